"""Tests of grpo.algorithm against plain references (python loops, unpadded per-row forwards).

Run: pytest -q tests/test_algorithm.py
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from grpo.algorithm import (
    completion_logprobs,
    group_advantages,
    grpo_loss,
    policy_update,
    selective_log_softmax,
)
from grpo.config import TrainConfig

VOCAB = 64
PAD = 0


# ---------------------------------------------------------------- helpers


def tiny_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        pad_token_id=PAD,
    )
    model = Qwen2ForCausalLM(cfg).to(dtype)
    model.eval()
    return model


@dataclass
class FakeRollout:
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    truncated: torch.Tensor
    prompts: list[list[int]]
    completions: list[list[int]]


def make_rollout(prompt_lens: list[int], completion_lens: list[int], t_max: int, seed: int) -> FakeRollout:
    """Left-padded prompts, right-padded completions of the given lengths (random tokens >= 1)."""
    g = torch.Generator().manual_seed(seed)
    p_max = max(prompt_lens)
    n = len(prompt_lens)
    prompt_ids = torch.full((n, p_max), PAD, dtype=torch.long)
    prompt_mask = torch.zeros((n, p_max), dtype=torch.long)
    completion_ids = torch.full((n, t_max), PAD, dtype=torch.long)
    completion_mask = torch.zeros((n, t_max), dtype=torch.long)
    prompts, completions = [], []
    for i, (p, t) in enumerate(zip(prompt_lens, completion_lens)):
        pr = torch.randint(1, VOCAB, (p,), generator=g)
        co = torch.randint(1, VOCAB, (t,), generator=g)
        prompt_ids[i, p_max - p :] = pr
        prompt_mask[i, p_max - p :] = 1
        completion_ids[i, :t] = co
        completion_mask[i, :t] = 1
        prompts.append(pr.tolist())
        completions.append(co.tolist())
    truncated = torch.tensor([t == t_max for t in completion_lens])
    return FakeRollout(prompt_ids, prompt_mask, completion_ids, completion_mask, truncated, prompts, completions)


def reference_logprobs(model, rollout: FakeRollout, temperature: float) -> list[torch.Tensor]:
    """Each row alone, without padding, full logits, log_softmax / temperature; one tensor per row."""
    out = []
    for pr, co in zip(rollout.prompts, rollout.completions):
        ids = torch.tensor([pr + co])
        logits = model(input_ids=ids).logits[0]  # (P+T, V)
        logp = torch.log_softmax(logits / temperature, dim=-1)
        pos = torch.arange(len(pr) - 1, len(pr) + len(co) - 1)
        out.append(logp[pos, torch.tensor(co)])
    return out


def reference_loss(logp, old, ref, adv, mask, *, el, eh, beta, loss_type, t_max) -> float:
    """Python-loop version of the loss, written from the formulas."""
    n, t = len(logp), len(logp[0])
    seq_means, total, count = [], 0.0, 0
    for i in range(n):
        s, c = 0.0, 0
        for j in range(t):
            if not mask[i][j]:
                continue
            r = math.exp(logp[i][j] - old[i][j])
            unclipped = r * adv[i]
            clipped = min(max(r, 1 - el), 1 + eh) * adv[i]
            tok = -min(unclipped, clipped)
            if beta > 0:
                d = ref[i][j] - logp[i][j]
                tok += beta * (math.exp(d) - d - 1)
            s += tok
            c += 1
        seq_means.append(s / max(c, 1))
        total += s
        count += c
    if loss_type == "grpo":
        return sum(seq_means) / n
    if loss_type == "bnpo":
        return total / max(count, 1)
    return total / (n * t_max)


def random_loss_inputs(n=6, t=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3
    old = logp + 0.4 * torch.randn(n, t, generator=g, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(n, t, generator=g, dtype=torch.float64)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    mask = (torch.rand(n, t, generator=g) < 0.7).long()
    mask[0] = 0  # one fully masked sequence
    mask[1] = 1
    return logp, old, ref, adv, mask


# ---------------------------------------------------------------- advantages


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_matches_numpy(scale):
    rng = np.random.default_rng(0)
    rewards = rng.integers(0, 3, size=12).astype(np.float64)
    g, eps = 4, 1e-4
    grouped = rewards.reshape(-1, g)
    expect = grouped - grouped.mean(axis=1, keepdims=True)
    if scale == "group":
        expect = expect / (grouped.std(axis=1, ddof=1, keepdims=True) + eps)
    elif scale == "batch":
        expect = expect / (rewards.std(ddof=1) + eps)
    got = group_advantages(torch.tensor(rewards), g, scale=scale, eps=eps)
    np.testing.assert_allclose(got.numpy(), expect.reshape(-1), rtol=1e-12, atol=1e-12)


def test_group_advantages_zero_std_group_is_zero_and_errors():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 2.0, 2.0])
    adv = group_advantages(rewards, 3)
    assert torch.equal(adv[:3], torch.zeros(3))
    assert adv[3] < 0 < adv[4]
    with pytest.raises(ValueError):
        group_advantages(torch.ones(7), 3)
    with pytest.raises(ValueError):
        group_advantages(torch.ones(6), 3, scale="bogus")


# ---------------------------------------------------------------- log-probs


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_selective_log_softmax(dtype, tol):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, 50, generator=g) * 4).to(dtype)
    index = torch.randint(0, 50, (3, 7), generator=g)
    expect = torch.log_softmax(logits.float(), dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    got = selective_log_softmax(logits, index)
    assert got.shape == (3, 7)
    torch.testing.assert_close(got.float(), expect, atol=tol, rtol=tol)


def test_completion_logprobs_matches_unpadded_rows():
    model = tiny_model()
    rollout = make_rollout([5, 2, 7, 1], [4, 6, 1, 6], t_max=6, seed=1)
    temperature = 0.7
    with torch.no_grad():
        ref = reference_logprobs(model, rollout, temperature)
        full = completion_logprobs(
            model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
            rollout.completion_mask, temperature=temperature,
        )
        assert full.shape == (4, 6)
        assert torch.isfinite(full).all()
        for i, r in enumerate(ref):
            torch.testing.assert_close(full[i, : len(r)], r, atol=1e-5, rtol=1e-5)
        for mb in (1, 3):
            part = completion_logprobs(
                model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                rollout.completion_mask, temperature=temperature, micro_batch_size=mb,
            )
            m = rollout.completion_mask.bool()
            torch.testing.assert_close(part[m], full[m], atol=1e-5, rtol=1e-5)


def test_completion_logprobs_keeps_gradients():
    model = tiny_model()
    rollout = make_rollout([3, 2], [2, 3], t_max=3, seed=2)
    logp = completion_logprobs(
        model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask
    )
    assert logp.requires_grad


# ---------------------------------------------------------------- loss


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_loss_matches_python_reference(loss_type, beta):
    logp, old, ref, adv, mask = random_loss_inputs()
    kw = dict(epsilon_low=0.2, epsilon_high=0.28, beta=beta, loss_type=loss_type, max_new_tokens=7)
    loss, stats = grpo_loss(logp, old, ref, adv, mask, **kw)
    expect = reference_loss(
        logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(),
        el=0.2, eh=0.28, beta=beta, loss_type=loss_type, t_max=7,
    )
    assert loss.item() == pytest.approx(expect, rel=1e-10, abs=1e-12)

    # stats: masked token means, TRL's clip definition
    ratio = torch.exp(logp - old)
    m = mask.bool()
    a = adv.unsqueeze(1).expand_as(ratio)
    low = ((ratio < 0.8) & (a < 0))[m].double().mean().item()
    high = ((ratio > 1.28) & (a > 0))[m].double().mean().item()
    kl = (torch.exp(ref - logp) - (ref - logp) - 1)[m].mean().item()
    assert stats["clip_low"].item() == pytest.approx(low)
    assert stats["clip_high"].item() == pytest.approx(high)
    assert stats["clip_fraction"].item() == pytest.approx(low + high)
    assert stats["kl"].item() == pytest.approx(kl)
    assert low > 0 and high > 0  # the random inputs exercise both sides

    # micro-batches with whole-batch totals sum to the full-batch loss
    n = logp.shape[0]
    total = 0.0
    for rows in (slice(0, 2), slice(2, 3), slice(3, n)):
        part, _ = grpo_loss(
            logp[rows], old[rows], ref[rows], adv[rows], mask[rows], **kw,
            num_sequences=n, num_tokens=int(mask.sum()),
        )
        total += part.item()
    assert total == pytest.approx(loss.item(), rel=1e-10, abs=1e-12)


def test_kl_is_zero_when_policy_equals_reference():
    logp, old, _, adv, mask = random_loss_inputs(seed=3)
    kw = dict(epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo", max_new_tokens=5)
    with_kl, stats = grpo_loss(logp, old, logp.clone(), adv, mask, beta=1.0, **kw)
    without, _ = grpo_loss(logp, old, None, adv, mask, beta=0.0, **kw)
    assert stats["kl"].item() == 0.0
    assert with_kl.item() == without.item()
    with pytest.raises(ValueError):
        grpo_loss(logp, old, None, adv, mask, beta=0.1, **kw)


# one token per sequence: ratio r, advantage sign
RATIOS = [0.75, 0.85, 1.0, 1.25, 1.3]


def clip_grads(epsilon_low: float, epsilon_high: float) -> dict[tuple[float, int], float]:
    cases = [(r, s) for r in RATIOS for s in (1, -1)]
    old = torch.zeros(len(cases), 1, dtype=torch.float64)
    logp = torch.tensor([[math.log(r)] for r, _ in cases], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([float(s) for _, s in cases], dtype=torch.float64)
    mask = torch.ones(len(cases), 1)
    loss, _ = grpo_loss(
        logp, old, None, adv, mask, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
        beta=0.0, loss_type="bnpo", max_new_tokens=1,
    )
    loss.backward()
    return {c: logp.grad[i, 0].item() for i, c in enumerate(cases)}


@pytest.mark.parametrize("epsilon_low,epsilon_high", [(0.2, 0.28), (0.28, 0.2), (0.2, 0.2)])
def test_clipping_zeroes_gradients_only_beyond_each_bound(epsilon_low, epsilon_high):
    grads = clip_grads(epsilon_low, epsilon_high)
    for (r, sign), grad in grads.items():
        clipped = (sign > 0 and r > 1 + epsilon_high) or (sign < 0 and r < 1 - epsilon_low)
        if clipped:
            assert grad == 0.0, (r, sign)
        else:
            # d/dlogp of -r*A/n = -r*A/n
            assert grad == pytest.approx(-r * sign / len(grads)), (r, sign)
    # the asymmetric cases really differ at both boundaries
    if epsilon_high == 0.28:
        assert grads[(1.25, 1)] != 0.0 and grads[(1.3, 1)] == 0.0
        assert grads[(0.75, -1)] == 0.0
    if epsilon_low == 0.28:
        assert grads[(0.75, -1)] != 0.0 and grads[(1.25, 1)] == 0.0


# ---------------------------------------------------------------- policy update


def train_cfg(**kw) -> TrainConfig:
    base = dict(prompts_per_step=2, group_size=4, micro_batch_size=8, max_grad_norm=1e6, learning_rate=1.0)
    base.update(kw)
    return TrainConfig(**base)


def one_sgd_step(model, rollout, adv, cfg, **kw):
    """Copy of `model` after one policy_update with SGD(lr=1): parameter delta = -clipped grad."""
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    metrics = policy_update(m, opt, rollout, adv, cfg=cfg, temperature=0.9, max_new_tokens=5, **kw)
    delta = torch.cat([(p0 - p1).flatten() for p0, p1 in zip(model.parameters(), m.parameters())])
    return delta, metrics


def reference_grad(model, rollout, adv, *, loss_type, mask_truncated, beta=0.0, ref_logp=None):
    """Full-batch gradient from unpadded per-row forwards and the on-policy loss (ratio = 1)."""
    m = copy.deepcopy(model)
    rows = reference_logprobs(m, rollout, 0.9)
    n, t_max = len(rows), 5
    keep = [not (mask_truncated and bool(tr)) for tr in rollout.truncated]
    num_tokens = sum(len(r) for r, k in zip(rows, keep) if k)
    loss = 0.0
    for i, (lp, k) in enumerate(zip(rows, keep)):
        if not k:
            continue
        tok = -torch.exp(lp - lp.detach()) * adv[i]
        if beta > 0:
            d = ref_logp[i, : len(lp)] - lp
            tok = tok + beta * (torch.exp(d) - d - 1)
        if loss_type == "grpo":
            loss = loss + tok.sum() / len(lp) / n
        elif loss_type == "bnpo":
            loss = loss + tok.sum() / num_tokens
        else:
            loss = loss + tok.sum() / (n * t_max)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in m.parameters()]), float(loss.detach())


@pytest.fixture(scope="module")
def setup():
    model = tiny_model(torch.float64, seed=3)
    rollout = make_rollout([4, 2, 6, 3, 5, 1, 2, 4], [5, 2, 3, 5, 1, 4, 5, 2], t_max=5, seed=4)
    rewards = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    return model, rollout, group_advantages(rewards, 4)


@pytest.mark.parametrize(
    "loss_type,mask_truncated,beta",
    [("grpo", False, 0.0), ("bnpo", True, 0.0), ("dr_grpo", False, 0.0), ("grpo", True, 0.1)],
)
def test_micro_batches_give_full_batch_gradient(setup, loss_type, mask_truncated, beta):
    model, rollout, adv = setup
    ref_logp = None
    if beta > 0:
        with torch.no_grad():
            ref_logp = completion_logprobs(
                tiny_model(torch.float64, seed=9), rollout.prompt_ids, rollout.prompt_mask,
                rollout.completion_ids, rollout.completion_mask, temperature=0.9,
            )
    kw = dict(loss_type=loss_type, mask_truncated=mask_truncated, beta=beta)
    full, m_full = one_sgd_step(model, rollout, adv, train_cfg(micro_batch_size=8, **kw), ref_logp=ref_logp)
    quarter, m_quarter = one_sgd_step(model, rollout, adv, train_cfg(micro_batch_size=2, **kw), ref_logp=ref_logp)
    expect, expect_loss = reference_grad(model, rollout, adv, ref_logp=ref_logp, **kw)
    assert expect.abs().max() > 1e-6
    torch.testing.assert_close(full, expect, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(quarter, expect, atol=1e-9, rtol=1e-7)
    for metrics in (m_full, m_quarter):
        assert metrics["loss"] == pytest.approx(expect_loss, rel=1e-9, abs=1e-12)
        assert metrics["grad_norm"] == pytest.approx(expect.norm().item(), rel=1e-9)
        assert metrics["clip_fraction"] == 0.0  # on-policy: ratio is exactly 1
        assert metrics["ratio"] == pytest.approx(1.0)
    if beta > 0:
        assert m_full["kl"] > 0 and m_full["kl"] == pytest.approx(m_quarter["kl"], rel=1e-9)


@pytest.mark.parametrize("micro", [8, 2])
def test_zero_advantage_rows_are_skipped_with_the_same_result(setup, micro):
    """beta 0, one epoch: the rows of a group whose rewards are all equal (advantage 0) do not
    run, and the gradient, loss and stats equal the full-batch reference over all rows."""
    model, rollout, _ = setup
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    adv = group_advantages(rewards, 4)
    assert (adv[:4] == 0).all() and (adv[4:] != 0).all()
    delta, metrics = one_sgd_step(model, rollout, adv, train_cfg(micro_batch_size=micro))
    expect, expect_loss = reference_grad(model, rollout, adv, loss_type="grpo", mask_truncated=False)
    assert expect.abs().max() > 1e-6
    torch.testing.assert_close(delta, expect, atol=1e-9, rtol=1e-7)
    assert metrics["skipped_rows"] == 4
    assert metrics["loss"] == pytest.approx(expect_loss, rel=1e-9, abs=1e-12)
    assert metrics["ratio"] == pytest.approx(1.0) and metrics["clip_fraction"] == 0.0 and metrics["kl"] == 0.0


def test_all_rows_skipped_still_steps_the_optimizer(setup):
    """Every advantage 0: no forward runs, yet AdamW steps as on a zero gradient (weight decay)."""
    model, rollout, _ = setup
    adv = torch.zeros(8, dtype=torch.float64)
    m = copy.deepcopy(model)
    opt = torch.optim.AdamW(m.parameters(), lr=0.1, weight_decay=0.5)
    metrics = policy_update(m, opt, rollout, adv, cfg=train_cfg(), temperature=0.9, max_new_tokens=5)
    assert metrics["skipped_rows"] == 8 and metrics["loss"] == 0.0 and metrics["grad_norm"] == 0.0
    for p0, p1 in zip(model.parameters(), m.parameters()):
        torch.testing.assert_close(p1, p0 * (1 - 0.1 * 0.5))


def test_grad_norm_is_clipped(setup):
    model, rollout, adv = setup
    expect, _ = reference_grad(model, rollout, adv, loss_type="grpo", mask_truncated=False)
    cap = 1e-3
    assert expect.norm() > 10 * cap
    delta, metrics = one_sgd_step(model, rollout, adv, train_cfg(max_grad_norm=cap, micro_batch_size=4))
    assert metrics["grad_norm"] == pytest.approx(expect.norm().item(), rel=1e-9)
    assert delta.norm().item() <= cap * (1 + 1e-6)
    torch.testing.assert_close(delta, expect * (cap / expect.norm()), atol=1e-10, rtol=1e-5)


def test_multiple_iterations_need_old_logp_and_step_each_epoch(setup):
    model, rollout, adv = setup
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    cfg = train_cfg(num_iterations=2, micro_batch_size=4)
    with pytest.raises(ValueError, match="old_logp"):
        policy_update(m, opt, rollout, adv, cfg=cfg, temperature=0.9, max_new_tokens=5)
    with torch.no_grad():
        old = completion_logprobs(
            m, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
            rollout.completion_mask, temperature=0.9,
        )
    metrics = policy_update(
        m, opt, rollout, adv, cfg=cfg, temperature=0.9, max_new_tokens=5, old_logp=old, scheduler=sched
    )
    assert sched.last_epoch == 2
    assert all(p.grad is None for p in m.parameters())
    assert set(metrics) >= {"loss", "kl", "clip_low", "clip_high", "clip_fraction", "grad_norm"}
    assert all(math.isfinite(v) for v in metrics.values())
    # the second epoch saw a moved policy: the epoch-mean ratio differs from 1
    assert metrics["ratio"] != pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_importance_weights_match_a_plain_reference(level: str, mode: str) -> None:
    """TRL's vllm_importance_sampling modes, written out per token and per sequence."""
    from grpo.algorithm import importance_weights

    g = torch.Generator().manual_seed(3)
    trainer = -torch.rand(4, 6, generator=g) * 3
    sampler = trainer + torch.randn(4, 6, generator=g) * 0.8
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4, [1] * 6])
    weights, stats = importance_weights(trainer, sampler, mask, level=level, mode=mode, cap=2.0)
    expected = torch.zeros(4, 6)
    for i in range(4):
        n = int(mask[i].sum())
        seq = math.exp(sum(float(trainer[i, t] - sampler[i, t]) for t in range(n)) / n)
        for t in range(n):
            r = math.exp(float(trainer[i, t] - sampler[i, t])) if level == "token" else seq
            expected[i, t] = min(r, 2.0) if mode == "truncate" else (0.0 if r > 2.0 else r)
    torch.testing.assert_close(weights, expected)
    deltas = [abs(float(trainer[i, t] - sampler[i, t])) for i in range(4) for t in range(int(mask[i].sum()))]
    assert stats["is/delta_abs_mean"] == pytest.approx(sum(deltas) / len(deltas))
    assert 0.0 <= stats["is/capped_fraction"] <= 1.0 and stats["is/weight_p95"] >= 0.0


def test_importance_weight_multiplies_each_tokens_surrogate() -> None:
    g = torch.Generator().manual_seed(5)
    logp = (-torch.rand(3, 5, generator=g)).requires_grad_()
    old = logp.detach() + 0.1 * torch.randn(3, 5, generator=g)
    adv, mask = torch.tensor([1.0, -0.5, 2.0]), torch.ones(3, 5)
    weight = torch.rand(3, 5, generator=g) * 2
    kw = dict(epsilon_low=0.2, epsilon_high=0.2, beta=0.0, loss_type="bnpo", max_new_tokens=5)
    loss, _ = grpo_loss(logp, old, None, adv, mask, is_weight=weight, **kw)
    ratio = torch.exp(logp - old)
    surrogate = -torch.min(ratio * adv[:, None], ratio.clamp(0.8, 1.2) * adv[:, None])
    torch.testing.assert_close(loss, (surrogate * weight).sum() / 15)
