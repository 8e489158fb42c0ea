"""Prefect tasks of a sweep: plan the trials, the parent and child MLflow runs, each trial's
results, the results table and plot, and closing the parent.

    from grpo_pipeline.tasks.sweep import plan_trials
    trials = plan_trials.fn(spec)        # [Trial]: validated and preflighted, before any work

Each task is one call of `grpo.stages.sweep`. They are idempotent, so Prefect's retries (and a
retried sweep flow run) find the parent and the trials' child runs again instead of adding runs.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from grpo.stages import sweep as stage
from grpo.stages.registry import PromotionDecision
from grpo.stages.sweep import SweepRun, Trial, TrialResult, TrialRun
from grpo.sweep import SweepSpec
from grpo_pipeline.tasks.retry import RETRY_OPTIONS


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
