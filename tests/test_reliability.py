"""Reliability, run for real on the tiny model: nothing non-finite is trained on, saved,
registered or promoted; bad input ends in one line before any work; no signal leaves a process
behind; a killed run resumes exactly.

    pytest -q tests/test_reliability.py

Covers: non-finite config values; a reward that returns NaN, a GRPO learning rate and a
warm-start learning rate that blow the weights up (each stops with a `TrainingDiverged` naming the
step and the likely cause, before a non-finite weight is kept); an adapter holding a NaN weight,
refused by the registry and by promotion; a tie keeps the champion, a candidate that solves
nothing is flagged; a bad recipe file (duplicate key, YAML error with its line, binary), numbers
given as booleans, unusable MLflow names, unusable tracking stores, unknown LoRA targets, a
Prefect server that never answers, a missing model or version for `grpo promote`, rows with
negative numbers or without any solution, a model folder that cannot be written; a full disk (not
retried, one line); SIGTERM during a round (exit 143, MLflow run FAILED, no process left); SIGKILL
of the whole process group during a round, then `grpo run --resume` (one MLflow run, every step
once, no version twice); two first runs on one new MLflow store at once.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from mlflow import MlflowClient
from pipeline_config import tiny_config

from grpo.algorithm import check_finite_update, check_finite_weights
from grpo.config import load_config
from grpo.countdown import generate
from grpo.errors import TrainingDiverged, UserError
from grpo_pipeline.cli import main


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.learning_rate=.inf", "train.learning_rate: inf"),
        ("sft.learning_rate=.inf", "sft.learning_rate: inf"),
        ("train.reward_weights=[.nan, 1]", "train.reward_weights.0: nan"),
        ("train.max_grad_norm=.nan", "train.max_grad_norm: nan"),
        ("generation.temperature=-.inf", "generation.temperature: -inf"),
    ],
)
def test_non_finite_config_values_fail_in_one_line(
    override: str, field: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(["run", "--set", f"pipeline.output_dir={tmp_path / 'runs'}", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: invalid config: {field}") and "not a finite number" in err[0], err
    assert not (tmp_path / "runs").exists()


def test_the_update_checks_refuse_non_finite_values() -> None:
    check_finite_update(0.5, 1.0)
    check_finite_weights([torch.ones(3), torch.zeros(2, 2)])
    for loss, norm in ((math.nan, 1.0), (0.5, math.inf)):
        with pytest.raises(TrainingDiverged, match="the update was not applied"):
            check_finite_update(loss, norm)
    with pytest.raises(TrainingDiverged, match="non-finite"):
        check_finite_weights([torch.ones(3), torch.tensor([1.0, math.nan])])


def _trainer(model_dir: Path, *overrides: str, reward_fns=None):
    from grpo.models import load_policy
    from grpo.trainer import GRPOTrainer

    cfg = load_config(None, [
        f"model.name_or_path={model_dir}", "train.prompts_per_step=2", "train.group_size=4",
        "train.micro_batch_size=8", "generation.max_new_tokens=8", *overrides,
    ])
    model, tok = load_policy(cfg)
    return GRPOTrainer(cfg, model, tok, generate(32, seed=0), reward_fns=reward_fns, total_steps=4)


def test_a_reward_returning_nan_stops_the_step_and_names_the_reward(tiny_model_dir: Path) -> None:
    def half_nan(completions, **_):
        return [math.nan if i % 2 else 1.0 for i in range(len(completions))]

    trainer = _trainer(tiny_model_dir, reward_fns=[("half_nan", half_nan)])
    with pytest.raises(TrainingDiverged, match=r"^reward 'half_nan' returned nan for completion 1 \(4 of 8"):
        trainer.train(1, progress=False)


def test_a_diverging_learning_rate_stops_before_a_non_finite_weight_is_kept(tiny_model_dir: Path) -> None:
    """Adam moves each weight by about the learning rate: 1e30 leaves finite but huge weights whose
    next forward overflows; the loss turns NaN and the step stops with its number."""
    def varied(completions, **_):  # rewards that differ within a group: the update has a gradient
        return [float(len(c) % 3) for c in completions]

    trainer = _trainer(tiny_model_dir, "train.learning_rate=1e30", "train.beta=0.04", reward_fns=[("varied", varied)])
    with pytest.raises(TrainingDiverged, match=r"^GRPO step \d: .*lower train.learning_rate \(1e\+30\)") as info:
        trainer.train(4, progress=False)
    assert len(str(info.value).splitlines()) == 1
    adapter = [p for n, p in trainer.model.named_parameters() if "lora_" in n]
    assert all(bool(torch.isfinite(p).all()) for p in adapter)  # the failing update was not applied


def test_a_diverging_warm_start_stops_with_its_step(tiny_model_dir: Path) -> None:
    from grpo.models import load_base_model, load_tokenizer
    from grpo.sft import train_sft

    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "sft.learning_rate=1e30",
                             "sft.max_steps=5", "sft.batch_size=8", "sft.warmup_steps=0"])
    model, tok = load_base_model(cfg.model), load_tokenizer(str(tiny_model_dir))
    model.requires_grad_(True)
    with pytest.raises(TrainingDiverged, match=r"^warm start step \d: .*lower sft.learning_rate \(1e\+30\)"):
        train_sft(model, tok, generate(64, seed=0), cfg, progress=False)


def _registered(tmp_path: Path, model_dir: Path, uri: str, name: str):
    """A run with one trained round: (cfg, dataset ref, checkpoint, its evaluation, run id)."""
    from grpo.stages import data, evaluate, runs, train

    cfg = tiny_config(tmp_path, model_dir, uri, name, "pipeline.rounds=1")
    ref = data.prepare(cfg)
    run_id = runs.open_run(cfg, uri).run_id
    ckpt = train.train_round(cfg, ref, 0, run_id, uri, progress=False)
    result = evaluate.evaluate_checkpoint(cfg, ckpt, ref, run_id, uri, progress=False)
    return cfg, ref, ckpt, result, run_id


def test_a_non_finite_adapter_is_neither_registered_nor_promoted(
    tmp_path: Path, tiny_model_dir: Path, mlflow_uri: str
) -> None:
    from safetensors.torch import load_file, save_file

    from grpo.stages import registry

    cfg, ref, ckpt, result, run_id = _registered(tmp_path, tiny_model_dir, mlflow_uri, "nan-adapter")
    weights = Path(ckpt.path) / "adapter_model.safetensors"
    intact = load_file(weights)
    spoiled = dict(intact)
    first = sorted(spoiled)[0]
    spoiled[first] = torch.full_like(spoiled[first], math.nan)
    save_file(spoiled, weights)
    with pytest.raises(TrainingDiverged, match=f"^checkpoint {ckpt.path}: the adapter holds non-finite weights"):
        registry.register_elite(cfg, ckpt, result, run_id, mlflow_uri, None, ref)
    assert MlflowClient(mlflow_uri).search_model_versions("name = 'lora-nan-adapter'") == []

    # A version registered with a NaN weight by some other means is refused at promotion.
    save_file(intact, weights)
    version = registry.register_elite(cfg, ckpt, result, run_id, mlflow_uri, None, ref).version
    stored = MlflowClient(mlflow_uri).get_model_version_download_uri("lora-nan-adapter", version)
    (stored_weights,) = Path(urlparse(stored).path).rglob("adapter_model.safetensors")
    save_file(spoiled, stored_weights)  # the artifact store now holds a NaN adapter for the version
    split = registry.held_out(mlflow_uri, "lora-nan-adapter", version)
    with pytest.raises(TrainingDiverged, match=f"version {version}: the adapter holds non-finite weights"):
        registry.evaluate_version(mlflow_uri, "lora-nan-adapter", version, split.test_path, progress=False)


def test_a_tie_keeps_the_champion_and_a_zero_score_is_flagged(
    tmp_path: Path, tiny_model_dir: Path, mlflow_uri: str
) -> None:
    from grpo import tracking
    from grpo.stages import registry

    cfg, ref, ckpt, result, run_id = _registered(tmp_path, tiny_model_dir, mlflow_uri, "ties")
    first = registry.register_elite(cfg, ckpt, result, run_id, mlflow_uri, None, ref).version
    better = result.model_copy(update={"accuracy": result.accuracy + 0.5})
    second = registry.register_elite(cfg, ckpt.model_copy(update={"step": 4}), better, run_id, mlflow_uri).version
    assert (first, second) == ("1", "2")

    zero = result.model_copy(update={"accuracy": 0.0})
    cands = registry.PromotionCandidates(model_name="lora-ties", alias="champion", candidate="1", champion=None)
    decision = registry.decide_promotion(mlflow_uri, cands, zero, None, ref.test_path)
    assert decision.moved and "warning: the candidate solves none of the 8 held-out problems" in decision.reason

    tie = registry.PromotionCandidates(model_name="lora-ties", alias="champion", candidate="2", champion="1")
    decision = registry.decide_promotion(mlflow_uri, tie, zero, zero, ref.test_path)
    assert (decision.moved, decision.decision) == (False, "rejected") and "a tie keeps the champion" in decision.reason
    assert tracking.get_alias_version(mlflow_uri, "lora-ties", "champion") == "1"

    decision = registry.decide_promotion(mlflow_uri, tie, better, zero, ref.test_path)
    assert decision.moved and tracking.get_alias_version(mlflow_uri, "lora-ties", "champion") == "2"


# ------------------------------------------------------------------- bad input found up front


def _one_error_line(capsys: pytest.CaptureFixture, code: int) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("train:\n  group_size: 4\n  group_size: 8\n", "key 'group_size' is given twice at line 3, column 3"),
        ("train:\n  group_size: [4\n", "is not valid YAML: expected ',' or ']', but got '<stream end>' at line 3"),
        (b"\x7fELF\x02\x01\x01\x00\x00\xff\xfe", "is not text; pass a YAML recipe to --config"),
    ],
)
def test_a_bad_recipe_file_is_one_line_with_its_position(
    text: str | bytes, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert expected in _one_error_line(capsys, main(["run", "--config", str(recipe)]))


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.group_size=true", "train.group_size: expected a number, got true"),
        ("pipeline.registered_model=it's-mine", "pipeline.registered_model: \"it's-mine\" is not a usable MLflow name"),
        ("pipeline.experiment=", "pipeline.experiment: String should have at least 1 character"),
    ],
)
def test_values_that_used_to_fail_late_fail_in_the_config(
    override: str, expected: str, capsys: pytest.CaptureFixture
) -> None:
    assert expected in _one_error_line(capsys, main(["run", "--set", override]))


def test_unusable_tracking_stores_fail_in_preflight(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "a-folder"
    folder.mkdir()
    not_a_db = tmp_path / "notes.db"
    not_a_db.write_text("these are notes\n")
    cases = {
        f"sqlite:///{folder}": f"{folder} is a folder; name a database file in it",
        f"sqlite:///{not_a_db}": f"{not_a_db} is not an SQLite database",
        "mongodb://localhost/runs": "has the scheme 'mongodb', which MLflow cannot store runs in",
    }
    for uri, expected in cases.items():
        code = main(["run", "--set", f"pipeline.tracking_uri={uri}", f"pipeline.output_dir={tmp_path / 'runs'}",
                     f"data.cache_dir={tmp_path / 'data'}"])
        assert expected in _one_error_line(capsys, code)
    assert not_a_db.read_text() == "these are notes\n"


def test_unknown_lora_targets_fail_in_preflight(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(["run", "--set", f"model.name_or_path={tiny_model_dir}", "model.build_tiny_if_missing=false",
                 "lora.target_modules=[q_proj, nope_proj]", f"pipeline.output_dir={tmp_path / 'runs'}",
                 f"data.cache_dir={tmp_path / 'data'}", f"pipeline.tracking_uri=sqlite:///{tmp_path / 'm.db'}"])
    line = _one_error_line(capsys, code)
    assert "lora.target_modules: ['nope_proj'] are not modules of" in line and "'down_proj'" in line


def test_a_prefect_server_that_never_answers_fails_within_seconds(capsys: pytest.CaptureFixture) -> None:
    import socket
    import time

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from grpo_pipeline.cli import PREFECT_HEALTH_TIMEOUT_S, check_prefect_api

    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/api"
        with temporary_settings({PREFECT_API_URL: url}):
            started = time.monotonic()
            with pytest.raises(UserError, match=f"^PREFECT_API_URL: the Prefect server at {url} does not answer"):
                check_prefect_api()
            assert time.monotonic() - started < PREFECT_HEALTH_TIMEOUT_S + 5


def test_promote_names_a_missing_model_or_version_in_one_line(
    mlflow_uri: str, tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    from grpo.stages import registry

    store = f"pipeline.tracking_uri={mlflow_uri}"
    assert "'no-such-model'" in _one_error_line(capsys, main(["promote", "--model", "no-such-model", "--set", store]))
    cfg, ref, ckpt, result, run_id = _registered(tmp_path, tiny_model_dir, mlflow_uri, "promote-999")
    registry.register_elite(cfg, ckpt, result, run_id, mlflow_uri, None, ref)
    capsys.readouterr()
    line = _one_error_line(capsys, main(["promote", "--model", "lora-promote-999", "--version", "999", "--set", store]))
    assert "'lora-promote-999' version 999" in line


# ------------------------------------------------------------------- signals


def _start_grpo_run(tmp_path: Path, model_dir: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    """`grpo run` on the tiny model in its own session (process group), its output in a log file."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env["PREFECT_HOME"] = str(tmp_path / ".prefect")
    args = [sys.executable, "-m", "grpo_pipeline", "run", "--set", f"model.name_or_path={model_dir}",
            "model.build_tiny_if_missing=false", f"pipeline.output_dir={tmp_path / 'runs'}",
            f"data.cache_dir={tmp_path / 'data'}", f"pipeline.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "sft.enabled=false", "data.generate_rows=200", "train.prompts_per_step=2", "train.group_size=4",
            "train.micro_batch_size=8", "generation.max_new_tokens=16", "eval.num_problems=8",
            "eval.batch_size=8", *extra]
    log = tmp_path / f"grpo-run-{len(list(tmp_path.glob('grpo-run-*.log')))}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(args, cwd=tmp_path, env=env, start_new_session=True, stdout=out, stderr=out)
    return proc, log


def _wait_for(proc: subprocess.Popen, log: Path, ready: Callable[[], bool], seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while proc.poll() is None and time.monotonic() < deadline and not ready():
        time.sleep(0.5)
    assert proc.poll() is None and ready(), log.read_text(errors="replace")[-3000:]


def test_sigterm_during_a_round_leaves_no_process_behind(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`kill <grpo run>` mid-round: the run ends (status 143), the MLflow run is marked FAILED by
    the flow's crash hook, and nothing it started (the temporary Prefect server) survives it."""
    from grpo import tracking

    proc, log = _start_grpo_run(tmp_path, tiny_model_dir, "pipeline.steps_per_round=1000")
    _wait_for(proc, log, lambda: "GRPO:" in log.read_text(errors="replace"))  # the round's progress bar
    time.sleep(3)  # a few steps into the round
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode == 143, log.read_text()[-3000:]
    time.sleep(2)
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # no process of its session is left (it was the group leader)
    (run,) = tracking.experiment_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "grpo-countdown")
    assert run.info.status == "FAILED", log.read_text(errors="replace")[-3000:]


def test_a_run_killed_mid_round_resumes_with_no_step_repeated(tmp_path: Path, tiny_model_dir: Path) -> None:
    """SIGKILL to the whole process group during round 2, then `grpo run --resume last`: one MLflow
    run, every step logged once, the planned steps reached, no version registered twice."""
    from grpo import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    plan = ["pipeline.rounds=2", "pipeline.steps_per_round=4"]
    proc, log = _start_grpo_run(tmp_path, tiny_model_dir, *plan)
    _wait_for(proc, log, lambda: any((tmp_path / "runs").glob("*/checkpoints/step-000004/COMPLETE")))
    time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    (killed,) = tracking.experiment_runs(uri, "grpo-countdown")
    assert killed.info.status == "RUNNING"  # nothing could mark it: the process is gone

    proc, log = _start_grpo_run(tmp_path, tiny_model_dir, *plan, "--resume")
    assert proc.wait(timeout=600) == 0, log.read_text(errors="replace")[-3000:]
    printed = log.read_text(errors="replace")
    assert f"resumed run {killed.info.run_id}" in printed
    (run,) = tracking.experiment_runs(uri, "grpo-countdown")
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    steps = sorted(m.step for m in tracking.metric_history(uri, run.info.run_id, "reward_mean"))
    assert steps == list(range(1, 9))
    versions = tracking.run_versions(uri, run.info.run_id)
    keys = [v.tags["elite_key"] for v in versions]
    assert len(keys) == len(set(keys)) and all(v.tags["grpo.run_finished"] == "true" for v in versions)


def test_a_full_disk_is_not_retried_and_ends_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from prefect.states import Failed

    from grpo.stages import data
    from grpo_pipeline.tasks.retry import retry_unless_user_error

    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "runs" / "step-000004"))
    assert not retry_unless_user_error(None, None, Failed(data=full))
    assert retry_unless_user_error(None, None, Failed(data=OSError(errno.EIO, "Input/output error")))

    def disk_full(cfg: object) -> None:
        raise full

    monkeypatch.setattr(data, "preflight", disk_full)
    line = _one_error_line(capsys, main(["run", "--set", f"pipeline.output_dir={tmp_path / 'runs'}"]))
    assert line == (f"error: No space left on device: {full.filename}; free space (or point the folder at "
                    "another disk) and continue the run with `grpo run --resume`: nothing saved so far is lost")


def _rows_file(tmp_path: Path, rows: list[dict]) -> Path:
    import json

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([{"nums": [3, -4, 5], "target": 4}] * 3, "data.source: row 0: nums must be non-negative"),
        ([{"nums": [2, 3, 5], "target": 10**6}] * 5, "none of the first 5 rows of"),
    ],
)
def test_unusable_rows_fail_in_preflight(
    rows: list[dict], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(["run", "--set", f"data.source={_rows_file(tmp_path, rows)}", f"pipeline.output_dir={tmp_path}/r",
                 f"data.cache_dir={tmp_path}/d", f"pipeline.tracking_uri=sqlite:///{tmp_path}/m.db"])
    assert expected in _one_error_line(capsys, code)


def test_some_unsolvable_rows_are_counted_in_a_warning(
    tmp_path: Path, tiny_model_dir: Path, mlflow_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    from grpo.stages import data

    rows = [{"nums": [93, 4, 68], "target": 29}] * 3 + [{"nums": [2, 3, 5], "target": 10**6}]
    cfg = tiny_config(tmp_path, tiny_model_dir, mlflow_uri, "rows", f"data.source={_rows_file(tmp_path, rows)}")
    data.preflight(cfg)
    assert "1 of the first 4 rows of" in caplog.text and "have no solution" in caplog.text


def test_a_model_folder_that_cannot_be_written_fails_in_preflight(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(["run", "--set", "model.name_or_path=/proc/grpo-tiny-model", f"pipeline.output_dir={tmp_path}/r",
                 f"data.cache_dir={tmp_path}/d", f"pipeline.tracking_uri=sqlite:///{tmp_path}/m.db"])
    line = _one_error_line(capsys, code)
    assert line.startswith("error: model.name_or_path: cannot build the tiny model in '/proc/grpo-tiny-model'")


def test_two_first_runs_on_a_new_store_do_not_race_on_its_migration(tmp_path: Path) -> None:
    """Both processes open the same new sqlite store at once; MLflow's schema migration runs once
    (under the store's lock file) and both create their run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = "import sys; from grpo import tracking; tracking.check_tracking(sys.argv[1]); " \
           "print(tracking.start_run(sys.argv[1], 'race', 'r'))"
    procs = [subprocess.Popen([sys.executable, "-c", code, uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    from grpo import tracking

    assert len(tracking.experiment_runs(uri, "race")) == 2
