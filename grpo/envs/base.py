"""The environment interface: everything task-specific, behind one class.

An environment owns its rows (generated, or loaded from a file or hub and validated), the prompt
(a conversation whose user template's `{column}` placeholders are filled from the row, ending in
an assistant prefill), the correctness check that evaluation reports as accuracy, its own reward
functions and, where it can, a reference completion for the warm start. The trainer, evaluation,
warm start, stages and CLI only call this interface:

    from grpo.envs import get_env
    env = get_env("reasoning_gym:chain_sum")
    rows = env.rows(100, seed=0)                         # a datasets.Dataset
    ref = env.reference_completion(rows[0])              # the text after the prefill
    env.correct([ref], **{k: [v] for k, v in rows[0].items()})   # [1.0]

A completion is the text generated after the prefill (which ends in `<think>`), so the format
reward and every answer check read `"<think>" + completion`. `correct` has TRL's reward
signature: the completions, then the dataset columns as keywords, one value per completion.
"""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import datasets

from grpo.errors import ConfigError, DataError, ModelLoadError

if TYPE_CHECKING:
    from grpo.config import Conversation

RewardFn = Callable[..., list[float | None]]

FORMAT_SYSTEM = (
    "You are a helpful assistant. You first think about the reasoning process in your mind and then "
    "provide the user with the answer. Show your work in <think> </think> tags and return the final "
    "answer in <answer> </answer> tags."
)
"""A system message that states the output format (for a pretrained model: `data.conversation.system`)."""


def placeholders(template: str, field: str = "data.conversation.user") -> set[str]:
    """The `{name}` placeholders of a format string; `ConfigError` naming `field` when it is not one."""
    try:
        return {f.split(".")[0].split("[")[0] for _, f, _, _ in string.Formatter().parse(template) if f}
    except ValueError as e:
        raise ConfigError(f"{field}: not a valid format string ({e}); double the braces of literal ones") from None


def stable_hash(value: Any, length: int = 8) -> str:
    """A short hex digest of a JSON-able value (keys sorted): names cache folders and tiny models."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:length]


class Env:
    """One verifiable-reward task. Subclasses set the class attributes and override what differs.

    `name` is what `task.name` says (e.g. "reasoning_gym:chain_sum"), `params` is `task.params`.
    """

    usage: ClassVar[str] = ""
    """How `task.name` spells this environment, e.g. "reasoning_gym:<dataset>"."""
    default_user: str = "{question}"
    """The user template when `data.conversation.user` is not set."""
    default_rewards: ClassVar[tuple[str, ...]] = ("format", "correct")
    """The rewards when `train.rewards` is not set."""
    known_columns: ClassVar[list[str] | None] = None
    """The columns every row has, when the environment knows them before seeing data."""
    generates: ClassVar[bool] = False
    """Whether `rows` generates data (`data.source: generate`)."""

    def __init__(self, name: str, params: dict[str, Any] | None = None) -> None:
        self.name = name
        self.params = dict(params or {})

    @classmethod
    def create(cls, name: str, variant: str | None, params: dict[str, Any]) -> Env:
        """Build the environment `name` (`family` or `family:variant`) from `task.params`;
        `ConfigError` naming the bad name or parameter. Families without variants refuse one."""
        if variant is not None:
            raise ConfigError(f"task.name: {name!r}: {name.partition(':')[0]} takes no ':<variant>'; use {cls.usage}")
        return cls(name, params)

    # -- identity ------------------------------------------------------------------------------

    @property
    def slug(self) -> str:
        """A short name for folders, MLflow experiments and registered models: letters, digits,
        `-` and `_` (e.g. "chain_sum", "countdown", "dataset-1a2b3c4d")."""
        base = self.name.split(":")[-1]
        return f"{base}-{stable_hash(self.params)}" if self.params else base

    def cache_key(self) -> dict[str, Any]:
        """What identifies this environment's rows in the prepared-data cache."""
        return {"env": self.name, "params": self.params}

    # -- rows --------------------------------------------------------------------------------

    def rows(self, n: int, seed: int) -> datasets.Dataset:
        """`n` generated rows, deterministic by `seed` (generated environments only)."""
        raise ConfigError(
            f"data.source: task {self.name!r} does not generate rows; set data.source to a "
            ".parquet/.jsonl/.json/.csv file or a Hugging Face dataset id"
        )

    def load(self, source: str) -> datasets.Dataset:
        """Rows of a file or hub dataset, validated and normalised (`DataError` in one line)."""
        from grpo.data import load_rows

        return self.normalize(load_rows(source), source)

    def normalize(self, ds: datasets.Dataset, source: str) -> datasets.Dataset:
        """Validate loaded rows and return them in this environment's column types. The base class
        checks that there are rows; the preflight checks the columns the prompt and rewards name."""
        if len(ds) == 0:
            raise DataError(f"data.source: '{source}' has no rows")
        return ds

    def check_rows(self, ds: datasets.Dataset, source: str) -> None:
        """Preflight checks beyond the schema (e.g. that rows can be solved); the default: none."""

    # -- prompt ------------------------------------------------------------------------------

    def fields(self, row: dict[str, Any]) -> dict[str, Any]:
        """Values of the template placeholders for `row` (the row's columns by default)."""
        return row

    def template_fields(self, columns: list[str]) -> set[str]:
        """The placeholders a template may use, given the rows' `columns`."""
        return set(columns)

    def check_template(self, template: str, columns: list[str]) -> None:
        """`ConfigError` naming the placeholders of `template` that rows with `columns` cannot fill."""
        allowed = self.template_fields(columns)
        missing = sorted(placeholders(template) - allowed)
        if missing:
            raise ConfigError(
                f"data.conversation.user: the template names {', '.join('{' + m + '}' for m in missing)} "
                f"but the rows of task {self.name!r} have no such column; use "
                f"{', '.join('{' + c + '}' for c in sorted(allowed)) or 'no placeholder'}"
            )

    def user_text(self, template: str | None, row: dict[str, Any]) -> str:
        """The user message of `row`: `template` (None = `default_user`) filled from `fields(row)`."""
        return (template if template is not None else self.default_user).format(**self.fields(row))

    def prompt(self, tokenizer: Any, conversation: Conversation, row: dict[str, Any]) -> str:
        """The prompt text of `row`: the chat template over [system?, user, assistant prefill], with
        the prefill continued (the completion is the text the model writes after it)."""
        if not getattr(tokenizer, "chat_template", None):
            raise ModelLoadError(
                "model.name_or_path: the tokenizer has no chat template; use a chat model's "
                "tokenizer or set tokenizer.chat_template (e.g. ChatML)"
            )
        messages = []
        if conversation.system is not None:
            messages.append({"role": "system", "content": conversation.system})
        messages.append({"role": "user", "content": self.user_text(conversation.user, row)})
        messages.append({"role": "assistant", "content": conversation.assistant_prefill})
        return tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)

    def prompts(self, tokenizer: Any, conversation: Conversation, rows: Any) -> list[str]:
        """`prompt` of every row of `rows` (a `datasets.Dataset` or a list of dicts)."""
        return [self.prompt(tokenizer, conversation, row) for row in rows]

    # -- scoring ---------------------------------------------------------------------------------

    def correct(self, completions: list[str], **columns: Any) -> list[float]:
        """1.0 or 0.0 per completion: is its answer right? (TRL's reward signature.)"""
        raise NotImplementedError

    def reference_completion(self, row: dict[str, Any]) -> str | None:
        """A completion (text after the prefill, without the end token) that `correct` scores 1.0,
        or None where this row has no reference answer."""
        return None

    def rewards(self) -> dict[str, RewardFn]:
        """This environment's own rewards by name (`train.rewards` may name them)."""
        return {"correct": self.correct}

    def describe(self, row: dict[str, Any]) -> dict[str, Any]:
        """A short, JSON-able view of a row for sample tables and `grpo data`."""
        return {k: v for k, v in row.items() if isinstance(v, (str, int, float, bool)) and k != "metadata"}

    # -- the tiny offline model ------------------------------------------------------------------

    def corpus_rows(self, data_source: str, seed: int, n: int) -> datasets.Dataset:
        """Rows whose text trains the tiny model's tokenizer: generated, or the head of the source."""
        if data_source == "generate":
            return self.rows(n, seed)
        ds = self.load(data_source)
        return ds.select(range(min(n, len(ds))))

    def tokenizer_corpus(self, data_source: str, seed: int, n: int = 2000) -> list[str]:
        """Text of this environment for the tiny model's tokenizer: user messages, reference
        completions and the format's words."""
        lines = [FORMAT_SYSTEM, "Let me solve this step by step.", "system", "user", "assistant"]
        for row in self.corpus_rows(data_source, seed, n):
            lines.append(self.user_text(None, row) if self._default_template_fits(row) else "")
            ref = self.reference_completion(row)
            if ref is not None:
                lines.append(ref)
        return [line for line in lines if line]

    def _default_template_fits(self, row: dict[str, Any]) -> bool:
        return placeholders(self.default_user) <= self.template_fields(list(row))
