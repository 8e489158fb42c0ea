"""Countdown's public functions where they have always been importable; the environment itself is
`grpo.envs.countdown` (rows, solver, prompt fields, reward, reference completions).

    >>> from grpo.countdown import generate, solve, solve_steps
    >>> ds = generate(1000, seed=0)  # every row solvable, deterministic by seed
    >>> len(ds), ds.column_names
    (1000, ['nums', 'target'])
    >>> solve([93, 4, 68], 29)
    '(93 + 4) - 68'
    >>> solve_steps([93, 4, 68], 29)
    [(93, '+', 4, 97), (97, '-', 68, 29)]

`python -m grpo.countdown 5` prints five generated rows with a solution each.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from grpo.config import Conversation
from grpo.data import FILE_SUFFIXES, DatasetRef, load_rows, load_split, prepare_dataset, prepare_splits
from grpo.envs.countdown import SOLVABLE_CHECK_ROWS, count_solvable, format_user, validate_rows
from grpo.envs.countdown.solver import FEATURES, generate, solve, solve_steps

__all__ = [
    "FEATURES", "FILE_SUFFIXES", "SOLVABLE_CHECK_ROWS", "DatasetRef", "build_prompt", "count_solvable", "format_user",
    "generate", "load_rows", "load_split", "prepare_dataset", "prepare_splits", "solve", "solve_steps",
    "validate_rows",
]


def build_prompt(tokenizer: Any, nums: Sequence[int], target: int, conversation: Conversation) -> str:
    """The prompt text of one Countdown problem (see `grpo.envs.base.Env.prompt`)."""
    from grpo.envs import get_env

    return get_env("countdown").prompt(tokenizer, conversation, {"nums": nums, "target": target})


def _main(argv: list[str]) -> None:
    n = int(argv[0]) if argv else 5
    for row in generate(n, seed=0):
        print(row["nums"], row["target"], "->", solve(row["nums"], row["target"]))


if __name__ == "__main__":
    _main(sys.argv[1:])
