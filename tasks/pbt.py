"""Prefect tasks of population based training: check the population, one generation, register the
best member, log the lineage.

    from grpo_pipeline.tasks.pbt import pbt_generation
    record = pbt_generation.fn(spec, trials, 1, dataset_ref, member_runs, parent_run_id, uri)

Each task is one call of `grpo.stages.pbt`. A generation is retryable: a retry (or a resumed
sweep) starts from the population saved after the previous generation, and a generation already
saved is read back instead of trained again.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from grpo.data import DatasetRef
from grpo.stages import pbt as stage
from grpo.stages.pbt import GenerationRecord
from grpo.stages.registry import Registration
from grpo.stages.sweep import Trial
from grpo.sweep import SweepSpec
from grpo_pipeline.tasks.retry import RETRY_OPTIONS


@task(name="check-population", cache_policy=NO_CACHE)
def check_population(spec: SweepSpec, trials: list[Trial]) -> None:
    """One line for a population that cannot be trained here (no retries)."""
    stage.check_population(spec, trials)


@task(name="pbt-generation", task_run_name="pbt-generation-{generation}", **RETRY_OPTIONS)
def pbt_generation(
    spec: SweepSpec, trials: list[Trial], generation: int, dataset_ref: DatasetRef, member_runs: list[str],
    parent_run_id: str, tracking_uri: str, base: str | None = None,
) -> GenerationRecord:
    """Train, evaluate, select and mutate; save the population after this generation."""
    return stage.run_generation(spec, trials, generation, dataset_ref, member_runs, parent_run_id, tracking_uri,
                                base=base)


@task(name="register-best-member", **RETRY_OPTIONS)
def register_best_member(
    spec: SweepSpec, trials: list[Trial], record: GenerationRecord, dataset_ref: DatasetRef,
    member_runs: list[str], tracking_uri: str, flow_run_id: str | None, base: str | None = None,
) -> tuple[int, Registration]:
    """Register the last generation's best member from its child run."""
    return stage.register_best(spec, trials, record, dataset_ref, member_runs, tracking_uri, flow_run_id, base=base)


@task(name="log-lineage", **RETRY_OPTIONS)
def log_lineage(
    tracking_uri: str, parent_run_id: str, spec: SweepSpec, trials: list[Trial], records: list[GenerationRecord]
) -> None:
    """The lineage table and plot on the parent run."""
    stage.log_lineage(tracking_uri, parent_run_id, spec, trials, records)
