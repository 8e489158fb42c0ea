"""The `dataset` environment: the user's own rows from a local file, checked by math-verify or exact match.

    pytest -q tests/test_env_dataset.py

Offline and fast: small files under tmp_path; the thread tests start math-verify's worker process
(about 2 s each time it starts).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from grpo.envs import dataset as dataset_env
from grpo.envs import get_env
from grpo.errors import ConfigError, DataError, UserError
from grpo.rewards import format_reward

GSM8K_ANSWER = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)

MATH_ROWS = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then half as many in May. How many "
                 "clips did she sell altogether?", "answer": GSM8K_ANSWER},
    {"question": "Weng earns $12 an hour. She did 50 minutes of babysitting. How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nShe earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"},
    {"question": "Betty has 1,000 dollars and earns 234 more. How much does she have?",
     "answer": "1000 + 234 = <<1000+234=1234>>1234\n#### 1,234"},
    {"question": "What is 1 divided by 2?", "answer": "\\frac{1}{2}"},
    {"question": "What is 3/4 as a fraction?", "answer": "$\\frac{3}{4}$"},
    {"question": "What is 1 + 2?", "answer": "\\boxed{3}"},
    {"question": "What is 6 * 7?", "answer": "42"},
    {"question": "What is 10 - 17?", "answer": "-7"},
    {"question": "What is 0.1 + 0.2?", "answer": "0.3"},
    {"question": "What is the square root of 2?", "answer": "\\sqrt{2}"},
    {"question": "Which set holds the roots of (x-1)(x-2)?", "answer": "\\{1, 2\\}"},
    {"question": "Is 7 prime?", "answer": "yes"},
]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _done(answer: str, thinking: str = "let me think") -> str:
    """A well-formed completion (the text after the prefilled <think>) answering `answer`."""
    return f"{thinking}</think>\n<answer>{answer}</answer>"


@pytest.fixture
def math_file(tmp_path: Path) -> Path:
    return _write_jsonl(tmp_path / "math.jsonl", MATH_ROWS)


def _one_line(err: pytest.ExceptionInfo[UserError], *words: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    for word in words:
        assert word in msg, (word, msg)
    return msg


# ------------------------------------------------------------------------------------- scoring


def test_reference_completions_are_well_formed_and_correct(math_file: Path) -> None:
    env = get_env("dataset", prompt="{question}", answer_column="answer", match="math")
    rows = env.load(str(math_file))
    assert len(rows) == len(MATH_ROWS)
    refs = [env.reference_completion(row) for row in rows]
    assert all(ref is not None for ref in refs), refs
    assert format_reward(refs) == [1.0] * len(refs)
    assert env.correct(refs, answer=rows["answer"]) == [1.0] * len(refs)
    # GSM8K: the reasoning becomes the thinking, calculator notes removed; the answer is after ####
    assert refs[0] == (
        "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May."
        "</think>\n<answer>72</answer>"
    )
    assert refs[3] == "</think>\n<answer>\\frac{1}{2}</answer>"
    wrong = [_done("73"), _done("11"), _done("1235"), _done("0.25"), _done("\\frac{4}{3}"), _done("4")]
    assert env.correct(wrong, answer=rows["answer"][:6]) == [0.0] * 6


def test_reference_completion_none_without_a_usable_gold() -> None:
    env = get_env("dataset")
    assert env.reference_completion({"answer": ""}) is None
    assert env.reference_completion({"answer": "  "}) is None
    assert env.reference_completion({"answer": None}) is None
    assert env.reference_completion({"answer": "see </think> #### 5"}) is None
    assert env.reference_completion({"answer": "<answer>5</answer>"}) is None
    assert env.reference_completion({"answer": 5}) == "</think>\n<answer>5</answer>"


EQUIVALENT = [  # (gold, a different way of writing the same answer)
    ("\\frac{1}{2}", "0.5"),
    ("0.5", "\\frac{1}{2}"),
    ("\\frac{1}{2}", "1/2"),
    ("1/2", "\\dfrac{1}{2}"),
    ("\\boxed{3}", "3"),
    ("3", "\\boxed{3}"),
    ("1234", "1,234"),
    ("1,000,000", "1000000"),
    ("72", "72.0"),
    (GSM8K_ANSWER, "$72$"),
    ("\\{1, 2\\}", "\\{2, 1\\}"),
    ("\\sqrt{2}", "2^{1/2}"),
    ("-\\frac{3}{4}", "-0.75"),
]


@pytest.mark.parametrize(("gold", "pred"), EQUIVALENT)
def test_equivalent_forms_match_with_math_not_exact(gold: str, pred: str) -> None:
    assert get_env("dataset", match="math").correct([_done(pred)], answer=[gold]) == [1.0]
    assert get_env("dataset", match="exact").correct([_done(pred)], answer=[gold]) == [0.0]


def test_exact_match_collapses_whitespace_and_reads_after_hashes() -> None:
    env = get_env("dataset", match="exact")
    golds = [GSM8K_ANSWER, "New  York", "yes", "42"]
    preds = [_done("72"), _done(" New York "), _done("Yes"), _done("42")]
    assert env.correct(preds, answer=golds) == [1.0, 1.0, 0.0, 1.0]


def test_math_match_edge_cases() -> None:
    env = get_env("dataset")
    golds = ["12", "1.2", "yes", "2", "2", "72"]
    preds = ["1,2", "1,2", "yes", "1 or 2", "2 or 3", "72 dollars"]
    # "1,2" is read as the decimal 1.2; text math-verify cannot read compares as text; with
    # several numbers the last counts
    assert env.correct([_done(p) for p in preds], answer=golds) == [0.0, 1.0, 1.0, 1.0, 0.0, 1.0]


def test_malformed_completions_score_zero() -> None:
    env = get_env("dataset")
    completions = ["72", "</think>\n<answer>72</answer><answer>72</answer>", "no answer</think>", ""]
    assert env.correct(completions, answer=["72"] * 4) == [0.0] * 4


# ---------------------------------------------------------------------------------- threads


def _in_thread(fn: Any, *args: Any) -> Any:
    out: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn(*args))
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread below
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=120)
    assert not t.is_alive(), "correct() did not return from its thread"
    if errors:
        raise errors[0]
    return out[0]


def test_correct_from_a_thread_matches_the_main_thread() -> None:
    env = get_env("dataset")
    golds = [g for g, _ in EQUIVALENT] + [GSM8K_ANSWER, "\\frac{1}{2}", "3", "yes"]
    preds = [_done(p) for _, p in EQUIVALENT] + [_done("71"), _done("0.25"), "3", _done("no")]
    main = env.correct(preds, answer=golds)
    assert main == [1.0] * len(EQUIVALENT) + [0.0] * 4
    assert _in_thread(lambda: env.correct(preds, answer=golds)) == main
    # several threads at once share the worker
    results: list[list[float]] = []
    threads = [threading.Thread(target=lambda: results.append(env.correct(preds, answer=golds))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [main] * 3


def test_a_hanging_answer_scores_zero_in_a_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """10^{10^{10}} never finishes without math-verify's timeouts, which need the main thread."""
    env = get_env("dataset")
    hang = [_done("$10^{10^{10}}$"), _done("3")]
    monkeypatch.setattr(dataset_env, "MATH_TIMEOUT_S", 1)  # the worker's own timeout answers
    start = time.monotonic()
    assert _in_thread(lambda: env.correct(hang, answer=["3", "3"])) == [0.0, 1.0]
    assert time.monotonic() - start < 30
    monkeypatch.setattr(dataset_env, "MATH_TIMEOUT_S", 0)  # no timeout there: the worker is killed
    monkeypatch.setattr(dataset_env, "WORKER_GRACE_S", 1)
    start = time.monotonic()
    assert _in_thread(lambda: env.correct(hang[:1], answer=["3"])) == [0.0]
    assert time.monotonic() - start < 30
    monkeypatch.setattr(dataset_env, "MATH_TIMEOUT_S", 1)
    assert _in_thread(lambda: env.correct([_done("\\frac{6}{2}")], answer=["3"])) == [1.0]  # a new worker


# ------------------------------------------------------------------------------------ sources


def test_csv_and_parquet_sources_turn_number_answers_into_text(tmp_path: Path) -> None:
    frame = pd.DataFrame({"problem": ["6 * 7?", "1 / 4?", "10 - 3?"], "solution": [42, 0.25, 7], "extra": [1, 2, 3]})
    csv, parquet = tmp_path / "rows.csv", tmp_path / "rows.parquet"
    frame.to_csv(csv, index=False)
    frame.to_parquet(parquet, index=False)
    env = get_env("dataset", prompt="Compute {problem}", answer_column="solution")
    for source in (csv, parquet):
        rows = env.load(str(source))
        assert rows.column_names == ["problem", "solution", "extra"]
        assert rows.features["solution"].dtype == "string"
        assert rows["solution"] == ["42", "0.25", "7"]
        assert env.correct([_done("42"), _done("1/4"), _done("8")], solution=rows["solution"]) == [1.0, 1.0, 0.0]
        assert env.user_text(None, rows[0]) == "Compute 6 * 7?"


def test_integral_floats_read_as_integers(tmp_path: Path) -> None:
    """pandas reads 42.0 as a float; the answer prints as 42."""
    path = tmp_path / "rows.csv"
    path.write_text("question,answer\nq1,42.0\nq2,7.0\n", encoding="utf-8")
    assert get_env("dataset").load(str(path))["answer"] == ["42", "7"]


def test_user_text_describe_slug_and_corpus(math_file: Path) -> None:
    env = get_env("dataset", prompt="Question: {question}\nAnswer in <answer> tags.")
    rows = env.load(str(math_file))
    assert env.default_user == "Question: {question}\nAnswer in <answer> tags."
    assert env.user_text(None, rows[6]) == "Question: What is 6 * 7?\nAnswer in <answer> tags."
    assert env.user_text("Q: {question}", rows[6]) == "Q: What is 6 * 7?"
    long = {"question": "x" * 1000, "answer": "42", "other": "dropped"}
    described = env.describe(long)
    assert set(described) == {"question", "answer"} and len(described["question"]) <= 300
    assert described["answer"] == "42"
    assert get_env("dataset").slug == "dataset"
    assert get_env("dataset", match="math").slug == "dataset"  # the defaults spelled out
    slug = env.slug
    assert slug.startswith("dataset-") and slug != get_env("dataset", match="exact").slug
    corpus = env.tokenizer_corpus(str(math_file), seed=0, n=4)
    assert "Question: What is 6 * 7?\nAnswer in <answer> tags." not in corpus  # only the first 4 rows
    assert "Question: What is 1 divided by 2?\nAnswer in <answer> tags." in corpus
    assert any("Natalia" in line and "</think>" in line for line in corpus)
    assert any(line.startswith("Question: Natalia sold clips") for line in corpus)


def test_registry_knows_the_environment() -> None:
    from grpo.envs import environment_help

    env = get_env("dataset")
    assert isinstance(env, dataset_env.DatasetEnv)
    assert env.default_rewards == ("format", "correct") and not env.generates
    assert "dataset" in environment_help()


# ------------------------------------------------------------------------------------- errors


def test_missing_answer_column(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "rows.jsonl", [{"question": "q", "solution": "1"}])
    with pytest.raises(DataError) as err:
        get_env("dataset").load(str(path))
    _one_line(err, "column 'answer' is missing", "question, solution", "task.params.answer_column")


def test_prompt_naming_a_missing_column(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "rows.jsonl", [{"question": "q", "answer": "1"}])
    with pytest.raises(DataError) as err:
        get_env("dataset", prompt="{question} ({hint})").load(str(path))
    _one_line(err, "'hint'", "task.params.prompt", "question, answer")


def test_default_prompt_is_left_to_the_preflight(tmp_path: Path) -> None:
    """With the default "{question}" the run may set data.conversation.user instead; the preflight
    checks whichever template the run uses."""
    path = _write_jsonl(tmp_path / "rows.jsonl", [{"problem": "q", "answer": "1"}])
    rows = get_env("dataset").load(str(path))
    with pytest.raises(ConfigError) as err:
        get_env("dataset").check_template(get_env("dataset").default_user, rows.column_names)
    _one_line(err, "{question}")


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"answer_col": "x"}, ["task.params", "answer_col", "unknown key"]),
        ({"match": "fuzzy"}, ["task.params", "match", "'math' or 'exact'"]),
        ({"prompt": "no placeholder"}, ["task.params.prompt", "names no column"]),
        ({"prompt": "{question"}, ["task.params.prompt", "not a valid format string"]),
        ({"prompt": "{} and {question}"}, ["task.params.prompt", "no column name"]),
        ({"answer_column": ""}, ["task.params", "answer_column"]),
    ],
)
def test_bad_params(params: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        get_env("dataset", **params)
    _one_line(err, *words)


@pytest.mark.parametrize(
    ("answers", "words"),
    [
        (["1", "", "3", None], ["row 1 has no answer", "'answer'", "2 of 4 rows", "fill or drop"]),
        ([[1, 2], [3]], ["row 0", "list", "text or numbers"]),
    ],
)
def test_bad_answers(tmp_path: Path, answers: list[Any], words: list[str]) -> None:
    path = _write_jsonl(tmp_path / "rows.jsonl", [{"question": f"q{i}", "answer": a} for i, a in enumerate(answers)])
    with pytest.raises(DataError) as err:
        get_env("dataset").load(str(path))
    _one_line(err, *words)


def test_no_rows(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text("", encoding="utf-8")
    with pytest.raises(DataError) as err:
        get_env("dataset").load(str(path))
    _one_line(err, "no rows")
