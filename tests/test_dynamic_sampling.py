"""DAPO's dynamic sampling with refill (`train.dynamic_sampling`): groups whose rewards all agree
are dropped and further prompts of the seeded data order are sampled until B informative groups
are kept; the data position follows what was sampled, so a resumed run samples the same prompts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_trainer import _adapter, _cfg, chosen_tokens_reward

from grpo.checkpoint import load_checkpoint, save_checkpoint
from grpo.countdown import generate
from grpo.models import build_tiny_model, load_policy
from grpo.trainer import GRPOTrainer

B, G = 4, 4


@pytest.fixture(scope="module")
def rows():
    return generate(64, seed=3)


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("wide") / "model", seed=0, init_std=0.2)


def half_constant(tokenizer):
    """The chosen-tokens reward for prompts with an odd target; 0 for every completion of the others
    (their groups carry no signal)."""
    (_, chosen), = chosen_tokens_reward(tokenizer)

    def half(completions, completion_ids, target, **_):
        varied = chosen(completions, completion_ids)
        return [v if t % 2 else 0.0 for v, t in zip(varied, target)]

    return [("half", half)]


def config(model_dir, *extra):
    return _cfg(model_dir, f"train.prompts_per_step={B}", f"train.group_size={G}", "train.micro_batch_size=16",
                "train.dynamic_sampling.enabled=true", "train.dynamic_sampling.max_generation_batches=4",
                "train.learning_rate=1e-2", *extra)


def test_the_trained_groups_are_informative_and_follow_the_data_order(wide_model_dir, rows) -> None:
    cfg = config(wide_model_dir)
    model, tok = load_policy(cfg)
    trainer = GRPOTrainer(cfg, model, tok, rows, reward_fns=half_constant(tok), total_steps=3)
    order = np.random.default_rng([cfg.train.seed, 0]).permutation(len(rows)).tolist()
    sampled_so_far = 0
    for _ in range(3):
        metrics = trainer.step()
        batches = int(metrics["dynamic/generation_batches"])
        sampled = order[sampled_so_far : sampled_so_far + batches * B]  # the seeded order, batch after batch
        sampled_so_far += batches * B
        assert metrics["dynamic/prompts_sampled"] == batches * B and trainer.position == sampled_so_far
        trained = trainer.trained_indices
        assert set(trained) <= set(sampled) and trained == [i for i in sampled if i in set(trained)]
        assert all(rows[i]["target"] % 2 for i in trained)  # no zero-variance group was trained
        odd = [i for i in sampled if rows[i]["target"] % 2]
        assert len(trained) == min(B, metrics["dynamic/prompts_sampled"] - metrics["dynamic/groups_dropped"])
        assert len(odd) >= len(trained)
        if len(trained) < B:
            assert batches == cfg.train.dynamic_sampling.max_generation_batches  # the cap stopped it
    assert sampled_so_far > 3 * B  # refills happened (about half the prompts carry no signal)


def test_without_dynamic_sampling_nothing_changes(wide_model_dir, rows) -> None:
    cfg = _cfg(wide_model_dir, f"train.prompts_per_step={B}", f"train.group_size={G}", "train.micro_batch_size=16")
    model, tok = load_policy(cfg)
    trainer = GRPOTrainer(cfg, model, tok, rows, reward_fns=half_constant(tok), total_steps=1)
    metrics = trainer.step()
    assert not any(k.startswith("dynamic/") for k in metrics) and trainer.position == B
    order = np.random.default_rng([cfg.train.seed, 0]).permutation(len(rows)).tolist()
    assert trainer.trained_indices == order[:B]


def test_resume_mid_run_gives_the_straight_runs_adapter(wide_model_dir, rows, tmp_path) -> None:
    cfg = config(wide_model_dir, "lora.dropout=0.1")
    n = 4
    model, tok = load_policy(cfg)
    straight = GRPOTrainer(cfg, model, tok, rows, reward_fns=half_constant(tok), total_steps=n)
    straight.train(n, progress=False)
    expected, position = _adapter(model), straight.position

    model, tok = load_policy(cfg)
    first = GRPOTrainer(cfg, model, tok, rows, reward_fns=half_constant(tok), total_steps=n)
    first.train(n // 2, progress=False)
    ckpt = save_checkpoint(tmp_path / "ckpt", model=model, tokenizer=tok, optimizer=first.optimizer,
                           scheduler=first.scheduler, state=first.state())
    assert first.state()["data_position"] == first.position > n // 2 * B  # refills moved the position on
    torch.manual_seed(999)
    model, tok = load_policy(cfg)
    second = GRPOTrainer(cfg, model, tok, rows, reward_fns=half_constant(tok), total_steps=n)
    second.load_state(load_checkpoint(ckpt, model=model, optimizer=second.optimizer, scheduler=second.scheduler))
    second.train(n - n // 2, progress=False)
    assert second.position == position
    got = _adapter(model)
    for k in expected:
        assert torch.equal(expected[k], got[k]), f"{k} differs after resume"


def test_gdpo_aggregation_through_the_trainer(wide_model_dir, rows) -> None:
    """normalize_then_sum with two rewards: a group counts as informative when either reward varies
    in it, and the advantages are the aggregation function's."""
    cfg = config(wide_model_dir, "train.reward_aggregation=normalize_then_sum")
    model, tok = load_policy(cfg)
    (name, half), = half_constant(tok)
    odd = [("odd_target", lambda completions, target, **_: [float(t % 2) for t in target])]  # constant per group
    trainer = GRPOTrainer(cfg, model, tok, rows, reward_fns=[(name, half), *odd], total_steps=1)
    metrics = trainer.step()
    assert all(rows[i]["target"] % 2 for i in trainer.trained_indices)  # the constant reward adds no signal
    assert metrics["reward/odd_target"] >= 0 and metrics["dynamic/groups_trained"] >= 1
