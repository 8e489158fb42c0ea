"""Markdown for the pipeline's artifacts (Prefect markdown artifacts, the CLI's pointers): the run
summary, the learning report, the promotion decision and where to find an MLflow run.

    from grpo import reports
    text = reports.summary_markdown(summary)            # a RunSummary: one table row per round
    url, note = reports.mlflow_pointer(uri, experiment_id, run_id)

Pure formatting: every value comes from a stage's typed result; nothing here reads a store.
"""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from grpo.evaluate import EvalResult
    from grpo.stages.registry import PromotionDecision
    from grpo.stages.runs import RunSummary

SUMMARY_COLUMNS = ("round", "step", "train_reward", "eval_accuracy", "eval_format_rate", "elite", "version")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def summary_markdown(summary: RunSummary, title: str | None = None) -> str:
    """A markdown table, one row per round: step, train reward, eval accuracy, elite, version."""
    lines = [
        f"## {title or f'GRPO run {summary.name} ({summary.run_id})'}",
        "",
        "| round | step | train reward | eval accuracy | format rate | elite | version |",
        "|---:|---:|---:|---:|---:|:---:|---:|",
    ]
    for row in summary.rounds:
        lines.append("| " + " | ".join(_fmt(getattr(row, k)) for k in SUMMARY_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def learning_markdown(
    baseline: EvalResult, rounds: list[EvalResult], paired: dict[str, float], start: float, title: str = ""
) -> str:
    """Baseline vs each round (minutes since `start`, greedy and sampled accuracy) and the paired
    McNemar comparison of the final adapter with the baseline."""

    def row(r: EvalResult) -> str:
        sampled = "-"
        if r.sampled_accuracy is not None:
            sampled = f"{r.sampled_accuracy:.3f} ± {r.sampled_accuracy_se:.3f}"
        return f"| {r.step} | {(r.finished_at - start) / 60:.1f} | {r.accuracy:.3f} ± {r.accuracy_se:.3f} | {sampled} |"

    lines = [
        f"## Learning: baseline vs final adapter {title}".rstrip(), "",
        "| step | minutes | greedy accuracy | sampled accuracy |", "|---:|---:|---:|---:|",
        row(baseline), *(row(r) for r in rounds), "",
        f"Paired (McNemar) on {rounds[-1].n} held-out problems: {paired['gained']} gained, "
        f"{paired['lost']} lost, z = {paired['z']:.2f} (z > 2: a real gain).",
    ]
    return "\n".join(lines)


def promotion_markdown(d: PromotionDecision) -> str:
    """The promotion decision as markdown."""
    champ = "none" if d.champion_before is None else f"v{d.champion_before}"
    lines = [
        f"## Promotion of `{d.model_name}` @{d.alias}: {d.decision}",
        "",
        "| | version | held-out accuracy |",
        "|---|---:|---:|",
        f"| candidate | v{d.candidate} | {_fmt(d.candidate_accuracy)} |",
        f"| champion before | {champ} | {_fmt(d.champion_accuracy)} |",
        "",
        f"{d.reason}; {d.n} problems from `{d.test_path}`.",
        f"Now `{d.model_uri}` -> v{d.champion}.",
    ]
    if d.mcnemar:
        m = d.mcnemar
        lines.append(f"Paired: gained {m['gained']}, lost {m['lost']}, z = {m['z']:.2f}.")
    return "\n".join(lines) + "\n"


def mlflow_pointer(tracking_uri: str, experiment_id: str, run_id: str) -> tuple[str | None, str]:
    """(UI URL of the run when the tracking URI is a server, else None; a markdown note)."""
    if tracking_uri.startswith(("http://", "https://")):
        url = f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
        return url, f"MLflow run [{run_id}]({url})"
    note = (
        f"MLflow run `{run_id}` (experiment id {experiment_id}) in `{tracking_uri}`.\n\n"
        f"Open it with:\n\n```\n{mlflow_ui_command(tracking_uri)}\n```\n"
    )
    return None, note


def mlflow_ui_command(tracking_uri: str) -> str:
    """The shell command that opens a local store in the MLflow UI (the URI quoted for the shell)."""
    return f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)}"
