"""Countdown: make a target from a few numbers with + - * /, each number used once.

A row is `nums: list[int]` (3 or 4 integers) and `target: int`, the schema of the public
`Jiayi-Pan/Countdown-Tasks-3to4`. `task.params` (all optional): `num_count` (how many numbers a
problem may have, default [3, 4]), `number_range` and `target_range` (inclusive, default [1, 99]).
The user template may use `{nums}` ("[93, 4, 68]", as the reference recipe writes it),
`{nums_plain}` ("93 4 68") and `{target}`. Rewards: `format` and `equation` (= `correct`); the
warm start trains on solver-written completions.

    from grpo.envs import get_env
    env = get_env("countdown", num_count=[3])
    rows = env.rows(1000, seed=0)                                 # solvable by construction
    env.reference_completion({"nums": [93, 4, 68], "target": 29})
    # '93+4=97,97-68=29</think>\\n<answer>(93+4)-68</answer>'
"""

from __future__ import annotations

import ast
import json
import logging
import random
from collections.abc import Sequence
from typing import Any, ClassVar

import datasets
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from grpo.config import REFERENCE_PREFILL, REFERENCE_SYSTEM, Conversation, format_validation_error
from grpo.envs.base import Env
from grpo.envs.countdown.reward import equation_reward
from grpo.envs.countdown.solver import FEATURES, completion_text, generate, solve
from grpo.errors import ConfigError, DataError

log = logging.getLogger(__name__)

REFERENCE_USER = (
    "Using each number in this list only once {nums}, create an equation that equals {target}. "
    "You can use basic arithmetic operations (+, -, *, /) and each number can only be used once. "
    "Show your work in <think> </think> tags. And return the final equation and answer in "
    "<answer> </answer> tags, for example <answer>(1 + 2) / 3</answer>."
)
"""The reference recipe's user message (Qwen2.5-0.5B on Countdown)."""
REFERENCE_CONVERSATION = Conversation(
    system=REFERENCE_SYSTEM, user=REFERENCE_USER, assistant_prefill=REFERENCE_PREFILL
)
"""The reference recipe's whole prompt (configs/qwen2.5-0.5b-countdown.yaml spells it out)."""
SOLVABLE_CHECK_ROWS = 200
"""How many rows of a user's dataset preflight checks for a solution."""


class CountdownParams(BaseModel):
    """`task.params` of Countdown: the shape of generated problems."""

    model_config = ConfigDict(extra="forbid")

    num_count: list[int] = Field(default_factory=lambda: [3, 4], description="How many numbers a problem may have.")
    number_range: tuple[int, int] = Field((1, 99), description="Inclusive range of the numbers.")
    target_range: tuple[int, int] = Field((1, 99), description="Inclusive range of the targets.")

    @model_validator(mode="after")
    def _check(self) -> CountdownParams:
        for name in ("number_range", "target_range"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} {[lo, hi]} must be [low, high] with 0 <= low <= high")
        if not self.num_count or any(not 2 <= k <= 6 for k in self.num_count):
            raise ValueError(f"num_count {self.num_count} must list sizes between 2 and 6")
        return self


# ------------------------------------------------------------------------------ load/validate


def _parse_nums_cell(cell: Any, row: int, source: str) -> Any:
    if not isinstance(cell, str):
        return cell
    s = cell.strip()
    try:
        if s.startswith("["):
            try:
                return json.loads(s)
            except json.JSONDecodeError:
                return ast.literal_eval(s)
        return [int(p) for p in s.replace(",", " ").split()]
    except (ValueError, SyntaxError) as e:
        raise DataError(
            f"data.source: file '{source}' row {row}: nums {cell!r} is not a list of integers ({e})"
        ) from None


def _is_int(x: Any) -> bool:
    """An integer, or a float with an integral value (e.g. a csv column pandas read as float)."""
    if isinstance(x, bool):
        return False
    return isinstance(x, int) or (isinstance(x, float) and x.is_integer())


def _first_bad_row(nums: list, targets: list) -> tuple[int, str] | None:
    for i, (ns, t) in enumerate(zip(nums, targets)):
        if not isinstance(ns, list) or not ns:
            return i, f"nums must be a non-empty list of integers, got {ns!r}"
        if not all(_is_int(x) for x in ns):
            return i, f"nums must be a non-empty list of integers, got {ns!r}"
        if any(x < 0 for x in ns):
            return i, f"nums must be non-negative (an answer cannot use a negative number), got {ns!r}"
        if not _is_int(t):
            return i, f"target must be an integer, got {t!r}"
    return None


def validate_rows(ds: datasets.Dataset) -> None:
    """Check columns `nums` (non-empty list of non-negative ints) and `target` (int); `DataError`
    names the problem.

    The error names the missing column (and those present) or the first bad row index. Floats
    with integral values (3.0) pass; `prepare_dataset` casts both columns to int64.
    """
    present = list(ds.column_names)
    for col in ("nums", "target"):
        if col not in present:
            raise DataError(
                f"data.source: column '{col}' is missing (columns present: {', '.join(present)}); "
                "rows need 'nums' (list of integers) and 'target' (integer)"
            )
    if len(ds) == 0:
        raise DataError("data.source: the dataset has no rows; give a source with Countdown rows")
    table = ds.select_columns(["nums", "target"]).with_format("arrow")[:]
    nums_col = table.column("nums").combine_chunks()
    target_col = table.column("target").combine_chunks()
    t_nums, t_target = nums_col.type, target_col.type
    typed = (
        (pa.types.is_list(t_nums) or pa.types.is_large_list(t_nums))
        and pa.types.is_integer(t_nums.value_type)
        and pa.types.is_integer(t_target)
    )
    if typed:
        bad = pc.or_(
            pc.or_(pc.is_null(nums_col), pc.is_null(target_col)),
            pc.equal(pc.fill_null(pc.list_value_length(nums_col), 0), 0),
        )
        flat = pc.list_flatten(nums_col)
        wrong = pc.or_(pc.is_null(flat), pc.fill_null(pc.less(flat, 0), False))  # null or negative
        if pc.any(wrong).as_py():
            parents = pc.list_parent_indices(nums_col)
            wrong_rows = pc.filter(parents, wrong)
            mask = pc.is_in(pa.array(range(len(nums_col))), value_set=wrong_rows)
            bad = pc.or_(bad, mask)
        if not pc.any(bad).as_py():
            return
        i = pc.index(bad, True).as_py()
        problem = _first_bad_row([nums_col[i].as_py()], [target_col[i].as_py()])
        reason = problem[1] if problem else "nums or target is missing"
        raise DataError(f"data.source: row {i}: {reason}; fix or drop that row")
    problem = _first_bad_row(nums_col.to_pylist(), target_col.to_pylist())
    if problem is None:  # e.g. integral floats
        return
    i, reason = problem
    raise DataError(f"data.source: row {i}: {reason}; fix or drop that row")


def count_solvable(ds: datasets.Dataset, limit: int = SOLVABLE_CHECK_ROWS) -> tuple[int, int]:
    """(rows with a solution, rows checked) among the first `limit` rows (an unsolvable row costs
    the solver's whole search, about 15 ms, so the check is bounded)."""
    head = ds.select(range(min(limit, len(ds))))
    solvable = sum(solve([int(x) for x in r["nums"]], int(r["target"])) is not None for r in head)
    return solvable, len(head)


def format_user(template: str, nums: Sequence[int], target: int) -> str:
    """Fill `{nums}` ("[93, 4, 68]"), `{nums_plain}` ("93 4 68") and `{target}` in `template`."""
    return template.format(**_fields(nums, target))


def _fields(nums: Sequence[int], target: int) -> dict[str, Any]:
    ns = [int(x) for x in nums]
    return {"nums": ns, "nums_plain": " ".join(str(x) for x in ns), "target": int(target)}


def _random_solution(rng: random.Random, nums: list[int]) -> tuple[list[str], str, int]:
    """Combine `nums` left to right with random valid operations: (steps, expression, value)."""
    order = list(nums)
    rng.shuffle(order)
    acc, expr = order[0], str(order[0])
    steps: list[str] = []
    spaced = rng.random() < 0.5
    for i, b in enumerate(order[1:]):
        ops = ["+"]
        if acc > b:
            ops.append("-")
        if acc * b <= 9999:
            ops.append("*")
        if b and acc % b == 0:
            ops.append("/")
        op = rng.choice(ops)
        value = {"+": acc + b, "-": acc - b, "*": acc * b, "/": acc // b if b else acc}[op]
        steps.append(f"{acc}{op}{b}={value}")
        sep = " " if spaced else ""
        expr = f"{expr}{sep}{op}{sep}{b}"
        if i < len(order) - 2:
            expr = f"({expr})"
        acc = value
    return steps, expr, acc


def tiny_corpus(seed: int, num_problems: int = 2000) -> list[str]:
    """Synthetic Countdown-style text (prompts, reasoning, answers) for training the tokenizer (whose
    trainer keeps the format tags out of the merges: they are whole tokens)."""
    rng = random.Random(seed)
    lines = [
        REFERENCE_SYSTEM,
        "Let me solve this step by step.",
        "system", "user", "assistant",
    ]
    for _ in range(num_problems):
        nums = [rng.randint(1, 99) for _ in range(rng.choice((3, 4)))]
        steps, expr, target = _random_solution(rng, nums)
        plain = " ".join(str(n) for n in nums)
        lines.append(f"nums: {plain} target: {target}")
        lines.append(f"{','.join(steps)}</think>\n<answer>{expr}</answer>")
        if rng.random() < 0.2:
            lines.append(REFERENCE_USER.format(nums=nums, target=target))
            lines.append(f" Let me solve this step by step.\n<think> {' '.join(steps)} so {expr} = {target}")
    return lines


class CountdownEnv(Env):
    """Countdown (see the module docstring)."""

    usage: ClassVar[str] = "countdown"
    default_user = "nums: {nums_plain} target: {target}"
    default_rewards: ClassVar[tuple[str, ...]] = ("format", "equation")
    generates: ClassVar[bool] = True
    known_columns: ClassVar[list[str] | None] = ["nums", "target"]

    def __init__(self, name: str, params: dict[str, Any] | None = None) -> None:
        try:
            self.shape = CountdownParams.model_validate(params or {})
        except ValidationError as e:
            raise ConfigError(f"task.params: {format_validation_error(e)}") from None
        super().__init__(name, params)

    @property
    def slug(self) -> str:
        return "countdown"

    def cache_key(self) -> dict[str, Any]:
        return {"env": self.name, "params": self.shape.model_dump(mode="json")}

    def rows(self, n: int, seed: int) -> datasets.Dataset:
        s = self.shape
        return generate(n, seed, s.num_count, s.number_range, s.target_range)

    def normalize(self, ds: datasets.Dataset, source: str) -> datasets.Dataset:
        """Parse `nums` written as text (csv), check the columns and values, cast both to int64."""
        feature = ds.features.get("nums")
        if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
            nums = [_parse_nums_cell(c, i, source) for i, c in enumerate(ds["nums"])]
            ds = ds.remove_columns("nums").add_column("nums", nums)
        validate_rows(ds)
        table = ds.select_columns(["nums", "target"]).with_format("arrow")[:]
        return datasets.Dataset(table.cast(FEATURES.arrow_schema))  # integral floats -> int64

    def check_rows(self, ds: datasets.Dataset, source: str) -> None:
        """`DataError` when no checked row has a solution (nothing could ever earn the equation
        reward or a warm-start example); a warning with the count when some have none."""
        solvable, checked = count_solvable(ds)
        if solvable == 0:
            raise DataError(
                f"data.source: none of the first {checked} rows of '{source}' has a solution (nums cannot "
                "make target); nothing could earn the equation reward. Check the nums/target columns"
            )
        if solvable < checked:
            log.warning("data.source: %d of the first %d rows of '%s' have no solution; they earn no "
                        "equation reward", checked - solvable, checked, source)

    def fields(self, row: dict[str, Any]) -> dict[str, Any]:
        return _fields(row["nums"], row["target"])

    def template_fields(self, columns: list[str]) -> set[str]:
        return {"nums", "nums_plain", "target"}

    def correct(self, completions: list[str], **columns: Any) -> list[float]:
        return equation_reward(completions, **columns)

    def reference_completion(self, row: dict[str, Any]) -> str | None:
        try:
            return completion_text([int(x) for x in row["nums"]], int(row["target"]))
        except ValueError:  # no solution
            return None

    def rewards(self) -> dict[str, Any]:
        return {"correct": equation_reward, "equation": equation_reward}

    def describe(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"nums": [int(x) for x in row["nums"]], "target": int(row["target"])}

    def tokenizer_corpus(self, data_source: str, seed: int, n: int = 2000) -> list[str]:
        """The synthetic Countdown text the tiny model's tokenizer has always been trained on."""
        return tiny_corpus(seed, n)
