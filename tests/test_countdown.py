"""Tests of grpo.countdown: generation, solver, loading/validation, splits, caching, prompts.

Run: pytest -q tests/test_countdown.py
"""

from __future__ import annotations

import doctest
import itertools
import json
import random
from fractions import Fraction
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import grpo.countdown
from grpo.config import Conversation, DataConfig
from grpo.countdown import (
    DatasetRef,
    build_prompt,
    format_user,
    generate,
    load_rows,
    load_split,
    prepare_dataset,
    prepare_splits,
    solve,
    solve_steps,
    validate_rows,
)
from grpo.envs import get_env
from grpo.envs.countdown import REFERENCE_CONVERSATION
from grpo.errors import DataError, ModelLoadError
from grpo.rewards import equation_reward


def reachable(nums: list[int]) -> set[Fraction]:
    """Every value an expression using each number exactly once can take (subset DP, exact)."""
    n = len(nums)
    reach: dict[int, set[Fraction]] = {1 << i: {Fraction(x)} for i, x in enumerate(nums)}
    for mask in range(1, 1 << n):
        if mask in reach:
            continue
        out: set[Fraction] = set()
        sub = (mask - 1) & mask
        while sub:
            rest = mask ^ sub
            if sub < rest:  # each unordered split once; both operand orders below
                for a in reach[sub]:
                    for b in reach[rest]:
                        out.update((a + b, a - b, b - a, a * b))
                        if b:
                            out.add(a / b)
                        if a:
                            out.add(b / a)
            sub = (sub - 1) & mask
        reach[mask] = out
    return reach[(1 << n) - 1]


def answer(expr: str) -> str:
    return f" work</think>\n<answer>{expr}</answer>"


# -------------------------------------------------------------------------------- generate


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_generated_rows_are_valid_and_solvable(seed: int) -> None:
    ds = generate(300, seed)
    assert ds.column_names == ["nums", "target"] and len(ds) == 300
    validate_rows(ds)
    counts = set()
    for row in ds:
        nums, target = row["nums"], row["target"]
        counts.add(len(nums))
        assert len(nums) in (3, 4)
        assert all(type(x) is int and 1 <= x <= 99 for x in nums)
        assert type(target) is int and 1 <= target <= 99
        assert Fraction(target) in reachable(nums), row
    assert counts == {3, 4}


def test_generate_respects_custom_ranges() -> None:
    ds = generate(100, 3, num_count=[2], number_range=(1, 10), target_range=(50, 60))
    for row in ds:
        assert len(row["nums"]) == 2 and all(1 <= x <= 10 for x in row["nums"])
        assert 50 <= row["target"] <= 60
        assert Fraction(row["target"]) in reachable(row["nums"])


def test_generate_unreachable_target_range_is_a_data_error() -> None:
    with pytest.raises(DataError, match="target_range"):
        generate(5, 0, num_count=[2], number_range=(1, 1), target_range=(50, 60))


def test_generate_is_deterministic_by_seed() -> None:
    a, b, c = generate(200, 5), generate(200, 5), generate(200, 6)
    assert a.to_dict() == b.to_dict()
    assert a.to_dict() != c.to_dict()
    state = random.getstate()
    generate(10, 0)
    assert random.getstate() == state  # no use of the global RNG


def test_module_docstring_example_runs() -> None:
    result = doctest.testmod(grpo.countdown)
    assert result.attempted >= 4 and result.failed == 0


# ---------------------------------------------------------------------------------- solver


def check_steps(nums: list[int], target: int, steps: list) -> None:
    """Each step combines two values still in the pool; all numbers used; ends at target."""
    pool = [Fraction(x) for x in nums]
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
           "/": lambda a, b: a / b}
    for a, op, b, r in steps:
        pool.remove(Fraction(a))
        pool.remove(Fraction(b))
        assert ops[op](Fraction(a), Fraction(b)) == r
        pool.append(Fraction(r))
    assert pool == [target]


def test_solve_on_generated_rows_scores_one() -> None:
    ds = generate(200, 11)
    exprs = [solve(r["nums"], r["target"]) for r in ds]
    assert all(e is not None for e in exprs)
    scores = equation_reward([answer(e) for e in exprs], ds["target"], ds["nums"])
    assert scores == [1.0] * len(ds)
    for row in ds:
        steps = solve_steps(row["nums"], row["target"])
        assert steps is not None and len(steps) == len(row["nums"]) - 1
        check_steps(row["nums"], row["target"], steps)
        # generated rows are built from non-negative integer steps, so those are found
        assert all(type(r) is int and r >= 0 for *_, r in steps)


def test_solve_known_cases() -> None:
    assert solve([93, 4, 68], 29) == "(93 + 4) - 68"
    assert solve_steps([93, 4, 68], 29) == [(93, "+", 4, 97), (97, "-", 68, 29)]
    for nums, target in [([3, 3, 8, 8], 24), ([1, 5, 5, 5], 24), ([4, 4, 10, 10], 24)]:
        expr = solve(nums, target)
        assert expr is not None
        assert equation_reward([answer(expr)], [target], [nums]) == [1.0]
        check_steps(nums, target, solve_steps(nums, target))
    assert solve([1, 1, 1, 1], 97) is None and solve_steps([1, 1, 1, 1], 97) is None
    assert solve([5], 5) == "5" and solve([5], 6) is None
    assert solve(np.array([93, 4, 68]), np.int64(29)) == "(93 + 4) - 68"
    assert solve([-3, 5], 2) is None  # no answer without unary minus can score
    assert solve_steps([-3, 5], 2) == [(-3, "+", 5, 2)]


def test_solve_agrees_with_brute_force_on_random_targets() -> None:
    rng = random.Random(0)
    for _ in range(150):
        nums = [rng.randint(1, 20) for _ in range(rng.choice([3, 4]))]
        target = rng.randint(1, 150)
        found = solve(nums, target)
        expected = Fraction(target) in reachable(nums)
        assert (found is not None) == expected, (nums, target, found)
        assert (solve_steps(nums, target) is not None) == expected
        if found is not None:
            assert equation_reward([answer(found)], [target], [nums]) == [1.0]


def test_solve_steps_prefers_integer_steps() -> None:
    steps = solve_steps([6, 4, 2], 5)  # 6 - 4 / 2 needs no fraction; (6 + 4) / 2 neither
    assert steps is not None and all(type(v) is int for s in steps for v in (s[0], s[2], s[3]))
    check_steps([6, 4, 2], 5, steps)


# ------------------------------------------------------------------------ load and validate


def test_missing_target_column_is_named(tmp_path: Path) -> None:
    pq.write_table(pa.table({"nums": [[1, 2], [3, 4]], "goal": [3, 7]}), tmp_path / "a.parquet")
    (tmp_path / "a.jsonl").write_text('{"nums": [1, 2], "goal": 3}\n')
    for name in ("a.parquet", "a.jsonl"):
        ds = load_rows(str(tmp_path / name))
        with pytest.raises(DataError) as e:
            validate_rows(ds)
        msg = str(e.value)
        assert "'target'" in msg and "goal" in msg and "nums" in msg and "\n" not in msg


def test_bad_rows_are_named(tmp_path: Path) -> None:
    rows = [{"nums": [1, 2], "target": 3}, {"nums": [4, 5], "target": 9}, {"nums": [], "target": 1}]
    with pytest.raises(DataError, match="row 2"):
        validate_rows(datasets.Dataset.from_list(rows))
    rows[2] = {"nums": [1, 2], "target": None}
    with pytest.raises(DataError, match="row 2"):
        validate_rows(datasets.Dataset.from_list(rows))
    rows[2] = {"nums": [1, None], "target": 3}
    with pytest.raises(DataError, match="row 2"):
        validate_rows(datasets.Dataset.from_list(rows))
    rows[2] = {"nums": [1, 2], "target": 3.5}
    with pytest.raises(DataError, match="row 2.*target"):
        validate_rows(datasets.Dataset.from_list(rows))
    rows[1] = {"nums": ["a", "b"], "target": 3}
    rows[2] = {"nums": ["c"], "target": 3}
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[1:]))
    with pytest.raises(DataError, match="row 0.*nums"):
        validate_rows(load_rows(str(tmp_path / "s.jsonl")))
    validate_rows(datasets.Dataset.from_list([{"nums": [1, 2], "target": 3}]))
    validate_rows(datasets.Dataset.from_list([{"nums": [1, 2], "target": 3.0}]))  # integral float
    with pytest.raises(DataError, match="no rows"):
        validate_rows(datasets.Dataset.from_dict({"nums": [], "target": []}))


def test_csv_and_json_load(tmp_path: Path) -> None:
    df = pd.DataFrame({"nums": ["[93, 4, 68]", "[1, 2, 3, 4]", "5 6"], "target": [29, 24, 11]})
    df.to_csv(tmp_path / "rows.csv", index=False)
    ds = get_env("countdown").load(str(tmp_path / "rows.csv"))  # csv text lists parsed, checked, cast
    assert ds.to_dict() == {"nums": [[93, 4, 68], [1, 2, 3, 4], [5, 6]], "target": [29, 24, 11]}
    (tmp_path / "rows.json").write_text(json.dumps([{"nums": [1, 2], "target": 3}]))
    assert load_rows(str(tmp_path / "rows.json")).to_dict() == {"nums": [[1, 2]], "target": [3]}
    (tmp_path / "bad.csv").write_text('nums,target\n"[1, 2",3\n')
    with pytest.raises(DataError, match="row 0"):
        get_env("countdown").load(str(tmp_path / "bad.csv"))


def test_missing_file_and_offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = str(tmp_path / "nope.parquet")
    with pytest.raises(DataError, match="not found") as e:
        load_rows(missing)
    assert missing in str(e.value) and "data.source" in str(e.value)
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as e:
        load_rows("no-such-owner/no-such-countdown-dataset")
    msg = str(e.value)
    assert "no-such-owner/no-such-countdown-dataset" in msg and "source=generate" in msg
    assert "\n" not in msg


# ---------------------------------------------------------------------------------- splits


def test_prepare_splits_sizes_determinism_and_recipe() -> None:
    ds = generate(100, 0)
    a = prepare_splits(ds, 50, 0.2, seed=42)
    b = prepare_splits(ds, 50, 0.2, seed=42)
    assert (len(a["train"]), len(a["test"])) == (40, 10)
    assert a["train"].to_dict() == b["train"].to_dict() and a["test"].to_dict() == b["test"].to_dict()
    recipe = ds.shuffle(seed=42).select(range(50)).train_test_split(test_size=0.2, seed=42)
    assert a["test"].to_dict() == recipe["test"].to_dict()
    c = prepare_splits(ds, None, 0.25, seed=1)
    assert (len(c["train"]), len(c["test"])) == (75, 25)
    key = lambda r: (tuple(r["nums"]), r["target"])  # noqa: E731
    all_rows = sorted(key(r) for r in ds)
    assert sorted([key(r) for r in c["train"]] + [key(r) for r in c["test"]]) == all_rows
    assert c["test"].to_dict() != prepare_splits(ds, None, 0.25, seed=2)["test"].to_dict()
    with pytest.raises(DataError, match="num_rows"):
        prepare_splits(ds, 101, 0.2, seed=0)


# ---------------------------------------------------------------------------------- caching


def test_prepare_dataset_caches_by_inputs(tmp_path: Path) -> None:
    cfg = DataConfig(generate_rows=200, cache_dir=str(tmp_path / "cache"))
    ref = prepare_dataset(cfg)
    assert isinstance(ref, DatasetRef) and not ref.reused
    assert (ref.train_rows, ref.test_rows, ref.source) == (160, 40, "generate")
    train, test = load_split(ref.train_path), load_split(ref.test_path)
    assert (len(train), len(test)) == (160, 40)
    validate_rows(train)
    expected = prepare_splits(generate(200, cfg.seed), None, cfg.test_fraction, cfg.seed)
    assert test.to_dict() == expected["test"].to_dict()
    mtimes = [Path(p).stat().st_mtime_ns for p in (ref.train_path, ref.test_path)]

    again = prepare_dataset(cfg)
    assert again.reused and again.content_hash == ref.content_hash
    assert (again.train_path, again.test_path) == (ref.train_path, ref.test_path)
    assert [Path(p).stat().st_mtime_ns for p in (ref.train_path, ref.test_path)] == mtimes
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no temp left

    elsewhere = prepare_dataset(cfg.model_copy(update={"cache_dir": str(tmp_path / "other")}))
    assert not elsewhere.reused and elsewhere.content_hash == ref.content_hash  # deterministic
    other_seed = prepare_dataset(cfg.model_copy(update={"seed": 1}))
    assert not other_seed.reused and other_seed.content_hash != ref.content_hash
    assert Path(other_seed.train_path).parent != Path(ref.train_path).parent


def test_prepare_dataset_from_file_and_bad_cache_dir(tmp_path: Path) -> None:
    src = tmp_path / "rows.jsonl"
    rows = generate(50, 4)
    src.write_text("".join(json.dumps({"nums": r["nums"], "target": float(r["target"]), "x": 1})
                           + "\n" for r in rows))
    cfg = DataConfig(source=str(src), cache_dir=str(tmp_path / "cache"), test_fraction=0.2)
    ref = prepare_dataset(cfg)
    assert (ref.train_rows, ref.test_rows) == (40, 10)
    train = load_split(ref.train_path)
    assert train.column_names == ["nums", "target"] and type(train[0]["target"]) is int
    assert sorted([*train["target"], *load_split(ref.test_path)["target"]]) == sorted(rows["target"])
    src.write_text("".join(json.dumps({"nums": r["nums"], "target": r["target"]}) + "\n"
                           for r in list(rows)[:20]))
    changed = prepare_dataset(cfg)  # edited file: new inputs, not the stale cache
    assert not changed.reused and changed.train_rows == 16

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    bad = DataConfig(generate_rows=20, cache_dir=str(blocker / "sub"))
    with pytest.raises(DataError, match="data.cache_dir"):
        prepare_dataset(bad)
    with pytest.raises(DataError, match="not found"):
        load_split(str(tmp_path / "missing.parquet"))


# ---------------------------------------------------------------------------------- prompts

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def chatml_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<|endoftext|>": 1, "<|im_start|>": 2, "<|im_end|>": 3}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="<|endoftext|>", eos_token="<|im_end|>"
    )
    fast.chat_template = CHATML
    return fast


def test_format_user() -> None:
    assert format_user("{nums} | {nums_plain} | {target}", np.array([93, 4, 68]), np.int64(29)) == (
        "[93, 4, 68] | 93 4 68 | 29"
    )


def test_build_prompt_default_and_reference(chatml_tokenizer) -> None:
    prompt = build_prompt(chatml_tokenizer, [93, 4, 68], 29, Conversation())
    assert prompt == (
        "<|im_start|>user\nnums: 93 4 68 target: 29<|im_end|>\n<|im_start|>assistant\n<think>"
    )
    ref = build_prompt(chatml_tokenizer, (93, 4, 68), 29, REFERENCE_CONVERSATION)
    assert ref.startswith("<|im_start|>system\n" + REFERENCE_CONVERSATION.system + "<|im_end|>\n")
    assert format_user(REFERENCE_CONVERSATION.user, [93, 4, 68], 29) in ref
    assert "[93, 4, 68]" in ref
    assert ref.endswith("<|im_start|>assistant\n" + REFERENCE_CONVERSATION.assistant_prefill)


def test_build_prompt_without_chat_template(chatml_tokenizer) -> None:
    tok = chatml_tokenizer.__class__(tokenizer_object=chatml_tokenizer.backend_tokenizer)
    tok.chat_template = None
    with pytest.raises(ModelLoadError, match="chat template"):
        build_prompt(tok, [1, 2], 3, Conversation())


def test_generated_rows_combine_in_every_order() -> None:
    # sanity of the brute force used above: a known unsolvable and a known fractional case
    assert Fraction(24) in reachable([3, 3, 8, 8])
    assert Fraction(97) not in reachable([1, 1, 1, 1])
    assert reachable([2, 3]) == {Fraction(v) for v in (5, -1, 1, 6, Fraction(2, 3), Fraction(3, 2))}
    assert all(Fraction(a + b + c) in reachable([a, b, c])
               for a, b, c in itertools.product([1, 7], repeat=3))
