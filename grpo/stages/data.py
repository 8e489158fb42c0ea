"""Data stage: the preflight checks (everything a user can get wrong, before any work) and the
prepared, cached train/test splits.

    from grpo.stages import data
    data.preflight(cfg)        # nothing, or one-line UserError naming the field and the fix
    ref = data.prepare(cfg)    # DatasetRef (paths + content hash); reused when the inputs match
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
from pathlib import Path
from typing import Any

from grpo import tracking
from grpo.config import RunConfig
from grpo.countdown import DatasetRef, count_solvable, load_rows, prepare_dataset, validate_rows
from grpo.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def _check_writable(folder: str, field: str) -> None:
    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise ConfigError(
            f"{field}: cannot write to '{folder}' ({why}); set {field} to a writable folder"
        ) from None


def preflight(cfg: RunConfig) -> None:
    """Check everything that can fail before training; raise a one-line `UserError` naming the field.

    Covers: the generation backend is installed, reward names exist, the device exists, the
    output and cache folders are writable, the MLflow tracking URI answers, a local dataset file
    exists, has the `nums`/`target` columns and rows with a solution, the base model and tokenizer load (the tiny
    model is built when missing and allowed; a hub id that is not cached offline fails here), and
    `lora.target_modules` names modules of that model.
    """
    from grpo.models import check_lora_targets, ensure_base_model, load_tokenizer, resolve_device
    from grpo.rewards import get_rewards

    if cfg.generation.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "generation.backend: vllm is not installed; install the extra "
            "(pip install 'grpo-pipeline[vllm]', GPU only) or set generation.backend=transformers"
        )
    get_rewards(cfg.train.rewards)
    resolve_device(cfg.model)
    _check_writable(cfg.pipeline.output_dir, "pipeline.output_dir")
    _check_writable(cfg.data.cache_dir, "data.cache_dir")
    tracking.check_tracking(tracking.resolve_tracking_uri(cfg.pipeline.tracking_uri))
    source = cfg.data.source
    if source != "generate":  # a file, or a hub dataset (downloaded once, then cached)
        rows = load_rows(source)
        validate_rows(rows)
        _check_solvable(rows, source)
    name = ensure_base_model(cfg.model)
    load_tokenizer(name, cfg.model.revision)
    check_lora_targets(cfg)


def _check_solvable(rows: Any, source: str) -> None:
    """`DataError` when no checked row has a solution (nothing could ever earn the equation reward
    or a warm-start example); a warning with the count when some have none."""
    solvable, checked = count_solvable(rows)
    if solvable == 0:
        raise DataError(
            f"data.source: none of the first {checked} rows of '{source}' has a solution (nums cannot "
            "make target); nothing could earn the equation reward. Check the nums/target columns"
        )
    if solvable < checked:
        log.warning("data.source: %d of the first %d rows of '%s' have no solution; they earn no "
                    "equation reward", checked - solvable, checked, source)


def prepare(cfg: RunConfig) -> DatasetRef:
    """Train/test splits on disk with their content hash, cached by their inputs (`data.*`)."""
    return prepare_dataset(cfg.data)
