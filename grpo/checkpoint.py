"""Atomic save and load of a training checkpoint: LoRA adapter, tokenizer, optimizer, scheduler,
RNG states and the trainer's counters (step, round, data position).

Layout of one checkpoint (`checkpoint_path(run_dir, 10)`):

    <run_dir>/checkpoints/step-000010/
        adapter_model.safetensors, adapter_config.json   # PeftModel.save_pretrained
        tokenizer files                                   # tokenizer.save_pretrained
        trainer_state.pt   # optimizer, scheduler, RNG states, `state`; torch.load(weights_only=True)
        state.json         # `state` again, for humans
        COMPLETE           # written last: the manifest, {"files": {name: size in bytes},
                           #                              "sha256": {name: hex digest}}

A save writes into the sibling folder `step-000010.tmp-<pid>` and renames it into place, so a
crash mid-save leaves the previous checkpoints untouched and `latest_checkpoint` never returns a
partial folder.

What is verified before a checkpoint counts (`is_complete`, `checkpoint_problem`): COMPLETE exists
and parses as the manifest above (listing trainer_state.pt and state.json), and every file it lists
exists with the recorded size and, when recorded, the recorded sha256. A COMPLETE of the older
format (sizes only, no "sha256") is still accepted and then only sizes are checked. A folder that
fails is not intact: `list_checkpoints` and `latest_checkpoint` skip it with one WARNING each (so a
resume falls back to the newest intact checkpoint, and pruning never counts it), and
`load_checkpoint`/`read_state` raise a one-line `CheckpointError` naming the file and the mismatch.
Files not listed in COMPLETE are not checked. Usage:

    path = save_checkpoint(checkpoint_path(run_dir, step), model=model, tokenizer=tok,
                           optimizer=opt, scheduler=sched, state={"step": step, "round": 1})
    state = load_checkpoint(latest_checkpoint(run_dir), model=model, optimizer=opt, scheduler=sched)

`adapter="member-1"` saves (or loads into) one named adapter of a model holding several (a
population, `grpo.pbt`); the folder has the same layout as a single adapter's, so it loads with
`PeftModel.from_pretrained` and registers like any checkpoint.

Not in the paper: the paper has no notion of checkpoints; resuming exactly (RNG and data position
included) is what makes a retried Prefect task continue rather than restart.
"""

from __future__ import annotations

import hashlib
import json
import logging
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
MANIFEST_SIZES = "files"
MANIFEST_SHA256 = "sha256"
REQUIRED_FILES = (TRAINER_STATE, STATE_JSON)

_STEP_RE = re.compile(r"^step-(\d+)$")
_LEFTOVER_RE = re.compile(r"^step-\d+\.(?:tmp|old)-(\d+)$")

log = logging.getLogger(__name__)


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


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _manifest_text(folder: Path, files: list[Path]) -> str:
    """COMPLETE's content: size and sha256 of each file, keyed by its path relative to `folder`."""
    names = {str(p.relative_to(folder)): p for p in files}
    manifest = {
        MANIFEST_SIZES: {name: p.stat().st_size for name, p in names.items()},
        MANIFEST_SHA256: {name: _sha256(p) for name, p in names.items()},
    }
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"


def save_adapter(model: Any, folder: Path, adapter: str | None = None) -> None:
    """The model's adapter (`adapter`: one named adapter of several) as `PeftModel.save_pretrained`
    writes a single one: adapter_model.safetensors (keys without the adapter name) and
    adapter_config.json at the top of `folder`."""
    if adapter is None:
        model.save_pretrained(str(folder))
        return
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    weights = get_peft_model_state_dict(model, adapter_name=adapter)
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(folder / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    config = model.peft_config[adapter]
    inference_mode = config.inference_mode
    config.inference_mode = True
    try:
        config.save_pretrained(str(folder))
    finally:
        config.inference_mode = inference_mode


def _write_files(
    tmp: Path,
    model: Any,
    tokenizer: Any | None,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    state: dict[str, Any],
    state_text: str,
    adapter: str | None = None,
) -> None:
    """Everything of a checkpoint into `tmp`, the COMPLETE marker (with a file manifest) last."""
    save_adapter(model, tmp, adapter)
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
    _write_text(tmp / COMPLETE, _manifest_text(tmp, files))
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
    adapter: str | None = None,
) -> Path:
    """Write a complete checkpoint to `dir` atomically and return its final path.

    `model` is a peft model (its adapter is saved, not the base weights; `adapter` names one of
    several); `state` must be JSON-able. Saving to a folder that already holds a checkpoint (a
    retried step) replaces it.
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
        _write_files(tmp, model, tokenizer, optimizer, scheduler, state, state_text, adapter)
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


class _NotIntact(Exception):
    """Why a checkpoint folder does not match its COMPLETE manifest (one line, no folder name)."""


def _is_plain_name(name: str) -> bool:
    parts = Path(name).parts
    return name.isprintable() and bool(parts) and not Path(name).is_absolute() and ".." not in parts


def _is_mapping(value: Any, value_type: type) -> bool:
    """A dict of plain relative file names to `value_type` values (bool is no int here)."""
    return isinstance(value, dict) and all(
        isinstance(k, str) and _is_plain_name(k) and type(v) is value_type for k, v in value.items()
    )


def _read_manifest(path: Path) -> tuple[dict[str, int], dict[str, str]]:
    """(sizes, sha256 digests) recorded in COMPLETE; digests are empty for the older sizes-only format."""
    marker = path / COMPLETE
    if not marker.is_file():
        raise _NotIntact(f"incomplete (no {COMPLETE} marker, the save was interrupted)")
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _NotIntact(f"{COMPLETE} is unreadable ({e})") from None
    sizes = data.get(MANIFEST_SIZES) if isinstance(data, dict) else None
    digests = data.get(MANIFEST_SHA256, {}) if isinstance(data, dict) else None
    if not _is_mapping(sizes, int) or not _is_mapping(digests, str) or not set(digests) <= set(sizes):
        raise _NotIntact(f"{COMPLETE} is malformed (no valid file manifest)")
    unlisted = [name for name in REQUIRED_FILES if name not in sizes]
    if unlisted:
        raise _NotIntact(f"{COMPLETE} is malformed (does not list {', '.join(unlisted)})")
    return sizes, digests


def _check_files(path: Path, sizes: dict[str, int], digests: dict[str, str]) -> None:
    """Every listed file exists with its recorded size; then (the slower part) its recorded sha256."""
    for name, recorded in sorted(sizes.items()):
        file = path / name
        if not file.is_file():
            raise _NotIntact(f"{name} is missing ({COMPLETE} lists it)")
        size = file.stat().st_size
        if size != recorded:
            raise _NotIntact(f"{name} is {size} bytes, {COMPLETE} recorded {recorded}")
    for name, recorded in sorted(digests.items()):
        if _sha256(path / name) != recorded:
            raise _NotIntact(f"{name} does not match its sha256 in {COMPLETE} (changed after the save)")


def checkpoint_problem(path: str | os.PathLike[str]) -> str | None:
    """None when `path` is an intact checkpoint folder, else why not in one line: no or unparsable
    COMPLETE, or the first listed file that is missing or differs in size or sha256."""
    p = Path(path)
    try:
        sizes, digests = _read_manifest(p)
        _check_files(p, sizes, digests)
    except _NotIntact as e:
        return str(e)
    return None


def is_complete(path: str | os.PathLike[str]) -> bool:
    """True when `path` is an intact checkpoint folder: its save finished (it holds COMPLETE) and
    every file matches what COMPLETE records (see `checkpoint_problem`)."""
    return checkpoint_problem(path) is None


def _step_folders(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Every `step-NNNNNN` folder of a run as (step, path), oldest first, intact or not."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_RE.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Intact checkpoints of a run as (step, path), oldest first; temp folders are ignored and a
    folder that fails verification is skipped with a WARNING naming it and why."""
    found = []
    for step, path in _step_folders(run_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            found.append((step, path))
        else:
            log.warning("checkpoint %s skipped: %s", path, problem)
    return found


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest intact checkpoint of a run (by step), or None when there is none. Newer folders
    that fail verification are skipped with one WARNING each; older ones are not read."""
    skipped: list[tuple[Path, str]] = []
    latest = None
    for _, path in reversed(_step_folders(run_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            latest = path
            break
        skipped.append((path, problem))
    fallback = f"the newest intact one is {latest.name}" if latest is not None else "none is intact"
    for path, problem in skipped:
        log.warning("checkpoint %s skipped: %s; %s", path, problem, fallback)
    return latest


def read_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The `state` dict of an intact checkpoint, from its state.json (no tensors loaded)."""
    p = _check_complete(Path(path))
    return json.loads((p / STATE_JSON).read_text(encoding="utf-8"))


def checkpoint_ref(path: str | os.PathLike[str]) -> CheckpointRef:
    """A `CheckpointRef` for an intact checkpoint; step/round from its state (folder name as fallback)."""
    p = Path(path).absolute()
    state = read_state(p)
    m = _STEP_RE.match(p.name)
    step = int(state.get("step", int(m.group(1)) if m else 0))
    return CheckpointRef(path=str(p), step=step, round=int(state.get("round", 0)))


def _check_complete(path: Path) -> Path:
    """`path`, or a one-line CheckpointError when it is no folder or fails verification."""
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint {path}: folder not found; pass a folder written by save_checkpoint "
            "(e.g. <run_dir>/checkpoints/step-000010)"
        )
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(
            f"checkpoint {path}: {problem}; resume from latest_checkpoint(<run_dir>), which skips "
            "this folder, or delete it"
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
    adapter: str = "default",
) -> dict[str, Any]:
    """Load adapter weights into `model` (an existing peft model; into its adapter named `adapter`),
    optimizer and scheduler states, restore the RNG states, and return the saved `state` dict."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    p = _check_complete(Path(path))
    weights = p / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(
            f"checkpoint {p}: {ADAPTER_WEIGHTS} not found; it was not saved from a peft model"
        )
    saved = load_file(str(weights), device=str(_model_device(model)))
    result = set_peft_model_state_dict(model, saved, adapter_name=adapter)
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
    temp folders of other processes' interrupted saves are removed too; folders that fail
    verification are neither counted nor deleted. Returns what was deleted."""
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
