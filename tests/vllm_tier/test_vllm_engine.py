"""The vLLM backend (`grpo.engines.vllm.VLLMEngine`) against a real vLLM engine, on the CPU.

    make test-vllm          # builds .venv-vllm once (about 4 GB), then runs this file

What a real engine shows that the fake cannot: the adapter is applied (greedy tokens equal to
transformers + peft) and re-synced after an update, stop-token and truncation semantics of real
outputs, seeds per prompt, one engine reused by training steps and an evaluation, `close` freeing it
(and a new engine after it), and two GRPO steps through the trainer with generation.backend=vllm.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from grpo.config import load_config
from grpo.countdown import generate
from grpo.engines import close_engines
from grpo.engines.hf import HFEngine
from grpo.engines.vllm import SHARED, VLLMEngine
from grpo.models import build_tiny_model, load_policy, stop_token_ids

PROMPTS = ["nums: 1 2 3 target: 6", "nums: 93 4 68 target: 29", "nums: 5 5 target: 25"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with larger random weights (its outputs depend clearly on the adapter)."""
    return build_tiny_model(tmp_path_factory.mktemp("vllm") / "tiny", seed=0, init_std=0.2)


def config(model_dir: Path, *extra: str):
    return load_config(None, [
        f"model.name_or_path={model_dir}", "model.build_tiny_if_missing=false", "generation.backend=vllm",
        "generation.vllm.sleep_mode=false", "generation.vllm.gpu_memory_utilization=0.5",
        "generation.max_new_tokens=12", "lora.dropout=0", *extra,
    ])


@pytest.fixture
def policy(model_dir: Path):
    cfg = config(model_dir)
    model, tokenizer = load_policy(cfg)
    yield cfg, model, tokenizer
    close_engines()


def test_adapter_applied_and_resynced(policy) -> None:
    cfg, model, tokenizer = policy
    hf = HFEngine(model, tokenizer, cfg.generation)
    engine = VLLMEngine(model, tokenizer, cfg.generation, cfg.model)
    fresh = engine.generate(PROMPTS, 1, greedy=True)
    assert torch.equal(fresh.completion_ids, hf.generate(PROMPTS, 1, greedy=True).completion_ids)
    with torch.no_grad():  # an "update": the adapter now moves the outputs
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    engine.sync(model)
    updated = engine.generate(PROMPTS, 1, greedy=True)
    assert not torch.equal(updated.completion_ids, fresh.completion_ids)
    assert torch.equal(updated.completion_ids, hf.generate(PROMPTS, 1, greedy=True).completion_ids)


def test_stop_token_and_truncation(policy) -> None:
    cfg, model, tokenizer = policy
    engine = VLLMEngine(model, tokenizer, cfg.generation, cfg.model)
    first = engine.generate(PROMPTS[:1], 1, greedy=True, max_new_tokens=12)
    tokens = first.completion_ids[0].tolist()
    assert bool(first.truncated[0]) and first.completion_mask[0].tolist() == [1] * 12
    position = next(i for i in range(3, 12) if tokens[i] not in tokens[:i])
    engine.stop_ids = [tokens[position]]  # a token the greedy completion writes at `position`
    stopped = engine.generate(PROMPTS[:1], 1, greedy=True, max_new_tokens=12)
    ids = stopped.completion_ids[0][stopped.completion_mask[0].bool()].tolist()
    assert ids == tokens[: position + 1]  # the stop token is the last id, inside the mask
    assert not bool(stopped.truncated[0])
    assert stopped.texts[0] == tokenizer.decode(tokens[:position], skip_special_tokens=True)
    late = engine.generate(PROMPTS[:1], 1, greedy=True, max_new_tokens=12, min_new_tokens=position + 2)
    assert int(late.completion_mask[0].sum()) >= position + 2  # no stop before min_new_tokens
    engine.stop_ids = stop_token_ids(tokenizer)


def test_seeds_per_prompt(policy) -> None:
    cfg, model, tokenizer = policy
    engine = VLLMEngine(model, tokenizer, cfg.generation, cfg.model)
    same = [PROMPTS[0], PROMPTS[0]]
    a = engine.generate(same, 4, generator=torch.Generator().manual_seed(7))
    b = engine.generate(same, 4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.completion_ids, b.completion_ids)  # reproducible
    rows = [tuple(r) for r in a.completion_ids.tolist()]
    assert rows[:4] != rows[4:]  # the same prompt twice: other seeds, other samples
    assert len(set(rows)) >= 6


def test_one_engine_for_training_and_evaluation_then_closed(model_dir: Path) -> None:
    from grpo.evaluate import evaluate
    from grpo.trainer import GRPOTrainer

    cfg = config(model_dir, "train.prompts_per_step=2", "train.group_size=4", "train.micro_batch_size=8",
                 "eval.num_problems=4", "eval.batch_size=4", "eval.sampled_problems=2", "eval.pass_k=2",
                 "train.loss_type=dapo", "train.dynamic_sampling.enabled=true")  # refills: more generate calls
    model, tokenizer = load_policy(cfg)
    trainer = GRPOTrainer(cfg, model, tokenizer, generate(40, seed=0), total_steps=2)
    engine = SHARED.engine
    history = trainer.train(2, progress=False)
    assert all(math.isfinite(m["loss"]) and "reward_mean" in m for m in history)
    assert trainer.engine.lora_request.lora_int_id == 3  # synced after each update
    result = evaluate(model, tokenizer, generate(8, seed=1), cfg, progress=False)
    assert SHARED.engine is engine  # the evaluation reused the training engine
    assert result.n == 4 and 0.0 <= result.accuracy <= 1.0
    close_engines()
    assert SHARED.engine is None
    again = VLLMEngine(model, tokenizer, cfg.generation, cfg.model)  # a new engine after close
    assert again.generate(PROMPTS[:1], 1, greedy=True).completion_ids.shape[0] == 1
    close_engines()


def test_sampler_logprobs_and_the_importance_sampling_correction(model_dir: Path) -> None:
    """vLLM reports the sampled tokens' log-probs (processed: after temperature); in float32 they
    agree with the trainer's own, so the correction's weights are about 1, and a GRPO step with
    the correction on logs its metrics."""
    from grpo.algorithm import completion_logprobs
    from grpo.trainer import GRPOTrainer

    cfg = config(model_dir, "generation.temperature=0.8", "train.prompts_per_step=2", "train.group_size=4",
                 "train.micro_batch_size=8")
    model, tokenizer = load_policy(cfg)
    engine = VLLMEngine(model, tokenizer, cfg.generation, cfg.model, sampler_logprobs=True)
    rollout = engine.generate(PROMPTS, 4, generator=torch.Generator().manual_seed(0))
    assert rollout.sampler_logp is not None and rollout.sampler_logp.shape == rollout.completion_ids.shape
    with torch.no_grad():
        trainer_logp = completion_logprobs(
            model.eval(), rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask,
            temperature=0.8,
        )
    mask = rollout.completion_mask.bool()
    delta = (trainer_logp - rollout.sampler_logp)[mask].abs()
    assert float(delta.max()) < 1e-3, float(delta.max())
    assert float(rollout.sampler_logp[mask].min()) < -0.5  # real log-probs, not zeros
    close_engines()

    trainer = GRPOTrainer(cfg, model, tokenizer, generate(40, seed=0), total_steps=1)
    assert trainer.importance_sampling  # on by default with vLLM
    metrics = trainer.step()
    assert metrics["is/delta_abs_mean"] < 1e-3 and abs(metrics["is/weight_mean"] - 1.0) < 1e-2
    assert metrics["is/capped_fraction"] == 0.0
    close_engines()


def test_a_population_shares_one_engine(model_dir: Path) -> None:
    """Two named adapters on one model (a PBT population, `grpo.pbt`): after `set_adapter` and a
    sync, the real engine samples with that member's adapter (greedy = transformers + peft)."""
    from grpo.models import add_lora, attach_lora, load_base_model

    cfg = config(model_dir)
    model = attach_lora(load_base_model(cfg.model), cfg.lora, adapter="member-0")
    add_lora(model, cfg.lora, "member-1")
    with torch.no_grad():  # member-1 moves the outputs, member-0 does not
        for name, param in model.named_parameters():
            if "lora_B" in name and ".member-1." in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    tokenizer = load_policy(cfg)[1]
    engine = VLLMEngine(model, tokenizer, cfg.generation, cfg.model)
    hf = HFEngine(model, tokenizer, cfg.generation)
    try:
        outputs = []
        for member in ("member-0", "member-1"):
            model.set_adapter(member)
            engine.sync(model)
            out = engine.generate(PROMPTS, 1, greedy=True).completion_ids
            assert torch.equal(out, hf.generate(PROMPTS, 1, greedy=True).completion_ids)
            outputs.append(out)
        assert not torch.equal(outputs[0], outputs[1])
    finally:
        engine.close()
        close_engines()


def test_a_population_trains_and_evolves_on_the_engine(model_dir: Path) -> None:
    """`grpo.pbt.Population` with generation.backend=vllm: one engine for the members' steps and
    evaluations, each member's adapter trained alone, a clone taking its parent's adapter."""
    from peft import get_peft_model_state_dict

    from grpo.pbt import Population, generation_rng
    from grpo.sweep import MutationSpec

    cfgs = [config(model_dir, "train.prompts_per_step=2", "train.group_size=4", "train.micro_batch_size=8",
                   "eval.num_problems=4", "eval.batch_size=4", "eval.sampled_problems=0",
                   f"train.learning_rate={lr}") for lr in (1e-3, 3e-3)]
    values = [{"train.learning_rate": 1e-3}, {"train.learning_rate": 3e-3}]
    pop = Population.create(cfgs, values, generate(40, seed=0), generate(8, seed=1), total_steps=2)
    try:
        engine = SHARED.engine
        pop.train(1, progress=False)
        results = pop.evaluate(progress=False)
        assert SHARED.engine is engine and len(results) == 2 and all(r.n == 4 for r in results)
        assert [m.trainer.step_count for m in pop.members] == [1, 1]
        pop.evolve([1, 1], 1, {"train.learning_rate": [1e-3, 3e-3]}, MutationSpec(probability=0.0),
                   generation_rng(0, 1))
        weights = [get_peft_model_state_dict(pop.model, adapter_name=m.name) for m in pop.members]
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
        assert pop.members[0].values == {"train.learning_rate": 3e-3}
    finally:
        pop.close()
        close_engines()
