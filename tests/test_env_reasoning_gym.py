"""Tests of the reasoning_gym:<dataset> environment (grpo.envs.reasoning_gym): answers checked as
reasoning-gym checks them, reference completions, rows, metadata round trips and one-line errors.

Offline, about ten seconds. Run: pytest -q tests/test_env_reasoning_gym.py
"""

from __future__ import annotations

import ast
import json
import logging
import random
from decimal import Decimal

import datasets
import numpy as np
import pytest
import reasoning_gym
from reasoning_gym.factory import DATASETS

from grpo.envs import get_env
from grpo.envs.reasoning_gym import ReasoningGymEnv, decode_metadata, encode_metadata
from grpo.errors import ConfigError, DataError
from grpo.rewards import format_reward, get_rewards

N = 30
SEED = 11


def _plus_one(a: str) -> str:
    return str(Decimal(a) + 1)


def _longer_list(a: str) -> str:
    return str([*ast.literal_eval(a), "999.0"])


def _other_first_cell(a: str) -> str:
    return ("2" if a[0] == "1" else "1") + a[1:]


PERTURB = {
    "chain_sum": _plus_one,  # arithmetic
    "basic_arithmetic": _plus_one,
    "letter_counting": _plus_one,  # counting letters in text
    "spell_backward": lambda a: a + "q",  # string manipulation
    "word_sorting": lambda a: a.split(", ", 1)[1],  # sorting words (extra words after the list score 1.0)
    "number_sorting": _longer_list,  # sorting numbers, answer a Python list
    "knights_knaves": lambda a: a.split(",")[0] + ".",  # logic: one person's role fewer
    "arc_agi": _other_first_cell,  # grids: metadata holds tuples
}
"""Datasets of different kinds whose rows all have one answer, and a surely wrong answer for each."""


def completion(answer: str) -> str:
    return f"</think>\n<answer>{answer}</answer>"


def columns(row: dict, k: int = 1) -> dict:
    return {c: [row[c]] * k for c in ("question", "answer", "metadata")}


@pytest.fixture(scope="module", params=sorted(PERTURB))
def case(request: pytest.FixtureRequest) -> tuple[str, ReasoningGymEnv, datasets.Dataset, list[dict]]:
    """(dataset, environment, its rows, the package's own entries for the same seed)."""
    name = request.param
    env = get_env(f"reasoning_gym:{name}")
    rows = env.rows(N, seed=SEED)
    package = reasoning_gym.create_dataset(name, size=N, seed=SEED)
    return name, env, rows, [package[i] for i in range(N)]


# ------------------------------------------------------------------------------ answers


def test_reference_completion_is_correct_and_well_formed(case):
    name, env, rows, _ = case
    refs = [env.reference_completion(row) for row in rows]
    assert all(ref is not None for ref in refs), name  # every row of these datasets has one answer
    for row, ref in zip(rows, refs):
        assert ref == completion(row["answer"])
        assert env.correct([ref], **columns(row)) == [1.0], (name, row["answer"])
        assert format_reward([ref]) == [1.0]


def test_perturbed_answer_is_wrong(case):
    name, env, rows, _ = case
    for row in rows:
        wrong = PERTURB[name](row["answer"])
        assert env.correct([completion(wrong)], **columns(row)) == [0.0], (name, row["answer"], wrong)


def test_correct_agrees_with_the_package_on_its_own_entries(case):
    """The rows' metadata went through JSON (tuples included); the package scores its originals."""
    name, env, rows, entries = case
    package = reasoning_gym.create_dataset(name, size=N, seed=SEED)
    for row, entry in zip(rows, entries):
        assert row["question"] == entry["question"] and row["answer"] == entry["answer"]
        for answer in (entry["answer"], PERTURB[name](entry["answer"])):
            expected = 1.0 if package.score_answer(answer.strip(), entry) == 1.0 else 0.0
            assert env.correct([completion(answer)], **columns(row)) == [expected], (name, answer)
        assert expected == 0.0  # the perturbed answer is wrong for the package too


def test_score_is_the_package_score(case):
    name, env, rows, entries = case
    package = reasoning_gym.create_dataset(name, size=N, seed=SEED)
    for row, entry in zip(rows.select(range(10)), entries[:10]):
        for answer in (entry["answer"], PERTURB[name](entry["answer"]), "I don't know"):
            assert env.score([completion(answer)], **columns(row)) == [package.score_answer(answer, entry)]


def test_partial_credit_is_score_not_correct():
    """spell_backward scores a right word plus a letter near 1 (0.8, 0.9999999999999998 or
    1.0000000000000002: summed fractions); `correct` gives 0.0, `score` passes it on."""
    env = get_env("reasoning_gym:spell_backward")
    rows = env.rows(N, seed=SEED)
    scores = [env.score([completion(r["answer"] + "q")], **columns(r))[0] for r in rows]
    assert all(0.5 < s < 1.0 + 1e-9 for s in scores)
    assert all(env.correct([completion(r["answer"] + "q")], **columns(r)) == [0.0] for r in rows)
    assert set(env.rewards()) == {"correct", "score"}
    names = [name for name, _ in get_rewards(["format", "correct", "score"], env)]
    assert names == ["format", "correct", "score"]


def test_no_answer_block_two_blocks_or_a_raising_scorer_score_zero(monkeypatch):
    env = get_env("reasoning_gym:chain_sum")
    row = env.rows(1, seed=SEED)[0]
    a = row["answer"]
    texts = [
        f"the answer is {a}</think>\n{a}",  # no answer block
        f"</think>\n<answer>{a}</answer><answer>{a}</answer>",  # two
        f"</think>\n<answer>{a}</answer>",  # right
    ]
    assert env.correct(texts, **columns(row, 3)) == [0.0, 0.0, 1.0]
    assert env.score(texts, **columns(row, 3)) == [0.0, 0.0, 1.0]

    def boom(answer: str, entry: dict) -> float:
        raise ValueError("cannot parse")

    monkeypatch.setattr(env, "_scorer", boom)
    assert env.correct([texts[2]], **columns(row)) == [0.0]
    assert env.score([texts[2]], **columns(row)) == [0.0]


def test_a_scorer_that_raises_on_words_scores_zero():
    """prime_factorization's own scorer raises ValueError on a non-numeric answer."""
    env = get_env("reasoning_gym:prime_factorization")
    row = env.rows(1, seed=SEED)[0]
    package = reasoning_gym.create_dataset("prime_factorization", size=1, seed=SEED)
    with pytest.raises(ValueError):
        package.score_answer("zzqq", package[0])
    assert env.correct([completion("zzqq")], **columns(row)) == [0.0]
    assert env.correct([completion(row["answer"])], **columns(row)) == [1.0]


def test_rows_without_a_single_answer_have_no_reference():
    env = get_env("reasoning_gym:graph_color")
    rows = env.rows(5, seed=SEED)
    assert rows["answer"] == [""] * 5
    assert [env.reference_completion(r) for r in rows] == [None] * 5
    # a valid coloring from the metadata is still scored right
    row = rows[0]
    coloring = json.dumps({str(k): v for k, v in decode_metadata(row["metadata"])["possible_answer"].items()})
    assert env.correct([completion(coloring)], **columns(row)) == [1.0]


def test_reference_completion_refuses_tags():
    env = get_env("reasoning_gym:chain_sum")
    row = dict(env.rows(1, seed=SEED)[0])
    assert env.reference_completion({**row, "answer": "<answer>5</answer>"}) is None
    assert env.reference_completion({**row, "answer": "5</think>"}) is None


# ------------------------------------------------------------------------------ rows


def test_rows_deterministic_by_seed_with_string_columns():
    env = get_env("reasoning_gym:chain_sum")
    a, b, c = env.rows(20, seed=3), env.rows(20, seed=3), env.rows(20, seed=4)
    assert a.column_names == ["question", "answer", "metadata"]
    assert all(a.features[k] == datasets.Value("string") for k in a.column_names)
    assert a.to_list() == b.to_list()
    assert a["question"] != c["question"]
    assert env.rows(5, seed=3).to_list() == a.to_list()[:5]
    for row in a:
        assert isinstance(row["answer"], str) and row["answer"]
        assert isinstance(decode_metadata(row["metadata"]), dict)
        json.loads(row["metadata"])  # plain JSON text
    assert len(env.rows(0, seed=3)) == 0


def test_rows_deterministic_where_the_package_draws_from_global_generators():
    """list_functions and codeio draw from the global generators too; rows seeds them per row and
    restores them."""
    env = get_env("reasoning_gym:list_functions")
    random.seed(1)
    np.random.seed(1)
    a = env.rows(N, seed=5).to_list()
    after = (random.random(), np.random.random())
    random.seed(1)
    np.random.seed(1)
    assert (random.random(), np.random.random()) == after  # the caller's generators are untouched
    assert env.rows(N, seed=5).to_list() == a


def test_metadata_round_trip_keeps_tuples_and_keys():
    """Plain JSON turns arc_agi's output grid (tuples) into lists, and its scorer then gives a
    right answer 0.05; the tagged JSON keeps them."""
    package = reasoning_gym.create_dataset("arc_agi", size=1, seed=SEED)
    entry = package[0]
    assert decode_metadata(encode_metadata(entry["metadata"])) == entry["metadata"]
    plain = {**entry, "metadata": json.loads(json.dumps(entry["metadata"]))}
    assert package.score_answer(entry["answer"], plain) < 1.0
    value = {"t": (1, (2, 3)), "k": {0: "a", 1: [(4,)]}, "s": "x"}
    assert decode_metadata(encode_metadata(value)) == value


def test_params_reach_the_generator_and_the_slug():
    env = get_env("reasoning_gym:chain_sum", min_terms=2, max_terms=2)
    assert all(decode_metadata(r["metadata"])["num_terms"] == 2 for r in env.rows(20, seed=0))
    assert env.slug.startswith("chain_sum-") and env.slug != "chain_sum"
    assert get_env("reasoning_gym:chain_sum").slug == "chain_sum"
    assert env.cache_key()["params"] == {"min_terms": 2, "max_terms": 2}


def test_class_attributes_and_describe():
    env = get_env("reasoning_gym:chain_sum")
    assert env.usage == "reasoning_gym:<dataset>" and env.generates
    assert env.default_user == "{question}" and env.default_rewards == ("format", "correct")
    assert env.known_columns == ["question", "answer", "metadata"]
    row = env.rows(1, seed=0)[0]
    assert env.describe(row) == {"question": row["question"], "answer": row["answer"]}
    assert env.user_text(None, row) == row["question"]


def test_weak_scorer_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="grpo.envs.reasoning_gym"):
        ReasoningGymEnv("reasoning_gym:game_of_life_halting")
    assert "any non-empty answer" in caplog.text


# ------------------------------------------------------------------------------ loaded rows


def test_normalize_encodes_metadata_and_names_missing_columns():
    env = get_env("reasoning_gym:chain_sum")
    entry = reasoning_gym.create_dataset("chain_sum", size=1, seed=0)[0]
    ds = datasets.Dataset.from_list([{"question": entry["question"], "answer": entry["answer"],
                                      "metadata": {"expression": entry["metadata"]["expression"]}}])
    out = env.normalize(ds, "rows.jsonl")
    assert isinstance(out[0]["metadata"], str)
    assert env.correct([completion(entry["answer"])], **columns(out[0])) == [1.0]
    with pytest.raises(DataError) as e:
        env.normalize(ds.remove_columns("metadata"), "rows.jsonl")
    assert "metadata" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="row 0: metadata is not JSON"):
        env.normalize(ds.remove_columns("metadata").add_column("metadata", ["{oops"]), "rows.jsonl")


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("name", "params", "needle"),
    [
        ("reasoning_gym", {}, "needs a dataset, e.g. reasoning_gym:chain_sum"),
        ("reasoning_gym:", {}, "needs a dataset"),
        ("reasoning_gym:chainsum", {}, "no dataset 'chainsum'; did you mean chain_sum"),
        ("reasoning_gym:zzzzzz", {}, f"it has {len(DATASETS)}"),
        ("reasoning_gym:chain_sum", {"min_terms": 5, "max_terms": 2}, "refused the parameters"),
        ("reasoning_gym:chain_sum", {"min_terms": "two"}, "refused the parameters"),
        ("reasoning_gym:chain_sum", {"terms": 2}, "has no parameter terms; its parameters: min_terms"),
        ("reasoning_gym:chain_sum", {"size": 10}, "data.generate_rows"),
        ("reasoning_gym:chain_sum", {"seed": 1}, "data.seed"),
        ("reasoning_gym:composite", {}, "refused the parameters"),
    ],
)
def test_config_errors_are_one_line(name, params, needle):
    with pytest.raises(ConfigError) as e:
        get_env(name, **params)
    message = str(e.value)
    assert needle in message and "\n" not in message
    assert message.startswith(("task.name", "task.params"))
