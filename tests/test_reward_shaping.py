"""Tests of the `overlong` reward: DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13).

Run: pytest -q tests/test_reward_shaping.py
"""

from __future__ import annotations

import functools
import inspect
import math

import pytest

from grpo.config import RunConfig
from grpo.envs import get_env
from grpo.errors import ConfigError
from grpo.rewards import REWARDS, check_reward_columns, format_reward, get_rewards, overlong_reward, score

DONE = " 2+2=4</think>\n<answer>4</answer>"


def ids(n: int) -> list[int]:
    """A completion of n tokens."""
    return [7] * n


def cfg_40_8_half() -> RunConfig:
    """max_new_tokens 40, buffer 8 (the ramp starts after 32 tokens), penalty 0.5: none a default."""
    return RunConfig(generation={"max_new_tokens": 40}, train={"overlong": {"buffer": 8, "penalty": 0.5}})


# ------------------------------------------------------------------------------ the values


@pytest.mark.parametrize(
    ("length", "expected"),
    [
        (0, 0.0),
        (10, 0.0),  # well below the ramp
        (32, 0.0),  # L = max_new_tokens - buffer: the ramp's start, not punished yet
        (33, -0.125),  # (32 - 33) / 8
        (36, -0.5),  # the ramp's middle
        (39, -0.875),
        (40, -1.0),  # L = max_new_tokens: the full penalty
        (41, -1.0),  # beyond: the full penalty
        (100, -1.0),
    ],
)
def test_overlong_hand_computed(length: int, expected: float) -> None:
    [got] = overlong_reward(["x"], [ids(length)], max_new_tokens=40, buffer=8)
    assert got == pytest.approx(expected)


def test_overlong_penalty_scales_the_ramp() -> None:
    lengths = [32, 34, 36, 40, 50]
    got = overlong_reward(["x"] * 5, [ids(n) for n in lengths], max_new_tokens=40, buffer=8, penalty=0.5)
    assert got == pytest.approx([0.0, -0.125, -0.25, -0.5, -0.5])


def test_overlong_is_continuous_and_monotone() -> None:
    """The pieces meet (eq. 13): non-increasing in L, from 0 to exactly -penalty, no jump."""
    got = overlong_reward(["x"] * 60, [ids(n) for n in range(60)], max_new_tokens=48, buffer=12, penalty=2.0)
    assert all(b <= a for a, b in zip(got, got[1:]))
    assert max(abs(b - a) for a, b in zip(got, got[1:])) == pytest.approx(2.0 / 12)
    assert got[36] == 0.0 and got[48] == -2.0 and got[59] == -2.0


def test_overlong_buffer_of_one_and_whole_length() -> None:
    assert overlong_reward(["x"] * 3, [ids(9), ids(10), ids(11)], max_new_tokens=10, buffer=1) == [0.0, -1.0, -1.0]
    assert overlong_reward(["x"] * 3, [ids(0), ids(5), ids(10)], max_new_tokens=10, buffer=10) == [0.0, -0.5, -1.0]


def test_overlong_reads_token_counts_not_text() -> None:
    """Only `len(completion_ids[i])` counts: the text is ignored; tuples work as lists."""
    got = overlong_reward(["", "a very long text " * 100], [(1,) * 40, [1] * 2], max_new_tokens=40, buffer=8)
    assert got == [-1.0, 0.0]


def test_overlong_is_registered() -> None:
    assert REWARDS["overlong"] is overlong_reward
    assert REWARDS["format"] is format_reward


# ------------------------------------------------------------------------------ get_rewards


def test_get_rewards_binds_the_run_config() -> None:
    env = get_env("dataset", match="exact")
    cfg = cfg_40_8_half()
    assert cfg.train.overlong.buffer == 8
    pairs = get_rewards(["format", "overlong"], env, cfg)
    assert [name for name, _ in pairs] == ["format", "overlong"]
    assert pairs[0][1] is format_reward
    fn = pairs[1][1]
    assert isinstance(fn, functools.partial) and fn.func is overlong_reward
    assert fn.keywords == {"max_new_tokens": 40, "buffer": 8, "penalty": 0.5}
    assert fn(["x"] * 3, completion_ids=[ids(32), ids(36), ids(40)]) == pytest.approx([0.0, -0.25, -0.5])
    assert get_rewards(["overlong"], env, cfg=cfg)[0][1].keywords == fn.keywords  # keyword too


def test_get_rewards_default_buffer_is_a_quarter() -> None:
    cfg = RunConfig(generation={"max_new_tokens": 100})
    [(name, fn)] = get_rewards(["overlong"], None, cfg)
    assert name == "overlong"
    assert fn.keywords == {"max_new_tokens": 100, "buffer": 25, "penalty": 1.0}


def test_get_rewards_unresolved_buffer_falls_back_to_a_quarter() -> None:
    """A section assigned after validation may hold buffer None: the same default is used."""
    cfg = RunConfig(generation={"max_new_tokens": 3})
    cfg.train.overlong = {"buffer": None, "penalty": 1.0}
    assert cfg.train.overlong.buffer is None
    [(_, fn)] = get_rewards(["overlong"], None, cfg)
    assert fn.keywords["buffer"] == 1  # max(1, 3 // 4)


def test_get_rewards_overlong_without_cfg_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as e:
        get_rewards(["format", "overlong"], get_env("dataset", match="exact"))
    msg = str(e.value)
    assert "'overlong'" in msg and "get_rewards(names, env, cfg)" in msg and "\n" not in msg


def test_get_rewards_without_cfg_still_works_for_others() -> None:
    assert get_rewards(["format", "correct"], get_env("dataset", match="exact"))[0] == ("format", format_reward)


def test_get_rewards_binds_overlong_by_import_path() -> None:
    [(name, fn)] = get_rewards(["grpo.rewards:overlong_reward"], None, cfg_40_8_half())
    assert name == "overlong_reward" and fn.keywords["max_new_tokens"] == 40


def test_unknown_name_lists_overlong() -> None:
    with pytest.raises(ConfigError, match="overlong"):
        get_rewards(["overlog"], None, cfg_40_8_half())


# ------------------------------------------------------------------------------ score, preflight


def test_score_reports_overlong() -> None:
    env = get_env("dataset", match="exact")
    pairs = get_rewards(["format", "overlong"], env, cfg_40_8_half())
    texts = [DONE, DONE, "no format", DONE]
    columns = {"answer": ["4"] * 4, "completion_ids": [ids(5), ids(36), ids(40), ids(32)]}
    scores = score(texts, columns, pairs, [1.0, 2.0])
    assert scores.per_fn["overlong"].tolist() == pytest.approx([0.0, -0.25, -0.5, 0.0])
    assert scores.total.tolist() == pytest.approx([1.0, 1.0 - 0.5, -1.0, 1.0])
    metrics = scores.metrics()
    assert metrics["reward/overlong"] == pytest.approx(-0.75 / 4)
    assert metrics["reward/overlong/errors"] == 0.0
    assert metrics["reward/format"] == pytest.approx(0.75)


def test_score_without_completion_ids_counts_errors() -> None:
    """A caller that forgets `completion_ids`: overlong raises, so it scores 0 and is counted."""
    pairs = get_rewards(["overlong"], None, cfg_40_8_half())
    scores = score([DONE, DONE], {"answer": ["4", "4"]}, pairs)
    assert scores.per_fn["overlong"].tolist() == [0.0, 0.0]
    assert scores.metrics()["reward/overlong/errors"] == 2.0


def test_check_reward_columns_accepts_overlong() -> None:
    pairs = get_rewards(["format", "overlong"], get_env("dataset", match="exact"), cfg_40_8_half())
    check_reward_columns(pairs, ["prompt", "answer"], "dataset")  # completion_ids: supplied by the caller
    check_reward_columns(get_rewards(["overlong"], None, cfg_40_8_half()), ["nums", "target"], "countdown")
    params = inspect.signature(pairs[1][1]).parameters
    assert params["max_new_tokens"].default == 40 and params["buffer"].default == 8


def test_check_reward_columns_rejects_unbound_overlong() -> None:
    """The raw function (not via get_rewards) lacks its settings: preflight says so."""
    with pytest.raises(ConfigError, match="max_new_tokens"):
        check_reward_columns([("overlong", overlong_reward)], ["answer"], "dataset")


def test_overlong_values_are_finite() -> None:
    got = overlong_reward(["x"] * 3, [ids(0), ids(47), ids(10_000)], max_new_tokens=48, buffer=48, penalty=3.0)
    assert all(math.isfinite(v) for v in got)
