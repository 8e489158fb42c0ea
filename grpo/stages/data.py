"""Data stage: the preflight checks (everything a user can get wrong, before any work) and the
prepared, cached train/test splits.

    from grpo.stages import data
    data.preflight(cfg)        # nothing, or one-line UserError naming the field and the fix
    ref = data.prepare(cfg)    # DatasetRef (paths + content hash); reused when the inputs match
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

from grpo import tracking
from grpo.config import RunConfig
from grpo.countdown import DatasetRef, load_rows, prepare_dataset, validate_rows
from grpo.errors import ConfigError


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


def _looks_like_file(source: str) -> bool:
    return source.lower().endswith((".parquet", ".jsonl", ".json", ".csv")) or source.startswith(
        (".", "/", "~")
    )


def preflight(cfg: RunConfig) -> None:
    """Check everything that can fail before training; raise a one-line `UserError` naming the field.

    Covers: the generation backend is installed, reward names exist, the device exists, the
    output and cache folders are writable, the MLflow tracking URI answers, a local dataset file
    exists and has the `nums`/`target` columns, and the base model and tokenizer load (the tiny
    model is built when missing and allowed; a hub id that is not cached offline fails here).
    """
    from grpo.models import ensure_base_model, load_tokenizer, resolve_device
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
    if source != "generate" and (Path(source).expanduser().exists() or _looks_like_file(source)):
        validate_rows(load_rows(source))  # hub ids are loaded (and checked) by prepare_dataset
    name = ensure_base_model(cfg.model)
    load_tokenizer(name, cfg.model.revision)


def prepare(cfg: RunConfig) -> DatasetRef:
    """Train/test splits on disk with their content hash, cached by their inputs (`data.*`)."""
    return prepare_dataset(cfg.data)
