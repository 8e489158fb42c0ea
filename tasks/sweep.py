"""Prefect tasks of a sweep: plan the trials, the parent and child MLflow runs, each trial's
results, the results table and plot, and closing the parent; with a work pool, the finetune
deployment on it, submitting trials as its flow runs and waiting for them.

    from grpo_pipeline.tasks.sweep import plan_trials
    trials = plan_trials.fn(spec)        # [Trial]: validated and preflighted, before any work

Each MLflow task is one call of `grpo.stages.sweep`. They are idempotent, so Prefect's retries
(and a retried sweep flow run) find the parent and the trials' child runs again instead of adding
runs. The work-pool tasks are Prefect's own business (the library has no Prefect): `deploy_trials`
creates or updates the deployment `grpo-finetune/sweep-<pool>` (a module entrypoint: each worker
imports the flow from its installed `grpo_pipeline`), `submit_trial` creates one flow run of it per
trial (`run_deployment`, a subflow of the sweep; an earlier attempt's run still in flight is taken
over instead of submitting a second one), and `wait_for_trials` polls until some have ended.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from grpo.errors import ConfigError
from grpo.stages import sweep as stage
from grpo.stages.registry import PromotionDecision
from grpo.stages.sweep import SweepRun, Trial, TrialResult, TrialRun
from grpo.sweep import SweepSpec
from grpo_pipeline.tasks.retry import RETRY_OPTIONS

FINETUNE_FLOW = "grpo-finetune"
FINETUNE_ENTRYPOINT = "grpo_pipeline.flows.finetune.finetune"
"""The finetune flow as workers import it (a module path: no code is copied to the workers)."""
TRIAL_RUN_TAG = "sweep_trial_run"
"""Tag prefix of a trial's flow run: `sweep_trial_run:<child MLflow run id>` finds it again."""
POLL_SECONDS = 5.0
"""How often `wait_for_trials` reads the trials' flow runs."""


def _logger() -> Any:
    """The task run's logger; a plain one when called outside a run (`task.fn(...)`)."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return get_logger("grpo-sweep")


def trial_deployment(pool: str) -> str:
    """The deployment (`flow/deployment`) that runs a sweep's trials on work pool `pool`."""
    return f"{FINETUNE_FLOW}/sweep-{pool}"


def check_work_pool_api(spec: SweepSpec) -> str | None:
    """The Prefect API URL the trials go through, or None when the spec names no work pool.
    A `ConfigError` of one line when it names one but no Prefect server is configured (Prefect
    would start a temporary server inside this process, which no worker can reach)."""
    if spec.work_pool is None:
        return None
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise ConfigError(
            f"work_pool: {spec.work_pool!r} needs a Prefect server that its workers reach, and PREFECT_API_URL "
            "is not set (Prefect would run a temporary server in this process); start `prefect server start` "
            "and set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api), or remove work_pool to run the trials "
            "here one after another"
        )
    return str(url)


@task(name="deploy-trials", **RETRY_OPTIONS)
def deploy_trials(spec: SweepSpec) -> str:
    """Create or update the finetune deployment on `spec.work_pool` (checked: a Prefect server,
    the pool exists); its name. Warns when no worker polls the pool yet (the trials wait for one)."""
    from prefect import get_client
    from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus
    from prefect.deployments.runner import RunnerDeployment
    from prefect.exceptions import ObjectNotFound

    url = check_work_pool_api(spec)
    pool = str(spec.work_pool)
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            raise ConfigError(
                f"work_pool: no work pool {pool!r} on the Prefect server at {url}; create it with "
                f"`prefect work-pool create {pool} --type process` and start workers with "
                f"`prefect worker start --pool {pool} --limit 1`"
            ) from None
        online = client.read_workers_for_work_pool(
            pool, worker_filter=WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"]))
        )
    if not online:
        _logger().warning("no worker polls work pool %r yet: the trials wait until one starts "
                                 "(`prefect worker start --pool %s --limit 1`)", pool, pool)
    name = trial_deployment(pool)
    deployment = RunnerDeployment.from_entrypoint(
        FINETUNE_ENTRYPOINT, name=name.split("/", 1)[1], work_pool_name=pool, tags=["grpo", "sweep"],
        description=f"The trials of sweeps on work pool {pool} (created by the grpo-sweep flow).",
    )
    deployment.apply(work_pool_name=pool)
    return name


def _active_run(client: Any, tag: str) -> str | None:
    """The id of a flow run tagged `tag` that has not ended (an earlier attempt's), else None."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType

    live = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED, StateType.CANCELLING]
    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
        tags=FlowRunFilterTags(all_=[tag]), state=FlowRunFilterState(type=FlowRunFilterStateType(any_=live)),
    ))
    return str(runs[0].id) if runs else None


@task(name="submit-trial", task_run_name="submit-trial-{trial.index}", **RETRY_OPTIONS)
def submit_trial(deployment: str, trial: Trial, run_id: str, tracking_uri: str, working_dir: str) -> str:
    """Create the trial's flow run of `deployment` (config + `resume_run_id` of its child MLflow
    run) and return its id at once; a flow run of this trial still in flight is returned instead.
    Workers run it in `working_dir` with MLFLOW_TRACKING_URI=`tracking_uri`."""
    from prefect import get_client
    from prefect.deployments import run_deployment

    tag = f"{TRIAL_RUN_TAG}:{run_id}"
    with get_client(sync_client=True) as client:
        found = _active_run(client, tag)
    if found is not None:
        _logger().info("trial %d: its flow run %s from an earlier attempt is still in flight; waiting for it",
                       trial.index, found)
        return found
    run = run_deployment(
        deployment, parameters={"config": trial.config.model_dump(mode="json"), "resume_run_id": run_id},
        flow_run_name=trial.run_name, timeout=0, as_subflow=True, tags=["grpo", "sweep", tag],
        job_variables={"working_dir": working_dir, "env": {"MLFLOW_TRACKING_URI": tracking_uri}},
    )
    return str(run.id)


def _failure(run: Any) -> str:
    """A trial's flow run that did not complete, as one line (its state and message)."""
    state = run.state
    message = " ".join(str(state.message or "").split()).removeprefix("Flow run encountered an exception: ")
    return f"flow run {run.name} {state.type.value}" + (f": {message}" if message else "")


@task(name="wait-for-trials", **RETRY_OPTIONS)
def wait_for_trials(flow_run_ids: list[str], poll_seconds: float = POLL_SECONDS) -> dict[str, str | None]:
    """Poll the flow runs until at least one has ended; {flow run id: None (completed) or its
    failure as one line} for those that have."""
    from uuid import UUID

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    ids = [UUID(i) for i in flow_run_ids]
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
        ended = {str(r.id): None if r.state.is_completed() else _failure(r)
                 for r in runs if r.state is not None and r.state.is_final()}
        if ended:
            return ended
        time.sleep(poll_seconds)


@task(name="plan-trials", cache_policy=NO_CACHE)
def plan_trials(spec: SweepSpec) -> list[Trial]:
    """The trials' configs, each through the finetune preflight: fail before any work, in one line
    (no retries: a bad spec does not heal by waiting)."""
    return stage.plan(spec)


@task(name="open-sweep-run", **RETRY_OPTIONS)
def open_sweep_run(
    spec: SweepSpec, tracking_uri: str, flow_run_id: str | None = None, resume_run_id: str | None = None
) -> SweepRun:
    """The sweep's parent MLflow run (found again on a retry, or `resume_run_id`)."""
    return stage.open_parent(spec, tracking_uri, flow_run_id, resume_run_id)


@task(name="open-trial-run", task_run_name="open-trial-run-{trial.index}", **RETRY_OPTIONS)
def open_trial_run(spec: SweepSpec, trial: Trial, parent_run_id: str, tracking_uri: str) -> TrialRun:
    """The trial's child MLflow run: created, or found again (finished: the trial is not rerun)."""
    return stage.open_trial_run(spec, trial, parent_run_id, tracking_uri)


@task(name="trial-result", task_run_name="trial-result-{trial.index}", **RETRY_OPTIONS)
def trial_result(
    tracking_uri: str, trial: Trial, run_id: str, metric: str, reused: bool = False, error: str | None = None
) -> TrialResult:
    """The trial's row of the results table, read back from its child run."""
    return stage.trial_result(tracking_uri, trial, run_id, metric, reused, error)


@task(name="log-sweep-results", **RETRY_OPTIONS)
def log_sweep_results(tracking_uri: str, parent_run_id: str, spec: SweepSpec, results: list[TrialResult]) -> None:
    """The results table, the plot and the per-trial metrics on the parent run."""
    stage.log_results(tracking_uri, parent_run_id, spec, results)


@task(name="close-sweep-run", **RETRY_OPTIONS)
def close_sweep_run(
    tracking_uri: str, run_id: str, status: str = "FINISHED", promotion: PromotionDecision | None = None
) -> None:
    """Record the promotion on the parent run and end it with `status`."""
    stage.close_parent(tracking_uri, run_id, status, promotion)
