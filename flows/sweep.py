"""The sweep flow (`grpo-sweep`): one finetune flow run per trial under one parent MLflow run, a
results table and plot, then the promote flow for the best trial's best version.

    from grpo.sweep import load_sweep
    from grpo_pipeline.flows.sweep import sweep
    summary = sweep(spec=load_sweep("configs/sweep-tiny.yaml"))   # SweepSummary; or `grpo sweep`

The spec (`grpo.sweep.SweepSpec`) is the flow parameter, so the Prefect UI shows it as a form.
Each trial is a `grpo-finetune` flow run named `<sweep>-<index>` whose MLflow run is a child of the
sweep's parent run (docs/sweeps.md). Without `spec.work_pool` the trials run one after another in
this process as subflows; with it (a Prefect server needed) each unfinished trial's child run is
opened here, then the trial is submitted as a run of the deployment `grpo-finetune/sweep-<pool>`
(created or updated here), at most `spec.max_concurrency` at once, and the flow waits for them: as
many train at once as the pool's workers take, each worker possibly on another machine. With
`strategy: pbt` the trials are the members of one population trained in this process instead
(`grpo_pipeline.flows.pbt`: one task per generation; the best member is promoted). A failed
trial does not stop the others: the results are logged, the parent run ends FAILED and the flow
fails in one line (`TrialsFailed`) without promoting. A retried flow run, or a new one with
`resume_run_id` (the parent run id; `grpo sweep --resume`), does not run the finished trials
again: it reads their results back and continues the unfinished ones from their checkpoints.
Artifacts: the parent run's link, a progress bar (trials done) and the results table (markdown).
When the flow fails or crashes, its state hooks mark the parent MLflow run FAILED.
"""

from __future__ import annotations

import os
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.runtime import flow_run
from pydantic import ValidationError

from grpo import reports, tracking
from grpo.errors import UserError
from grpo.stages import sweep as stage
from grpo.stages.sweep import SweepRun, SweepSummary, Trial, TrialResult
from grpo.sweep import SweepSpec
from grpo_pipeline.flows.finetune import _tag_flow_run, finetune
from grpo_pipeline.flows.pbt import run_population
from grpo_pipeline.flows.promote import promote
from grpo_pipeline.tasks.sweep import (
    close_sweep_run,
    deploy_trials,
    log_sweep_results,
    open_sweep_run,
    open_trial_run,
    plan_trials,
    submit_trial,
    trial_result,
    wait_for_trials,
)


def mark_sweep_run_failed(flow: Any, run: Any, state: Any) -> None:
    """State hook (on failure, on crash): the flow run's parent MLflow run ends FAILED."""
    from prefect.logging import get_logger

    logger = get_logger("grpo-sweep")
    try:
        spec = SweepSpec.model_validate(run.parameters.get("spec") or {})
        run_id = stage.fail_parent(spec, str(run.id))
    except (UserError, ValidationError) as e:
        logger.warning("flow run %s %s; its parent MLflow run could not be marked FAILED: %s",
                       run.id, state.type.value, " ".join(str(e).split()))
        return
    if run_id is not None:
        logger.info("parent MLflow run %s marked FAILED (flow run %s)", run_id, state.type.value)


def _exception(state: Any) -> BaseException | None:
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as e:  # noqa: BLE001 - the result itself may fail to load
        return e
    return exc if isinstance(exc, BaseException) else None


def run_here(
    spec: SweepSpec, trials: list[Trial], parent: SweepRun, progress_id: Any
) -> tuple[list[TrialResult], dict[int, str]]:
    """Every trial in this process, one after another, as a finetune subflow: (results, failures)."""
    logger = get_run_logger()
    uri = parent.tracking_uri
    results, failures = [], {}
    for trial in trials:
        child = open_trial_run(spec, trial, parent.run_id, uri)
        error = None
        if child.finished:
            logger.info("trial %d (%s) finished in an earlier attempt: MLflow run %s, not run again",
                        trial.index, trial.run_name, child.run_id)
        else:
            logger.info("trial %d (%s): %s", trial.index, trial.run_name, stage.describe(trial.params))
            state = finetune.with_options(flow_run_name=trial.run_name)(
                config=trial.config, resume_run_id=child.run_id, return_state=True
            )
            if not state.is_completed():
                error = stage.failure_line(_exception(state))
            elif getattr(state.result(), "run_id", child.run_id) != child.run_id:
                # A retried flow run whose subflow calls do not line up with the first attempt's,
                # with results persisted: Prefect handed back another trial's finished subflow run.
                error = ("Prefect returned an earlier subflow run instead of running this trial; run the "
                         f"sweep again as a new flow run with --resume {parent.run_id}")
            if error is not None:
                failures[trial.index] = error
                logger.error("trial %d failed: %s", trial.index, error)
        results.append(trial_result(uri, trial, child.run_id, spec.metric, child.finished, error))
        update_progress_artifact(progress_id, progress=100.0 * (trial.index + 1) / len(trials))

    return results, failures


def run_on_pool(
    spec: SweepSpec, trials: list[Trial], parent: SweepRun, progress_id: Any, deployment: str
) -> tuple[list[TrialResult], dict[int, str]]:
    """Every unfinished trial as a run of `deployment` on `spec.work_pool`, at most
    `spec.max_concurrency` in flight, waiting for all: (results, failures). Each trial's child
    MLflow run is opened here just before it is submitted, so its worker continues that run
    (`resume_run_id`); a trial finished in an earlier attempt is read back, not submitted."""
    logger = get_run_logger()
    uri = parent.tracking_uri
    limit = spec.max_concurrency or len(trials)
    logger.info("sweep %s: trials go to work pool %r (deployment %s), at most %d at once",
                spec.name, spec.work_pool, deployment, limit)
    done: dict[int, TrialResult] = {}
    failures: dict[int, str] = {}
    pending = list(trials)
    in_flight: dict[str, tuple[Trial, Any]] = {}
    while pending or in_flight:
        while pending and len(in_flight) < limit:
            trial = pending.pop(0)
            child = open_trial_run(spec, trial, parent.run_id, uri)
            if child.finished:
                logger.info("trial %d (%s) finished in an earlier attempt: MLflow run %s, not run again",
                            trial.index, trial.run_name, child.run_id)
                done[trial.index] = trial_result(uri, trial, child.run_id, spec.metric, True)
                update_progress_artifact(progress_id, progress=100.0 * len(done) / len(trials))
                continue
            flow_run_id = submit_trial(deployment, trial, child.run_id, uri, os.getcwd())
            logger.info("trial %d (%s): %s, flow run %s", trial.index, trial.run_name,
                        stage.describe(trial.params), flow_run_id)
            in_flight[flow_run_id] = (trial, child)
        if not in_flight:
            continue
        for flow_run_id, error in wait_for_trials(list(in_flight)).items():
            trial, child = in_flight.pop(flow_run_id)
            if error is not None:
                failures[trial.index] = error
                logger.error("trial %d failed: %s", trial.index, error)
            done[trial.index] = trial_result(uri, trial, child.run_id, spec.metric, False, error)
            update_progress_artifact(progress_id, progress=100.0 * len(done) / len(trials))
    return [done[trial.index] for trial in trials], failures


@flow(name="grpo-sweep", on_failure=[mark_sweep_run_failed], on_crashed=[mark_sweep_run_failed])
def sweep(spec: SweepSpec, resume_run_id: str | None = None) -> SweepSummary:
    """Run every trial of `spec` as a finetune flow run (a subflow here, or a deployment run on
    `spec.work_pool`) under one parent MLflow run, log the results on it, and (with `spec.promote`)
    promote the best trial's best version if it beats the champion.

    `resume_run_id` continues an earlier sweep of the same spec (its parent run id): finished
    trials are not run again."""
    logger = get_run_logger()
    flow_run_id = str(flow_run.id) if flow_run.id else None
    trials = plan_trials(spec)
    # With a work pool: a Prefect server, the pool and the trials' deployment, before any MLflow run.
    deployment = deploy_trials(spec) if spec.work_pool is not None else None
    first = trials[0].config
    uri = tracking.resolve_tracking_uri(first.pipeline.tracking_uri)
    parent = open_sweep_run(spec, uri, flow_run_id, resume_run_id)
    _tag_flow_run(flow_run_id, [f"mlflow_run_id:{parent.run_id}"])
    url, note = reports.mlflow_pointer(uri, parent.experiment_id, parent.run_id)
    if url:
        create_link_artifact(link=url, link_text=f"MLflow parent run {parent.run_id}", key="mlflow-run")
    else:
        create_markdown_artifact(markdown=note, key="mlflow-run", description="Where the parent MLflow run is")
    logger.info("sweep %s: %d trials, parent MLflow run %s (experiment %s%s)", spec.name, len(trials),
                parent.run_id, parent.experiment, ", resumed" if parent.resumed else "")
    progress_id = create_progress_artifact(
        progress=0.0, key="grpo-sweep-progress", description=f"trials done of {len(trials)}"
    )

    if spec.strategy == "pbt":
        results, best = run_population(spec, trials, parent, progress_id, flow_run_id)
        failures: dict[int, str] = {}
    elif deployment is None:
        results, failures = run_here(spec, trials, parent, progress_id)
        best = stage.best_trial(results)
    else:
        results, failures = run_on_pool(spec, trials, parent, progress_id, deployment)
        best = stage.best_trial(results)

    log_sweep_results(uri, parent.run_id, spec, results)
    summary = SweepSummary(
        name=spec.name, parent_run_id=parent.run_id, experiment=parent.experiment,
        experiment_id=parent.experiment_id, tracking_uri=uri, flow_run_id=flow_run_id, metric=spec.metric,
        parameters=list(spec.parameters), trials=results, best_trial=best.index if best else None,
    )
    if failures:
        create_markdown_artifact(markdown=stage.results_markdown(summary), key="grpo-sweep",
                                 description="One row per trial")
        close_sweep_run(uri, parent.run_id, "FAILED")
        raise stage.trials_failed(spec, parent.run_id, failures, len(trials))

    if spec.promote and best is not None and best.best_version is not None:
        logger.info("best: trial %d, %s %.4f; promoting %s v%s", best.index, spec.metric, best.best,
                    best.model_name, best.best_version)
        summary.promotion = promote(
            model_name=best.model_name, version=int(best.best_version), config=trials[best.index].config
        )
    elif spec.promote:
        logger.warning("no trial registered a version with %s logged: nothing to promote", spec.metric)
    create_markdown_artifact(markdown=stage.results_markdown(summary), key="grpo-sweep",
                             description="One row per trial, the best trial and the promotion")
    close_sweep_run(uri, parent.run_id, "FINISHED", summary.promotion)
    return summary
