"""Countdown's equation reward: a safe arithmetic evaluator over exact fractions and the check
that the single `<answer>` block uses exactly the row's numbers and equals its target.

    >>> from grpo.envs.countdown.reward import equation_reward
    >>> done = " 93+4=97, 97-68=29</think>\\n<answer>(93 + 4) - 68</answer>"
    >>> equation_reward([done], target=[29], nums=[[93, 4, 68]])
    [1.0]

The answer is evaluated by a small `ast` walker over exact fractions (never Python `eval`); hostile
input (very long text, deep nesting, huge numbers, `**`, `//`, division by zero) scores 0.0
quickly. Departures from the reference recipe: its equation check runs `eval`; here the
expression must use binary operators only (no unary minus), and intermediate values are bounded
by `MAX_ABS`.
"""

from __future__ import annotations

import ast
import re
from fractions import Fraction
from typing import Any

from grpo.rewards import MAX_TEXT_CHARS

TOLERANCE = 1e-5
"""An answer is right when its value is within this distance of the target."""
MAX_EXPR_CHARS = 200
"""Answer expressions longer than this are invalid."""
MAX_PAREN_DEPTH = 20
"""Answer expressions nested deeper than this are invalid."""
MAX_ABS = 1e12
"""Any intermediate value larger than this in absolute value makes the expression invalid."""

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ALLOWED_CHARS_RE = re.compile(r"[0-9+\-*/() ]+")
_INT_RE = re.compile(r"[0-9]+")
_OPS = (ast.Add, ast.Sub, ast.Mult, ast.Div)


def _paren_depth_ok(expr: str, limit: int) -> bool:
    depth = 0
    for ch in expr:
        if ch == "(":
            depth += 1
            if depth > limit:
                return False
        elif ch == ")":
            depth -= 1
    return True


def _eval_node(node: ast.AST) -> Fraction:
    """Exact value of an allowed node; ValueError on anything else."""
    if isinstance(node, ast.Constant):
        v = node.value
        if type(v) is not int:
            raise ValueError("only integer literals are allowed")
        value = Fraction(v)
    elif isinstance(node, ast.BinOp) and isinstance(node.op, _OPS):
        a = _eval_node(node.left)
        b = _eval_node(node.right)
        if isinstance(node.op, ast.Add):
            value = a + b
        elif isinstance(node.op, ast.Sub):
            value = a - b
        elif isinstance(node.op, ast.Mult):
            value = a * b
        else:
            if b == 0:
                raise ZeroDivisionError
            value = a / b
    else:
        raise ValueError(f"{type(node).__name__} is not allowed")
    if abs(value) > MAX_ABS:
        raise ValueError("value too large")
    return value


def safe_eval_exact(expr: str) -> Fraction | None:
    """Exact value of an arithmetic expression over integers with binary + - * /, else None.

    None for: characters other than ASCII digits, `+ - * / ( )` and spaces; more than
    `MAX_EXPR_CHARS` characters or `MAX_PAREN_DEPTH` nested parentheses (checked before
    parsing); syntax errors; unary operators, `**` and `//`; division by zero; any intermediate
    value beyond `MAX_ABS`.
    """
    try:
        if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS:
            return None
        if not _ALLOWED_CHARS_RE.fullmatch(expr) or not _paren_depth_ok(expr, MAX_PAREN_DEPTH):
            return None
        tree = ast.parse(expr.strip(), mode="eval")
        return _eval_node(tree.body)
    except Exception:  # noqa: BLE001 - any malformed expression is "no value", never an error
        return None


def safe_eval(expr: str) -> float | None:
    """Value of an arithmetic expression (see `safe_eval_exact`) as a float; None if invalid."""
    value = safe_eval_exact(expr)
    return None if value is None else float(value)


def matches_target(value: float | Fraction, target: Any) -> bool:
    """True when `value` is within `TOLERANCE` of `target` (the equation reward's test)."""
    return abs(float(value) - float(target)) < TOLERANCE

def _equation_ok(completion: str, target: Any, nums: Any) -> bool:
    if not isinstance(completion, str) or len(completion) > MAX_TEXT_CHARS:
        return False
    text = "<think>" + completion
    if text.count("<answer>") != 1 or text.count("</answer>") != 1:
        return False
    m = _ANSWER_RE.search(text)
    if m is None:
        return False
    expr = m.group(1).strip()
    if len(expr) > MAX_EXPR_CHARS or not _ALLOWED_CHARS_RE.fullmatch(expr):
        return False
    used = sorted(int(s) for s in _INT_RE.findall(expr))
    if used != sorted(int(x) for x in nums):
        return False
    value = safe_eval_exact(expr)
    return value is not None and matches_target(value, target)


def equation_reward(
    completions: list[str], target: list[int], nums: list[list[int]], **kwargs: Any
) -> list[float]:
    """1.0 when the single `<answer>` block is an expression using exactly `nums` that equals `target`.

    `target` and `nums` are the dataset columns, one entry per completion (python or numpy ints;
    each `nums` entry a list, tuple or array). The stripped answer may hold only ASCII digits,
    `+ - * / ( )` and spaces; its integers must be `nums` as a multiset; its value must be within
    `TOLERANCE` of the target. Raises ValueError only when the three lists differ in length.
    """
    if not (len(completions) == len(target) == len(nums)):
        raise ValueError(
            f"equation_reward: {len(completions)} completions but {len(target)} targets and "
            f"{len(nums)} nums; pass one of each per completion"
        )
    out = []
    for completion, t, ns in zip(completions, target, nums):
        try:
            out.append(1.0 if _equation_ok(completion, t, ns) else 0.0)
        except Exception:  # noqa: BLE001 - a reward never raises: a completion it cannot read scores 0
            out.append(0.0)
    return out
