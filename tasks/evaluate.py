"""Prefect tasks of the evaluation stage: a checkpoint of the run, or a registered version.

    from grpo_pipeline.tasks.evaluate import evaluate
    result = evaluate.fn(cfg, ckpt_ref, dataset_ref, run_id, tracking_uri)   # EvalResult

Metrics go to the MLflow run at the checkpoint's step (once, even when retried) with a table of
sample completions.
"""

from __future__ import annotations

from prefect import task

from grpo.checkpoint import CheckpointRef
from grpo.config import EvalConfig, RunConfig
from grpo.data import DatasetRef
from grpo.evaluate import EvalResult
from grpo.stages import evaluate as stage
from grpo.stages import registry
from grpo_pipeline.tasks.retry import RETRY_OPTIONS


@task(name="evaluate", task_run_name="evaluate-step-{ckpt_ref.step}", **RETRY_OPTIONS)
def evaluate(
    config: RunConfig, ckpt_ref: CheckpointRef, dataset_ref: DatasetRef, run_id: str, tracking_uri: str
) -> EvalResult:
    """Greedy held-out accuracy of a checkpoint, logged to the MLflow run."""
    return stage.evaluate_checkpoint(config, ckpt_ref, dataset_ref, run_id, tracking_uri)


@task(name="evaluate-baseline", **RETRY_OPTIONS)
def evaluate_baseline(config: RunConfig, dataset_ref: DatasetRef, run_id: str, tracking_uri: str) -> EvalResult:
    """Held-out accuracy of the policy GRPO starts from (step 0): the rounds' baseline."""
    return stage.evaluate_baseline(config, dataset_ref, run_id, tracking_uri)


@task(name="learning-report", **RETRY_OPTIONS)
def learning_report(
    tracking_uri: str, run_id: str, baseline: EvalResult, rounds: list[EvalResult], title: str = ""
) -> str:
    """Baseline vs final adapter (McNemar) and accuracy against wall clock, logged to MLflow."""
    return stage.learning_report(tracking_uri, run_id, baseline, rounds, title)


@task(name="evaluate-version", task_run_name="evaluate-version-{version}", **RETRY_OPTIONS)
def evaluate_version(
    tracking_uri: str,
    model_name: str,
    version: str,
    test_path: str,
    eval_config: EvalConfig | None = None,
    config: RunConfig | None = None,
) -> EvalResult:
    """Re-evaluate a registered version on a held-out split (for promotion)."""
    return registry.evaluate_version(tracking_uri, model_name, version, test_path, eval_config, config)
