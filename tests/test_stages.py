"""Pipeline tasks through `.fn()` (their logic, no Prefect run) against a real sqlite MLflow store.

    pytest -q tests/test_stages.py

Covers: the data cache (a second prepare reuses the files), a round that trains to the right step
and a repeated round that returns at once (no new metric rows, checkpoint untouched, even with an
empty model cache), evaluation logged once at the checkpoint's step with its sample table, and an
elite registration that a repeated call does not duplicate.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient
from pipeline_config import tiny_config

from grpo import reports, tracking
from grpo.config import RunConfig, load_config
from grpo.models import POLICY_CACHE
from grpo.stages import data, runs
from grpo.stages import warm_start as warm


def test_tiny_cpu_yaml_is_the_embedded_default() -> None:
    import yaml

    path = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"
    assert load_config(path) == RunConfig()
    spelled = RunConfig.model_validate(yaml.safe_load(path.read_text())).model_fields_set
    assert spelled == set(RunConfig.model_fields)  # every section written out

    def keys(d: dict, prefix: str = "") -> set[str]:
        out = set()
        for k, v in d.items():
            out |= keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
        return out

    assert keys(yaml.safe_load(path.read_text())) == set(RunConfig().flat())


def test_prepare_twice_reuses_the_files(tmp_path: Path) -> None:
    from grpo_pipeline.tasks.data import prepare_dataset

    cfg = load_config(None, ["data.generate_rows=200", f"data.cache_dir={tmp_path / 'data'}"])
    first = prepare_dataset.fn(cfg)
    assert not first.reused and first.train_rows + first.test_rows == 200
    mtimes = {p: Path(p).stat().st_mtime_ns for p in (first.train_path, first.test_path)}
    second = prepare_dataset.fn(cfg)
    assert second.reused
    assert (second.train_path, second.test_path, second.content_hash) == (
        first.train_path, first.test_path, first.content_hash
    )
    assert {p: Path(p).stat().st_mtime_ns for p in mtimes} == mtimes
    other = prepare_dataset.fn(cfg.model_copy(update={"data": cfg.data.model_copy(update={"seed": 7})}))
    assert not other.reused and other.content_hash != first.content_hash


def test_round_eval_register_are_idempotent(tmp_path: Path, tiny_model_dir: Path, mlflow_uri: str) -> None:
    from grpo_pipeline.tasks.data import prepare_dataset
    from grpo_pipeline.tasks.evaluate import evaluate
    from grpo_pipeline.tasks.registry import open_run, register_elite
    from grpo_pipeline.tasks.train import train_round

    cfg = tiny_config(tmp_path, tiny_model_dir, mlflow_uri, "stages")
    client = MlflowClient(mlflow_uri)
    ref = prepare_dataset.fn(cfg)
    run_id = open_run.fn(cfg, mlflow_uri, None).run_id
    assert client.get_run(run_id).data.params["train.group_size"] == "4"

    ckpt = train_round.fn(cfg, ref, 0, run_id, mlflow_uri)
    assert (ckpt.step, ckpt.round) == (2, 0)
    assert Path(ckpt.path) == runs.run_dir(cfg, run_id) / "checkpoints" / "step-000002"
    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "reward_mean")]
    assert sorted(s for s, _ in history) == [1, 2]
    weights = Path(ckpt.path) / "adapter_model.safetensors"
    mtime = weights.stat().st_mtime_ns

    # The same round again: the checkpoint is returned, nothing is trained or logged.
    POLICY_CACHE.clear()
    again = train_round.fn(cfg, ref, 0, run_id, mlflow_uri)
    assert again == ckpt
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "reward_mean")] == history
    assert weights.stat().st_mtime_ns == mtime
    assert [p.name for p in (Path(ckpt.path).parent).iterdir()] == ["step-000002"]

    result = evaluate.fn(cfg, ckpt, ref, run_id, mlflow_uri)
    assert result.step == 2 and result.n == 8
    evaluate.fn(cfg, ckpt, ref, run_id, mlflow_uri)  # a retry logs nothing new
    acc = client.get_metric_history(run_id, "eval/accuracy")
    assert [(m.step, m.value) for m in acc] == [(2, result.accuracy)]
    files = [f.path for f in client.list_artifacts(run_id, "eval")]
    assert files == ["eval/samples_step_000002.json"]

    first = register_elite.fn(cfg, ckpt, result, run_id, mlflow_uri, "flow-1", ref)
    assert first.elite and first.created and first.version == "1"
    second = register_elite.fn(cfg, ckpt, result, run_id, mlflow_uri, "flow-1", ref)
    assert second.version == "1" and not second.created
    versions = client.search_model_versions("name = 'lora-stages'")
    assert len(versions) == 1
    tags = versions[0].tags
    assert tags["step"] == "2" and tags["run_id"] == run_id and tags["prefect_flow_run_id"] == "flow-1"
    assert tags["dataset_hash"] == ref.content_hash and tags["test_path"] == ref.test_path
    assert float(tags["eval_accuracy"]) == result.accuracy
    assert tags["base_model"] == str(tiny_model_dir.absolute())

    # A later evaluation that is not better than the best so far is not registered.
    not_better = result.model_copy(update={"step": 4, "accuracy": result.accuracy})
    later = ckpt.model_copy(update={"step": 4, "round": 1})
    assert register_elite.fn(cfg, later, not_better, run_id, mlflow_uri).model_dump() == {
        "version": None, "elite": False, "best_accuracy": result.accuracy, "created": False
    }
    assert len(client.search_model_versions("name = 'lora-stages'")) == 1


def test_summary_markdown_has_one_row_per_round() -> None:
    from grpo.stages.runs import RoundSummary, RunSummary

    rows = [
        RoundSummary(round=1, step=2, train_reward=0.25, eval_accuracy=0.0, eval_format_rate=0.5,
                     elite=True, version="1"),
        RoundSummary(round=2, step=4, train_reward=None, eval_accuracy=0.125, eval_format_rate=0.5,
                     elite=False, version=None),
    ]
    summary = RunSummary(name="run", run_id="abc", experiment="e", experiment_id="1", tracking_uri="sqlite://",
                         flow_run_id=None, registered_model="m", rounds=rows)
    assert (summary.versions, summary.final_step) == (["1"], 4)
    text = reports.summary_markdown(summary)
    assert text.startswith("## GRPO run run (abc)")
    table = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert table == [
        "| 1 | 2 | 0.250 | 0.000 | 0.500 | yes | 1 |",
        "| 2 | 4 | - | 0.125 | 0.500 | no | - |",
    ]


def test_mlflow_pointer() -> None:
    url, note = reports.mlflow_pointer("http://127.0.0.1:5000/", "7", "abc")
    assert url == "http://127.0.0.1:5000/#/experiments/7/runs/abc" and url in note
    url, note = reports.mlflow_pointer("sqlite:////x/mlflow.db", "7", "abc")
    assert url is None and "mlflow ui --backend-store-uri sqlite:////x/mlflow.db" in note


@pytest.mark.parametrize("field", ["pipeline.output_dir", "data.cache_dir"])
def test_preflight_names_an_unwritable_folder(tmp_path: Path, field: str) -> None:
    from grpo.errors import ConfigError

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = load_config(None, [
        f"pipeline.output_dir={tmp_path / 'out'}",
        f"data.cache_dir={tmp_path / 'data'}",
        f"{field}={blocker / 'sub'}",
        f"pipeline.tracking_uri=sqlite:///{tmp_path}/m.db",
    ])
    with pytest.raises(ConfigError, match=f"^{field}: cannot write"):
        data.preflight(cfg)


def test_warm_start_saves_a_base_once(tmp_path: Path, tiny_model_dir: Path, mlflow_uri: str) -> None:
    import torch
    from safetensors.torch import load_file

    from grpo_pipeline.tasks.data import prepare_dataset
    from grpo_pipeline.tasks.registry import open_run
    from grpo_pipeline.tasks.train import warm_start

    cfg = tiny_config(tmp_path, tiny_model_dir, mlflow_uri, "sft", "sft.enabled=true", "sft.max_steps=2",
                      "sft.batch_size=8", "sft.warmup_steps=0")
    ref = prepare_dataset.fn(cfg)
    run_id = open_run.fn(cfg, mlflow_uri, None).run_id
    folder = Path(warm_start.fn(cfg, ref, run_id, mlflow_uri))
    assert folder == runs.run_dir(cfg, run_id) / "sft" and (folder / "config.json").is_file()
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(folder / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the weights were trained
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert Path(warm_start.fn(cfg, ref, run_id, mlflow_uri)) == folder  # reused, not retrained
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    steps = [m.step for m in MlflowClient(mlflow_uri).get_metric_history(run_id, "sft/loss")]
    assert steps == [1, 2]
    based = warm.with_base(cfg, str(folder))
    assert based.model.name_or_path == str(folder) and not based.model.build_tiny_if_missing


def test_open_run_finds_the_run_of_a_retried_flow_run(tmp_path: Path, mlflow_uri: str) -> None:
    cfg = load_config(None, ["pipeline.experiment=exp-reopen"])
    run = runs.open_run(cfg, mlflow_uri, "flow-run-a")
    run_id = run.run_id
    client = MlflowClient(mlflow_uri)
    assert client.get_run(run_id).data.tags[runs.FLOW_RUN_TAG] == "flow-run-a"
    assert run.experiment_id == client.get_run(run_id).info.experiment_id
    tracking.end_run(mlflow_uri, run_id, "FAILED")
    assert runs.open_run(cfg, mlflow_uri, "flow-run-a") == run
    assert client.get_run(run_id).info.status == "RUNNING"
    assert runs.open_run(cfg, mlflow_uri, "flow-run-b").run_id != run_id
    assert runs.run_config(mlflow_uri, run_id) == cfg


def test_fail_flow_run_marks_only_its_running_run(mlflow_uri: str) -> None:
    cfg = load_config(None, ["pipeline.experiment=exp-fail-flow-run", f"pipeline.tracking_uri={mlflow_uri}"])
    client = MlflowClient(mlflow_uri)
    assert runs.fail_flow_run(cfg, "never-opened") is None
    run_id = runs.open_run(cfg, mlflow_uri, "flow-run-x").run_id
    other = runs.open_run(cfg, mlflow_uri, "flow-run-y").run_id
    assert runs.fail_flow_run(cfg, "flow-run-x") == run_id
    assert client.get_run(run_id).info.status == "FAILED"
    assert client.get_run(other).info.status == "RUNNING"
    tracking.end_run(mlflow_uri, other, "FINISHED")
    assert runs.fail_flow_run(cfg, "flow-run-y") == other  # a finished run stays finished
    assert client.get_run(other).info.status == "FINISHED"


def test_run_config_tells_absent_from_unreadable(mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from grpo.errors import ConfigError, TrackingReadError

    cfg = load_config(None, ["pipeline.experiment=exp-config"])
    bare = tracking.start_run(mlflow_uri, "exp-config", "no-config")
    assert runs.run_config(mlflow_uri, bare) is None  # absent: the caller may use its own settings

    corrupt = tracking.start_run(mlflow_uri, "exp-config", "corrupt")
    tracking.log_text(mlflow_uri, corrupt, "{not json", runs.CONFIG_ARTIFACT)
    with pytest.raises(TrackingReadError, match=f"^MLflow run {corrupt}: artifact 'config.json' could not be read"):
        runs.run_config(mlflow_uri, corrupt)

    stale = tracking.start_run(mlflow_uri, "exp-config", "stale")
    tracking.log_dict(mlflow_uri, stale, {"train": {"no_such_field": 1}}, runs.CONFIG_ARTIFACT)
    with pytest.raises(ConfigError, match="does not validate .train.no_such_field"):
        runs.run_config(mlflow_uri, stale)

    good = runs.open_run(cfg, mlflow_uri, None).run_id

    def store_down(**kwargs: object) -> str:
        raise OSError("connection reset by peer")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", store_down)
    with pytest.raises(TrackingReadError, match="connection reset by peer"):
        runs.run_config(mlflow_uri, good)


def test_user_errors_are_not_retried() -> None:
    from prefect.states import Failed

    from grpo.errors import ConfigError, DataError, TrackingReadError
    from grpo_pipeline.tasks.retry import retry_unless_user_error

    assert retry_unless_user_error(None, None, Failed(data=RuntimeError("disk hiccup")))
    assert retry_unless_user_error(None, None, Failed(data=OSError("I/O error")))
    assert not retry_unless_user_error(None, None, Failed(data=ConfigError("train.group_size: ...")))
    assert not retry_unless_user_error(None, None, Failed(data=DataError("data.source: ...")))
    assert retry_unless_user_error(None, None, Failed(data=TrackingReadError("MLflow run r: artifact ...")))


def test_stale_runs_are_marked_and_the_interrupted_one_is_found(tmp_path: Path, mlflow_uri: str) -> None:
    import subprocess
    import sys

    from grpo.errors import ConfigError

    cfg = load_config(None, ["pipeline.experiment=exp-stale", f"pipeline.tracking_uri={mlflow_uri}"])
    other = cfg.model_copy(update={"name": "other"})
    assert runs.last_interrupted(cfg, mlflow_uri) is None
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    crashed = runs.open_run(cfg, mlflow_uri, "flow-a").run_id
    tracking.set_tags(mlflow_uri, crashed, {runs.PID_TAG: gone.stdout.strip()})  # its process has exited
    alive = runs.open_run(cfg, mlflow_uri, "flow-b").run_id  # this process: alive
    assert runs.mark_stale_runs(cfg, mlflow_uri) == [crashed]
    client = MlflowClient(mlflow_uri)
    assert client.get_run(crashed).info.status == "KILLED" and client.get_run(alive).info.status == "RUNNING"
    assert runs.last_interrupted(cfg, mlflow_uri) == crashed
    assert runs.interrupted_previous_run(cfg, mlflow_uri) is None  # the newest run is the live one

    tracking.end_run(mlflow_uri, alive, "FAILED")
    assert runs.interrupted_previous_run(cfg, mlflow_uri) == alive
    assert runs.interrupted_previous_run(other, mlflow_uri) is None  # another config
    runs.check_resumable(cfg, mlflow_uri, crashed)
    with pytest.raises(ConfigError, match=f"^--resume {crashed}: name is 'other' here but 'tiny-cpu' in the run"):
        runs.check_resumable(other, mlflow_uri, crashed)
    resumed = runs.open_run(cfg, mlflow_uri, "flow-c", resume_run_id=crashed)
    assert resumed.run_id == crashed and client.get_run(crashed).info.status == "RUNNING"
    assert client.get_run(crashed).data.tags[runs.FLOW_RUN_TAG] == "flow-c"  # the hooks find it again
    tracking.end_run(mlflow_uri, crashed, "FINISHED")
    with pytest.raises(ConfigError, match="the run has finished"):
        runs.check_resumable(cfg, mlflow_uri, crashed)
