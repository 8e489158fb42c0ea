"""The contract every environment keeps (`grpo.envs.base.Env`), checked on each built-in one.

    pytest -q tests/test_envs.py

Per environment: rows of the declared columns, a rendered prompt that ends in the prefill, a
reference completion for every row of a sample that `correct` and the format reward score 1.0,
a wrong answer scored 0.0, a JSON-able `describe`, tokenizer text, and `get_env`'s one-line
errors. Each environment's own details are in tests/test_env_<name>.py (Countdown:
tests/test_countdown.py, tests/test_rewards.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from grpo.config import Conversation, RunConfig, load_config
from grpo.envs import ENVIRONMENTS, HELP, env_for, get_env
from grpo.envs.base import Env
from grpo.errors import ConfigError
from grpo.rewards import format_reward, get_rewards

WRONG = "no idea</think>\n<answer>-123456789</answer>"


def _math_rows(tmp_path: Path) -> str:
    path = tmp_path / "qa.jsonl"
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i} #### {2 * i}"} for i in range(1, 31)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def sample(name: str, tmp_path: Path) -> tuple[Env, datasets.Dataset]:
    """The environment and 30 of its rows."""
    if name == "countdown":
        env = get_env("countdown")
        return env, env.rows(30, seed=1)
    if name == "reasoning_gym":
        env = get_env("reasoning_gym:basic_arithmetic")
        return env, env.rows(30, seed=1)
    env = get_env("dataset", prompt="Q: {question}", match="math")
    return env, env.load(_math_rows(tmp_path))


@pytest.mark.parametrize("name", list(ENVIRONMENTS))
def test_environment_contract(name: str, tmp_path: Path, chatml_tokenizer: object) -> None:
    env, rows = sample(name, tmp_path)
    assert len(rows) == 30
    if env.known_columns is not None:
        assert set(env.known_columns) <= set(rows.column_names)
    columns = {c: list(rows[c]) for c in rows.column_names}

    references = [env.reference_completion(row) for row in rows]
    assert all(r is not None for r in references), references
    assert env.correct(references, **columns) == [1.0] * 30
    assert format_reward(references) == [1.0] * 30
    assert env.correct([WRONG] * 30, **columns) == [0.0] * 30
    assert env.correct(["no answer block"] * 30, **columns) == [0.0] * 30

    # The default rewards resolve and score the references; `correct` is the environment's check.
    rewards = dict(get_rewards(env.default_rewards, env))
    assert "format" in rewards and set(rewards) - {"format"}
    assert all(fn(references, **columns) == [1.0] * 30 for fn in rewards.values())

    conversation = Conversation()
    prompt = env.prompt(chatml_tokenizer, conversation, rows[0])
    assert env.user_text(None, rows[0]) in prompt and prompt.endswith("<|im_start|>assistant\n<think>")
    env.check_template(env.default_user, rows.column_names)  # the default template fits the rows
    json.dumps(env.describe(rows[0]))
    assert env.slug and all(c.isalnum() or c in "-_" for c in env.slug)

    data_source = "generate" if env.generates else _math_rows(tmp_path)
    corpus = env.tokenizer_corpus(data_source, seed=0, n=20)
    assert len(corpus) >= 20 and all(isinstance(line, str) and line for line in corpus)


@pytest.fixture(scope="module")
def chatml_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> object:
    from grpo.models import build_tiny_model, load_tokenizer

    path = build_tiny_model(tmp_path_factory.mktemp("tok") / "m", hidden_size=16, num_layers=1, num_heads=2,
                            num_kv_heads=1, intermediate_size=32)
    return load_tokenizer(str(path))


def test_help_lists_every_environment() -> None:
    assert [usage.split(":")[0] for usage, _ in HELP] == list(ENVIRONMENTS)


@pytest.mark.parametrize(
    ("name", "params", "expected"),
    [
        ("chess", {}, "task.name: unknown environment 'chess'; known: countdown, dataset, reasoning_gym"),
        ("countdown:big", {}, "countdown takes no ':<variant>'"),
        ("countdown", {"num_count": [9]}, "num_count [9] must list sizes between 2 and 6"),
        ("countdown", {"numbers": 3}, "task.params: numbers: unknown key"),
        ("dataset", {"match": "fuzzy"}, "task.params: match"),
    ],
)
def test_get_env_errors_are_one_line(name: str, params: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        get_env(name, **params)
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_run_config_fills_what_depends_on_the_task() -> None:
    countdown = RunConfig()
    assert (countdown.model.name_or_path, countdown.pipeline.experiment, countdown.pipeline.registered_model) == (
        "artifacts/tiny-model", "grpo-countdown", "countdown-lora")
    rg = load_config(None, ["task.name=reasoning_gym:chain_sum"])
    assert env_for(rg).name == "reasoning_gym:chain_sum"
    assert (rg.model.name_or_path, rg.pipeline.experiment, rg.pipeline.registered_model) == (
        "artifacts/tiny-model-chain_sum", "grpo-chain_sum", "chain_sum-lora")
    named = load_config(None, ["task.name=reasoning_gym:chain_sum", "pipeline.experiment=mine"])
    assert named.pipeline.experiment == "mine"


def test_older_recipes_with_countdown_shape_in_data_still_load(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="grpo.config"):
        cfg = load_config(None, ["data.num_count=[3]", "data.number_range=[1, 10]"])
    assert cfg.task.params == {"num_count": [3], "number_range": [1, 10]}
    assert "moved to task.params" in caplog.text
    assert env_for(cfg).rows(5, seed=0)["nums"] and all(len(n) == 3 for n in env_for(cfg).rows(5, seed=0)["nums"])


def test_a_countdown_config_pointed_at_another_task_gets_that_tasks_names() -> None:
    """The Prefect form starts from the embedded default's filled values; changing only the task
    there must not register the other task's adapters as Countdown's."""
    form = RunConfig().model_dump(mode="json")
    form["task"] = {"name": "reasoning_gym:chain_sum", "params": {}}
    cfg = RunConfig.model_validate(form)
    assert (cfg.model.name_or_path, cfg.pipeline.experiment, cfg.pipeline.registered_model) == (
        "artifacts/tiny-model-chain_sum", "grpo-chain_sum", "chain_sum-lora")
    form["pipeline"]["registered_model"] = "team-adapters"  # a name of the user's own stays
    assert RunConfig.model_validate(form).pipeline.registered_model == "team-adapters"
