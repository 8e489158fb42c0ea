"""Prefect tasks around MLflow: the run of a flow run, its summary rows, elite registration and
promotion decisions.

    from grpo_pipeline.tasks.registry import register_elite
    reg = register_elite.fn(cfg, ckpt_ref, eval_result, run_id, tracking_uri)   # Registration

`register_elite` is idempotent: a retried call finds the version registered for (run, step) by
its `elite_key` tag and never creates a second one.
"""

from __future__ import annotations

from prefect import task

from grpo.checkpoint import CheckpointRef
from grpo.config import RunConfig
from grpo.data import DatasetRef
from grpo.evaluate import EvalResult
from grpo.stages import registry, runs
from grpo.stages.registry import HeldOutSplit, PromotionCandidates, PromotionDecision, Registration
from grpo.stages.runs import RoundSummary, TrackedRun
from grpo_pipeline.tasks.retry import RETRY_OPTIONS


@task(name="open-mlflow-run", **RETRY_OPTIONS)
def open_run(
    config: RunConfig,
    tracking_uri: str,
    flow_run_id: str | None = None,
    resume_run_id: str | None = None,
    dataset: DatasetRef | None = None,
) -> TrackedRun:
    """The MLflow run of this flow run (found again when the flow run is retried; the interrupted
    run `resume_run_id` when given), with the prepared splits as its dataset inputs."""
    return runs.open_run(config, tracking_uri, flow_run_id, resume_run_id, dataset)


@task(name="close-mlflow-run", **RETRY_OPTIONS)
def close_run(tracking_uri: str, run_id: str, status: str = "FINISHED", title: str | None = None) -> None:
    """Log the curves and end the MLflow run with `status`."""
    runs.close_run(tracking_uri, run_id, status, title)


@task(name="round-summary", task_run_name="round-summary-step-{ckpt_ref.step}", **RETRY_OPTIONS)
def round_summary(
    tracking_uri: str,
    run_id: str,
    ckpt_ref: CheckpointRef,
    steps_per_round: int,
    eval_result: EvalResult,
    registration: Registration,
) -> RoundSummary:
    """The round's row of the run summary (mean train reward read back from MLflow)."""
    return runs.round_summary(tracking_uri, run_id, ckpt_ref, steps_per_round, eval_result, registration)


@task(name="register-elite", task_run_name="register-elite-step-{ckpt_ref.step}", **RETRY_OPTIONS)
def register_elite(
    config: RunConfig,
    ckpt_ref: CheckpointRef,
    eval_result: EvalResult,
    run_id: str,
    tracking_uri: str,
    flow_run_id: str | None = None,
    dataset_ref: DatasetRef | None = None,
) -> Registration:
    """Register the checkpoint when it beats the run's best so far (once per run and step)."""
    return registry.register_elite(config, ckpt_ref, eval_result, run_id, tracking_uri, flow_run_id, dataset_ref)


@task(name="promotion-candidates", **RETRY_OPTIONS)
def promotion_candidates(
    tracking_uri: str, model_name: str, version: int | None, alias: str, metric: str
) -> PromotionCandidates:
    """The candidate version (named, or best by `metric`) and the current holder of `alias`."""
    return registry.promotion_candidates(tracking_uri, model_name, version, alias, metric)


@task(name="held-out-split", **RETRY_OPTIONS)
def held_out(tracking_uri: str, model_name: str, version: str, config: RunConfig | None) -> HeldOutSplit:
    """The held-out split the candidate was evaluated on, and the eval settings to compare with."""
    return registry.held_out(tracking_uri, model_name, version, config)


@task(name="decide-promotion", **RETRY_OPTIONS)
def decide_promotion(
    tracking_uri: str,
    candidates: PromotionCandidates,
    candidate_result: EvalResult,
    champion_result: EvalResult | None,
    test_path: str,
) -> PromotionDecision:
    """Move the alias when the candidate is more accurate; tag both versions with the outcome."""
    return registry.decide_promotion(tracking_uri, candidates, candidate_result, champion_result, test_path)
