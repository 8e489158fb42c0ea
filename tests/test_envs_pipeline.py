"""Any environment through the whole pipeline: the finetune and promote flows on a reasoning-gym
dataset and on a local math jsonl (math-verify), rewards by import path (one that raises on some
completions, one that returns the wrong number of values), dataset lineage in MLflow, `grpo data`,
and bad task input failing in one line.

    pytest -q tests/test_envs_pipeline.py
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow import MlflowClient

from grpo import tracking
from grpo.config import RunConfig, load_config
from grpo.envs import env_for
from grpo.errors import RewardError
from grpo_pipeline.cli import main

# A tiny model of its own per task (built from the task's text), trained for seconds.
SMALL = [
    "model.tiny.hidden_size=64",
    "model.tiny.num_layers=2",
    "model.tiny.intermediate_size=128",
    "generation.max_new_tokens=16",
    "train.prompts_per_step=2",
    "train.group_size=4",
    "train.micro_batch_size=8",
    "eval.num_problems=8",
    "eval.batch_size=8",
    "eval.sampled_problems=4",
    "eval.samples_logged=4",
    "data.generate_rows=120",
    "sft.max_steps=20",
    "sft.batch_size=8",
    "pipeline.rounds=2",
    "pipeline.steps_per_round=2",
]

USER_REWARDS = textwrap.dedent('''
    """Rewards of a team's own module, named by import path in train.rewards."""

    def picky(completions, **columns):
        """Raises on completions that contain a digit 7; 1.0 otherwise."""
        if any("7" in c for c in completions):
            raise ValueError("sevens are not welcome")
        return [1.0] * len(completions)

    def no_opinion(completions, **columns):
        """None (no opinion) on every other completion."""
        return [None if i % 2 else 0.5 for i in range(len(completions))]

    def short(completions, **columns):
        """One value too few: a bug the run must name."""
        return [1.0] * (len(completions) - 1)
''')


@pytest.fixture
def user_rewards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module `team_rewards_<n>` on sys.path (as PYTHONPATH puts it); returns its name."""
    name = f"team_rewards_{abs(hash(str(tmp_path))) % 10_000}"
    (tmp_path / f"{name}.py").write_text(USER_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def config(tmp_path: Path, uri: str, name: str, *extra: str) -> RunConfig:
    return load_config(None, [
        *SMALL,
        f"model.name_or_path={tmp_path / 'tiny'}",
        f"pipeline.output_dir={tmp_path / 'runs'}",
        f"data.cache_dir={tmp_path / 'data'}",
        f"pipeline.tracking_uri={uri}",
        f"pipeline.experiment=exp-{name}",
        f"pipeline.registered_model=lora-{name}",
        *extra,
    ])


def check_pipeline(cfg: RunConfig, uri: str) -> None:
    """finetune then promote: a finished run with the task's metrics, dataset inputs and versions,
    and a champion."""
    from grpo_pipeline.flows.finetune import finetune
    from grpo_pipeline.flows.promote import promote

    summary = finetune(config=cfg)
    client = MlflowClient(uri)
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["task"] == cfg.task.name
    for key in ("reward/format", "reward/correct", "reward_mean"):
        assert sorted(m.step for m in client.get_metric_history(summary.run_id, key)) == [1, 2, 3, 4], key
    assert [m.step for m in client.get_metric_history(summary.run_id, "sft/loss")][-1] == cfg.sft.max_steps
    assert sorted(m.step for m in client.get_metric_history(summary.run_id, "eval/accuracy")) == [0, 2, 4]
    assert client.get_metric_history(summary.run_id, "eval/reward/correct")

    ref = json.loads((Path(cfg.data.cache_dir)).joinpath(_only_cache(cfg), "ref.json").read_text())
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {f"{cfg.task.name}/train", f"{cfg.task.name}/test"}
    assert {d.dataset.digest for d in inputs.values()} == {ref["content_hash"][:16]}
    assert json.loads(inputs[f"{cfg.task.name}/train"].dataset.source)["tags"]["task"] == cfg.task.name
    assert json.loads(inputs[f"{cfg.task.name}/train"].dataset.profile)["num_rows"] == ref["train_rows"]

    assert summary.versions
    versions = client.search_model_versions(f"name = '{cfg.pipeline.registered_model}'")
    assert {v.tags["task"] for v in versions} == {cfg.task.name}
    decision = promote(config=cfg)
    assert decision.champion is not None
    alias = tracking.get_alias_version(uri, cfg.pipeline.registered_model, cfg.pipeline.champion_alias)
    assert alias == str(decision.champion)


def _only_cache(cfg: RunConfig) -> str:
    (folder,) = [p.name for p in Path(cfg.data.cache_dir).iterdir() if not p.name.startswith(".")]
    return folder


def test_reasoning_gym_dataset_through_the_pipeline(
    tmp_path: Path, mlflow_uri: str, prefect_harness: None
) -> None:
    cfg = config(tmp_path, mlflow_uri, "rg", "task.name=reasoning_gym:chain_sum")
    assert env_for(cfg).name == "reasoning_gym:chain_sum"
    check_pipeline(cfg, mlflow_uri)
    tokenizer = json.loads((tmp_path / "tiny" / "tokenizer.json").read_text())
    assert "arithmetic" in "".join(tokenizer["model"]["vocab"]).replace("Ġ", " ")  # its text, not Countdown's


def test_local_math_jsonl_with_math_verify(tmp_path: Path, mlflow_uri: str, prefect_harness: None) -> None:
    rows = []
    for i in range(60):
        a, b = i % 9 + 1, i % 7 + 2
        if i % 3 == 0:
            rows.append({"question": f"What is {a} + {b}?", "answer": f"{a} plus {b} is {a + b} #### {a + b}"})
        elif i % 3 == 1:
            rows.append({"question": f"What is {a} divided by {2 * a}?", "answer": "\\frac{1}{2}"})
        else:
            rows.append({"question": f"What is {a} times {b}?", "answer": a * b})
    source = tmp_path / "math.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = config(tmp_path, mlflow_uri, "math", "task.name=dataset", f"data.source={source}",
                 "task.params={prompt: 'Q: {question}', answer_column: answer, match: math}")
    check_pipeline(cfg, mlflow_uri)


def test_rewards_by_import_path_raising_and_no_opinion(
    tmp_path: Path, tiny_model_dir: Path, user_rewards: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A reward that raises on some completions: the step goes on, those completions score 0 and
    are counted, the first traceback is logged once; None is left out of the mean and the sum."""
    from grpo.countdown import generate
    from grpo.models import load_policy
    from grpo.trainer import GRPOTrainer

    cfg = load_config(None, [
        f"model.name_or_path={tiny_model_dir}", "model.build_tiny_if_missing=false",
        "train.prompts_per_step=4", "train.group_size=4", "train.micro_batch_size=16",
        "generation.max_new_tokens=24", "generation.min_new_tokens=24",
        f"train.rewards=[format, '{user_rewards}:picky', '{user_rewards}:no_opinion']",
    ])
    model, tokenizer = load_policy(cfg)
    trainer = GRPOTrainer(cfg, model, tokenizer, generate(50, seed=0), total_steps=2)
    assert [name for name, _ in trainer.reward_fns] == ["format", "picky", "no_opinion"]
    with caplog.at_level("WARNING", logger="grpo.rewards"):
        history = trainer.train(2, progress=False)
    errors = [m["reward/picky/errors"] for m in history]
    assert sum(errors) > 0, "no completion had a 7: the test needs some"  # 24 random tokens: many do
    assert all(0 <= e <= 16 for e in errors)
    assert all(m["reward/picky"] == pytest.approx(1 - m["reward/picky/errors"] / 16) for m in history)
    assert all(m["reward/no_opinion"] == 0.5 and m["reward/no_opinion/errors"] == 0 for m in history)
    tracebacks = [r for r in caplog.records if "'picky' raised" in r.getMessage()]
    assert len(tracebacks) == 1 and tracebacks[0].exc_info is not None


def test_reward_returning_the_wrong_number_of_values_stops_in_one_line(
    tmp_path: Path, tiny_model_dir: Path, user_rewards: str
) -> None:
    from grpo.countdown import generate
    from grpo.models import load_policy
    from grpo.trainer import GRPOTrainer

    cfg = load_config(None, [
        f"model.name_or_path={tiny_model_dir}", "model.build_tiny_if_missing=false",
        "train.prompts_per_step=2", "train.group_size=2", "train.micro_batch_size=4",
        "generation.max_new_tokens=4", f"train.rewards=[format, '{user_rewards}:short']",
    ])
    model, tokenizer = load_policy(cfg)
    trainer = GRPOTrainer(cfg, model, tokenizer, generate(20, seed=0), total_steps=1)
    with pytest.raises(RewardError) as e:
        trainer.step()
    assert str(e.value) == ("reward 'short' returned 3 values for 4 completions; a reward returns one float "
                            "(or None) per completion")


def test_data_command_shows_prompts_and_references(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["data", "--show", "2", "--set", "task.name=reasoning_gym:chain_sum", "data.generate_rows=40",
                 f"data.cache_dir={tmp_path / 'data'}", f"model.name_or_path={tmp_path / 'tiny'}",
                 "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
                 "model.tiny.num_kv_heads=1", "model.tiny.intermediate_size=64"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("--- prompt ") == 2 and out.count("--- reference completion ---") == 2
    assert "<|im_start|>user\nState the final answer" in out and "</think>\n<answer>" in out


@pytest.fixture
def valid(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Overrides that pass preflight; each case spoils one thing."""
    monkeypatch.chdir(tmp_path)
    return [
        f"model.name_or_path={tiny_model_dir}", "model.build_tiny_if_missing=false",
        f"pipeline.output_dir={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'data'}",
        f"pipeline.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]


def _bad_task_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    rows = tmp_path / "qa.jsonl"
    rows.write_text("\n".join(json.dumps({"question": f"{i}?", "answer": str(i)}) for i in range(5)))
    return {
        "unknown environment": (["task.name=chess"], "task: unknown environment 'chess'; known: countdown, dataset"),
        "unknown reasoning-gym dataset": (["task.name=reasoning_gym:chain_summ"], "'chain_summ'"),
        "import path that does not import": (
            ["train.rewards=[format, 'no_such_module_xyz:fn']"],
            "train.rewards: cannot import 'no_such_module_xyz:fn' (ModuleNotFoundError",
        ),
        "template names a missing column": (
            ["task.name=dataset", f"data.source={rows}", "task.params={prompt: '{question} {context}'}"],
            "context",
        ),
        "countdown template names a missing field": (
            ["data.conversation.user='{nums} {goal}'"], "data.conversation.user: the template names {goal}",
        ),
        "reward of another task": (
            ["task.name=reasoning_gym:chain_sum", "train.rewards=[format, equation]"],
            "train.rewards: unknown reward 'equation'; known rewards: correct, format, overlong, score",
        ),
        "reward needs a column the task lacks": (
            ["task.name=reasoning_gym:chain_sum",
             "train.rewards=[format, 'grpo.envs.countdown.reward:equation_reward']"],
            "train.rewards: reward 'equation_reward' needs column(s) ['target', 'nums']",
        ),
    }


BAD_TASK_CASES = ["unknown environment", "unknown reasoning-gym dataset", "import path that does not import",
                  "template names a missing column", "countdown template names a missing field",
                  "reward of another task", "reward needs a column the task lacks"]


@pytest.mark.parametrize("case", BAD_TASK_CASES)
def test_bad_task_input_exits_2_in_one_line(
    case: str, valid: list[str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    overrides, expected = _bad_task_inputs(tmp_path)[case]
    code = main(["run", "--set", *valid, *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
