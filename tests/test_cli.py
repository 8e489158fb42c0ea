"""The `grpo` command: help, environment defaults, and bad input that fails before any training
with exit status 2 and one `error: ...` line naming the field.

    pytest -q tests/test_cli.py
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_pipeline.cli import main, set_env_defaults

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "grpo_pipeline", *args], cwd=cwd, capture_output=True, text=True, timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_help_is_fast_and_does_not_import_prefect() -> None:
    for args in (["--help"], ["run", "--help"], ["promote", "--help"], ["eval", "--help"],
                 ["data", "--help"], ["tiny-model", "--help"]):
        out = _run(*args)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("usage: grpo"), out.stdout
    assert "--set KEY=VALUE" in _run("run", "--help").stdout
    top = _run("--help").stdout
    assert all(env in top for env in ("countdown", "reasoning_gym:<dataset>", "dataset")), top
    code = (
        "import sys, grpo_pipeline.cli as c; c.build_parser(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'torch', 'mlflow')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout


def test_env_defaults_are_set_only_when_missing(tmp_path: Path) -> None:
    env = {"DO_NOT_TRACK": "0"}
    set_env_defaults(env, tmp_path)
    assert env == {
        "DO_NOT_TRACK": "0",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "TOKENIZERS_PARALLELISM": "false",
        "PREFECT_HOME": str(tmp_path / ".prefect"),
    }


@pytest.fixture
def valid(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Overrides that pass preflight; each test spoils one of them."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / ".prefect"))
    return [
        f"model.name_or_path={tiny_model_dir}",
        "model.build_tiny_if_missing=false",
        f"pipeline.output_dir={tmp_path / 'runs'}",
        f"data.cache_dir={tmp_path / 'data'}",
        f"pipeline.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    no_target = tmp_path / "no_target.jsonl"
    no_target.write_text("\n".join(json.dumps({"nums": [1, 2, 3], "answer": 6}) for _ in range(5)))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    port = _free_port()
    return {
        "unknown key": (["train.bogus=1"], "train.bogus: unknown key"),
        "group size": (["train.group_size=1"], "group_size is 1"),
        "no target column": ([f"data.source={no_target}"], "data.source: column 'target' is missing"),
        "hub model offline": (
            ["model.name_or_path=no-such-org/no-such-model"],
            "model.name_or_path: cannot load 'no-such-org/no-such-model'",
        ),
        "unwritable output": ([f"pipeline.output_dir={blocker / 'runs'}"], "pipeline.output_dir: cannot write"),
        "too long for the model": (
            ["generation.max_new_tokens=1020"],
            "generation.max_new_tokens: the longest prompt (",
        ),
        "float16 training": (["model.dtype=float16"], "model.dtype: float16 trains without loss scaling"),
        "vllm temperature": (
            ["generation.backend=vllm", "generation.temperature=2.5"], "vLLM accepts at most 2",
        ),
        "dead tracking": (
            [f"pipeline.tracking_uri=http://127.0.0.1:{port}"],
            f"pipeline.tracking_uri: MLflow at http://127.0.0.1:{port} does not answer",
        ),
    }


@pytest.mark.parametrize("case", ["unknown key", "group size", "no target column", "hub model offline",
                                  "unwritable output", "dead tracking", "too long for the model",
                                  "float16 training", "vllm temperature"])
def test_bad_input_fails_before_training_in_one_line(
    case: str, valid: list[str], tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    overrides, expected = _bad_inputs(tmp_path)[case]
    code = main(["run", "--set", *valid, *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir())  # nothing trained


def test_bad_input_through_the_installed_command(valid: list[str], tmp_path: Path) -> None:
    out = _run("run", "--set", *valid, "train.micro_batch_size=3", cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid config: train: micro_batch_size 3"), lines


def test_missing_config_file(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert main(["run", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.startswith("error: config file")


def test_data_command_prints_the_ref_and_reuses_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["data", "--show", "0", "--set", "data.generate_rows=50", f"data.cache_dir={tmp_path}"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["train_rows"] + first["test_rows"] == 50 and not first["reused"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["reused"]


def test_tiny_model_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["tiny-model", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "config.json").is_file()
