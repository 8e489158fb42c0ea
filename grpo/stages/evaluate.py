"""Evaluation stage: held-out accuracy of a checkpoint of the run or of the policy GRPO starts
from, logged to the MLflow run; the learning report comparing the final adapter with that start.

    from grpo.stages import evaluate
    result = evaluate.evaluate_checkpoint(cfg, ckpt, dataset_ref, run_id, uri)   # EvalResult
    base = evaluate.evaluate_baseline(cfg, dataset_ref, run_id, uri)             # step 0
    markdown = evaluate.learning_report(uri, run_id, base, [result], cfg.name)

Metrics are logged once per step (a retry logs nothing new), with a table of sample completions.
"""

from __future__ import annotations

from typing import Any

from grpo import reports, tracking
from grpo.checkpoint import CheckpointRef
from grpo.config import RunConfig
from grpo.data import DatasetRef, load_split
from grpo.evaluate import EvalResult, evaluate, mcnemar
from grpo.models import POLICY_CACHE, PolicyCache, cached_policy, load_policy


def samples_artifact(step: int) -> str:
    """Artifact path of the sample-completions table of the evaluation at `step`."""
    return f"eval/samples_step_{step:06d}.json"


def _evaluate_and_log(
    cfg: RunConfig, policy: tuple[Any, Any], dataset_ref: DatasetRef, step: int, run_id: str,
    tracking_uri: str, progress: bool,
) -> EvalResult:
    """Evaluate `policy` on the test split; log `eval/*` at `step` (once) and the sample table."""
    model, tokenizer = policy
    result = evaluate(model, tokenizer, load_split(dataset_ref.test_path), cfg, step=step, progress=progress)
    tracking.log_metrics(tracking_uri, run_id, result.metrics(), step=step, skip_logged=True)
    if result.samples:
        table = [{"step": step, **s} for s in result.samples]
        tracking.log_table(tracking_uri, run_id, table, samples_artifact(step))
    return result


def evaluate_checkpoint(
    cfg: RunConfig,
    ckpt_ref: CheckpointRef,
    dataset_ref: DatasetRef,
    run_id: str,
    tracking_uri: str,
    *,
    cache: PolicyCache = POLICY_CACHE,
    progress: bool = True,
) -> EvalResult:
    """Greedy held-out evaluation of a checkpoint; logs `eval/*` metrics at its step (once) and
    a table of sample completions (`eval/samples_step_000010.json`)."""
    policy = cached_policy(cfg, ckpt_ref.path, cache)
    return _evaluate_and_log(cfg, policy, dataset_ref, ckpt_ref.step, run_id, tracking_uri, progress)


def evaluate_baseline(
    cfg: RunConfig, dataset_ref: DatasetRef, run_id: str, tracking_uri: str, *, progress: bool = True
) -> EvalResult:
    """Held-out evaluation at step 0 of the policy GRPO starts from (e.g. the warm-started base
    with its fresh adapter, whose LoRA B is zero): the baseline the GRPO rounds are compared with.
    Logs `eval/*` at step 0 (once) and its sample table."""
    return _evaluate_and_log(cfg, load_policy(cfg), dataset_ref, 0, run_id, tracking_uri, progress)


def learning_report(
    tracking_uri: str, run_id: str, baseline: EvalResult, rounds: list[EvalResult], title: str = ""
) -> str:
    """Compare the final adapter with the baseline on the same problems (paired McNemar test),
    log `compare/*` metrics and an accuracy-against-wall-clock image; return markdown."""
    from grpo.plots import plot_accuracy_vs_time

    final = rounds[-1]
    paired = mcnemar(baseline.correct, final.correct)
    tracking.log_metrics(tracking_uri, run_id, {
        "compare/accuracy_gain": final.accuracy - baseline.accuracy,
        "compare/mcnemar_z": paired["z"], "compare/gained": paired["gained"], "compare/lost": paired["lost"],
        **({"compare/sampled_accuracy_gain": final.sampled_accuracy - baseline.sampled_accuracy}
           if final.sampled_accuracy is not None and baseline.sampled_accuracy is not None else {}),
    }, step=final.step, skip_logged=True)
    start = tracking.run_info(tracking_uri, run_id).start_time / 1000.0
    points = [
        {"minutes": (r.finished_at - start) / 60.0, "accuracy": r.accuracy,
         "sampled_accuracy": r.sampled_accuracy, "label": label}
        for label, r in [("baseline", baseline)] + [(f"step {r.step}", r) for r in rounds]
    ]
    tracking.log_figure(tracking_uri, run_id, plot_accuracy_vs_time(points, title=title),
                        "plots/accuracy_vs_time.png")
    return reports.learning_markdown(baseline, rounds, paired, start, title)
