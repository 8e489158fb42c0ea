"""Countdown rows and their solutions: a seeded generator whose rows are solvable by construction,
an exact solver, and the solver-written reference completion of the warm start.

    >>> from grpo.envs.countdown.solver import completion_text, generate, solve, solve_steps
    >>> ds = generate(1000, seed=0)
    >>> len(ds), ds.column_names
    (1000, ['nums', 'target'])
    >>> solve([93, 4, 68], 29)
    '(93 + 4) - 68'
    >>> solve_steps([93, 4, 68], 29)
    [(93, '+', 4, 97), (97, '-', 68, 29)]
    >>> completion_text([93, 4, 68], 29)
    '93+4=97,97-68=29</think>\\n<answer>(93+4)-68</answer>'

Departures from the reference recipe: offline, rows are generated here rather than downloaded.
Generation builds each target from its numbers with random non-negative integer steps (exact
division only), so every row is solvable by construction; the target distribution therefore
differs from the public dataset's (`Jiayi-Pan/Countdown-Tasks-3to4`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import datasets

from grpo.envs.countdown.reward import MAX_ABS, matches_target
from grpo.errors import DataError

FEATURES = datasets.Features(
    {"nums": datasets.List(datasets.Value("int64")), "target": datasets.Value("int64")}
)
"""The column types of Countdown rows."""

Value = int | Fraction
# A search node: a leaf number, or (left, op, right, value).
Node = int | tuple


# ----------------------------------------------------------------------------------- generate


def _combine(rng: random.Random, nums: list[int]) -> int:
    """Combine all `nums` in a random order with random ops; every step a non-negative int."""
    pool = list(nums)
    while len(pool) > 1:
        i, j = rng.sample(range(len(pool)), 2)
        a, b = pool[i], pool[j]
        for k in sorted((i, j), reverse=True):
            pool.pop(k)
        op = rng.randrange(4)
        if op == 3:  # division, only when exact (either way round)
            if b and a % b == 0:
                r = a // b
            elif a and b % a == 0:
                r = b // a
            else:
                op = rng.randrange(3)
        if op == 0:
            r = a + b
        elif op == 1:
            r = abs(a - b)
        elif op == 2:
            r = a * b
        pool.append(r)
    return pool[0]


def generate(
    n: int,
    seed: int,
    num_count: Sequence[int] = (3, 4),
    number_range: Sequence[int] = (1, 99),
    target_range: Sequence[int] = (1, 99),
) -> datasets.Dataset:
    """`n` solvable rows (`nums`, `target`), deterministic by `seed`.

    For each row: k from `num_count`, k numbers uniform in `number_range` (inclusive), then a
    target in `target_range` (inclusive) reached by combining all the numbers with random
    non-negative integer steps; new numbers are drawn when no try lands in range.
    """
    if n < 0:
        raise DataError(f"data.generate_rows is {n}; give a positive number of rows")
    counts = list(num_count)
    lo, hi = int(number_range[0]), int(number_range[1])
    tlo, thi = int(target_range[0]), int(target_range[1])
    if not counts or any(k < 2 for k in counts):
        raise DataError(f"data.num_count {counts} must list sizes of 2 or more")
    if not (lo <= hi and tlo <= thi):
        raise DataError("data.number_range / data.target_range must be [low, high] with low <= high")
    rng = random.Random(seed)
    all_nums: list[list[int]] = []
    targets: list[int] = []
    for _ in range(n):
        for _draw in range(1000):
            k = rng.choice(counts)
            nums = [rng.randint(lo, hi) for _ in range(k)]
            target = None
            for _try in range(20):
                t = _combine(rng, nums)
                if tlo <= t <= thi:
                    target = t
                    break
            if target is not None:
                break
        else:
            raise DataError(
                f"data.target_range {[tlo, thi]}: no target reachable from numbers in "
                f"{[lo, hi]}; widen target_range or change number_range"
            )
        all_nums.append(nums)
        targets.append(target)
    return datasets.Dataset.from_dict({"nums": all_nums, "target": targets}, features=FEATURES)


# ------------------------------------------------------------------------------------- solver


def _candidates(a: Value, b: Value, mode: str) -> list[tuple[bool, str, Value]]:
    """(swapped, op, result) for the pair: `a op b`, or `b op a` when swapped.

    `mode` "nonneg": non-negative integer results (larger minus smaller, exact division);
    "int": integer results; "any": exact fractions too.
    """
    out: list[tuple[bool, str, Value]] = [(False, "+", a + b), (False, "*", a * b)]
    if mode == "nonneg":
        out.append((a < b, "-", abs(a - b)))
    else:
        out.append((False, "-", a - b))
        if a != b:
            out.append((True, "-", b - a))
    for swapped, x, y in ((False, a, b), (True, b, a)):
        if swapped and a == b:
            break
        if y == 0:
            continue
        if mode == "any":
            q = Fraction(x) / y
            out.append((swapped, "/", q))
        elif x % y == 0:
            out.append((swapped, "/", x // y))
    if mode == "any":  # keep integer values as int (cheaper, and steps read naturally)
        out = [(s, op, int(r) if isinstance(r, Fraction) and r.denominator == 1 else r)
               for s, op, r in out]
    return out


def _search(
    values: list[Value], nodes: list[Node], target: int, mode: str, exact: bool, failed: set
) -> Node | None:
    """Depth-first search combining pairs until one value is left that hits `target`.

    `failed` holds value multisets already known to miss (local to one call).
    """
    if len(values) == 1:
        hit = values[0] == target if exact else matches_target(values[0], target)
        return nodes[0] if hit else None
    key = tuple(sorted(values))
    if key in failed:
        return None
    n = len(values)
    for i in range(n):
        for j in range(i + 1, n):
            rest_v = [values[k] for k in range(n) if k != i and k != j]
            rest_n = [nodes[k] for k in range(n) if k != i and k != j]
            for swapped, op, r in _candidates(values[i], values[j], mode):
                if abs(r) > MAX_ABS:
                    continue
                left, right = (nodes[j], nodes[i]) if swapped else (nodes[i], nodes[j])
                found = _search(
                    rest_v + [r], rest_n + [(left, op, right, r)], target, mode, exact, failed
                )
                if found is not None:
                    return found
    failed.add(key)
    return None


def _solve_tree(nums: Sequence[int], target: int, modes: Sequence[str], exact: bool) -> Node | None:
    values = [int(x) for x in nums]
    if not values:
        return None
    for mode in modes:
        found = _search(list(values), list(values), int(target), mode, exact, set())
        if found is not None:
            return found
    return None


def _render(node: Node, top: bool = True) -> str:
    if not isinstance(node, tuple):
        return str(node)
    left, op, right, _ = node
    s = f"{_render(left, False)} {op} {_render(right, False)}"
    return s if top else f"({s})"


def _steps(node: Node, out: list) -> Value:
    if not isinstance(node, tuple):
        return node
    left, op, right, value = node
    a = _steps(left, out)
    b = _steps(right, out)
    out.append((a, op, b, value))
    return value


def solve(nums: Sequence[int], target: int) -> str | None:
    """One expression using every number once that `equation_reward` scores 1.0, or None.

    Exhaustive search over combining pairs with + - * / (exact fractions, same tolerance and
    magnitude bound as the reward); natural non-negative integer steps are tried first. None for
    negative numbers too: the reward accepts no unary minus, so no answer could score.
    """
    if any(int(x) < 0 for x in nums):
        return None
    tree = _solve_tree(nums, target, ("nonneg", "any"), exact=False)
    return None if tree is None else _render(tree)


def solve_steps(nums: Sequence[int], target: int) -> list[tuple[int, str, int, int]] | None:
    """Steps `[(a, op, b, result), ...]` that combine all numbers into exactly `target`, or None.

    Non-negative integer steps are preferred, then any integer steps; only when neither exists
    are fractional steps used (then a, b or result may be a `fractions.Fraction`). Suits
    supervised traces such as "93+4=97,97-68=29".
    """
    tree = _solve_tree(nums, target, ("nonneg", "int", "any"), exact=True)
    if tree is None:
        return None
    out: list = []
    _steps(tree, out)
    return out


# ----------------------------------------------------------------------------- completions


def _num(x: int | Fraction) -> str:
    """A step value as text: integers plainly, fractions in parentheses ("(7/2)")."""
    if isinstance(x, Fraction) and x.denominator != 1:
        return f"({x.numerator}/{x.denominator})"
    return str(int(x))


def expression_from_steps(nums: Sequence[int], steps: Sequence[tuple[Any, str, Any, Any]]) -> str:
    """The answer expression that the steps compute, e.g. "(93+4)-68", parenthesised per step.

    Each step (a, op, b, r) takes an available value a and an available value b (starting from
    `nums`) and makes r available; the expression of r is "(ea op eb)", and the outer parentheses
    of the last one are dropped. When equal values are available any of them may be taken: the
    result uses each number once and has the same value. ValueError when the steps do not use
    exactly the given numbers.
    """
    pool: list[tuple[Any, str]] = [(int(x), str(int(x))) for x in nums]

    def take(value: Any) -> str:
        for i, (v, expr) in enumerate(pool):
            if v == value:
                pool.pop(i)
                return expr
        raise ValueError(f"step operand {value} is not an available value")

    for a, op, b, r in steps:
        ea = take(a)
        eb = take(b)
        pool.append((r, f"({ea}{op}{eb})"))
    if len(pool) != 1:
        raise ValueError(f"steps leave {len(pool)} values; they must combine all numbers into one")
    expr = pool[0][1]
    return expr[1:-1] if len(steps) else expr


def completion_text(nums: Sequence[int], target: int) -> str:
    """Solver-written completion after the prefilled "<think>", without the end-of-turn token.

    "93+4=97,97-68=29</think>\\n<answer>(93+4)-68</answer>" for nums [93, 4, 68], target 29.
    ValueError when the problem has no solution.
    """
    steps = solve_steps(nums, target)
    if steps is None:
        raise ValueError(f"no solution for nums {list(nums)} and target {target}")
    trace = ",".join(f"{_num(a)}{op}{_num(b)}={_num(r)}" for a, op, b, r in steps)
    return f"{trace}</think>\n<answer>{expression_from_steps(nums, steps)}</answer>"
