"""Population based training inside the `grpo-sweep` flow (`strategy: pbt`): the dataset, the
optional warm start, one task per generation, the best member registered, the lineage logged.

    # in the sweep flow, after the parent MLflow run is open:
    results, best = run_population(spec, trials, parent, progress_id, flow_run_id)

The members are the sweep's trials (their initial values drawn from the spec) and train in this
process on one base model (`grpo.pbt`). The dataset is prepared once and the warm start
(`sft.enabled`) runs once, on the parent run, so every member starts from the same model. Each
generation is a retryable `pbt-generation` task: a retry, or a new flow run with the parent's id
(`grpo sweep --resume`), continues from the population saved after the last finished generation.
The last generation's best member is registered from its child run; the sweep flow then promotes it
through the promote flow's gate as it does a grid's best trial.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger
from prefect.artifacts import update_progress_artifact

from grpo.stages import pbt as stage
from grpo.stages import sweep as sweep_stage
from grpo.stages.sweep import SweepRun, Trial, TrialResult
from grpo.sweep import SweepSpec
from grpo_pipeline.tasks.data import prepare_dataset
from grpo_pipeline.tasks.pbt import check_population, log_lineage, pbt_generation, register_best_member
from grpo_pipeline.tasks.registry import close_run
from grpo_pipeline.tasks.sweep import open_trial_run, trial_result
from grpo_pipeline.tasks.train import warm_start


def run_population(
    spec: SweepSpec, trials: list[Trial], parent: SweepRun, progress_id: Any, flow_run_id: str | None
) -> tuple[list[TrialResult], TrialResult]:
    """Train the population generation by generation: (one result per member, the registered best
    member's result). A generation that fails after its retries fails the flow (the population is
    one training: there is no partial result to keep going with)."""
    assert spec.pbt is not None
    logger = get_run_logger()
    uri = parent.tracking_uri
    check_population(spec, trials)
    dataset = prepare_dataset(trials[0].config)
    base = warm_start(trials[0].config, dataset, parent.run_id, uri) if trials[0].config.sft.enabled else None
    members = [open_trial_run(spec, trial, parent.run_id, uri) for trial in trials]
    member_runs = [m.run_id for m in members]
    logger.info("population of %d members, %d generations of %d steps each; members: %s", len(trials),
                spec.pbt.generations, spec.pbt.steps_per_generation,
                "; ".join(f"{t.run_name} {sweep_stage.describe(t.params)}" for t in trials))

    records = []
    for g in range(1, spec.pbt.generations + 1):
        records.append(pbt_generation(spec, trials, g, dataset, member_runs, parent.run_id, uri, base))
        logger.info(stage.generation_line(records[-1]))
        update_progress_artifact(progress_id, progress=100.0 * g / spec.pbt.generations,
                                 description=f"generations done of {spec.pbt.generations}")
    best, registration = register_best_member(spec, trials, records[-1], dataset, member_runs, uri, flow_run_id,
                                              base)
    logger.info("best member: %s (%s %.3f), registered version %s", trials[best].run_name, spec.metric,
                records[-1].fitness[best], registration.version)
    log_lineage(uri, parent.run_id, spec, trials, records)
    for trial, run_id in zip(trials, member_runs):
        close_run(uri, run_id, "FINISHED", trial.run_name)
    results = [trial_result(uri, trial, run_id, spec.metric) for trial, run_id in zip(trials, member_runs)]
    return results, results[best]
