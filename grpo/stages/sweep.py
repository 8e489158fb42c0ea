"""Sweep stage: the parent MLflow run of a sweep, one child run per trial, the results table and
plot, and what a retried sweep finds again.

    from grpo.stages import sweep as stage
    trials = stage.plan(spec)                                   # [Trial]; every config preflighted
    parent = stage.open_parent(spec, uri, flow_run_id)          # SweepRun (found again on a retry)
    child = stage.open_trial_run(spec, trials[0], parent.run_id, uri)   # TrialRun: run id, finished?
    # ... the finetune flow trains it: finetune(config=trials[0].config, resume_run_id=child.run_id)
    result = stage.trial_result(uri, trials[0], child.run_id, spec.metric)   # TrialResult
    stage.log_results(uri, parent.run_id, spec, [result])       # table + plot + metrics on the parent
    stage.close_parent(uri, parent.run_id, "FINISHED")

The `grpo-sweep` flow (`grpo_pipeline.flows.sweep`) sequences these. MLflow layout: one parent run
named after the sweep, in the base config's experiment, tagged `grpo.sweep=parent` and
`prefect_flow_run_id`, holding the spec (`sweep.*` params, `sweep.json`), the base config
(`base_config.json`), the results table (`sweep/results.json`), the plot of the metric against
each swept field (`sweep/metric_vs_params.png`) and `sweep/best`, `sweep/final` per trial (step =
trial index). Each trial is a child run (`mlflow.parentRunId`, `sweep_trial=<index>`) that this
stage creates with the trial's config as params and `config.json`, exactly as the finetune flow
would, and that the finetune flow then continues through its `resume_run_id`.

Where trials run (in the flow's process, or as deployment runs on a work pool's workers) is the
flow's business; this stage only opens the child runs first, so every trial is a child of one parent
whichever process trains it. Resume: a retried flow run finds its parent by `prefect_flow_run_id` (a new flow run by
`resume_run_id`, the parent's id); a trial whose child run is FINISHED is not run again (its
results are read back), an unfinished one is continued from its checkpoints. A child run started
with another config (the spec or its base file changed since) is refused in one line. Pure: no
Prefect; MLflow through `grpo.tracking` only.
"""

from __future__ import annotations

import json
import math
import os
import socket
from typing import Any

from matplotlib.ticker import MaxNLocator
from pydantic import BaseModel, computed_field

from grpo import tracking
from grpo.config import RunConfig
from grpo.errors import ConfigError, UserError
from grpo.plots import new_figure
from grpo.stages import data
from grpo.stages.registry import ACCURACY_TAG, PromotionDecision
from grpo.stages.runs import (
    CONFIG_ARTIFACT,
    FLOW_RUN_TAG,
    HOST_TAG,
    PID_TAG,
    SWEEP_TAG,
    fail_flow_run,
    run_config,
)
from grpo.sweep import SweepSpec, base_config, trial_configs

TRIAL_TAG = "sweep_trial"
"""Tag of a trial's child run: the trial index (from 0)."""
SWEEP_NAME_TAG = "sweep_name"
SPEC_ARTIFACT = "sweep.json"
BASE_ARTIFACT = "base_config.json"
RESULTS_TABLE = "sweep/results.json"
PLOT_FILE = "sweep/metric_vs_params.png"
BEST_METRIC, FINAL_METRIC = "sweep/best", "sweep/final"
"""Parent-run metrics: each trial's best and final value of the sweep's metric, at step = trial index."""


class TrialsFailed(UserError):
    """Some trials of a sweep failed (each one's own error is in its flow run's log); the others
    finished. Running the sweep again with `--resume <parent run id>` runs only the unfinished."""


class Trial(BaseModel):
    """One trial as tasks pass it on: its index, run name, swept values and full config."""

    index: int
    run_name: str
    params: dict[str, Any]
    config: RunConfig


class SweepRun(BaseModel, frozen=True):
    """The parent MLflow run of a sweep."""

    run_id: str
    experiment: str
    experiment_id: str
    tracking_uri: str
    resumed: bool
    """True when an earlier attempt (a retried flow run, or `resume_run_id`) had opened it."""


class TrialRun(BaseModel, frozen=True):
    """The child MLflow run of one trial."""

    index: int
    run_id: str
    status: str
    created: bool
    """False when an earlier attempt had created it."""

    @computed_field
    @property
    def finished(self) -> bool:
        """Whether the trial finished in an earlier attempt (it is not run again)."""
        return self.status == "FINISHED"


class TrialResult(BaseModel):
    """One row of the results table."""

    index: int
    run_name: str
    run_id: str
    params: dict[str, Any]
    status: str
    best: float | None
    """Best (highest) value of the sweep's metric over the run's evaluations; None when never logged."""
    best_step: int | None
    final: float | None
    """The value at the run's last logged step."""
    wall_s: float | None
    """Seconds from the run's start to its end (a resumed run counts the time in between too)."""
    versions: list[str]
    """Versions registered from the run, in order."""
    best_version: str | None
    """The version with the highest held-out accuracy tag (the run's last elite)."""
    model_name: str
    reused: bool = False
    """True when the trial had finished in an earlier attempt and was not run again."""
    error: str | None = None


class SweepSummary(BaseModel):
    """What a sweep flow run did: the parent run, one result per trial, the promotion."""

    name: str
    parent_run_id: str
    experiment: str
    experiment_id: str
    tracking_uri: str
    flow_run_id: str | None
    metric: str
    parameters: list[str]
    trials: list[TrialResult]
    best_trial: int | None
    promotion: PromotionDecision | None = None

    @property
    def best(self) -> TrialResult | None:
        return next((t for t in self.trials if t.index == self.best_trial), None)


def _process_tags() -> dict[str, str]:
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def plan(spec: SweepSpec, preflight: bool = True) -> list[Trial]:
    """The trials of `spec`, validated; with `preflight`, every trial config also passes the
    finetune flow's preflight checks (one-line `UserError` naming the trial), before any work."""
    trials = [
        Trial(index=i, run_name=cfg.name, params=params, config=cfg)
        for i, (params, cfg) in enumerate(trial_configs(spec))
    ]
    if preflight:
        for t in trials:
            try:
                data.preflight(t.config)
            except UserError as e:
                raise type(e)(f"trial {t.index} ({describe(t.params)}): {e}") from None
    return trials


def describe(params: dict[str, Any]) -> str:
    """A trial's swept values as `field=value, ...`."""
    return ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())


def spec_params(spec: SweepSpec) -> dict[str, Any]:
    """The spec as MLflow params of the parent run (`sweep.<field>`, one per swept field)."""
    out: dict[str, Any] = {
        "sweep.strategy": spec.strategy,
        "sweep.metric": spec.metric,
        "sweep.seed": spec.seed,
        "sweep.trials": spec.trials,
        "sweep.work_pool": spec.work_pool,
        "sweep.max_concurrency": spec.max_concurrency,
        "sweep.promote": spec.promote,
        "sweep.base": spec.base if isinstance(spec.base, str) else "inline",
    }
    for field, values in spec.parameters.items():
        out[f"sweep.parameters.{field}"] = values.model_dump() if isinstance(values, BaseModel) else values
    return out


def _first_difference(here: dict[str, Any], there: dict[str, Any]) -> str:
    return next((k for k in sorted(set(here) | set(there)) if here.get(k) != there.get(k)), "the spec")


EXECUTION_FIELDS = ("work_pool", "max_concurrency")
"""Spec fields that say where and how many trials run at once, not what they are: a resumed sweep
may change them (e.g. continue on a work pool what began in one process)."""


def check_resumable(spec: SweepSpec, tracking_uri: str, run_id: str, experiment_id: str) -> None:
    """`ConfigError` unless `run_id` is a sweep's parent run in this experiment started with this spec
    (`EXECUTION_FIELDS` may differ)."""
    info = tracking.run_info(tracking_uri, run_id)
    if info.experiment_id != experiment_id:
        raise ConfigError(
            f"--resume {run_id}: the run is not in the base config's experiment; resume it with its own spec"
        )
    if tracking.run_tags(tracking_uri, run_id).get(SWEEP_TAG) != "parent":
        raise ConfigError(
            f"--resume {run_id}: not the parent run of a sweep (no tag {SWEEP_TAG}=parent); pass the "
            "parent run id that `grpo sweep` printed"
        )
    stored = tracking.read_json_artifact(tracking_uri, run_id, SPEC_ARTIFACT)
    here = spec.model_dump(mode="json", exclude=set(EXECUTION_FIELDS))
    if stored is not None:
        stored = {k: v for k, v in stored.items() if k not in EXECUTION_FIELDS}
    if stored is not None and stored != here:
        key = _first_difference(here, stored)
        raise ConfigError(
            f"--resume {run_id}: the spec's {key} is {here.get(key)!r} here but {stored.get(key)!r} in the "
            "run; resume with the sweep's own spec, or start a new sweep without --resume"
        )


def open_parent(
    spec: SweepSpec,
    tracking_uri: str,
    flow_run_id: str | None = None,
    resume_run_id: str | None = None,
) -> SweepRun:
    """The sweep's parent run: `resume_run_id` when given (checked: a parent run of this spec), else
    the run tagged with this `prefect_flow_run_id` (a retried flow run), else a new run with the
    spec as params and `sweep.json` and the base config as `base_config.json`."""
    base = base_config(spec)
    exp = str(base.pipeline.experiment)
    experiment_id = tracking.make_experiment(tracking_uri, exp)
    found: str | None = None
    if resume_run_id is not None:
        check_resumable(spec, tracking_uri, resume_run_id, experiment_id)
        found = resume_run_id
    elif flow_run_id:
        found = tracking.find_run(tracking_uri, exp, FLOW_RUN_TAG, flow_run_id)
    if found is not None:
        tracking.reopen_run(tracking_uri, found)
        tracking.set_tags(tracking_uri, found, _process_tags() | ({FLOW_RUN_TAG: flow_run_id} if flow_run_id else {}))
        run_id = found
    else:
        tags = {FLOW_RUN_TAG: flow_run_id or "", SWEEP_TAG: "parent", SWEEP_NAME_TAG: spec.name,
                "base_model": base.model.name_or_path, "task": base.task.name, **_process_tags()}
        run_id = tracking.start_run(tracking_uri, exp, spec.name, tags=tags, params=spec_params(spec))
    if tracking.read_json_artifact(tracking_uri, run_id, SPEC_ARTIFACT) is None:  # new, or cut short
        tracking.log_dict(tracking_uri, run_id, spec.model_dump(mode="json"), SPEC_ARTIFACT)
        tracking.log_dict(tracking_uri, run_id, base.model_dump(mode="json"), BASE_ARTIFACT)
    return SweepRun(run_id=run_id, experiment=exp, experiment_id=experiment_id, tracking_uri=tracking_uri,
                    resumed=found is not None)


def open_trial_run(spec: SweepSpec, trial: Trial, parent_run_id: str, tracking_uri: str) -> TrialRun:
    """The child run of `trial` under the parent: found again by its tags (`mlflow.parentRunId`,
    `sweep_trial`) when an earlier attempt created it, else created with the trial's config as
    params and `config.json` (what the finetune flow's `open_run` logs), ready for the finetune
    flow's `resume_run_id`. A found run started with another config raises `ConfigError`."""
    cfg = trial.config
    exp = str(cfg.pipeline.experiment)
    found = tracking.find_runs(tracking_uri, exp, {**tracking.child_tags(parent_run_id), TRIAL_TAG: trial.index})
    if found:
        run_id, status = found[-1].info.run_id, found[-1].info.status
    else:
        tags = {**tracking.child_tags(parent_run_id), TRIAL_TAG: trial.index, SWEEP_NAME_TAG: spec.name,
                FLOW_RUN_TAG: "", "base_model": cfg.model.name_or_path, "task": cfg.task.name}
        run_id = tracking.start_run(tracking_uri, exp, trial.run_name, tags=tags, params=cfg.flat())
        status = "RUNNING"
    stored = run_config(tracking_uri, run_id)
    if stored is None:  # new, or an earlier attempt stopped before logging it
        tracking.log_params(tracking_uri, run_id, cfg.flat())
        tracking.log_dict(tracking_uri, run_id, cfg.model_dump(mode="json"), CONFIG_ARTIFACT)
    elif stored != cfg:
        here, there = cfg.flat(), stored.flat()
        key = _first_difference(here, there)
        raise ConfigError(
            f"trial {trial.index}: its MLflow run {run_id} was started with {key}={there.get(key)!r}, the spec "
            f"now gives {here.get(key)!r} (the base config changed?); restore it, or start a new sweep "
            "without --resume"
        )
    return TrialRun(index=trial.index, run_id=run_id, status=status, created=not found)


def _finite(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))


def trial_result(
    tracking_uri: str,
    trial: Trial,
    run_id: str,
    metric: str,
    reused: bool = False,
    error: str | None = None,
) -> TrialResult:
    """The trial's row, read back from its child run: best and final value of `metric`, wall
    seconds, registered versions (the same whether the trial ran now or in an earlier attempt)."""
    info = tracking.run_info(tracking_uri, run_id)
    history = sorted(tracking.metric_history(tracking_uri, run_id, metric), key=lambda m: (m.step, m.timestamp))
    points = [(m.step, m.value) for m in history if _finite(m.value)]
    best_step, best = max(points, key=lambda p: (p[1], -p[0])) if points else (None, None)
    final = points[-1][1] if points else None
    wall = (info.end_time - info.start_time) / 1000.0 if info.end_time and info.start_time else None
    name = str(trial.config.pipeline.registered_model)
    versions = sorted(tracking.run_versions(tracking_uri, run_id, name), key=lambda v: int(v.version))

    def accuracy(v: Any) -> float:
        try:
            value = float(v.tags.get(ACCURACY_TAG, "nan"))
        except ValueError:
            return -math.inf
        return value if _finite(value) else -math.inf

    best_version = max(versions, key=lambda v: (accuracy(v), int(v.version))) if versions else None
    return TrialResult(
        index=trial.index, run_name=trial.run_name, run_id=run_id, params=trial.params, status=info.status,
        best=best, best_step=best_step, final=final, wall_s=wall, versions=[str(v.version) for v in versions],
        best_version=str(best_version.version) if best_version is not None else None, model_name=name,
        reused=reused, error=error,
    )


def best_trial(results: list[TrialResult]) -> TrialResult | None:
    """The finished trial with the highest best value of the metric (ties: the lowest index);
    None when no finished trial logged it."""
    scored = [r for r in results if r.status == "FINISHED" and r.best is not None]
    return max(scored, key=lambda r: (r.best, -r.index)) if scored else None


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def results_rows(results: list[TrialResult], metric: str) -> list[dict[str, Any]]:
    """The results table, one dict per trial: trial, run, swept values, best/final metric, wall
    seconds, versions, status (list and mapping values as JSON text, so the table stays flat)."""
    rows = []
    for r in results:
        row: dict[str, Any] = {"trial": r.index, "run_name": r.run_name, "run_id": r.run_id}
        for k, v in r.params.items():
            row[k] = json.dumps(v) if isinstance(v, (list, dict)) else v
        row.update({
            f"best {metric}": r.best, "best_step": r.best_step, f"final {metric}": r.final,
            "wall_s": None if r.wall_s is None else round(r.wall_s, 1),
            "versions": ", ".join(f"{r.model_name} v{v}" for v in r.versions),
            "status": r.status, "reused": r.reused,
        })
        rows.append(row)
    return rows


def results_text(summary: SweepSummary) -> str:
    """The results table as plain text (what `grpo sweep` prints)."""
    import pandas as pd

    rows = results_rows(summary.trials, summary.metric)
    for row in rows:
        row["run_id"] = row["run_id"][:8]
        for k, v in row.items():
            if k not in ("trial", "best_step") and not isinstance(v, bool):
                row[k] = _fmt(v)
        row["best_step"] = _fmt(row["best_step"])
        row["versions"] = row["versions"] or "-"
    return pd.DataFrame(rows).to_string(index=False) if rows else "(no trials)"


def results_markdown(summary: SweepSummary) -> str:
    """The sweep's Prefect artifact: one row per trial, the best trial and the promotion."""
    m = summary.metric
    head = ["trial", "run", *summary.parameters, f"best {m}", f"final {m}", "wall s", "versions", "status"]
    lines = [
        f"## Sweep {summary.name} (parent MLflow run `{summary.parent_run_id}`)", "",
        "| " + " | ".join(head) + " |", "|" + "---:|" * len(head),
    ]
    for r in summary.trials:
        status = r.status + (" (earlier attempt)" if r.reused else "") + (f": {r.error}" if r.error else "")
        cells = [str(r.index), f"{r.run_name} `{r.run_id[:8]}`", *(_fmt(r.params.get(p)) for p in summary.parameters),
                 _fmt(r.best), _fmt(r.final), _fmt(None if r.wall_s is None else round(r.wall_s, 1)),
                 ", ".join(f"v{v}" for v in r.versions) or "-", status.replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    best = summary.best
    lines.append("")
    if best is None:
        lines.append(f"No finished trial logged `{m}`.")
    else:
        lines.append(f"Best: trial {best.index} ({describe(best.params)}), best {m} {_fmt(best.best)} at step "
                     f"{best.best_step}; version {best.best_version or '-'} of `{best.model_name}`.")
    if summary.promotion is not None:
        p = summary.promotion
        lines.append(f"Promotion of v{p.candidate}: {p.decision} ({p.reason}).")
    lines.append(f"Compare the trials: `grpo compare --parent {summary.parent_run_id}`.")
    return "\n".join(lines) + "\n"


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot_sweep(results: list[TrialResult], parameters: list[str], metric: str, title: str | None = None) -> Any:
    """One panel per swept field: each trial's best `metric` against its value (numbers on a linear
    or, when they span 100x or more, a log axis; anything else as categories), labelled with the
    trial index. Trials without the metric are left out (a note says so when none has it)."""
    fig = new_figure(max(5.0, 4.5 * len(parameters)), 4.0)
    axes = fig.subplots(1, len(parameters), squeeze=False)[0]
    scored = [r for r in results if r.best is not None]
    for ax, p in zip(axes, parameters):
        xs = [r.params.get(p) for r in scored]
        ys = [r.best for r in scored]
        if not scored:
            ax.text(0.5, 0.5, f"no trial logged {metric}", ha="center", va="center", transform=ax.transAxes)
        elif _numeric(xs):
            ax.scatter(xs, ys, color="tab:green")
            positive = [float(x) for x in xs if x > 0]
            if len(positive) == len(xs) and max(positive) / min(positive) >= 100:
                ax.set_xscale("log")
            else:  # 0.0001 .. 0.0003 in 1e-4 units, five ticks at most
                ax.xaxis.set_major_locator(MaxNLocator(5))
                ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 4))
        else:
            cats = list(dict.fromkeys(_fmt(x) for x in xs))
            pos = [cats.index(_fmt(x)) for x in xs]
            ax.scatter(pos, ys, color="tab:green")
            ax.set_xticks(range(len(cats)), cats, rotation=20, fontsize="small")
            xs = pos
        for r, x, y in zip(scored, xs, ys):
            ax.annotate(f"#{r.index}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(p)
        ax.set_ylabel(f"best {metric}")
        ax.grid(alpha=0.3)
    fig.suptitle(title or f"best {metric} per trial")
    return fig


def log_results(tracking_uri: str, parent_run_id: str, spec: SweepSpec, results: list[TrialResult]) -> None:
    """On the parent run: the results table, the plot, each trial's best/final metric (step =
    trial index) and the best trial's tags. Safe to call again (the table is replaced)."""
    tracking.log_table(tracking_uri, parent_run_id, results_rows(results, spec.metric), RESULTS_TABLE)
    fig = plot_sweep(results, list(spec.parameters), spec.metric, title=f"sweep {spec.name}: best {spec.metric}")
    tracking.log_figure(tracking_uri, parent_run_id, fig, PLOT_FILE)
    for r in results:
        values = {BEST_METRIC: r.best, FINAL_METRIC: r.final}
        tracking.log_metrics(tracking_uri, parent_run_id, values, step=r.index, skip_logged=True)
    best = best_trial(results)
    if best is not None:
        tracking.set_tags(tracking_uri, parent_run_id, {
            "sweep.best_trial": best.index, "sweep.best_run_id": best.run_id,
            "sweep.best_value": best.best, "sweep.best_version": best.best_version or "",
        })


def failure_line(exc: BaseException | None) -> str:
    """A trial's failure as one line (a `UserError` is its message; anything else gets its type)."""
    if exc is None:
        return "failed"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, UserError) else f"{type(exc).__name__}: {text}"


def trials_failed(spec: SweepSpec, parent_run_id: str, failures: dict[int, str], total: int) -> TrialsFailed:
    """The one-line error of a sweep whose trials `failures` (index -> line) failed."""
    first = min(failures)
    done = total - len(failures)
    return TrialsFailed(
        f"sweep {spec.name}: {len(failures)} of {total} trials failed (trial {first}: {failures[first]}); "
        f"{done} finished. `grpo sweep --config SPEC --resume {parent_run_id}` runs only the unfinished ones"
    )


def close_parent(
    tracking_uri: str, run_id: str, status: str = "FINISHED", promotion: PromotionDecision | None = None
) -> None:
    """Record the promotion (tags `sweep.promotion`, `sweep.champion`) and end the parent run."""
    if promotion is not None:
        tracking.set_tags(tracking_uri, run_id, {
            "sweep.promotion": f"{promotion.decision} v{promotion.candidate}",
            "sweep.champion": promotion.champion or "",
        })
    tracking.end_run(tracking_uri, run_id, status)


def fail_parent(spec: SweepSpec, flow_run_id: str) -> str | None:
    """Mark the parent run of a failed or crashed sweep flow run FAILED (if still RUNNING); its id."""
    return fail_flow_run(base_config(spec), flow_run_id)
