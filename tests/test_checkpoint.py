"""Checkpoints: an exact round trip (adapter, optimizer, scheduler, RNG, counters), peft loading,
atomic saves that survive a crash mid-write, retries of the same step, pruning, and verification
against COMPLETE (damaged newest checkpoints are skipped, loading one is a one-line error)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

import grpo.checkpoint as ckpt
from grpo.checkpoint import (
    CheckpointError,
    capture_rng,
    checkpoint_path,
    checkpoint_ref,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
)
from grpo.errors import UserError

VOCAB = 16


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, **{str(i): i + 2 for i in range(10)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def make_base(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(cfg)


def make_policy(lora_seed: int) -> tuple[PeftModel, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Same base weights every time (seed 0); LoRA A matrices drawn from `lora_seed`."""
    base = make_base(0)
    torch.manual_seed(lora_seed)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    return model, opt, sched


def train_steps(model: PeftModel, opt: torch.optim.Optimizer, sched, n: int, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randint(0, VOCAB, (2, 6), generator=g)  # (N, T)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def test_round_trip_restores_everything(tmp_path: Path, tokenizer) -> None:
    model, opt, sched = make_policy(lora_seed=1)
    train_steps(model, opt, sched, 3)
    saved_adapter = adapter_state(model)
    saved_opt = opt.state_dict()
    state = {"step": 3, "round": 1, "data_position": 24, "history": [0.5, 0.25]}

    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    path = save_checkpoint(
        checkpoint_path(tmp_path, 3), model=model, tokenizer=tokenizer, optimizer=opt,
        scheduler=sched, state=state,
    )
    expected_draws = (torch.rand(4), random.random(), np.random.rand(3))

    assert path == (tmp_path / "checkpoints" / "step-000003").absolute()
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json",
                 "trainer_state.pt", "state.json", "COMPLETE"):
        assert (path / name).is_file(), name
    assert json.loads((path / "state.json").read_text()) == state

    model2, opt2, sched2 = make_policy(lora_seed=99)
    assert not torch.equal(  # a different starting adapter, so the load must do the work
        next(iter(adapter_state(model2).values())), next(iter(saved_adapter.values()))
    )
    torch.manual_seed(12345)
    loaded = load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2)

    assert loaded == state
    assert_same_tensors(adapter_state(model2), saved_adapter)
    got_opt = opt2.state_dict()
    assert got_opt["param_groups"] == saved_opt["param_groups"]
    for idx, st in saved_opt["state"].items():
        assert_same_tensors(got_opt["state"][idx], st)
    assert sched2.last_epoch == sched.last_epoch == 3
    assert sched2.get_last_lr() == sched.get_last_lr()
    t, py, npv = expected_draws
    assert torch.equal(torch.rand(4), t)
    assert random.random() == py
    assert np.array_equal(np.random.rand(3), npv)

    # Training continues identically from the restored state.
    train_steps(model, opt, sched, 2, seed=3)
    train_steps(model2, opt2, sched2, 2, seed=3)
    assert_same_tensors(adapter_state(model2), adapter_state(model))


def test_peft_from_pretrained_loads_checkpoint(tmp_path: Path, tokenizer) -> None:
    model, opt, sched = make_policy(lora_seed=1)
    train_steps(model, opt, sched, 2)
    path = save_checkpoint(tmp_path / "ck", model=model, tokenizer=tokenizer, optimizer=opt,
                           scheduler=None, state={"step": 2})
    loaded = PeftModel.from_pretrained(make_base(0), str(path))
    model.eval()
    loaded.eval()
    x = torch.tensor([[2, 3, 4, 5]])  # (1, T)
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=x).logits, model(input_ids=x).logits, atol=1e-6)
    assert_same_tensors(adapter_state(loaded), adapter_state(model))
    assert PreTrainedTokenizerFast.from_pretrained(str(path))("1 2").input_ids == [3, 4]
    # a checkpoint without scheduler state loads into a run that has a scheduler
    _, opt2, sched2 = make_policy(lora_seed=5)
    assert load_checkpoint(path, model=loaded, optimizer=opt2, scheduler=sched2) == {"step": 2}


def test_capture_and_restore_rng() -> None:
    state = capture_rng()
    a = (torch.rand(3), random.random(), np.random.rand(2), random.gauss(0, 1))
    restore_rng(state)
    b = (torch.rand(3), random.random(), np.random.rand(2), random.gauss(0, 1))
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and np.array_equal(a[2], b[2]) and a[3] == b[3]


def test_rng_state_loads_with_weights_only(tmp_path: Path) -> None:
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    np.random.standard_normal()
    state = capture_rng()
    torch.save(state, tmp_path / "rng.pt")
    restored = torch.load(tmp_path / "rng.pt", weights_only=True)
    a = (random.gauss(0, 1), np.random.standard_normal(), torch.rand(2))
    restore_rng(restored)
    b = (random.gauss(0, 1), np.random.standard_normal(), torch.rand(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_latest_checkpoint_picks_newest_complete(tmp_path: Path, tokenizer) -> None:
    assert latest_checkpoint(tmp_path) is None
    model, opt, sched = make_policy(lora_seed=1)
    for step in (2, 10, 5):
        save_checkpoint(checkpoint_path(tmp_path, step), model=model, tokenizer=tokenizer,
                        optimizer=opt, scheduler=sched, state={"step": step, "round": step // 5})
    root = tmp_path / "checkpoints"
    (root / "step-000020").mkdir()  # no COMPLETE: never picked
    (root / "step-000020" / "adapter_config.json").write_text("{}")
    leftover = root / "step-000030.tmp-4242"  # a temp folder, even with a marker, is ignored
    leftover.mkdir()
    (leftover / "COMPLETE").write_text("{}")

    latest = latest_checkpoint(tmp_path)
    assert latest == root / "step-000010"
    ref = checkpoint_ref(latest)
    assert (ref.step, ref.round, Path(ref.path)) == (10, 2, latest.absolute())
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 5, 10]


def _failing_write(where: str, action):
    """Replacement for a write inside save_checkpoint that calls `action()` at `where`."""
    if where == "trainer_state":
        def fail_state(path, payload):
            action()

        return "_write_trainer_state", fail_state
    real_write = ckpt._write_text

    def fail_marker(path, text):
        if path.name == "COMPLETE":
            action()
        real_write(path, text)

    return "_write_text", fail_marker


def _disk_full() -> None:
    raise OSError("disk full")


@pytest.mark.parametrize("where", ["trainer_state", "marker", "retry_marker"])
def test_failed_save_keeps_previous_checkpoint(
    tmp_path: Path, tokenizer, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    model, opt, sched = make_policy(lora_seed=1)
    train_steps(model, opt, sched, 1)
    first = save_checkpoint(checkpoint_path(tmp_path, 1), model=model, tokenizer=tokenizer,
                            optimizer=opt, scheduler=sched, state={"step": 1})
    first_adapter = adapter_state(model)
    train_steps(model, opt, sched, 1, seed=8)

    monkeypatch.setattr(ckpt, *_failing_write(where.removeprefix("retry_"), _disk_full))
    step = 1 if where == "retry_marker" else 2  # retry_: the failed save targets an existing step
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(checkpoint_path(tmp_path, step), model=model, tokenizer=tokenizer,
                        optimizer=opt, scheduler=sched, state={"step": step})
    monkeypatch.undo()

    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]
    assert latest_checkpoint(tmp_path) == first
    fresh, fresh_opt, fresh_sched = make_policy(lora_seed=3)
    assert load_checkpoint(first, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched) == {"step": 1}
    assert_same_tensors(adapter_state(fresh), first_adapter)


@pytest.mark.parametrize("where", ["trainer_state", "marker"])
def test_process_killed_mid_save_leaves_nothing_picked(tmp_path: Path, tokenizer, where: str) -> None:
    """A process that dies mid-save (no Python cleanup) leaves a partial temp folder; it is never
    picked or loaded, the previous checkpoint stays loadable, and the next save succeeds."""
    model, opt, sched = make_policy(lora_seed=1)
    train_steps(model, opt, sched, 1)
    first = save_checkpoint(checkpoint_path(tmp_path, 1), model=model, tokenizer=tokenizer,
                            optimizer=opt, scheduler=sched, state={"step": 1})
    first_adapter = adapter_state(model)
    train_steps(model, opt, sched, 1, seed=8)

    def child() -> None:
        name, fn = _failing_write(where, lambda: os._exit(3))
        setattr(ckpt, name, fn)
        save_checkpoint(checkpoint_path(tmp_path, 2), model=model, tokenizer=tokenizer,
                        optimizer=opt, scheduler=sched, state={"step": 2})
        os._exit(0)

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(120)
    assert proc.exitcode == 3

    root = tmp_path / "checkpoints"
    leftovers = [p for p in root.iterdir() if ".tmp-" in p.name]
    assert len(leftovers) == 1 and (leftovers[0] / "adapter_model.safetensors").is_file()
    assert not (leftovers[0] / "COMPLETE").exists()
    assert latest_checkpoint(tmp_path) == first
    fresh, fresh_opt, fresh_sched = make_policy(lora_seed=3)
    assert load_checkpoint(first, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched) == {"step": 1}
    assert_same_tensors(adapter_state(fresh), first_adapter)
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(leftovers[0], model=fresh)

    save_checkpoint(checkpoint_path(tmp_path, 2), model=model, tokenizer=tokenizer,
                    optimizer=opt, scheduler=sched, state={"step": 2})
    assert latest_checkpoint(tmp_path) == root / "step-000002"
    assert prune_checkpoints(tmp_path, keep=None) == leftovers  # the dead process's temp folder


def test_saving_same_step_twice_replaces_it(tmp_path: Path, tokenizer) -> None:
    model, opt, sched = make_policy(lora_seed=1)
    target = checkpoint_path(tmp_path, 4)
    save_checkpoint(target, model=model, tokenizer=tokenizer, optimizer=opt, scheduler=sched,
                    state={"step": 4, "attempt": 1})
    train_steps(model, opt, sched, 2)
    again = save_checkpoint(target, model=model, tokenizer=tokenizer, optimizer=opt,
                            scheduler=sched, state={"step": 4, "attempt": 2})
    assert again == target.absolute()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000004"]
    fresh, fresh_opt, _ = make_policy(lora_seed=3)
    assert load_checkpoint(target, model=fresh, optimizer=fresh_opt)["attempt"] == 2
    assert_same_tensors(adapter_state(fresh), adapter_state(model))


def test_missing_or_incomplete_checkpoint_is_a_user_error(tmp_path: Path) -> None:
    model, _, _ = make_policy(lora_seed=1)
    with pytest.raises(CheckpointError, match="folder not found") as missing:
        load_checkpoint(tmp_path / "nope", model=model)
    partial = tmp_path / "checkpoints" / "step-000001"
    partial.mkdir(parents=True)
    (partial / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="incomplete") as incomplete:
        load_checkpoint(partial, model=model)
    for err in (missing, incomplete):
        assert isinstance(err.value, UserError)
        assert "\n" not in str(err.value)


def test_state_must_be_json_able(tmp_path: Path, tokenizer) -> None:
    model, opt, sched = make_policy(lora_seed=1)
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path / "ck", model=model, tokenizer=tokenizer, optimizer=opt,
                        scheduler=sched, state={"bad": object()})
    assert not (tmp_path / "ck").exists()


def test_prune_keeps_newest_and_protected(tmp_path: Path, tokenizer) -> None:
    model, opt, sched = make_policy(lora_seed=1)
    for step in range(1, 6):
        save_checkpoint(checkpoint_path(tmp_path, step), model=model, tokenizer=None,
                        optimizer=opt, scheduler=sched, state={"step": step})
    root = tmp_path / "checkpoints"
    stale = root / "step-000006.tmp-999999999"
    stale.mkdir()
    assert prune_checkpoints(tmp_path, keep=None) == [stale]
    assert len(ckpt.list_checkpoints(tmp_path)) == 5

    removed = prune_checkpoints(tmp_path, keep=2, protect={checkpoint_path(tmp_path, 2)})
    assert sorted(p.name for p in removed) == ["step-000001", "step-000003"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 4, 5]
    prune_checkpoints(tmp_path, keep=1)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [5]
    with pytest.raises(ValueError):
        prune_checkpoints(tmp_path, keep=0)


# ----------------------------------------------------------------------------- verification


def _two_checkpoints(tmp_path: Path, tokenizer) -> tuple[Path, Path]:
    """Checkpoints at steps 2 and 4 of one run (different adapters)."""
    model, opt, sched = make_policy(lora_seed=1)
    paths = []
    for step in (2, 4):
        train_steps(model, opt, sched, 1, seed=step)
        paths.append(save_checkpoint(checkpoint_path(tmp_path, step), model=model, tokenizer=tokenizer,
                                     optimizer=opt, scheduler=sched, state={"step": step, "round": 0}))
    return paths[0], paths[1]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _zero(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))  # same size: only the sha256 tells


SPOILS: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated_adapter": (lambda ck: _truncate(ck / "adapter_model.safetensors"),
                          r"adapter_model\.safetensors is \d+ bytes, COMPLETE recorded \d+"),
    "zeroed_trainer_state": (lambda ck: _zero(ck / "trainer_state.pt"),
                             r"trainer_state\.pt does not match its sha256 in COMPLETE"),
    "truncated_complete": (lambda ck: _truncate(ck / "COMPLETE"), r"COMPLETE is unreadable \(.+\)"),
    "garbled_complete": (lambda ck: (ck / "COMPLETE").write_bytes(b"\xff\xfe garbage"), r"COMPLETE is unreadable"),
    "empty_manifest": (lambda ck: (ck / "COMPLETE").write_text('{"files": {}}'), r"COMPLETE is malformed"),
    "missing_complete": (lambda ck: (ck / "COMPLETE").unlink(), r"incomplete \(no COMPLETE marker"),
}


@pytest.mark.parametrize("spoil", list(SPOILS))
def test_damaged_newest_checkpoint_is_skipped(
    tmp_path: Path, tokenizer, caplog: pytest.LogCaptureFixture, spoil: str
) -> None:
    intact, damaged = _two_checkpoints(tmp_path, tokenizer)
    assert ckpt.checkpoint_problem(damaged) is None and ckpt.is_complete(damaged)
    damage, reason = SPOILS[spoil]
    damage(damaged)

    with caplog.at_level(logging.WARNING, logger="grpo.checkpoint"):
        assert latest_checkpoint(tmp_path) == intact
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"checkpoint {damaged} skipped: ")
    assert re.search(reason, warnings[0]) and warnings[0].endswith("the newest intact one is step-000002")
    assert not ckpt.is_complete(damaged) and ckpt.is_complete(intact)
    assert ckpt.list_checkpoints(tmp_path) == [(2, intact)]
    assert checkpoint_ref(latest_checkpoint(tmp_path)).step == 2

    model, opt, sched = make_policy(lora_seed=3)
    with pytest.raises(CheckpointError, match=reason) as err:
        load_checkpoint(damaged, model=model, optimizer=opt, scheduler=sched)
    assert isinstance(err.value, UserError)
    assert str(err.value).startswith(f"checkpoint {damaged}: ") and "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match=reason):
        checkpoint_ref(damaged)
    assert load_checkpoint(intact, model=model, optimizer=opt, scheduler=sched) == {"step": 2, "round": 0}


def test_every_checkpoint_damaged_means_none(tmp_path: Path, tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    for path in _two_checkpoints(tmp_path, tokenizer):
        _truncate(path / "adapter_model.safetensors")
    with caplog.at_level(logging.WARNING, logger="grpo.checkpoint"):
        assert latest_checkpoint(tmp_path) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all(w.endswith("none is intact") for w in warnings)
    # a damaged folder is neither counted nor deleted by pruning
    assert prune_checkpoints(tmp_path, keep=1) == [] and len(list((tmp_path / "checkpoints").iterdir())) == 2


def test_complete_records_sizes_and_hashes_and_old_format_still_verifies(tmp_path: Path, tokenizer) -> None:
    intact, newest = _two_checkpoints(tmp_path, tokenizer)
    marker = newest / "COMPLETE"
    manifest = json.loads(marker.read_text())
    assert set(manifest) == {"files", "sha256"}
    assert set(manifest["sha256"]) == set(manifest["files"]) >= {"adapter_model.safetensors", "trainer_state.pt"}
    assert manifest["files"]["trainer_state.pt"] == (newest / "trainer_state.pt").stat().st_size

    marker.write_text(json.dumps({"files": manifest["files"]}, indent=2, sort_keys=True) + "\n")  # sizes only
    assert ckpt.checkpoint_problem(newest) is None
    assert latest_checkpoint(tmp_path) == newest
    model, opt, sched = make_policy(lora_seed=3)
    assert load_checkpoint(newest, model=model, optimizer=opt, scheduler=sched) == {"step": 4, "round": 0}

    _truncate(newest / "adapter_model.safetensors")  # sizes are still checked
    assert latest_checkpoint(tmp_path) == intact
