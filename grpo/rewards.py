"""Rewards: plain functions `(completions, **dataset_columns) -> list[float | None]`, TRL's signature.

A completion is the text generated after the prefilled `<think>`, so rewards read
`"<think>" + completion`, as the reference recipe does. `train.rewards` names each reward one of
three ways, looked up in this order:

1. a reward of the run's environment: `correct` (every environment: its answer check), or one of
   its own (Countdown: `equation`);
2. a registered name: `format`, `overlong` (DAPO's soft overlong punishment, `overlong_reward`;
   its lengths come from the run's config: `get_rewards(names, env, cfg)`), or one added with
   `@register_reward("name")`;
3. an import path `package.module:function`: your own function, imported by every process that
   trains (a deployment's worker too: the module must be importable there, e.g. installed or on
   its PYTHONPATH).

    >>> from grpo.envs import get_env
    >>> from grpo.rewards import get_rewards
    >>> done = " 2+2=4</think>\\n<answer>4</answer>"
    >>> rewards = get_rewards(["format", "correct"], get_env("dataset", match="exact"))
    >>> {name: fn([done], answer=["4"]) for name, fn in rewards}
    {'format': [1.0], 'correct': [1.0]}

A reward may return None for a completion it has no opinion on (as in TRL): that reward is left
out of that completion's sum. `call_reward` guards each call: a reward that raises is called again
one completion at a time, the completions it still raises on score 0 (counted, and the first
traceback logged once); a reward that returns the wrong number of values or something other than
numbers stops the run with one line naming it (`RewardError`).

Countdown's `equation_reward` and its safe evaluator live in `grpo.envs.countdown.reward`; they
stay importable from here.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import math
import numbers
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from grpo.errors import ConfigError, RewardError, TrainingDiverged

if TYPE_CHECKING:
    import torch

    from grpo.config import RunConfig
    from grpo.envs import Env

log = logging.getLogger(__name__)

MAX_TEXT_CHARS = 10_000
"""Completions longer than this score 0.0 without being parsed."""
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
"""The output format's tags (whole tokens of the tiny model's vocabulary; never inside an answer)."""

RewardFn = Callable[..., list[float | None]]

REWARDS: dict[str, RewardFn] = {}
"""Registered reward functions by name (environment-independent ones; see the module docstring)."""

_FORMAT_RE = re.compile(
    r"<think>(?:(?!</?think>).)*</think>\n<answer>(?:(?!</?answer>).)*</answer>", re.DOTALL
)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
_COUNTDOWN_NAMES = {"TOLERANCE", "MAX_EXPR_CHARS", "MAX_PAREN_DEPTH", "MAX_ABS", "safe_eval", "safe_eval_exact",
                    "matches_target", "equation_reward"}


def __getattr__(name: str) -> Any:
    """Countdown's reward and evaluator, importable from here as before they moved."""
    if name in _COUNTDOWN_NAMES:
        from grpo.envs.countdown import reward

        return getattr(reward, name)
    raise AttributeError(f"module 'grpo.rewards' has no attribute {name!r}")


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: register `fn` under `name` in `REWARDS` (replacing an earlier one)."""

    def deco(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn

    return deco


# ------------------------------------------------------------------------------ the format


def _format_ok(completion: str) -> bool:
    if not isinstance(completion, str) or len(completion) > MAX_TEXT_CHARS:
        return False
    return _FORMAT_RE.fullmatch("<think>" + completion) is not None


@register_reward("format")
def format_reward(completions: list[str], **kwargs: Any) -> list[float]:
    """1.0 when `"<think>" + completion` is `<think>…</think>\\n<answer>…</answer>` and nothing else.

    The think body holds no other `<think>`/`</think>` tag, exactly one newline separates
    `</think>` from `<answer>`, the answer body holds no answer tag, and `</answer>` ends the
    text (no trailing whitespace).
    """
    out = []
    for completion in completions:
        try:
            out.append(1.0 if _format_ok(completion) else 0.0)
        except Exception:  # noqa: BLE001 - a reward never raises: a completion it cannot read scores 0
            out.append(0.0)
    return out


def answer_content(completion: str) -> str | None:
    """The stripped body of the completion's single `<answer>…</answer>` block; None when there is
    no such block, more than one, or the text is longer than `MAX_TEXT_CHARS`.

    >>> answer_content("2+2=4</think>\\n<answer> 4 </answer>")
    '4'
    """
    if not isinstance(completion, str) or len(completion) > MAX_TEXT_CHARS:
        return None
    if completion.count("<answer>") != 1 or completion.count("</answer>") != 1:
        return None
    m = _ANSWER_RE.search(completion)
    return m.group(1).strip() if m else None


# ------------------------------------------------------------------------------ the length


@register_reward("overlong")
def overlong_reward(
    completions: list[str],
    completion_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    buffer: int,
    penalty: float = 1.0,
    **kwargs: Any,
) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, eq. 13), scaled by `penalty`.

    With L = `len(completion_ids[i])` (the completion's tokens as the trainer gives them, the stop
    token included), L_max = `max_new_tokens` and L_cache = `buffer`, as in the paper:

    - 0 when L <= L_max - L_cache;
    - ((L_max - L_cache) - L) / L_cache * penalty when L_max - L_cache < L <= L_max: a linear ramp
      from 0 (exclusive) down to exactly -penalty at L = L_max;
    - -penalty when L > L_max.

    The pieces meet, so the value is continuous: a completion of exactly L_max tokens (one cut off
    by the limit, or one whose stop token is the last allowed) gets the full -penalty. The settings
    are not dataset columns: `get_rewards(names, env, cfg)` binds them from `generation.max_new_tokens`
    and `train.overlong` (`buffer` None there means max(1, max_new_tokens // 4)).

    >>> overlong_reward(["a"] * 4, [[0] * 6, [0] * 7, [0] * 8, [0] * 10], max_new_tokens=8, buffer=2)
    [0.0, -0.5, -1.0, -1.0]
    """
    if buffer < 1:
        raise ValueError(f"overlong_reward: buffer must be >= 1, got {buffer}")
    start = max_new_tokens - buffer  # L_max - L_cache: the last length that is not punished
    out = []
    for ids in completion_ids:
        n = len(ids)
        if n <= start:
            out.append(0.0)
        elif n <= max_new_tokens:
            out.append((start - n) / buffer * penalty)
        else:
            out.append(-float(penalty))
    return out


# ------------------------------------------------------------------------------- lookup


def _import_reward(path: str) -> RewardFn:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"train.rewards: cannot import {path!r} ({type(e).__name__}: {e}); the module must be "
            "importable by every process that trains (installed, or on PYTHONPATH)"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"train.rewards: {module_name!r} has no function {attr!r} (from {path!r})")
    return fn


def reward_name(entry: str, fn: RewardFn) -> str:
    """The name a reward's metrics use: the registered name, or an imported function's `__name__`."""
    return getattr(fn, "__name__", entry.rpartition(":")[2]) if _IMPORT_PATH.fullmatch(entry) else entry


def _bind_overlong(cfg: RunConfig | None) -> RewardFn:
    """`overlong_reward` with the run's lengths bound (`ConfigError` without a config)."""
    if cfg is None:
        raise ConfigError(
            "train.rewards: reward 'overlong' needs the run's generation.max_new_tokens and "
            "train.overlong; pass the RunConfig: get_rewards(names, env, cfg)"
        )
    max_new = cfg.generation.max_new_tokens
    buffer = cfg.train.overlong.buffer
    if buffer is None:  # RunConfig resolves it; a section assigned later may not be
        buffer = max(1, max_new // 4)
    return functools.partial(
        overlong_reward, max_new_tokens=max_new, buffer=buffer, penalty=cfg.train.overlong.penalty
    )


def get_rewards(
    names: Iterable[str], env: Env | None = None, cfg: RunConfig | None = None
) -> list[tuple[str, RewardFn]]:
    """`[(name, fn), ...]` for `train.rewards` entries, in order (see the module docstring for the
    lookup); `env` None means Countdown. `cfg` (the run's `RunConfig`) supplies settings that are not
    dataset columns: `overlong` gets `max_new_tokens=cfg.generation.max_new_tokens`,
    `buffer=cfg.train.overlong.buffer` and `penalty=cfg.train.overlong.penalty` bound (a
    `functools.partial`; its name stays `overlong`). `ConfigError` in one line for an unknown name,
    an import path that does not import, or `overlong` without `cfg` (defaults would silently
    punish at the wrong length)."""
    if env is None:
        from grpo.envs import get_env

        env = get_env("countdown")
    own = env.rewards()
    out = []
    for entry in names:
        if entry in own:
            fn = own[entry]
        elif entry in REWARDS:
            fn = REWARDS[entry]
        elif _IMPORT_PATH.fullmatch(entry):
            fn = _import_reward(entry)
        else:
            known = sorted(set(own) | set(REWARDS))
            raise ConfigError(
                f"train.rewards: unknown reward {entry!r}; known rewards: {', '.join(known)}, or an "
                "import path package.module:function"
            )
        name = reward_name(entry, fn)
        if fn is overlong_reward:  # by name or by import path: it needs the run's lengths
            fn = _bind_overlong(cfg)
        if any(name == seen for seen, _ in out):
            raise ConfigError(f"train.rewards: two rewards are named {name!r}; name each reward once")
        out.append((name, fn))
    return out


def check_reward_columns(reward_fns: Sequence[tuple[str, RewardFn]], columns: Iterable[str], task: str) -> None:
    """`ConfigError` when a reward has a required keyword argument that no dataset column feeds
    (e.g. one task's reward on the rows of another)."""
    have = set(columns) | {"completion_ids"}
    for name, fn in reward_fns:
        try:
            params = list(inspect.signature(fn).parameters.values())[1:]
        except (TypeError, ValueError):  # a builtin or C function: nothing to check
            continue
        needed = [p.name for p in params
                  if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        missing = [n for n in needed if n not in have]
        if missing:
            raise ConfigError(
                f"train.rewards: reward {name!r} needs column(s) {missing}, which the rows of task "
                f"{task!r} do not have (columns: {', '.join(sorted(set(columns)))})"
            )


# ------------------------------------------------------------------------------ calling


_TRACEBACK_LOGGED: set[str] = set()


@dataclass
class RewardValues:
    """One reward's values for N completions: a float or None (no opinion) each, and how many
    completions it raised on (scored 0)."""

    values: list[float | None]
    errors: int = 0


def _checked(name: str, out: Any, n: int) -> list[float | None]:
    """`out` as a list of n floats or Nones; `RewardError` naming the reward otherwise, and
    `TrainingDiverged` for a NaN or infinite value."""
    if hasattr(out, "tolist"):  # a tensor or an array
        out = out.tolist()
    if isinstance(out, (str, bytes)) or not isinstance(out, Sequence):
        raise RewardError(
            f"reward {name!r} returned {type(out).__name__}, not a list; a reward returns one float "
            "(or None) per completion"
        )
    if len(out) != n:
        raise RewardError(
            f"reward {name!r} returned {len(out)} values for {n} completions; a reward returns one "
            "float (or None) per completion"
        )
    values: list[float | None] = []
    for i, v in enumerate(out):
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
            raise RewardError(
                f"reward {name!r} returned {v!r} ({type(v).__name__}) for completion {i}; a reward "
                "returns a float (or None) per completion"
            )
        values.append(None if v is None else float(v))
    bad = [i for i, v in enumerate(values) if v is not None and not math.isfinite(v)]
    if bad:
        raise TrainingDiverged(
            f"reward {name!r} returned {values[bad[0]]} for completion {bad[0]} ({len(bad)} of {n} "
            "non-finite); a reward must return finite numbers"
        )
    return values


def call_reward(name: str, fn: RewardFn, completions: list[str], columns: dict[str, list[Any]]) -> RewardValues:
    """Call one reward on N completions (columns: one value per completion), guarded as the module
    docstring says."""
    n = len(completions)
    try:
        return RewardValues(_checked(name, fn(completions, **columns), n))
    except (RewardError, TrainingDiverged):
        raise
    except Exception:  # noqa: BLE001 - a user's reward may raise anything: retried per completion below
        first_error = True
    values: list[float | None] = []
    result = RewardValues(values)
    for i, completion in enumerate(completions):
        one = {k: [v[i]] for k, v in columns.items()}
        try:
            values.extend(_checked(name, fn([completion], **one), 1))
        except (RewardError, TrainingDiverged):
            raise
        except Exception:  # noqa: BLE001 - this completion scores 0 for this reward; counted and logged once
            values.append(0.0)
            result.errors += 1
            if first_error and name not in _TRACEBACK_LOGGED:
                _TRACEBACK_LOGGED.add(name)
                log.warning("reward %r raised on completion %d (it scores 0; later errors are only "
                            "counted, as reward/%s/errors)", name, i, name, exc_info=True)
            first_error = False
    return result


@dataclass
class Scores:
    """Rewards of N completions: the weighted total (N,), each reward's values (N,) with NaN where
    it had no opinion, and each reward's error count."""

    total: torch.Tensor
    per_fn: dict[str, torch.Tensor]
    errors: dict[str, int]

    def matrix(self) -> torch.Tensor:
        """Each reward's values side by side, (N, K) in reward order (NaN: no opinion)."""
        import torch

        return torch.stack(list(self.per_fn.values()), dim=1)  # (N, K)

    def select(self, rows: Sequence[int]) -> Scores:
        """The scores of `rows` only (errors keep their counts: they happened)."""
        import torch

        index = torch.as_tensor(list(rows), dtype=torch.long)  # (n,)
        return Scores(self.total[index], {k: v[index] for k, v in self.per_fn.items()}, dict(self.errors))

    @staticmethod
    def concat(parts: Sequence[Scores]) -> Scores:
        """Scores of several batches, rows in order; error counts added."""
        import torch

        names = list(parts[0].per_fn)
        return Scores(
            torch.cat([p.total for p in parts]),  # (N,)
            {k: torch.cat([p.per_fn[k] for p in parts]) for k in names},
            {k: sum(p.errors.get(k, 0) for p in parts) for k in names},
        )

    def metrics(self, prefix: str = "reward/") -> dict[str, float]:
        """`reward/<name>`: each reward's mean over the completions it scored (NaN when it had no
        opinion on any); `reward/<name>/errors`: how many completions it raised on. The same keys
        every step, so that data-parallel ranks can average them."""
        import torch

        out: dict[str, float] = {}
        for name, values in self.per_fn.items():
            scored = values[~torch.isnan(values)]  # (k,)
            out[f"{prefix}{name}"] = scored.mean().item() if len(scored) else math.nan
            out[f"{prefix}{name}/errors"] = float(self.errors.get(name, 0))
        return out


def score(
    texts: Sequence[str],
    columns: dict[str, list[Any]],
    reward_fns: Sequence[tuple[str, RewardFn]],
    weights: Sequence[float] | None = None,
) -> Scores:
    """Every reward on every completion, and their weighted sum (None counts 0 in the sum, as TRL's
    nansum). Each reward is called as `fn(texts, **columns)`: the dataset columns repeated per
    completion, plus `completion_ids` where the caller passes them."""
    import torch

    per_fn: dict[str, torch.Tensor] = {}
    errors: dict[str, int] = {}
    for name, fn in reward_fns:
        got = call_reward(name, fn, list(texts), columns)
        per_fn[name] = torch.tensor(
            [math.nan if v is None else v for v in got.values], dtype=torch.float32
        )  # (N,)
        errors[name] = got.errors
    weights = weights or [1.0] * len(reward_fns)
    total = torch.zeros(len(texts), dtype=torch.float32)  # (N,)
    for w, (name, _) in zip(weights, reward_fns):
        total += w * torch.nan_to_num(per_fn[name], nan=0.0)  # (N,)
    return Scores(total, per_fn, errors)
