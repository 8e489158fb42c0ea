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
from typing import Any

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
    `lora.target_modules` names modules of that model, the longest prompt plus
    `generation.max_new_tokens` fits the model (and vLLM's `max_model_len`), and with vLLM a CUDA
    device (with bfloat16 when asked for) is there.
    """
    from grpo.models import check_lora_targets, ensure_model_for, load_tokenizer, resolve_device
    from grpo.rewards import check_reward_columns, get_rewards

    if cfg.generation.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "generation.backend: vllm is not installed; install the extra "
            "(pip install 'grpo-pipeline[vllm]', GPU only) or set generation.backend=transformers"
        )
    env = env_for(cfg)
    reward_fns = get_rewards(cfg.train.rewards or env.default_rewards, env, cfg)
    resolve_device(cfg.model)
    _check_writable(cfg.pipeline.output_dir, "pipeline.output_dir")
    _check_writable(cfg.data.cache_dir, "data.cache_dir")
    tracking.check_tracking(tracking.resolve_tracking_uri(cfg.pipeline.tracking_uri))
    source = cfg.data.source
    if source == "generate":  # ConfigError for a task that does not generate rows
        sample = env.rows(LENGTH_CHECK_ROWS, cfg.data.seed)
    else:  # a file, or a hub dataset (downloaded once, then cached)
        sample = env.load(source)
        env.check_rows(sample, source)
    env.check_template(cfg.data.conversation.user or env.default_user, sample.column_names)
    check_reward_columns(reward_fns, sample.column_names, env.name)
    name = ensure_model_for(cfg)
    tokenizer = load_tokenizer(name, cfg.model.revision)
    check_lora_targets(cfg)
    if cfg.generation.backend == "vllm":
        _check_vllm_device(cfg)
    _check_lengths(cfg, env, tokenizer, sample, name)


LENGTH_CHECK_ROWS = 200
"""How many rows preflight renders to check that prompt + completion fit the model."""


def _check_vllm_device(cfg: RunConfig) -> None:
    """vLLM runs on CUDA (a CPU build of vLLM excepted), in bfloat16 only where the GPU has it."""
    import torch
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return
    if not torch.cuda.is_available():
        raise ConfigError(
            "generation.backend: vllm needs a CUDA GPU and none is visible; set generation.backend=transformers"
        )
    if cfg.model.dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            "model.dtype: this GPU has no bfloat16 (compute capability below 8.0); use float32"
        )


def _check_lengths(cfg: RunConfig, env: Any, tokenizer: Any, rows: Any, model_name: str) -> None:
    """The longest rendered prompt of `rows` plus `generation.max_new_tokens` must fit the model's
    positions and, with vLLM, `generation.vllm.max_model_len` (which vLLM would silently cap at)."""
    from transformers import AutoConfig

    head = rows.select(range(min(LENGTH_CHECK_ROWS, len(rows))))
    prompts = env.prompts(tokenizer, cfg.data.conversation, head)
    longest = max(len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"])
    need = longest + cfg.generation.max_new_tokens
    config = AutoConfig.from_pretrained(model_name, revision=cfg.model.revision)
    limits = {"the model's max_position_embeddings": getattr(config, "max_position_embeddings", None)}
    if cfg.generation.backend == "vllm":
        limits["generation.vllm.max_model_len"] = cfg.generation.vllm.max_model_len
    for what, limit in limits.items():
        if limit is not None and need > limit:
            raise ConfigError(
                f"generation.max_new_tokens: the longest prompt ({longest} tokens) + {cfg.generation.max_new_tokens} "
                f"new tokens = {need} exceeds {what} ({limit}); shorten the prompt or lower max_new_tokens"
            )


def prepare(cfg: RunConfig) -> DatasetRef:
    """Train/test splits on disk with their content hash, cached by their inputs (`task`, `data.*`)."""
    return prepare_dataset(cfg.data, env_for(cfg))
