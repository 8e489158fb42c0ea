"""Tests of grpo.rewards: format and equation rewards, the safe evaluator, the registry.

Run: pytest -q tests/test_rewards.py
"""

from __future__ import annotations

import doctest
import time
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import grpo.rewards
from grpo.errors import ConfigError
from grpo.rewards import (
    REWARDS,
    equation_reward,
    format_reward,
    get_rewards,
    register_reward,
    safe_eval,
)

NUMS = [93, 4, 68]
GOOD = " 93+4=97, 97-68=29</think>\n<answer>(93 + 4) - 68</answer>"


def eq(answer_text: str, target: int, nums) -> float:
    """Equation reward of one completion whose answer block holds `answer_text`."""
    return equation_reward([f" work</think>\n<answer>{answer_text}</answer>"], [target], [nums])[0]


def fmt(completion: str) -> float:
    return format_reward([completion])[0]


# ------------------------------------------------------------------------------ equation


def test_right_answer_scores_one() -> None:
    assert equation_reward([GOOD], [29], [NUMS]) == [1.0]
    assert eq(" 93 + 4 - 68 ", 29, NUMS) == 1.0  # surrounding spaces stripped, precedence honoured
    assert eq("68-(93/(4+ 89))", 67, [68, 93, 4, 89]) == 1.0
    assert eq("(1 + 2) / 3", 1, [1, 2, 3]) == 1.0


def test_fractional_intermediates_are_exact() -> None:
    assert eq("8 / (3 - 8 / 3)", 24, [8, 3, 8, 3]) == 1.0
    assert eq("5 * (5 - 1 / 5)", 24, [5, 5, 1, 5]) == 1.0


def test_wrong_value_scores_zero() -> None:
    assert eq("(93 + 4) - 68", 30, NUMS) == 0.0
    assert eq("93 - 4 - 68", 29, NUMS) == 0.0
    assert eq("93 / 4 + 68", 91, NUMS) == 0.0  # 91.25


def test_numbers_must_be_the_given_multiset() -> None:
    assert eq("93 - 64", 29, NUMS) == 0.0  # 4 and 68 missing, 64 foreign
    assert eq("97 - 68", 29, NUMS) == 0.0  # number missing
    assert eq("(93 + 4) - 68 + 4 - 4", 29, NUMS) == 0.0  # 4 reused
    assert eq("(93 + 4) - 68 + 0", 29, NUMS) == 0.0  # extra number
    assert eq("(93 + 4) - 68 + 1 - 1", 29, NUMS) == 0.0
    assert eq("93 + 4 - 68", 29, [93, 4, 68, 68]) == 0.0  # one given number unused
    assert eq("(1 + 1) * 2", 4, [1, 2, 2]) == 0.0
    assert eq("(1 + 2) * 2", 6, [1, 2, 2]) == 1.0  # duplicates as a multiset


def test_missing_or_doubled_tags() -> None:
    assert equation_reward([" (93 + 4) - 68"], [29], [NUMS]) == [0.0]
    assert equation_reward(["</think>\n<answer>(93 + 4) - 68"], [29], [NUMS]) == [0.0]
    assert equation_reward(["</think>\n(93 + 4) - 68</answer>"], [29], [NUMS]) == [0.0]
    two = "</think>\n<answer>(93 + 4) - 68</answer><answer>(93 + 4) - 68</answer>"
    assert equation_reward([two], [29], [NUMS]) == [0.0]
    nested = "</think>\n<answer><answer>(93 + 4) - 68</answer></answer>"
    assert equation_reward([nested], [29], [NUMS]) == [0.0]
    assert format_reward([two, nested]) == [0.0, 0.0]


def test_division_by_zero_pow_and_floordiv() -> None:
    assert eq("5 / (3 - 3)", 5, [5, 3, 3]) == 0.0
    assert eq("2 ** 3", 8, [2, 3]) == 0.0
    assert eq("2**3", 8, [2, 3]) == 0.0
    assert eq("7 // 7", 1, [7, 7]) == 0.0
    assert eq("7 / 7", 1, [7, 7]) == 1.0  # control: true division is fine
    assert safe_eval("1 / 0") is None
    assert safe_eval("2 ** 3") is None
    assert safe_eval("7 // 2") is None


def test_unary_operators_and_other_syntax_rejected() -> None:
    assert eq("-3 + 10", 7, [3, 10]) == 0.0
    assert eq("10 + -3", 7, [10, 3]) == 0.0
    assert eq("+10 - 3", 7, [10, 3]) == 0.0
    assert eq("(10)(3)", 30, [10, 3]) == 0.0
    assert eq("", 0, []) == 0.0
    assert eq("10 - 3 = 7", 7, [10, 3, 7]) == 0.0
    assert eq("10 x 3", 30, [10, 3]) == 0.0
    assert eq("010 - 3", 7, [10, 3]) == 0.0  # leading zero is not a Python int literal
    for bad in ["1 +", "()", "(1 + 2", "1 2", "__import__('os')", "1e3", "1.5 * 2", "0x10"]:
        assert safe_eval(bad) is None, bad
    assert safe_eval("(93 + 4) - 68") == 29.0
    assert safe_eval("1 / 3") == pytest.approx(1 / 3)


def test_huge_values_rejected() -> None:
    big = 99999999999
    assert eq(f"{big} * {big}", big * big, [big, big]) == 0.0
    assert eq("99 * 99 * 99 * 99 * 99 * 99 * 99", 99**7, [99] * 7) == 0.0  # 9.3e13 > bound
    assert safe_eval("9999999999999") is None
    assert safe_eval("99999 * 99999") == 99999.0 * 99999.0  # below the bound


def test_non_ascii_digits_rejected() -> None:
    assert eq("3 + 4", 7, [3, 4]) == 1.0
    assert eq("\u0663 + 4", 7, [3, 4]) == 0.0  # Arabic-Indic three
    assert eq("\uff13 + 4", 7, [3, 4]) == 0.0  # fullwidth three
    assert eq("3 \uff0b 4", 7, [3, 4]) == 0.0  # fullwidth plus
    assert eq("3\t+ 4", 7, [3, 4]) == 0.0  # only spaces inside
    assert safe_eval("\u0663 + 4") is None


def test_nums_and_target_as_tuple_or_numpy() -> None:
    assert equation_reward([GOOD], [29], [(93, 4, 68)]) == [1.0]
    assert equation_reward([GOOD], [np.int64(29)], [np.array([93, 4, 68])]) == [1.0]
    assert equation_reward([GOOD], np.array([29]), np.array([[93, 4, 68]])) == [1.0]
    assert equation_reward([GOOD], [29], [np.array([93, 4, 68], dtype=np.int32)]) == [1.0]
    assert equation_reward([GOOD], [30], [np.array([93, 4, 68])]) == [0.0]


def test_batch_scores_each_completion() -> None:
    comps = [GOOD, GOOD, "nothing", GOOD]
    targets = [29, 30, 29, 29]
    nums = [NUMS, NUMS, NUMS, [93, 4, 67]]
    assert equation_reward(comps, targets, nums) == [1.0, 0.0, 0.0, 0.0]
    assert equation_reward([], [], []) == []


def test_hostile_inputs_are_fast() -> None:
    cases = [  # (completion, expected format reward)
        (" " + "x" * 10_000 + "</think>\n<answer>(93 + 4) - 68</answer>", 0.0),  # over the length guard
        ("</think>\n<answer>" + "(" * 5000 + "1" + ")" * 5000 + "</answer>", 0.0),
        ("</think>\n<answer>" + "(" * 60 + "1 + 2" + ")" * 60 + "</answer>", 1.0),  # short, too deep
        ("</think>\n<answer>" + "1+" * 4900 + "1</answer>", 1.0),
        ("<think>" * 1400 + "</think>" * 1000, 0.0),
        ("</think>\n<answer>" + "9" * 9000 + "</answer>", 1.0),
        ("<answer>" + "(" * 9990, 0.0),
    ]
    for c, expected_format in cases:
        start = time.perf_counter()
        assert format_reward([c]) == [expected_format]
        assert equation_reward([c], [3], [[1, 2]]) == [0.0]
        assert time.perf_counter() - start < 0.5
    # within the depth bound, nesting is fine
    assert eq("(" * 15 + "1 + 2" + ")" * 15, 3, [1, 2]) == 1.0
    assert safe_eval("(" * 30 + "1" + ")" * 30) is None


def test_non_string_completion_scores_zero() -> None:
    assert format_reward([None, 3]) == [0.0, 0.0]  # type: ignore[list-item]
    assert equation_reward([None], [29], [NUMS]) == [0.0]  # type: ignore[list-item]
    assert equation_reward([GOOD], [29], [None]) == [0.0]  # type: ignore[list-item]


# -------------------------------------------------------------------------------- format


def test_format_accepts_the_exact_shape() -> None:
    assert fmt(GOOD) == 1.0
    assert fmt("</think>\n<answer></answer>") == 1.0  # empty bodies are still the right shape
    assert fmt(" multi\nline\n thinking </think>\n<answer>1 + 2</answer>") == 1.0
    assert fmt(" 3 < 4 and x>y </think>\n<answer>1 < 2</answer>") == 1.0


@pytest.mark.parametrize(
    "completion",
    [
        " a</think><answer>1</answer>",  # no newline
        " a</think>\n\n<answer>1</answer>",  # two newlines
        " a</think> \n<answer>1</answer>",  # space before the newline
        " a</think>\r\n<answer>1</answer>",
        " a</think>\n<answer>1</answer>\n",  # trailing newline
        " a</think>\n<answer>1</answer> ",  # trailing space
        " a</think>\n<answer>1</answer>more",
        " a <think> b</think>\n<answer>1</answer>",  # nested <think>
        "<think> a</think>\n<answer>1</answer>",  # completion repeats the prefill
        " a</think></think>\n<answer>1</answer>",
        " a</think>\n<answer>1</answer></think>",
        " a\n<answer>1</answer>",  # no </think>
        " a</think>\n<answer>1",  # no </answer>
        " a</think>\n1</answer>",  # no <answer>
        " a</think>\n<answer>1</answer><answer>2</answer>",
        " a</think>\n<answer><answer>1</answer>",
        "",
    ],
)
def test_format_rejects(completion: str) -> None:
    assert fmt(completion) == 0.0


# ------------------------------------------------------------------------------ registry


def test_module_docstring_example_runs() -> None:
    result = doctest.testmod(grpo.rewards)
    assert result.attempted >= 3 and result.failed == 0


def test_registry() -> None:
    """Registered names are environment-independent; `equation` and `correct` come from the task."""
    assert REWARDS["format"] is format_reward
    assert "equation" not in REWARDS
    pairs = get_rewards(["equation", "format", "correct"])  # the default task: countdown
    assert pairs == [("equation", equation_reward), ("format", format_reward), ("correct", equation_reward)]
    with pytest.raises(ConfigError) as e:
        get_rewards(["format", "lenght"])
    msg = str(e.value)
    assert "'lenght'" in msg and "equation" in msg and "format" in msg and "\n" not in msg


def test_register_reward_adds_a_named_reward() -> None:
    @register_reward("test_length")
    def length_reward(completions: list[str], **kwargs: object) -> list[float]:
        return [min(len(c), 10) / 10 for c in completions]

    try:
        [(name, fn)] = get_rewards(["test_length"])
        assert name == "test_length" and fn(["abcde"]) == [0.5]
    finally:
        REWARDS.pop("test_length", None)


# ---------------------------------------------------------------------- property tests


def _reference_format(completion: str) -> float:
    """The format rule written with plain string operations (independent of the regex)."""
    t = "<think>" + completion
    close = t.find("</think>")
    if close < 0 or "<think>" in t[len("<think>") : close]:
        return 0.0
    rest = t[close + len("</think>") :]
    head, tail = "\n<answer>", "</answer>"
    if not (rest.startswith(head) and rest.endswith(tail) and len(rest) >= len(head) + len(tail)):
        return 0.0
    body = rest[len(head) : -len(tail)]
    return 0.0 if ("<answer>" in body or "</answer>" in body) else 1.0


@st.composite
def expression_over(draw: st.DrawFn) -> tuple[list[int], str, Fraction]:
    """Numbers, a random expression using each exactly once, and its exact value."""
    nums = draw(st.lists(st.integers(1, 99), min_size=1, max_size=5))
    pool = [(Fraction(n), str(n)) for n in nums]
    while len(pool) > 1:
        i = draw(st.integers(0, len(pool) - 1))
        a = pool.pop(i)
        j = draw(st.integers(0, len(pool) - 1))
        b = pool.pop(j)
        op = draw(st.sampled_from("+-*/"))
        if op == "/" and b[0] == 0:
            op = "+"
        value = {"+": a[0] + b[0], "-": a[0] - b[0], "*": a[0] * b[0], "/": a[0] / b[0] if b[0] else 0}[op]
        sep = draw(st.sampled_from(["", " "]))
        pool.append((value, f"({a[1]}{sep}{op}{sep}{b[1]})"))
    value, expr = pool[0]
    if draw(st.booleans()) and expr.startswith("("):
        expr = expr[1:-1]  # outermost parentheses are optional
    return nums, expr, value


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(expression_over(), st.integers(1, 1000))
def test_equation_reward_matches_exact_arithmetic(case, offset: int) -> None:
    nums, expr, value = case
    completion = f" thinking</think>\n<answer>{expr}</answer>"
    shuffled = list(reversed(nums))
    if value.denominator == 1:
        target = int(value)
        assert equation_reward([completion], [target], [shuffled]) == [1.0]
        assert equation_reward([completion], [target + offset], [shuffled]) == [0.0]
        assert equation_reward([completion], [target], [shuffled + [1]]) == [0.0]
    else:
        near = round(value)
        assume(abs(value - near) > Fraction(1, 10_000))
        assert equation_reward([completion], [near], [shuffled]) == [0.0]
    assert format_reward([completion]) == [1.0]


_TOKENS = ["<think>", "</think>", "<answer>", "</answer>", "\n", " ", "1", "2", "+", "-", "*",
           "/", "(", ")", "**", "//", "\u0663", "x", "0"]


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.text(max_size=300), st.lists(st.sampled_from(_TOKENS), max_size=40).map("".join)),
    st.integers(-(10**15), 10**15),
    st.lists(st.integers(-(10**15), 10**15), max_size=6),
)
def test_rewards_never_raise(text: str, target: int, nums: list[int]) -> None:
    f = format_reward([text])
    e = equation_reward([text], [target], [nums])
    assert f in ([0.0], [1.0]) and e in ([0.0], [1.0])
    assert f == [_reference_format(text)]
    safe_eval(text)  # must not raise either
