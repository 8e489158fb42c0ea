"""The MLflow run of a flow run: open it (or find it again), close it, mark it failed; the config it
was started with; the run's summary.

    from grpo.stages import runs
    run = runs.open_run(cfg, uri, flow_run_id)     # TrackedRun: run_id, experiment_id, tracking_uri
    runs.close_run(uri, run.run_id, "FINISHED", cfg.name)
    cfg_again = runs.run_config(uri, run.run_id)   # RunConfig, or None when it has no config.json

One MLflow run per flow run, tagged `prefect_flow_run_id`: a retried flow run continues its run,
and the flow's failure and crash hooks find it by that tag (`fail_flow_run`). A run interrupted for
good (a killed process) is continued by a new flow run with `open_run(..., resume_run_id=...)`:
same MLflow run, same checkpoints, no step repeated; `mark_stale_runs` marks runs whose process is
gone KILLED, and `last_interrupted` finds the one to resume. `round_summary` makes one row of the
run's summary per round.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ValidationError, computed_field

from grpo import tracking
from grpo.checkpoint import CheckpointRef
from grpo.config import RunConfig
from grpo.data import DatasetRef
from grpo.errors import ConfigError
from grpo.evaluate import EvalResult

if TYPE_CHECKING:
    from grpo.stages.registry import Registration

FLOW_RUN_TAG = "prefect_flow_run_id"
"""MLflow run tag (and model version tag) holding the Prefect flow run id."""
SWEEP_TAG = "grpo.sweep"
"""Tag of a sweep's parent run (value "parent"): it holds a sweep, not a training to resume."""
CONFIG_ARTIFACT = "config.json"
"""The run's full config, logged with every MLflow run (promote re-evaluates with it)."""
HOST_TAG, PID_TAG = "grpo.host", "grpo.pid"
"""Run tags: the host and process id running the flow (a crashed run's process is gone)."""
RUN_FINISHED_TAG = "grpo.run_finished"
"""Model-version tag: "false" while the run that registered it has not finished ("true" then);
promotion skips the versions of unfinished runs unless one is named."""
STEP_METRIC = "reward_mean"
"""A metric the trainer logs at every step: its history says which steps are already logged."""


class TrackedRun(BaseModel, frozen=True):
    """An MLflow run as tasks pass it on."""

    run_id: str
    experiment_id: str
    tracking_uri: str


class RoundSummary(BaseModel):
    """One round of a run: its step, mean train reward, held-out result and registration."""

    round: int
    step: int
    train_reward: float | None
    eval_accuracy: float
    eval_format_rate: float
    elite: bool
    version: str | None


class RunSummary(BaseModel):
    """What a finetune flow run did: its MLflow run and one row per round."""

    name: str
    run_id: str
    experiment: str
    experiment_id: str
    tracking_uri: str
    flow_run_id: str | None
    registered_model: str
    rounds: list[RoundSummary]

    @computed_field
    @property
    def versions(self) -> list[str]:
        """Model versions registered by this run, in order."""
        return [r.version for r in self.rounds if r.version is not None]

    @computed_field
    @property
    def final_step(self) -> int:
        return self.rounds[-1].step if self.rounds else 0


def run_dir(cfg: RunConfig, run_id: str) -> Path:
    """Checkpoints of one run: `<pipeline.output_dir>/<MLflow run id>/`."""
    return Path(cfg.pipeline.output_dir).expanduser().absolute() / run_id


OPENED: dict[str, str] = {}
"""MLflow runs this process opened and has not closed (run id -> tracking URI): what
`fail_opened_runs` ends when the process is stopped."""


def fail_opened_runs() -> list[str]:
    """End FAILED every run this process opened that is still RUNNING (the command line calls it when
    a flow is stopped by a signal, whether or not the flow's crash hook got to run); their ids."""
    failed = []
    for run_id, uri in list(OPENED.items()):
        if tracking.run_info(uri, run_id).status == "RUNNING":
            tracking.end_run(uri, run_id, "FAILED")
            failed.append(run_id)
        OPENED.pop(run_id, None)
    return failed


def _process_tags() -> dict[str, str]:
    """Where the run's process lives: `mark_stale_runs` tells a crashed run from a live one by it."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def open_run(
    cfg: RunConfig,
    tracking_uri: str,
    flow_run_id: str | None = None,
    resume_run_id: str | None = None,
    dataset: DatasetRef | None = None,
) -> TrackedRun:
    """The MLflow run of this flow run: `resume_run_id` when given (an interrupted run continued by
    a new flow run, see `check_resumable`), else the run tagged with this `prefect_flow_run_id` (a
    retried flow run continues its run), else a new run with the config as params and as
    `config.json`. The prepared splits of `dataset` become the run's dataset inputs."""
    exp = cfg.pipeline.experiment
    experiment_id = tracking.make_experiment(tracking_uri, exp)
    if resume_run_id is not None:
        check_resumable(cfg, tracking_uri, resume_run_id)
        found: str | None = resume_run_id
    else:
        found = tracking.find_run(tracking_uri, exp, FLOW_RUN_TAG, str(flow_run_id)) if flow_run_id else None
    if found is not None:
        tracking.reopen_run(tracking_uri, found)
        tags = _process_tags() | ({FLOW_RUN_TAG: flow_run_id} if flow_run_id else {})
        tracking.set_tags(tracking_uri, found, tags)
        run_id = found
    else:
        tags = {FLOW_RUN_TAG: str(flow_run_id or ""), "base_model": cfg.model.name_or_path, "task": cfg.task.name,
                **_process_tags()}
        run_id = tracking.start_run(tracking_uri, exp, cfg.name, tags=tags, params=cfg.flat())
        tracking.log_dict(tracking_uri, run_id, cfg.model_dump(mode="json"), CONFIG_ARTIFACT)
    if dataset is not None:
        tracking.log_dataset_inputs(
            tracking_uri, run_id, dataset.task, dataset.source,
            {"train": dataset.train_path, "test": dataset.test_path}, dataset.content_hash,
        )
    OPENED[run_id] = tracking_uri
    return TrackedRun(run_id=run_id, experiment_id=experiment_id, tracking_uri=tracking_uri)


def close_run(tracking_uri: str, run_id: str, status: str = "FINISHED", title: str | None = None) -> None:
    """Log the run's curves (train reward, eval accuracy) as plots/curves.png and end the run; when
    it finished, its registered versions become candidates for promotion (`RUN_FINISHED_TAG`)."""
    if status == "FINISHED":
        from grpo.compare import run_curves_from_mlflow

        fig = run_curves_from_mlflow(tracking_uri, run_id, title=title)
        tracking.log_figure(tracking_uri, run_id, fig, "plots/curves.png")
        for version in tracking.run_versions(tracking_uri, run_id):
            tracking.set_version_tags(tracking_uri, version.name, version.version, {RUN_FINISHED_TAG: "true"})
    tracking.end_run(tracking_uri, run_id, status)
    OPENED.pop(run_id, None)


def check_resumable(cfg: RunConfig, tracking_uri: str, run_id: str) -> None:
    """`ConfigError` unless run `run_id` can be continued with `cfg`: it exists in the experiment,
    has not finished, and was started with this very config (or has no stored config)."""
    info = tracking.run_info(tracking_uri, run_id)
    if info.status == "FINISHED":
        raise ConfigError(f"--resume {run_id}: the run has finished; start a new one without --resume")
    if info.experiment_id != tracking.make_experiment(tracking_uri, cfg.pipeline.experiment):
        raise ConfigError(
            f"--resume {run_id}: the run is not in experiment {cfg.pipeline.experiment!r}; "
            "resume it with its own config (no --config/--set)"
        )
    stored = run_config(tracking_uri, run_id)
    if stored is not None and stored != cfg:
        here, there = cfg.flat(), stored.flat()
        key = next((k for k in here if there.get(k) != here[k]), "the config")
        raise ConfigError(
            f"--resume {run_id}: {key} is {here.get(key)!r} here but {there.get(key)!r} in the run; "
            "resume with the run's own config (no --config/--set)"
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def mark_stale_runs(cfg: RunConfig, tracking_uri: str) -> list[str]:
    """Runs of the experiment left RUNNING by a process of this host that is gone (killed, or the
    machine restarted): marked KILLED so that they no longer look alive; their ids, oldest first."""
    host = socket.gethostname()
    stale = []
    for run in tracking.experiment_runs(tracking_uri, cfg.pipeline.experiment) or []:
        tags = run.data.tags
        pid = int(tags.get(PID_TAG, "0") or 0)
        if run.info.status == "RUNNING" and tags.get(HOST_TAG) == host and pid and not _alive(pid):
            tracking.end_run(tracking_uri, run.info.run_id, "KILLED")
            stale.append(run.info.run_id)
    return stale


def last_interrupted(cfg: RunConfig, tracking_uri: str) -> str | None:
    """The newest training run of the experiment that ended FAILED or KILLED, or None (a sweep's
    parent run is not one)."""
    for run in reversed(tracking.experiment_runs(tracking_uri, cfg.pipeline.experiment) or []):
        if run.info.status in ("FAILED", "KILLED") and run.data.tags.get(SWEEP_TAG) != "parent":
            return run.info.run_id
    return None


def interrupted_previous_run(cfg: RunConfig, tracking_uri: str) -> str | None:
    """The newest run of the experiment when it ended FAILED or KILLED with this very config (a
    rerun of the same command after a crash), else None."""
    found = tracking.experiment_runs(tracking_uri, cfg.pipeline.experiment) or []
    if found and found[-1].info.status in ("FAILED", "KILLED"):
        run_id = found[-1].info.run_id
        return run_id if run_config(tracking_uri, run_id) == cfg else None
    return None


def fail_flow_run(cfg: RunConfig, flow_run_id: str) -> str | None:
    """Mark the MLflow run of a failed or crashed flow run FAILED (when it is still RUNNING);
    return its id, or None when the flow run never opened one."""
    uri = tracking.resolve_tracking_uri(cfg.pipeline.tracking_uri)
    tracking.check_tracking(uri)
    run_id = tracking.find_run(uri, cfg.pipeline.experiment, FLOW_RUN_TAG, flow_run_id)
    if run_id is None:
        return None
    if tracking.run_info(uri, run_id).status == "RUNNING":
        tracking.end_run(uri, run_id, "FAILED")
    OPENED.pop(run_id, None)
    return run_id


def round_summary(
    tracking_uri: str,
    run_id: str,
    ckpt_ref: CheckpointRef,
    steps_per_round: int,
    eval_result: EvalResult,
    registration: Registration,
) -> RoundSummary:
    """One row of the run summary; the mean train reward over the round's steps is read back from
    the run's `reward_mean` history (steps logged by an earlier attempt count too)."""
    first = ckpt_ref.step - steps_per_round + 1
    history = tracking.metric_history(tracking_uri, run_id, STEP_METRIC)
    values = [m.value for m in history if first <= m.step <= ckpt_ref.step]
    return RoundSummary(
        round=ckpt_ref.round + 1,
        step=ckpt_ref.step,
        train_reward=sum(values) / len(values) if values else None,
        eval_accuracy=eval_result.accuracy,
        eval_format_rate=eval_result.format_rate,
        elite=registration.elite,
        version=registration.version,
    )


def run_config(tracking_uri: str, run_id: str) -> RunConfig | None:
    """The config a run was started with (its `config.json` artifact), or None when the run has none.

    A store that fails to answer or an unreadable file raises `TrackingReadError` (retried by the
    task); a file that no longer validates raises `ConfigError`. Neither ever reads as None, so a
    caller never falls back to default settings by accident."""
    data = tracking.read_json_artifact(tracking_uri, run_id, CONFIG_ARTIFACT)
    if data is None:
        return None
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ConfigError(
            f"MLflow run {run_id}: its {CONFIG_ARTIFACT} does not validate ({where}: {first['msg']}); "
            "it was written by an incompatible version of grpo-pipeline"
        ) from None
