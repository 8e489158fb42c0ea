"""Run comparison against a real MLflow sqlite store: two small runs logged directly with mlflow.

    pytest -q tests/test_compare.py
"""

from __future__ import annotations

import argparse
import socket
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image

from grpo.compare import compare_runs, differing_params, format_table, main_compare, plot_runs
from grpo.errors import TrackingError
from grpo.plots import plot_run_curves

COMMON = {"train.learning_rate": "0.0005", "train.prompts_per_step": "2", "model.name_or_path": "tiny"}


def _log_run(client, exp_id: str, name: str, group_size: int, accs: list[tuple[int, float]],
             rewards: list[tuple[int, float]]) -> str:
    run = client.create_run(exp_id, run_name=name)
    rid = run.info.run_id
    for k, v in {**COMMON, "train.group_size": str(group_size)}.items():
        client.log_param(rid, k, v)
    for step, v in rewards:
        client.log_metric(rid, "reward_mean", v, step=step)
    for step, v in accs:
        client.log_metric(rid, "eval/accuracy", v, step=step)
    time.sleep(0.05)
    client.set_terminated(rid)
    return rid


@pytest.fixture(scope="module")
def two_runs(mlflow_uri: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    """Experiment name and the ids of run A (group 4) and run B (group 8, one registered version)."""
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    exp_name = f"compare-{uuid.uuid4().hex[:6]}"
    art = tmp_path_factory.mktemp("compare-artifacts")
    exp_id = client.create_experiment(exp_name, artifact_location=art.as_uri())
    a = _log_run(client, exp_id, "run-a", 4, accs=[(2, 0.25), (4, 0.5), (6, 0.375)],
                 rewards=[(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4), (5, 0.5), (6, 0.55)])
    b = _log_run(client, exp_id, "run-b", 8, accs=[(2, 0.125), (4, 0.25)],
                 rewards=[(1, 0.0), (2, 0.1), (3, 0.2), (4, 0.3)])
    # Register an adapter of run B the way MLflow 3 wants it: a LoggedModel, then models:/<id>.
    folder = art / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    model = client.create_logged_model(exp_id, name="adapter", source_run_id=b)
    client.log_model_artifacts(model.model_id, str(folder))
    client.finalize_logged_model(model.model_id, "READY")
    registry = MlflowClient(mlflow_uri, registry_uri=mlflow_uri)  # no process-wide registry URI for later tests
    registry.create_registered_model(f"{exp_name}-lora")
    registry.create_model_version(f"{exp_name}-lora", f"models:/{model.model_id}", run_id=b, model_id=model.model_id)
    return exp_name, a, b


def test_differing_params_counts_missing_keys() -> None:
    assert differing_params([{"a": "1", "b": "2"}, {"a": "1", "b": "3"}]) == ["b"]
    assert differing_params([{"a": "1"}, {"a": "1", "c": "x"}]) == ["c"]
    assert differing_params([{"a": "1"}, {"a": "1"}]) == []


def test_compare_runs_table(mlflow_uri: str, two_runs: tuple[str, str, str]) -> None:
    exp, a, b = two_runs
    df = compare_runs(mlflow_uri, exp)
    assert list(df["run_id"]) == [a, b]  # oldest first
    assert list(df["run_name"]) == ["run-a", "run-b"]
    # Only the differing config key is shown, between the name/id and the results.
    params = [c for c in df.columns if "." in c]
    assert params == ["train.group_size"]
    assert list(df["train.group_size"]) == ["4", "8"]
    a_row, b_row = df.iloc[0], df.iloc[1]
    assert a_row["best_accuracy"] == pytest.approx(0.5)
    assert a_row["final_accuracy"] == pytest.approx(0.375)  # value at the last step, not the best
    assert b_row["best_accuracy"] == pytest.approx(0.25)
    assert b_row["final_accuracy"] == pytest.approx(0.25)
    assert (a_row["steps"], b_row["steps"]) == (6, 4)
    assert a_row["wall_time_s"] > 0 and b_row["wall_time_s"] > 0
    assert a_row["registered_versions"] == ""
    assert b_row["registered_versions"] == f"{exp}-lora v1"

    text = format_table(df)
    lines = text.splitlines()
    assert len(lines) == 3
    assert "train.group_size" in lines[0] and "train.learning_rate" not in text
    assert "0.375" in lines[1] and "0.500" in lines[1]
    assert f"{exp}-lora v1" in lines[2]


def test_compare_subset_and_errors(mlflow_uri: str, two_runs: tuple[str, str, str]) -> None:
    exp, a, _ = two_runs
    df = compare_runs(mlflow_uri, exp, run_ids=[a])
    assert list(df["run_id"]) == [a]
    assert not [c for c in df.columns if "." in c]  # one run: nothing differs
    with pytest.raises(TrackingError, match="experiment 'no-such-exp' not found"):
        compare_runs(mlflow_uri, "no-such-exp")


def test_compare_server_down_is_one_line() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match=f"127.0.0.1:{port} does not answer") as err:
        compare_runs(f"http://127.0.0.1:{port}", "grpo-countdown")
    assert "\n" not in str(err.value) and time.monotonic() - t0 < 15


def test_plot_runs_writes_png(mlflow_uri: str, two_runs: tuple[str, str, str], tmp_path: Path) -> None:
    exp, _, _ = two_runs
    out = plot_runs(mlflow_uri, exp, tmp_path / "sub" / "compare.png")
    assert out.is_file() and out.stat().st_size > 5000
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (1200, 450)


def test_main_compare_prints_and_plots(
    mlflow_uri: str, two_runs: tuple[str, str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exp, _, _ = two_runs
    png = tmp_path / "c.png"
    assert main_compare(["--experiment", exp, "--tracking-uri", mlflow_uri, "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "run-a" in out and "run-b" in out and "train.group_size" in out
    assert png.is_file() and png.stat().st_size > 0


def test_plot_run_curves_draws_both_panels(tmp_path: Path) -> None:
    history = [{"step": s, "reward_mean": 0.1 * s, "loss": 0.0} for s in range(1, 6)]
    evals = [{"step": 0, "accuracy": 0.0}, {"step": 5, "accuracy": 0.4}]
    fig = plot_run_curves(history, evals, title="run-x")
    ax_r, ax_a = fig.axes[:2]
    x, y = ax_r.lines[0].get_data()
    assert list(x) == [1, 2, 3, 4, 5] and y[-1] == pytest.approx(0.5)
    x, y = ax_a.lines[0].get_data()
    assert list(x) == [0, 5] and list(y) == [0.0, 0.4]
    path = tmp_path / "curves.png"
    fig.savefig(path)
    assert path.stat().st_size > 0
    # Objects with attributes (e.g. grpo.evaluate.EvalResult) work as well as mappings.
    ns = [argparse.Namespace(step=3, accuracy=0.2)]
    fig = plot_run_curves([], ns)
    assert not fig.axes[0].lines and list(fig.axes[1].lines[0].get_xdata()) == [3]
