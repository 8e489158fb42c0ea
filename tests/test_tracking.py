"""MLflow tracking against a real sqlite store: runs, params, idempotent metrics, tables,
adapters as LoggedModels, registry versions (registered once per key), aliases, downloads, and
one-line errors for a dead server or a bad name."""

from __future__ import annotations

import json
import socket
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file, save_file

from grpo import tracking
from grpo.errors import TrackingError, UserError


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def fake_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A checkpoint-shaped folder: adapter + tokenizer files + training state that must stay out."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    save_file({"base_model.model.lora_A.weight": torch.randn(4, 8, generator=g)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "state.json").write_text(json.dumps({"step": 10}))
    (folder / "trainer_state.pt").write_bytes(b"optimizer state")
    (folder / "COMPLETE").write_text("{}")
    return folder


def test_resolve_tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}
    assert tracking.resolve_tracking_uri("sqlite:///x.db", env) == "sqlite:///x.db"
    assert tracking.resolve_tracking_uri(None, env) == "http://127.0.0.1:5000"
    default = tracking.resolve_tracking_uri(None, {})
    assert default == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert default.startswith("sqlite:////")  # absolute path
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://h:1")
    assert tracking.resolve_tracking_uri(None) == "http://h:1"
    assert tracking.resolve_tracking_uri("") == "http://h:1"


def test_run_params_metrics(mlflow_uri: str) -> None:
    exp = unique("exp")
    flow_run = uuid.uuid4().hex
    params = {f"p{i}": i for i in range(150)}  # more than one batch of 100
    params.update({"long": "x" * 7000, "nums": [3, 4], "none": None})
    run_id = tracking.start_run(mlflow_uri, exp, "tiny", tags={"prefect.flow_run_id": flow_run},
                                params=params)
    client = MlflowClient(mlflow_uri, registry_uri=mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.run_name == "tiny"
    got = run.data.params
    assert len(got) == 153 and got["p149"] == "149" and got["nums"] == "[3, 4]"
    assert got["none"] == "None" and got["long"] == "x" * 6000
    # artifacts live next to the database, not in the working folder
    db_dir = Path(mlflow_uri.removeprefix("sqlite:///")).parent
    assert run.info.artifact_uri.startswith((db_dir / "mlartifacts").as_uri())

    assert tracking.find_run(mlflow_uri, exp, "prefect.flow_run_id", flow_run) == run_id
    assert tracking.find_run(mlflow_uri, exp, "prefect.flow_run_id", "other") is None
    assert tracking.find_run(mlflow_uri, unique("no-such-exp"), "k", "v") is None

    tracking.log_params(mlflow_uri, run_id, {"p1": 1, "new": "v"})  # retry-safe
    with pytest.raises(TrackingError, match="p1"):
        tracking.log_params(mlflow_uri, run_id, {"p1": 2})

    for step in (1, 2, 3):
        tracking.log_metrics(mlflow_uri, run_id, {"reward/mean": step / 10, "loss": -step,
                                                  "skipped": None}, step=step)
    assert tracking.logged_steps(mlflow_uri, run_id, "reward/mean") == {1, 2, 3}
    assert tracking.logged_steps(mlflow_uri, run_id, "never") == set()
    tracking.log_metrics(mlflow_uri, run_id, {"reward/mean": 9.0, "loss": -4}, step=3,
                         skip_logged=True)  # step 3 again: skipped
    tracking.log_metrics(mlflow_uri, run_id, {"reward/mean": 0.4}, step=4, skip_logged=True)
    hist = client.get_metric_history(run_id, "reward/mean")
    assert sorted((m.step, m.value) for m in hist) == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4)]
    assert "skipped" not in client.get_run(run_id).data.metrics

    tracking.set_tags(mlflow_uri, run_id, {"status_note": "ok", "n": 3})
    tracking.end_run(mlflow_uri, run_id, status="FINISHED")
    run = client.get_run(run_id)
    assert run.data.tags["status_note"] == "ok" and run.data.tags["n"] == "3"
    assert run.info.status == "FINISHED"


def test_tables_and_artifacts(mlflow_uri: str, tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exp = unique("exp")
    run_id = tracking.start_run(mlflow_uri, exp, "tables")
    rows = [{"prompt": "nums: 1 2 target: 3", "completion": "1 + 2", "reward": 2.0},
            {"prompt": "nums: 4 5 target: 9", "completion": "4 * 5", "reward": 1.0}]
    tracking.log_table(mlflow_uri, run_id, rows, "samples/step-000001.json")
    tracking.log_table(mlflow_uri, run_id, rows, "samples/step-000001.json")  # retry: replaced
    tracking.log_table(mlflow_uri, run_id, pd.DataFrame(rows[:1]), "eval.json", replace=False)
    tracking.log_table(mlflow_uri, run_id, pd.DataFrame(rows[1:]), "eval.json", replace=False)

    client = MlflowClient(mlflow_uri, registry_uri=mlflow_uri)
    exp_id = client.get_run(run_id).info.experiment_id
    samples = client.load_table(exp_id, "samples/step-000001.json", run_ids=[run_id])
    assert samples[["prompt", "completion", "reward"]].to_dict("records") == rows
    appended = client.load_table(exp_id, "eval.json", run_ids=[run_id])
    assert appended["completion"].tolist() == ["1 + 2", "4 * 5"]

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    tracking.log_figure(mlflow_uri, run_id, fig, "plots/reward.png")
    plt.close(fig)
    png = tmp_path / "curve.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    tracking.log_image(mlflow_uri, run_id, png, "plots/curve.png")
    tracking.log_dict(mlflow_uri, run_id, {"a": 1}, "summary.json")
    tracking.log_text(mlflow_uri, run_id, "hello", "notes/readme.txt")

    listed = {f.path for f in client.list_artifacts(run_id, "plots")}
    assert listed == {"plots/reward.png", "plots/curve.png"}
    dst = Path(client.download_artifacts(run_id, "summary.json", str(tmp_path)))
    assert json.loads(dst.read_text()) == {"a": 1}
    dst = Path(client.download_artifacts(run_id, "plots/curve.png", str(tmp_path)))
    assert dst.read_bytes() == png.read_bytes()
    with pytest.raises(TrackingError, match=r"\.json"):
        tracking.log_table(mlflow_uri, run_id, rows, "samples.csv")


@pytest.fixture
def process_uri_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point MLflow's process-wide tracking and registry URIs at another (never created) store,
    so a call that ignores the explicit URI fails or creates this file."""
    import mlflow.tracking._model_registry.utils as registry_utils
    import mlflow.tracking._tracking_service.utils as tracking_utils

    other = tmp_path / "elsewhere.db"
    uri = f"sqlite:///{other}"
    monkeypatch.setattr(tracking_utils, "_tracking_uri", uri)
    monkeypatch.setattr(registry_utils, "_registry_uri", uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    return other


def test_adapter_model_registry_alias_download(
    mlflow_uri: str, tmp_path: Path, process_uri_elsewhere: Path
) -> None:
    exp = unique("exp")
    name = unique("countdown-lora")
    run_id = tracking.start_run(mlflow_uri, exp, "elite")
    client = MlflowClient(mlflow_uri, registry_uri=mlflow_uri)
    tracking.log_metrics(mlflow_uri, run_id, {"eval/accuracy": 0.25}, step=10)

    ckpt = fake_checkpoint(tmp_path / "step-000010")
    model_id = tracking.log_adapter_model(
        mlflow_uri, run_id, ckpt, name="step-10", step=10,
        metrics={"eval/accuracy": 0.25, "eval/format": 0.5}, params={"lora.r": 4},
        key=f"{run_id}:10",
    )
    lm = client.get_logged_model(model_id)
    assert lm.status == "READY" and lm.source_run_id == run_id and lm.params == {"lora.r": "4"}
    linked = {(m.key, m.step, m.value) for m in lm.metrics}
    assert linked == {("eval/accuracy", 10, 0.25), ("eval/format", 10, 0.5)}
    # the identical run metric logged before gains no duplicate row
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "eval/accuracy")] == [(10, 0.25)]
    assert [o.model_id for o in client.get_run(run_id).outputs.model_outputs] == [model_id]
    # a retried task gets the same logged model back
    assert tracking.log_adapter_model(mlflow_uri, run_id, ckpt, name="step-10", step=10,
                                      key=f"{run_id}:10") == model_id

    key = f"{run_id}:10"
    version, created = tracking.register_once(
        mlflow_uri, name, model_id, {"eval_accuracy": 0.25, "step": 10}, run_id, key=key
    )
    assert (version, created) == ("1", True)
    again, created = tracking.register_once(
        mlflow_uri, name, model_id, {"eval_accuracy": 0.25, "step": 10}, run_id, key=key
    )
    assert (again, created) == ("1", False)
    assert tracking.find_version(mlflow_uri, name, "elite_key", key) == "1"
    assert tracking.find_version(mlflow_uri, name, "elite_key", "other") is None
    mv = client.get_model_version(name, "1")
    assert mv.tags["eval_accuracy"] == "0.25" and mv.tags["elite_key"] == key
    assert mv.run_id == run_id and mv.tags["model_id"] == model_id
    assert mv.source == lm.artifact_location  # sqlite store: see tracking.register_version

    ckpt2 = fake_checkpoint(tmp_path / "step-000020", seed=1)
    model2 = tracking.log_adapter_model(mlflow_uri, run_id, ckpt2, name="step-20", step=20,
                                        metrics={"eval/accuracy": 0.5})
    v2 = tracking.register_version(mlflow_uri, name, model2, {"eval_accuracy": 0.5}, run_id)
    v3 = tracking.register_version(mlflow_uri, name, model_id, {"eval_accuracy": "n/a"}, run_id)
    assert (v2, v3) == ("2", "3")
    assert len(client.search_model_versions(f"name = '{name}'")) == 3
    assert tracking.best_version(mlflow_uri, name, "eval_accuracy") == "2"
    assert tracking.best_version(mlflow_uri, name, "no_such_tag") is None
    tracking.set_version_tags(mlflow_uri, name, "1", {"eval_accuracy": 0.9, "note": "recheck"})
    assert tracking.best_version(mlflow_uri, name, "eval_accuracy") == "1"
    assert client.get_model_version(name, "1").tags["note"] == "recheck"

    assert tracking.get_alias_version(mlflow_uri, name, "champion") is None
    tracking.set_alias(mlflow_uri, name, "champion", v2)
    assert tracking.get_alias_version(mlflow_uri, name, "champion") == "2"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"

    folder = tracking.download_model(mlflow_uri, f"models:/{name}@champion", tmp_path / "dl")
    assert (folder / "adapter_config.json").is_file()
    assert not (folder / "trainer_state.pt").exists() and not (folder / "COMPLETE").exists()
    assert torch.equal(load_file(str(folder / "adapter_model.safetensors"))["base_model.model.lora_A.weight"],
                       load_file(str(ckpt2 / "adapter_model.safetensors"))["base_model.model.lora_A.weight"])
    folder1 = tracking.download_model(mlflow_uri, f"models:/{name}/1", tmp_path / "dl1")
    assert (folder1 / "tokenizer_config.json").is_file()
    assert json.loads((folder1 / "state.json").read_text()) == {"step": 10}

    with pytest.raises(TrackingError) as err:
        tracking.download_model(mlflow_uri, f"models:/{name}@no-such-alias", tmp_path / "dl2")
    assert "\n" not in str(err.value) and isinstance(err.value, UserError)
    with pytest.raises(TrackingError, match="no-such-model"):
        tracking.get_alias_version(mlflow_uri, "no-such-model", "champion")
    with pytest.raises(TrackingError):
        tracking.best_version(mlflow_uri, unique("missing"), "eval_accuracy")
    with pytest.raises(TrackingError, match="adapter_config"):
        tracking.log_adapter_model(mlflow_uri, run_id, tmp_path, name="x", step=1)
    # every call above used the explicit URI, never the process-wide one
    assert not process_uri_elsewhere.exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dead_server_fails_fast_with_one_line() -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingError) as err:
        tracking.check_tracking(uri)
    with pytest.raises(TrackingError):
        tracking.start_run(uri, "exp", "run")
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"pipeline.tracking_uri: MLflow at {uri} does not answer")
    assert "mlflow server" in msg and "MLFLOW_TRACKING_URI" in msg


def test_sqlite_folder_must_be_writable(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(TrackingError, match="pipeline.tracking_uri"):
        tracking.check_tracking(f"sqlite:///{blocker / 'mlflow.db'}")
    tracking.check_tracking(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")
    assert (tmp_path / "new").is_dir()
    with pytest.raises(TrackingError, match="pipeline.tracking_uri: cannot open"):
        tracking.start_run((tmp_path / "file-store").as_uri(), "exp", "run")


def test_session_store_keeps_artifacts_in_its_folder(mlflow_uri: str) -> None:
    db_dir = Path(mlflow_uri.removeprefix("sqlite:///")).parent
    default = MlflowClient(mlflow_uri).get_experiment("0")
    assert default.artifact_location.startswith((db_dir / "mlartifacts").as_uri())
