"""Compare the runs of one MLflow experiment: a table of what differs and how each run did, and a plot.

    grpo compare [--experiment grpo-countdown] [--tracking-uri URI] [--out compare.png]
    grpo compare --parent RUN_ID          # the child runs of a sweep's parent run (its trials)
    grpo compare --sweep NAME             # the same for the newest sweep named NAME in --experiment

or from Python:

    from grpo.compare import compare_runs, format_table, plot_runs
    df = compare_runs("http://127.0.0.1:5000", "grpo-countdown")
    trials = compare_runs("http://127.0.0.1:5000", None, parent_run_id="<parent run id>")
    print(format_table(df)); plot_runs("http://127.0.0.1:5000", "grpo-countdown", "compare.png", df)

One row per run: run name and id, the config values (MLflow params) that differ between the runs,
best and final held-out accuracy (metric `eval/accuracy`), steps (last step of `reward_mean`), wall
time, and the registered model versions created from the run. The plot draws eval accuracy and
train reward against step for the same runs. Works the same against a local sqlite URI and an
`mlflow server`. Pure: MLflow through `grpo.tracking` only, no Prefect.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from grpo import tracking
from grpo.errors import ConfigError, TrackingError, UserError
from grpo.plots import new_figure
from grpo.tracking import check_tracking, resolve_tracking_uri

ACCURACY_METRIC = "eval/accuracy"
REWARD_METRIC = "reward_mean"
# Columns that always come first / last; the differing params sit between them.
LEAD_COLUMNS = ["run_name", "run_id"]
RESULT_COLUMNS = ["best_accuracy", "final_accuracy", "steps", "wall_time_s", "status", "registered_versions"]


def _uri(tracking_uri: str | None) -> str:
    """The tracking URI (None: $MLFLOW_TRACKING_URI, else ./mlflow.db); a server that does not
    answer fails here, in one line, instead of after MLflow's retries."""
    uri = resolve_tracking_uri(tracking_uri)
    check_tracking(uri)
    return uri


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) points of one metric, sorted by step then timestamp (last write wins)."""
    ms = tracking.metric_history(uri, run_id, key)
    return [(m.step, m.value) for m in sorted(ms, key=lambda m: (m.step, m.timestamp))]


def _runs(
    uri: str, experiment: str | None, run_ids: list[str] | None, parent_run_id: str | None = None
) -> list[Any]:
    if parent_run_id is not None:
        runs = tracking.child_runs(uri, parent_run_id)
        if not runs:
            raise TrackingError(
                f"MLflow run {parent_run_id} has no child runs; pass the parent run id of a sweep "
                "(`grpo sweep` prints it; tag grpo.sweep=parent in the MLflow UI)"
            )
    else:
        runs = tracking.experiment_runs(uri, str(experiment)) if experiment else None
        if runs is None:
            raise TrackingError(
                f"experiment {experiment!r} not found at {uri}; pass --experiment NAME (see the MLflow UI)"
            )
    if run_ids is not None:
        wanted = set(run_ids)
        runs = [r for r in runs if r.info.run_id in wanted]
    return runs


def differing_params(params: list[dict[str, str]]) -> list[str]:
    """Keys whose value is not the same in every run (a key missing from a run counts as differing)."""
    keys = sorted(set().union(*params)) if params else []
    return [k for k in keys if len({p.get(k) for p in params}) > 1]


def _registered_versions(uri: str, run_id: str) -> str:
    return ", ".join(sorted(f"{v.name} v{v.version}" for v in tracking.run_versions(uri, run_id)))


def compare_runs(
    tracking_uri: str | None,
    experiment: str | None,
    run_ids: list[str] | None = None,
    parent_run_id: str | None = None,
) -> pd.DataFrame:
    """One row per run of `experiment` (oldest first); see the module docstring for the columns.
    With `parent_run_id`, the runs are that run's children instead (a sweep's trials, tag
    `mlflow.parentRunId`), wherever `experiment` points.

    Missing values (a run without evaluations, a run still running) are NaN / None.
    Raises `TrackingError` when the server does not answer, the experiment does not exist, or the
    parent run does not exist or has no children.
    """
    uri = _uri(tracking_uri)
    runs = _runs(uri, experiment, run_ids, parent_run_id)
    params = [dict(r.data.params) for r in runs]
    diff = differing_params(params) if len(runs) > 1 else []
    rows = []
    for run, p in zip(runs, params):
        info = run.info
        acc = _history(uri, info.run_id, ACCURACY_METRIC)
        reward = _history(uri, info.run_id, REWARD_METRIC)
        row: dict[str, Any] = {"run_name": info.run_name, "run_id": info.run_id}
        row.update({k: p.get(k) for k in diff})
        row["best_accuracy"] = max(v for _, v in acc) if acc else math.nan
        row["final_accuracy"] = acc[-1][1] if acc else math.nan
        row["steps"] = max(s for s, _ in reward) if reward else None
        row["wall_time_s"] = (
            (info.end_time - info.start_time) / 1000.0 if info.end_time and info.start_time else math.nan
        )
        row["status"] = info.status
        row["registered_versions"] = _registered_versions(uri, info.run_id)
        rows.append(row)
    return pd.DataFrame(rows, columns=LEAD_COLUMNS + diff + RESULT_COLUMNS)


def format_table(df: pd.DataFrame) -> str:
    """The comparison as a plain-text table (accuracies to 3 decimals, wall time to 1)."""
    if df.empty:
        return "(no runs)"
    out = df.copy()
    out["run_id"] = out["run_id"].str.slice(0, 8)
    for col in ("best_accuracy", "final_accuracy"):
        out[col] = out[col].map(lambda v: "-" if pd.isna(v) else f"{v:.3f}")
    out["wall_time_s"] = out["wall_time_s"].map(lambda v: "-" if pd.isna(v) else f"{v:.1f}")
    out["steps"] = out["steps"].map(lambda v: "-" if v is None or pd.isna(v) else str(int(v)))
    out["registered_versions"] = out["registered_versions"].map(lambda v: v or "-")
    return out.to_string(index=False)


def plot_runs(
    tracking_uri: str | None,
    experiment: str | None,
    out_png: str | Path,
    runs: pd.DataFrame | None = None,
    title: str | None = None,
) -> Path:
    """Write a PNG: eval accuracy (left) and train reward (right) against step, one line per run.

    `runs` is a frame from `compare_runs` (its run_id/run_name columns pick the runs); None
    compares every run of the experiment. `title` replaces "experiment NAME: N run(s)". Returns
    the PNG path.
    """
    uri = _uri(tracking_uri)
    if runs is None:
        runs = compare_runs(uri, experiment)
    fig = new_figure(12.0, 4.5)
    ax_a, ax_r = fig.subplots(1, 2)
    for run_id, name in zip(runs["run_id"], runs["run_name"]):
        label = f"{name} ({run_id[:8]})"
        acc = _history(uri, run_id, ACCURACY_METRIC)
        if acc:
            ax_a.plot([s for s, _ in acc], [v for _, v in acc], marker="o", label=label)
        reward = _history(uri, run_id, REWARD_METRIC)
        if reward:
            ax_r.plot([s for s, _ in reward], [v for _, v in reward], label=label)
    for ax, what in ((ax_a, f"eval accuracy ({ACCURACY_METRIC})"), (ax_r, f"train reward ({REWARD_METRIC})")):
        ax.set_xlabel("step")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title or f"experiment {experiment}: {len(runs)} run(s)")
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def run_curves_from_mlflow(tracking_uri: str | None, run_id: str, title: str | None = None) -> Any:
    """`grpo.plots.plot_run_curves` for a logged run, reading its metrics back from MLflow."""
    from grpo.plots import plot_run_curves

    uri = _uri(tracking_uri)
    history = [{"step": s, REWARD_METRIC: v} for s, v in _history(uri, run_id, REWARD_METRIC)]
    evals = [{"step": s, "accuracy": v} for s, v in _history(uri, run_id, ACCURACY_METRIC)]
    return plot_run_curves(history, evals, title=title)


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `grpo compare` (for a subparser of the main CLI)."""
    parser.add_argument("--experiment", default="grpo-countdown", help="MLflow experiment (default: %(default)s).")
    parser.add_argument(
        "--tracking-uri", default=None,
        help="MLflow URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).",
    )
    parser.add_argument(
        "--parent", default=None, metavar="RUN_ID",
        help="Compare the child runs of this MLflow run (a sweep's trials; `grpo sweep` prints the parent "
        "run id) instead of the whole experiment.",
    )
    parser.add_argument(
        "--sweep", default=None, metavar="NAME",
        help="Compare the trials (or PBT members) of the newest sweep named NAME in --experiment.",
    )
    parser.add_argument("--out", default="compare.png", help="PNG of the curves (default: %(default)s).")
    parser.add_argument("--no-plot", action="store_true", help="Print the table only.")


def sweep_parent(tracking_uri: str | None, experiment: str, name: str) -> str:
    """The parent run id of the newest sweep named `name` in `experiment`; `ConfigError` when none."""
    from grpo.stages.runs import SWEEP_TAG
    from grpo.stages.sweep import SWEEP_NAME_TAG

    found = tracking.find_runs(_uri(tracking_uri), experiment, {SWEEP_TAG: "parent", SWEEP_NAME_TAG: name})
    if not found:
        raise ConfigError(
            f"--sweep {name}: experiment {experiment!r} has no sweep of that name; pass the sweep's name from "
            "its spec (and its experiment with --experiment), or its parent run id with --parent"
        )
    return str(found[-1].info.run_id)


def run_compare(args: argparse.Namespace) -> int:
    """Print the table and write the PNG; raises `TrackingError` (a `UserError`) on server problems."""
    parent = getattr(args, "parent", None)
    if getattr(args, "sweep", None) is not None:
        if parent is not None:
            raise ConfigError("--sweep and --parent both name a sweep; pass one of them")
        parent = sweep_parent(args.tracking_uri, args.experiment, args.sweep)
    df = compare_runs(args.tracking_uri, args.experiment, parent_run_id=parent)
    print(format_table(df))
    if not args.no_plot and not df.empty:
        title = f"children of MLflow run {parent}: {len(df)} run(s)" if parent else None
        path = plot_runs(args.tracking_uri, args.experiment, args.out, df, title=title)
        print(f"curves: {path}")
    return 0


def main_compare(argv: list[str] | None = None) -> int:
    """`grpo compare ...` with its own parser: prints the table, writes the PNG, returns 0.

    A `UserError` (server down, unknown experiment) propagates for the caller to print; run as
    `python -m grpo.compare` it is printed as one line with exit status 2.
    """
    parser = argparse.ArgumentParser(
        prog="grpo compare",
        description="Compare the runs of an MLflow experiment, or the child runs of a sweep (--parent).",
    )
    add_compare_arguments(parser)
    return run_compare(parser.parse_args(argv))


if __name__ == "__main__":
    try:
        sys.exit(main_compare())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
