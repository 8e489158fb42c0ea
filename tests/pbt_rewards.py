"""A reward that varies on the untrained tiny model, so that population tests see different fitness:
1.0 when a completion's first token id is even."""

from __future__ import annotations

from typing import Any


def first_even(completions: list[str], completion_ids: list[list[int]], **_: Any) -> list[float]:
    return [float(bool(ids) and ids[0] % 2 == 0) for ids in completion_ids]
