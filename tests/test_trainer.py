"""The GRPO loop on the tiny model: it learns a reward it can learn, leaves the base weights
untouched, and resumes from a checkpoint to exactly the weights of an uninterrupted run."""

from __future__ import annotations

import pytest
import torch

from grpo.checkpoint import load_checkpoint, save_checkpoint
from grpo.config import load_config
from grpo.countdown import generate
from grpo.models import build_tiny_model, load_policy
from grpo.trainer import GRPOTrainer, make_scheduler


def _cfg(model_dir, *extra):
    return load_config(None, [
        f"model.name_or_path={model_dir}",
        "train.prompts_per_step=4", "train.group_size=8", "train.micro_batch_size=32",
        "generation.max_new_tokens=8", *extra,
    ])


def _adapter(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


@pytest.fixture(scope="module")
def rows():
    return generate(64, seed=3)


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory):
    """The tiny model with larger random weights, whose adapter can move its output quickly."""
    return build_tiny_model(tmp_path_factory.mktemp("wide") / "model", seed=0, init_std=0.2)


def chosen_tokens_reward(tokenizer):
    """Reward = share of completion tokens in a fixed tenth of the vocabulary (chance: ~0.1)."""
    chosen = len(tokenizer) // 10

    def chosen_tokens(completions, completion_ids, **_):
        return [sum(t < chosen for t in ids) / len(ids) for ids in completion_ids]

    return [("chosen", chosen_tokens)]


def test_learns_a_learnable_reward_and_keeps_base_weights(wide_model_dir, rows):
    """GRPO must raise the chosen-tokens reward from about 0.1 to above 0.6 within a minute."""
    cfg = _cfg(wide_model_dir, "train.learning_rate=1e-2")
    model, tok = load_policy(cfg)
    base_before = {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" not in k}
    adapter_before = _adapter(model)
    trainer = GRPOTrainer(cfg, model, tok, rows, reward_fns=chosen_tokens_reward(tok), total_steps=25)
    history = trainer.train(25, progress=False)
    start = sum(m["reward_mean"] for m in history[:2]) / 2
    end = sum(m["reward_mean"] for m in history[-3:]) / 3
    assert start < 0.3, f"the chosen tokens should start near chance (0.1), got {start:.2f}"
    assert end > 0.6, f"reward did not rise: {start:.2f} -> {end:.2f}"
    assert history[0]["reward/chosen"] == pytest.approx(history[0]["reward_mean"])

    for k, v in model.named_parameters():
        if "lora_" not in k:
            assert torch.equal(v, base_before[k]), f"base weight {k} changed"
    changed = [k for k, v in _adapter(model).items() if not torch.equal(v, adapter_before[k])]
    assert changed, "the adapter did not change"


def test_resume_gives_identical_adapter(wide_model_dir, rows, tmp_path):
    """N steps straight == N/2 steps + save + load into a fresh process state + N/2 steps.

    The wide model's samples depend on the adapter, so a resumed run that sampled from stale
    weights would diverge."""
    cfg = _cfg(wide_model_dir, "train.beta=0.04", "train.learning_rate=1e-2", "lora.dropout=0.1")
    n = 4

    model, tok = load_policy(cfg)
    straight = GRPOTrainer(cfg, model, tok, rows, reward_fns=chosen_tokens_reward(tok), total_steps=n)
    straight.train(n, progress=False)
    expected = _adapter(model)
    assert any(not torch.equal(v, w) for v, w in zip(expected.values(), _adapter(load_policy(cfg)[0]).values()))

    model, tok = load_policy(cfg)
    first = GRPOTrainer(cfg, model, tok, rows, reward_fns=chosen_tokens_reward(tok), total_steps=n)
    first.train(n // 2, progress=False)
    ckpt = save_checkpoint(
        tmp_path / "ckpt", model=model, tokenizer=tok, optimizer=first.optimizer,
        scheduler=first.scheduler, state=first.state(),
    )
    torch.manual_seed(12345)  # a different global RNG state must not matter after loading

    model, tok = load_policy(cfg)
    second = GRPOTrainer(cfg, model, tok, rows, reward_fns=chosen_tokens_reward(tok), total_steps=n)
    second.load_state(load_checkpoint(ckpt, model=model, optimizer=second.optimizer, scheduler=second.scheduler))
    assert second.step_count == n // 2
    second.train(n - n // 2, progress=False)
    got = _adapter(model)
    assert expected.keys() == got.keys()
    for k in expected:
        assert torch.equal(expected[k], got[k]), f"{k} differs after resume"


def test_warmup_cosine_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, "cosine", warmup_steps=2, total_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:2] == [0.5, 1.0]
    assert lrs[2] == pytest.approx(1.0) and lrs[2] > lrs[3] > lrs[4] > lrs[5] >= 0.0


def test_gradient_checkpointing_gives_the_same_update(wide_model_dir, rows):
    """`train.gradient_checkpointing` recomputes activations in the backward pass (on the
    hf engine, which it selects): same adapter after a step, to float32 rounding."""
    adapters = []
    for extra in (["generation.fast_path=false"], ["train.gradient_checkpointing=true"]):
        cfg = _cfg(wide_model_dir, "train.learning_rate=1e-2", "lora.dropout=0", *extra)
        model, tok = load_policy(cfg)
        trainer = GRPOTrainer(cfg, model, tok, rows, reward_fns=chosen_tokens_reward(tok), total_steps=1)
        assert trainer.engine.name == "hf"
        trainer.step()
        adapters.append(_adapter(model))
    assert model.base_model.model.model.gradient_checkpointing
    for key, value in adapters[0].items():
        torch.testing.assert_close(adapters[1][key], value, rtol=1e-4, atol=1e-6)


def test_the_engine_sleeps_after_sampling_and_wakes_to_sample(wide_model_dir, rows, tmp_path):
    """With vLLM (a fake engine here), each step samples, then the engine sleeps for the scoring,
    reference and update passes, the new adapter is synced, and the next sample wakes it."""
    from test_rollout import FakeLLM, fake_vllm

    cfg = _cfg(wide_model_dir)
    model, tok = load_policy(cfg)
    engine = fake_vllm(model, tok, cfg.generation, cfg.model, tmp_path)
    trainer = GRPOTrainer(cfg, model, tok, rows, engine=engine, total_steps=2)
    trainer.train(2, progress=False)
    llm = FakeLLM.instances[-1]
    assert [c[0] if c[0] != "generate" else ("generate", c[1]) for c in llm.calls] == [
        ("generate", 1), "sleep", "wake_up", ("generate", 2), "sleep",
    ]
    assert engine.lora_request.lora_int_id == 3  # synced after each of the two updates


def test_dynamic_sampling_through_the_vllm_engine(wide_model_dir, rows, tmp_path):
    """With vLLM (a fake engine) and dynamic sampling, the refills are more generate calls before
    the engine sleeps once; the sampler's log-probs follow the kept rows into the correction."""
    from test_rollout import FakeLLM, fake_vllm

    cfg = _cfg(wide_model_dir, "train.dynamic_sampling.enabled=true", "train.dynamic_sampling.max_generation_batches=3",
               "train.loss_type=dapo")
    model, tok = load_policy(cfg)
    engine = fake_vllm(model, tok, cfg.generation, cfg.model, tmp_path)
    trainer = GRPOTrainer(cfg, model, tok, rows, engine=engine, total_steps=1)
    metrics = trainer.step()
    batches = int(metrics["dynamic/generation_batches"])
    calls = [c[0] for c in FakeLLM.instances[-1].calls]
    assert calls == ["generate"] * batches + ["sleep"]
    assert metrics["dynamic/prompts_sampled"] == 4 * batches and trainer.position == 4 * batches
