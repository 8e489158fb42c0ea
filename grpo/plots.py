"""Curves of one run: train reward and held-out accuracy against step, as a matplotlib Figure.

The finetune flow logs the figure as an MLflow image artifact when a run ends (`grpo.stages.runs.close_run`):

    from grpo.plots import plot_run_curves
    fig = plot_run_curves(history, evals, title=cfg.name)   # history: trainer step metrics
    tracking.log_figure(uri, run_id, fig, "plots/curves.png")   # grpo.tracking

Figures are built with the Agg canvas directly (no pyplot state, no display needed), so this works
in worker processes and tests. Nothing here departs from the paper; it only draws what was logged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _get(item: Any, key: str) -> Any:
    """Read `key` from a mapping or an attribute of an object (e.g. an `EvalResult`)."""
    if isinstance(item, Mapping):
        return item.get(key)
    return getattr(item, key, None)


def _xy(items: Sequence[Any], key: str) -> tuple[list[float], list[float]]:
    """Points (step, value) for `key`, sorted by step, skipping items without either."""
    pts = sorted(
        (float(_get(it, "step")), float(_get(it, key)))
        for it in items
        if _get(it, "step") is not None and _get(it, key) is not None
    )
    return [p[0] for p in pts], [p[1] for p in pts]


def new_figure(width: float = 10.0, height: float = 4.0) -> Figure:
    """A Figure with an Agg canvas attached (savefig works without pyplot)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_run_curves(
    history: Sequence[Mapping[str, Any]],
    evals: Sequence[Any],
    *,
    title: str | None = None,
    reward_key: str = "reward_mean",
    accuracy_key: str = "accuracy",
) -> Figure:
    """Train reward (left) and held-out accuracy (right) against step for one run.

    history: the trainer's per-step metrics, each with `step` and `reward_key` (e.g. the list
        `GRPOTrainer.train` returns, or `{"step": s, "reward_mean": v}` rows read back from MLflow).
    evals: evaluation results, each with `step` and `accuracy_key` (`grpo.evaluate.EvalResult`
        objects or mappings such as `{"step": 10, "accuracy": 0.25}`).
    Empty inputs give empty panels with a note, never an error.
    """
    fig = new_figure()
    ax_r, ax_a = fig.subplots(1, 2)
    xs, ys = _xy(history, reward_key)
    if xs:
        ax_r.plot(xs, ys, marker="." if len(xs) < 50 else None, color="tab:blue")
    else:
        ax_r.text(0.5, 0.5, "no train steps logged", ha="center", va="center", transform=ax_r.transAxes)
    ax_r.set_xlabel("step")
    ax_r.set_ylabel(f"train {reward_key}")
    ax_r.set_title("train reward")
    ax_r.grid(alpha=0.3)

    xs, ys = _xy(evals, accuracy_key)
    if xs:
        ax_a.plot(xs, ys, marker="o", color="tab:green")
        ax_a.set_ylim(-0.02, max(1.0, max(ys)) + 0.02)
    else:
        ax_a.text(0.5, 0.5, "no evaluations logged", ha="center", va="center", transform=ax_a.transAxes)
    ax_a.set_xlabel("step")
    ax_a.set_ylabel(f"eval {accuracy_key}")
    ax_a.set_title("held-out accuracy (greedy)")
    ax_a.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def plot_accuracy_vs_time(points: Sequence[Mapping[str, Any]], *, title: str | None = None) -> Figure:
    """Held-out accuracy (greedy, and sampled where measured) against minutes since the run
    started, across the warm start and the GRPO rounds. Each point: `minutes`, `accuracy`,
    optional `sampled_accuracy`, `label` (e.g. "warm start", "round 1")."""
    fig = new_figure(8.0, 4.5)
    ax = fig.subplots()
    pts = sorted(points, key=lambda p: p["minutes"])
    xs = [p["minutes"] for p in pts]
    ax.plot(xs, [p["accuracy"] for p in pts], marker="o", color="tab:green", label="greedy")
    sampled = [(p["minutes"], p["sampled_accuracy"]) for p in pts if p.get("sampled_accuracy") is not None]
    if sampled:
        ax.plot(*zip(*sampled), marker="s", color="tab:orange", label="sampled (temperature of training)")
    for p in pts:
        if p.get("label"):
            ax.annotate(p["label"], (p["minutes"], p["accuracy"]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xlabel("minutes since the run started")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    if title:
        ax.set_title(title)
    return fig
