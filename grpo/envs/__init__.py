"""Environments: any task with a verifiable reward, chosen by `task.name` in the run config.

    countdown                 numbers and a target, answered with an arithmetic expression (the default)
    reasoning_gym:<dataset>   any of reasoning-gym's ~100 procedural datasets (offline), e.g. chain_sum
    dataset                   your own rows (`data.source`: a file or a hub id), your prompt template,
                              answers checked by math-verify or exact match

    from grpo.envs import get_env, env_for
    env = get_env("reasoning_gym:chain_sum", min_terms=2)   # task.name, **task.params
    env = env_for(cfg)                                      # the environment of a RunConfig

See `grpo.envs.base.Env` for the interface; an unknown name is a `ConfigError` listing the known ones.
"""

from __future__ import annotations

import functools
import importlib
import json
from typing import TYPE_CHECKING, Any

from grpo.errors import ConfigError

if TYPE_CHECKING:
    from grpo.config import RunConfig
    from grpo.envs.base import Env

ENVIRONMENTS: dict[str, str] = {
    "countdown": "grpo.envs.countdown:CountdownEnv",
    "reasoning_gym": "grpo.envs.reasoning_gym:ReasoningGymEnv",
    "dataset": "grpo.envs.dataset:DatasetEnv",
}
"""Environment families by name; `family:variant` names pass the variant to the family."""
HELP = [
    ("countdown", "numbers and a target, answered with an arithmetic expression (the default)"),
    ("reasoning_gym:<dataset>", "any of reasoning-gym's ~100 procedural datasets, generated offline"),
    ("dataset", "your rows (data.source), your prompt template, answers checked by math-verify or exactly"),
]
"""`grpo --help`'s list of environments (kept here so that help imports no environment)."""

__all__ = ["ENVIRONMENTS", "Env", "env_for", "environment_help", "get_env"]


def __getattr__(name: str) -> Any:
    """`grpo.envs.Env`, imported on first use (so that `grpo --help` imports no data library)."""
    if name == "Env":
        from grpo.envs.base import Env

        return Env
    raise AttributeError(f"module 'grpo.envs' has no attribute {name!r}")


def _family(name: str) -> tuple[str, str | None]:
    family, sep, variant = name.partition(":")
    return family, (variant if sep else None)


def _env_class(family: str) -> type[Env]:
    module, _, cls = ENVIRONMENTS[family].partition(":")
    return getattr(importlib.import_module(module), cls)


@functools.lru_cache(maxsize=16)
def _cached(name: str, params_json: str) -> Env:
    family, variant = _family(name)
    if family not in ENVIRONMENTS:
        raise ConfigError(
            f"task.name: unknown environment {name!r}; known: {', '.join(sorted(ENVIRONMENTS))} "
            "(reasoning-gym datasets as reasoning_gym:<dataset>, e.g. reasoning_gym:chain_sum)"
        )
    return _env_class(family).create(name, variant, json.loads(params_json))


def get_env(name: str, **params: Any) -> Env:
    """The environment `name` with `params` (`task.name`, `task.params`); `ConfigError` in one line
    for an unknown name or bad parameters. Environments are immutable and cached."""
    try:
        key = json.dumps(params, sort_keys=True)
    except TypeError as e:
        raise ConfigError(f"task.params: values must be plain YAML values ({e})") from None
    return _cached(name, key)


def env_for(cfg: RunConfig) -> Env:
    """The environment of a run config (`task.name`, `task.params`)."""
    return get_env(cfg.task.name, **cfg.task.params)


def environment_help() -> str:
    """One line per environment family, for `grpo --help`."""
    return "\n".join(f"  {usage:<26}{text}" for usage, text in HELP)
