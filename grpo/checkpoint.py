"""Atomic save and load of a training checkpoint: LoRA adapter, tokenizer, optimizer, scheduler,
RNG states and the trainer's counters (step, round, data position).

Layout of one checkpoint (`checkpoint_path(run_dir, 10)`):

    <run_dir>/checkpoints/step-000010/
        adapter_model.safetensors, adapter_config.json   # PeftModel.save_pretrained
        tokenizer files                                   # tokenizer.save_pretrained
        trainer_state.pt   # optimizer, scheduler, RNG states, `state`; torch.load(weights_only=True)
        state.json         # `state` again, for humans
        COMPLETE           # written last: a folder without it is never loaded

A save writes into the sibling folder `step-000010.tmp-<pid>` and renames it into place, so a
crash mid-save leaves the previous checkpoints untouched and `latest_checkpoint` never returns a
partial folder. Usage:

    path = save_checkpoint(checkpoint_path(run_dir, step), model=model, tokenizer=tok,
                           optimizer=opt, scheduler=sched, state={"step": step, "round": 1})
    state = load_checkpoint(latest_checkpoint(run_dir), model=model, optimizer=opt, scheduler=sched)

Not in the paper: the paper has no notion of checkpoints; resuming exactly (RNG and data position
included) is what makes a retried Prefect task continue rather than restart.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel

from grpo.errors import UserError

CHECKPOINTS_DIR = "checkpoints"
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.pt"
STATE_JSON = "state.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

_STEP_RE = re.compile(r"^step-(\d+)$")
_LEFTOVER_RE = re.compile(r"^step-\d+\.(?:tmp|old)-(\d+)$")


class CheckpointError(UserError):
    """A checkpoint folder is missing, incomplete or does not match the model."""


class CheckpointRef(BaseModel):
    """What tasks pass around instead of a model: where a checkpoint is and which step it holds."""

    path: str
    step: int
    round: int


def checkpoint_path(run_dir: str | os.PathLike[str], step: int) -> Path:
    """`<run_dir>/checkpoints/step-000010` for step 10."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"step-{step:06d}"


# ----------------------------------------------------------------------------- RNG states


def capture_rng() -> dict[str, Any]:
    """Python, NumPy (legacy global), torch CPU and CUDA RNG states, as weights_only-safe values."""
    version, py_state, gauss_next = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    rng: dict[str, Any] = {
        "python": {"version": version, "state": list(py_state), "gauss_next": gauss_next},
        "numpy": {
            "name": str(np_name),
            "keys": [int(k) for k in np_keys],
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    """Set every RNG to the states `capture_rng` returned (CUDA only when the device count matches)."""
    py = rng["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss_next"]))
    npr = rng["numpy"]
    np.random.set_state(
        (
            npr["name"],
            np.asarray(npr["keys"], dtype=np.uint32),
            int(npr["pos"]),
            int(npr["has_gauss"]),
            float(npr["cached_gaussian"]),
        )
    )
    torch.set_rng_state(rng["torch"])
    cuda = rng.get("cuda")
    if cuda is not None and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)


# ----------------------------------------------------------------------------- save


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_trainer_state(path: Path, payload: dict[str, Any]) -> None:
    torch.save(payload, path)


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _write_files(
    tmp: Path,
    model: Any,
    tokenizer: Any | None,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    state: dict[str, Any],
    state_text: str,
) -> None:
    """Everything of a checkpoint into `tmp`, the COMPLETE marker (with a file manifest) last."""
    model.save_pretrained(str(tmp))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    payload = {
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": capture_rng(),
        "state": state,
    }
    _write_trainer_state(tmp / TRAINER_STATE, payload)
    _write_text(tmp / STATE_JSON, state_text + "\n")

    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    for p in files:
        _fsync_file(p)
    manifest = {str(p.relative_to(tmp)): p.stat().st_size for p in files}
    _write_text(tmp / COMPLETE, json.dumps({"files": manifest}, indent=2, sort_keys=True) + "\n")
    _fsync_file(tmp / COMPLETE)
    _fsync_dir(tmp)


def save_checkpoint(
    dir: str | os.PathLike[str],
    *,
    model: Any,
    tokenizer: Any | None,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    state: dict[str, Any],
) -> Path:
    """Write a complete checkpoint to `dir` atomically and return its final path.

    `model` is a peft model (its adapter is saved, not the base weights); `state` must be
    JSON-able. Saving to a folder that already holds a checkpoint (a retried step) replaces it.
    """
    target = Path(dir).absolute()
    try:
        state_text = json.dumps(state, indent=2, sort_keys=True)
    except TypeError as e:
        raise TypeError(f"checkpoint state must be JSON-able: {e}") from None

    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    try:
        _write_files(tmp, model, tokenizer, optimizer, scheduler, state, state_text)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a hard crash leaves it; latest_checkpoint skips it
        raise

    if target.exists():
        old = target.with_name(f"{target.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    _fsync_dir(target.parent)
    return target


# ----------------------------------------------------------------------------- find / load


def is_complete(path: str | os.PathLike[str]) -> bool:
    """True when `path` is a checkpoint folder whose save finished (it holds COMPLETE)."""
    return (Path(path) / COMPLETE).is_file()


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, path), oldest first; temp and partial folders skipped."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_RE.match(child.name)
        if m and child.is_dir() and is_complete(child):
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint of a run (by step), or None when there is none."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def read_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The `state` dict of a complete checkpoint, from its state.json (no tensors loaded)."""
    p = _check_complete(Path(path))
    return json.loads((p / STATE_JSON).read_text(encoding="utf-8"))


def checkpoint_ref(path: str | os.PathLike[str]) -> CheckpointRef:
    """A `CheckpointRef` for a complete checkpoint; step/round from its state (folder name as fallback)."""
    p = Path(path).absolute()
    state = read_state(p)
    m = _STEP_RE.match(p.name)
    step = int(state.get("step", int(m.group(1)) if m else 0))
    return CheckpointRef(path=str(p), step=step, round=int(state.get("round", 0)))


def _check_complete(path: Path) -> Path:
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint {path}: folder not found; pass a folder written by save_checkpoint "
            "(e.g. <run_dir>/checkpoints/step-000010)"
        )
    if not is_complete(path):
        raise CheckpointError(
            f"checkpoint {path}: incomplete (no {COMPLETE} marker, the save was interrupted); "
            "resume from latest_checkpoint(<run_dir>) or delete this folder"
        )
    manifest = json.loads((path / COMPLETE).read_text(encoding="utf-8")).get("files", {})
    missing = sorted(name for name in manifest if not (path / name).is_file())
    if missing:
        raise CheckpointError(
            f"checkpoint {path}: files {missing} listed in {COMPLETE} are missing; "
            "resume from an older checkpoint or delete this folder"
        )
    return path


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: Any,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    restore_rng_state: bool = True,
) -> dict[str, Any]:
    """Load adapter weights into `model` (an existing peft model), optimizer and scheduler states,
    restore the RNG states, and return the saved `state` dict."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    p = _check_complete(Path(path))
    weights = p / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(
            f"checkpoint {p}: {ADAPTER_WEIGHTS} not found; it was not saved from a peft model"
        )
    adapter = load_file(str(weights), device=str(_model_device(model)))
    result = set_peft_model_state_dict(model, adapter)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise CheckpointError(
            f"checkpoint {p}: adapter does not match the model ({len(unexpected)} unexpected keys, "
            f"e.g. {unexpected[0]}); load it with the base model and LoRA settings it was trained with"
        )

    payload = torch.load(p / TRAINER_STATE, map_location="cpu", weights_only=True)
    if optimizer is not None:
        if payload.get("optimizer") is None:
            raise CheckpointError(f"checkpoint {p}: holds no optimizer state; resume without one")
        optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and payload.get("scheduler") is not None:
        scheduler.load_state_dict(payload["scheduler"])
    if restore_rng_state:
        restore_rng(payload["rng"])
    return payload["state"]


# ----------------------------------------------------------------------------- prune


def prune_checkpoints(
    run_dir: str | os.PathLike[str],
    keep: int | None,
    protect: Iterable[str | os.PathLike[str]] = (),
) -> list[Path]:
    """Delete all but the `keep` newest complete checkpoints (None keeps all), sparing `protect`
    (e.g. elite checkpoints the registry points at) and always the newest complete one. Leftover
    temp folders of other processes' interrupted saves are removed too. Returns what was deleted."""
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 or None, got {keep}")
    removed: list[Path] = []
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return removed
    for child in root.iterdir():
        m = _LEFTOVER_RE.match(child.name)
        if m and int(m.group(1)) != os.getpid() and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    if keep is None:
        return removed
    protected = {Path(p).resolve() for p in protect}
    complete = [path for _, path in list_checkpoints(run_dir)]
    for path in complete[:-keep]:
        if path.resolve() in protected:
            continue
        shutil.rmtree(path)
        removed.append(path)
    return removed
