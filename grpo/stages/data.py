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
from grpo.data import DatasetRef, prepare_dataset
from grpo.envs import env_for
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


def preflight(cfg: RunConfig) -> None:
    """Check everything that can fail before training; raise a one-line `UserError` naming the field.

    Covers: the generation backend is installed, the device exists, the output and cache folders
    are writable, the MLflow tracking URI answers, a dataset source (file or hub) loads and has the
    columns the task, its prompt template and its rewards need (and, for Countdown, rows with a
    solution), the rewards resolve (import paths import), the base model and tokenizer load (the
    tiny model is built when missing and allowed; a hub id that is not cached offline fails here),
    and `lora.target_modules` names modules of that model.
    """
    from grpo.models import check_lora_targets, ensure_model_for, load_tokenizer, resolve_device
    from grpo.rewards import check_reward_columns, get_rewards

    if cfg.generation.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "generation.backend: vllm is not installed; install the extra "
            "(pip install 'grpo-pipeline[vllm]', GPU only) or set generation.backend=transformers"
        )
    env = env_for(cfg)
    reward_fns = get_rewards(cfg.train.rewards or env.default_rewards, env)
    resolve_device(cfg.model)
    _check_writable(cfg.pipeline.output_dir, "pipeline.output_dir")
    _check_writable(cfg.data.cache_dir, "data.cache_dir")
    tracking.check_tracking(tracking.resolve_tracking_uri(cfg.pipeline.tracking_uri))
    source = cfg.data.source
    if source == "generate":
        sample = env.rows(2, cfg.data.seed)  # ConfigError for a task that does not generate rows
    else:  # a file, or a hub dataset (downloaded once, then cached)
        sample = env.load(source)
        env.check_rows(sample, source)
    env.check_template(cfg.data.conversation.user or env.default_user, sample.column_names)
    check_reward_columns(reward_fns, sample.column_names, env.name)
    name = ensure_model_for(cfg)
    load_tokenizer(name, cfg.model.revision)
    check_lora_targets(cfg)


def prepare(cfg: RunConfig) -> DatasetRef:
    """Train/test splits on disk with their content hash, cached by their inputs (`task`, `data.*`)."""
    return prepare_dataset(cfg.data, env_for(cfg))
