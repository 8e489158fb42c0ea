"""reasoning-gym: any of its ~100 procedural datasets as an environment, generated offline.

`task.name` is `reasoning_gym:<dataset>` (e.g. `reasoning_gym:chain_sum`; the names are
`reasoning_gym.factory.DATASETS`), and `task.params` are the keyword arguments of
`reasoning_gym.create_dataset` for that dataset (its config fields, e.g. `min_terms`), except `size`
and `seed`, which come from `data.generate_rows` and `data.seed`. A row is `question`, `answer`
("" where the dataset has no single answer) and `metadata` (JSON text); the default user template
is `{question}`.

    from grpo.envs import get_env
    env = get_env("reasoning_gym:chain_sum", min_terms=2, max_terms=3)
    rows = env.rows(100, seed=0)
    rows[0]["question"]     # 'State the final answer to the following arithmetic problem: 1663 - 5242 - 9376 ='
    ref = env.reference_completion(rows[0])           # '</think>\\n<answer>-12955</answer>'
    env.correct([ref], **{k: [v] for k, v in rows[0].items()})   # [1.0]

Answers are checked by the dataset's own `score_answer` (built once, with `task.params`: some
scorers read their config) on the single `<answer>` block, with the entry rebuilt from the row.
`metadata` is stored as JSON that keeps tuples and non-string dict keys (tagged `{"__tuple__": [...]}`
and `{"__items__": [[key, value], ...]}`), so the scorers see what the package generated: with plain
JSON, arc_agi's and rearc's scorers compare a parsed board (tuples) with the stored one (lists) and
score every right answer 0.05.

Rewards, and why `correct` is binary. Two rewards are offered: `correct` (the default, and what
evaluation reports as accuracy) is 1.0 exactly when the package scores the answer 1.0, else 0.0;
`score` is the package's raw score, partial credit included, for those who want it
(`train.rewards: [format, score]`). Binary is the default because the partial scores often reward
answering anything. Measured on reasoning-gym 0.1.25, scoring each of 40 rows with another row's
answer (well-formed, wrong), over the 100 datasets with answers:

* 53 datasets give every such answer 0.0;
* 26 give most of them a positive score: a constant for anything parseable (0.01: codeio,
  color_cube_rotation, cryptarithm, emoji_mystery, group_anagrams, gsm_symbolic, jugs,
  power_function, prime_factorization; 0.05: arc_agi, rearc, countdown, fraction_simplification,
  palindrome_generation, sentence_reordering, tsumego) or graded closeness (game_of_life about 0.9,
  sudoku, mini_sudoku, rectangle_count, time_intervals, coin_flip, complex_arithmetic);
* 21 give some of them partial credit, e.g. the base scorer and `compute_decimal_reward` give
  len(oracle)/len(answer) when the right answer is inside a longer one ("37" for 3 scores 0.5);
* 11 give 0.01 or 0.02 even to "I don't know" (advanced_geometry, color_cube_rotation, countdown,
  emoji_mystery, fraction_simplification, palindrome_generation, power_function, puzzle24,
  rubiks_cube, rush_hour, tsumego).

`correct` compares with 1.0 exactly, not within a tolerance: every dataset scored its own answers
exactly 1.0 (30 to 60 rows each), while spell_backward scores the right word plus one character (a
trailing period, say) 0.9999999999999998 or 1.0000000000000002, summing 1/len per letter.

Two scorers are weak (`WEAK_SCORERS`, a warning when used): game_of_life_halting scores any
non-empty answer 1.0, and puzzle24 accepts any four in-range numbers that make 24, not only the
given ones. Other scorers are lenient, and the environment keeps their verdict: word_sorting
accepts extra words after the sorted ones, knights_knaves, kakurasu, quantum_lock and sokoban
accept some trailing text, numeric ones allow a tolerance.

Five datasets have no single answer (boxnet, graph_color, propositional_logic, rubiks_cube,
rush_hour: the scorer checks a solution against the metadata), so their rows have no reference
completion and the warm start cannot use them. composite needs `task.params.datasets`.

Rows are deterministic by seed within a Python process (`rows` seeds the global generators per row
for codeio and list_functions, which draw from them). Across processes, isomorphic_strings,
knight_swap, polynomial_multiplication, ransom_note and word_ladder generate other rows unless
PYTHONHASHSEED is fixed (they iterate sets); the prepared-data cache keeps a run's rows either way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import importlib.metadata
import json
import logging
import random
from collections.abc import Iterator
from typing import Any, ClassVar

import datasets
import numpy as np
from tqdm.auto import tqdm

from grpo.envs.base import Env
from grpo.errors import ConfigError, DataError
from grpo.rewards import TAGS, answer_content

log = logging.getLogger(__name__)

PROGRESS_ROWS = 2000
"""`rows` shows a progress bar from this many rows on."""

FEATURES = datasets.Features(
    {"question": datasets.Value("string"), "answer": datasets.Value("string"), "metadata": datasets.Value("string")}
)
"""The columns of generated rows."""

WEAK_SCORERS: dict[str, str] = {
    "game_of_life_halting": "its scorer gives 1.0 to any non-empty answer, so rewards and accuracy mean nothing",
    "puzzle24": "its scorer accepts any four in-range numbers that make 24, not only the given ones",
}
"""Datasets whose package scorer accepts wrong answers (reasoning-gym 0.1.25), and how."""

_TUPLE = "__tuple__"
_ITEMS = "__items__"


# ----------------------------------------------------------------------------- metadata as text


def _tagged(value: Any) -> Any:
    if isinstance(value, tuple):
        return {_TUPLE: [_tagged(v) for v in value]}
    if isinstance(value, list):
        return [_tagged(v) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _tagged(v) for k, v in value.items()}
        return {_ITEMS: [[_tagged(k), _tagged(v)] for k, v in value.items()]}
    return value


def _untagged(obj: dict[str, Any]) -> Any:
    if len(obj) == 1 and isinstance(obj.get(_TUPLE), list):
        return tuple(obj[_TUPLE])
    if len(obj) == 1 and isinstance(obj.get(_ITEMS), list):
        return {k: v for k, v in obj[_ITEMS]}
    return obj


def encode_metadata(metadata: Any) -> str:
    """A dataset entry's metadata as JSON text that keeps tuples and non-string dict keys (tagged);
    values JSON cannot hold (a Fraction, say) become their `str`."""
    return json.dumps(_tagged(metadata), default=str, ensure_ascii=False)


def decode_metadata(text: str) -> Any:
    """The metadata `encode_metadata` wrote (plain JSON reads as itself)."""
    return json.loads(text, object_hook=_untagged)


@contextlib.contextmanager
def _global_rngs() -> Iterator[Any]:
    """Yield `seed_row(seed, i)`, which seeds Python's and numpy's global generators for one row;
    their states are restored on exit. Some generators draw from them (codeio, list_functions)
    besides their own seeded `Random`, and gave other rows on every call without this."""
    py_state, np_state = random.getstate(), np.random.get_state()

    def seed_row(seed: int, i: int) -> None:
        digest = hashlib.sha256(f"{seed}:{i}".encode()).digest()
        random.seed(digest)
        np.random.seed(int.from_bytes(digest[:4], "little"))

    try:
        yield seed_row
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


# ----------------------------------------------------------------------------- the environment


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _package() -> Any:
    try:
        import reasoning_gym
    except ImportError as e:
        raise ConfigError(
            f"task.name: reasoning_gym environments need the reasoning-gym package ({e}); pip install reasoning-gym"
        ) from None
    return reasoning_gym


class ReasoningGymEnv(Env):
    """One reasoning-gym dataset (see the module docstring)."""

    usage: ClassVar[str] = "reasoning_gym:<dataset>"
    default_user = "{question}"
    default_rewards: ClassVar[tuple[str, ...]] = ("format", "correct")
    generates: ClassVar[bool] = True
    known_columns: ClassVar[list[str] | None] = ["question", "answer", "metadata"]

    def __init__(self, name: str, params: dict[str, Any] | None = None) -> None:
        """Check the dataset name and `task.params` (by building a one-row dataset and generating
        its row); `ConfigError` in one line naming what is wrong."""
        super().__init__(name, params)
        self.dataset = name.partition(":")[2]
        """The reasoning-gym dataset name, e.g. "chain_sum"."""
        self._scorer = self._check(name, self.dataset, self.params).score_answer

    @classmethod
    def create(cls, name: str, variant: str | None, params: dict[str, Any]) -> ReasoningGymEnv:
        """The environment `reasoning_gym:<variant>`; `ConfigError` in one line for a missing or
        unknown dataset or parameters it refuses."""
        return cls(name, params)

    @staticmethod
    def _check(name: str, variant: str, params: dict[str, Any]) -> Any:
        """The one-row dataset of `variant` with `params` (its `score_answer` scores this
        environment), after checking both."""
        if not variant:
            raise ConfigError(
                f"task.name: {name!r}: reasoning_gym needs a dataset, e.g. reasoning_gym:chain_sum; the names are "
                "reasoning_gym.factory.DATASETS"
            )
        rg = _package()
        from reasoning_gym.factory import DATASETS

        if variant not in DATASETS:
            close = difflib.get_close_matches(variant, list(DATASETS), n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ConfigError(
                f"task.name: reasoning-gym has no dataset {variant!r}; {hint}it has {len(DATASETS)}, listed in "
                "reasoning_gym.factory.DATASETS"
            )
        for key, field in (("size", "data.generate_rows"), ("seed", "data.seed")):
            if key in params:
                raise ConfigError(
                    f"task.params.{key}: reasoning_gym takes the {key} of generated rows from {field}; "
                    f"remove {key} from task.params and set {field}"
                )
        config_cls = DATASETS[variant][1]
        if dataclasses.is_dataclass(config_cls):
            accepted = [f.name for f in dataclasses.fields(config_cls) if f.name not in ("size", "seed")]
            unknown = sorted(set(params) - set(accepted))
            if unknown:
                raise ConfigError(
                    f"task.params: reasoning_gym dataset {variant!r} has no parameter {', '.join(unknown)}; "
                    f"its parameters: {', '.join(accepted) or 'none'}"
                )
        try:
            dataset = rg.create_dataset(variant, size=1, seed=0, **params)
            with _global_rngs() as seed_row:  # leaves the caller's global generators as they were
                seed_row(0, 0)
                dataset[0]
        except Exception as e:  # noqa: BLE001 - the package's config checks raise assertions, type and value errors alike; each means these parameters were refused, and the message says why
            raise ConfigError(
                f"task.params: reasoning_gym dataset {variant!r} refused the parameters {params} ({_first_line(e)})"
            ) from None
        if variant in WEAK_SCORERS:
            log.warning("reasoning_gym:%s: %s", variant, WEAK_SCORERS[variant])
        return dataset

    def cache_key(self) -> dict[str, Any]:
        """The name, parameters and package version (another version generates other rows)."""
        return {**super().cache_key(), "reasoning_gym": importlib.metadata.version("reasoning-gym")}

    # -- rows --------------------------------------------------------------------------------

    def rows(self, n: int, seed: int) -> datasets.Dataset:
        """`n` rows of the dataset generated with `seed` (the same seed gives the same rows, and
        the first rows of a longer run); a progress bar from `PROGRESS_ROWS` rows on."""
        if n <= 0:
            return datasets.Dataset.from_dict({"question": [], "answer": [], "metadata": []}, features=FEATURES)
        try:
            dataset = _package().create_dataset(self.dataset, size=n, seed=seed, **self.params)
        except Exception as e:  # noqa: BLE001 - as in create: any error of the package's config check is a refusal
            raise ConfigError(
                f"task.params: reasoning_gym dataset {self.dataset!r} refused the parameters {self.params} "
                f"({_first_line(e)})"
            ) from None
        columns: dict[str, list[str]] = {"question": [], "answer": [], "metadata": []}
        bar = tqdm(range(n), desc=f"reasoning_gym:{self.dataset}", unit="row", disable=n < PROGRESS_ROWS)
        with _global_rngs() as seed_row:
            for i in bar:
                seed_row(seed, i)
                try:
                    entry = dataset[i]
                except Exception as e:  # noqa: BLE001 - the generator's own error, of any type; named in one line, the traceback chained
                    raise ConfigError(
                        f"task.params: reasoning_gym dataset {self.dataset!r} failed to generate row {i} (data.seed "
                        f"{seed}) with the parameters {self.params} ({_first_line(e)}); try other parameters"
                    ) from e
                columns["question"].append(str(entry["question"]))
                columns["answer"].append("" if entry["answer"] is None else str(entry["answer"]))
                columns["metadata"].append(encode_metadata(entry.get("metadata", {})))
        return datasets.Dataset.from_dict(columns, features=FEATURES)

    def normalize(self, ds: datasets.Dataset, source: str) -> datasets.Dataset:
        """Rows of a file or hub dataset: `question`, `answer` and `metadata` must be there; a
        missing answer becomes "", metadata that is not text becomes JSON text."""
        ds = super().normalize(ds, source)
        missing = [c for c in ("question", "answer", "metadata") if c not in ds.column_names]
        if missing:
            raise DataError(
                f"data.source: '{source}' has no column {', '.join(missing)}; reasoning_gym rows need question, answer "
                "and metadata, as reasoning_gym.create_dataset writes them"
            )
        answers = ["" if a is None else str(a) for a in ds["answer"]]
        metadata = []
        for i, m in enumerate(ds["metadata"]):
            if isinstance(m, str):
                try:
                    decode_metadata(m)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"data.source: '{source}' row {i}: metadata is not JSON ({e}); fix or drop that row"
                    ) from None
                metadata.append(m)
            else:
                metadata.append(encode_metadata({} if m is None else m))
        ds = ds.remove_columns(["answer", "metadata"])
        ds = ds.add_column("answer", answers).add_column("metadata", metadata)
        return ds.cast_column("question", datasets.Value("string"))

    # -- scoring ---------------------------------------------------------------------------------

    def _scores(
        self, completions: list[str], question: list[str], answer: list[str], metadata: list[str]
    ) -> list[float]:
        """The package's score of each completion's answer block (0.0 without one, or where the
        scorer raises)."""
        decoded: dict[str, Any] = {}  # the completions of one prompt share its metadata
        out = []
        for i, completion in enumerate(completions):
            content = answer_content(completion)
            if content is None:
                out.append(0.0)
                continue
            if metadata[i] not in decoded:
                decoded[metadata[i]] = decode_metadata(metadata[i])
            entry = {"question": question[i], "answer": answer[i], "metadata": decoded[metadata[i]]}
            try:
                out.append(float(self._scorer(content, entry)))
            except Exception:  # noqa: BLE001 - some scorers raise on answers they cannot parse (prime_factorization on words); an unparseable answer is a wrong one
                out.append(0.0)
        return out

    def correct(
        self, completions: list[str], question: list[str], answer: list[str], metadata: list[str], **_: Any
    ) -> list[float]:
        """1.0 where the dataset scores the answer block exactly 1.0, else 0.0 (no answer block,
        partial credit, a scorer error)."""
        return [1.0 if s == 1.0 else 0.0 for s in self._scores(completions, question, answer, metadata)]

    def score(
        self, completions: list[str], question: list[str], answer: list[str], metadata: list[str], **_: Any
    ) -> list[float]:
        """The dataset's own score of the answer block, partial credit included (0.0 without one,
        or where the scorer raises)."""
        return self._scores(completions, question, answer, metadata)

    def rewards(self) -> dict[str, Any]:
        """`correct` (binary) and `score` (the package's partial credit)."""
        return {"correct": self.correct, "score": self.score}

    def reference_completion(self, row: dict[str, Any]) -> str | None:
        """`</think>\\n<answer>{answer}</answer>`, or None where the answer holds a tag or the
        dataset does not score it 1.0 (a row without an answer: "" scores 0 there; ab's rows whose
        answer is empty keep their empty answer block)."""
        answer = row.get("answer") or ""
        if any(tag in answer for tag in TAGS):
            return None
        text = f"</think>\n<answer>{answer}</answer>"
        ok = self.correct([text], [row["question"]], [answer], [row["metadata"]])
        return text if ok == [1.0] else None

    def describe(self, row: dict[str, Any]) -> dict[str, Any]:
        """The question and the answer."""
        return {"question": row["question"], "answer": row["answer"]}
