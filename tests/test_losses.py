"""The loss types (grpo, bnpo, dr_grpo, dapo, cispo) at both importance-sampling levels (token,
GSPO's sequence) against per-token Python loops written from the papers' formulas; micro-batching
and (simulated) data parallelism of dapo/cispo in `policy_update`; GDPO's reward aggregation.

Run: pytest -q tests/test_losses.py
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_algorithm import (  # tests/ is on sys.path under pytest
    make_rollout,
    one_sgd_step,
    reference_logprobs,
    tiny_model,
    train_cfg,
)

from grpo import algorithm
from grpo.algorithm import combined_advantages, completion_logprobs, group_advantages, grpo_loss, policy_update
from grpo.distributed import global_max, global_sum
from grpo.rewards import score

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo"]
LEVELS = ["token", "sequence"]
EPSILONS = {"token": (0.2, 0.28), "sequence": (0.08, 0.12)}  # sequence: wide enough that some stay unclipped


# ---------------------------------------------------------------- plain references


def reference_loss(logp, old, ref, adv, mask, *, el, eh, beta, loss_type, level, t_max, is_weight=None):
    """The loss from the papers' formulas, one token at a time (autograd through the scalars).

    Ratio: token level r_t = pi/pi_old; sequence level (GSPO-token, arXiv 2507.18071 eq. 13-14)
    s_t = sg[s] * pi_t / sg[pi_t], s = exp(mean over the sequence's tokens of log pi/pi_old).
    Clipped surrogate -min(r A, clip(r, 1 - el, 1 + eh) A); CISPO (arXiv 2506.13585):
    -sg(min(r, 1 + eh)) A log pi_t. Times the IS weight, + beta * (exp(ref - lp) - (ref - lp) - 1).
    """
    n, t = logp.shape
    per_seq = []  # per sequence: its tokens' losses
    for i in range(n):
        tokens = [j for j in range(t) if mask[i][j]]
        if level == "sequence" and tokens:
            s = torch.exp(sum(logp[i, j] - old[i, j] for j in tokens) / len(tokens))
        losses = []
        for j in tokens:
            if level == "token":
                r = torch.exp(logp[i, j] - old[i, j])
            else:
                r = s.detach() * torch.exp(logp[i, j] - logp[i, j].detach())
            a = adv[i]
            if loss_type == "cispo":
                tok = -min(r.detach(), torch.tensor(1 + eh, dtype=r.dtype)) * a * logp[i, j]
            else:
                tok = -min(r * a, torch.clamp(r, 1 - el, 1 + eh) * a)
            if is_weight is not None:
                tok = tok * is_weight[i, j]
            if beta > 0:
                d = ref[i, j] - logp[i, j]
                tok = tok + beta * (torch.exp(d) - d - 1)
            losses.append(tok)
        per_seq.append(losses)
    zero = logp.sum() * 0
    if loss_type == "grpo":
        return sum((sum(ls, zero) / max(len(ls), 1) for ls in per_seq), zero) / n
    total = sum((x for ls in per_seq for x in ls), zero)
    count = sum(len(ls) for ls in per_seq)
    if loss_type in ("bnpo", "dapo", "cispo"):
        return total / max(count, 1)
    return total / (n * t_max)


def loss_inputs(n=6, t=5, seed=0):
    """Random log-probs, old/ref log-probs, advantages, a mask with rows of every length (one row
    empty, one full, holes inside others) and IS weights."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3
    old = logp + 0.3 * torch.randn(n, t, generator=g, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(n, t, generator=g, dtype=torch.float64)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    mask = (torch.rand(n, t, generator=g) < 0.7).long()
    mask[0] = 0  # an empty sequence
    mask[1] = 1  # a full one
    mask[2] = torch.tensor([1, 1, 0, 0, 0])  # right-padded, 2 tokens
    weight = 0.5 + torch.rand(n, t, generator=g, dtype=torch.float64)
    return logp, old, ref, adv, mask, weight


def loss_and_grad(fn, logp):
    leaf = logp.clone().requires_grad_()
    loss = fn(leaf)
    loss.backward()
    return loss.detach(), leaf.grad


# ---------------------------------------------------------------- grpo_loss


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("beta,weighted", [(0.0, False), (0.05, True)])
def test_loss_and_gradient_match_the_per_token_reference(loss_type, level, beta, weighted):
    logp, old, ref, adv, mask, weight = loss_inputs()
    el, eh = EPSILONS[level]
    w = weight if weighted else None
    kw = dict(epsilon_low=el, epsilon_high=eh, beta=beta, loss_type=loss_type, max_new_tokens=7)
    got, got_grad = loss_and_grad(
        lambda lp: grpo_loss(lp, old, ref, adv, mask, **kw, is_weight=w, importance_sampling_level=level)[0], logp
    )
    expect, expect_grad = loss_and_grad(
        lambda lp: reference_loss(
            lp, old, ref, adv, mask.tolist(), el=el, eh=eh, beta=beta, loss_type=loss_type, level=level,
            t_max=7, is_weight=w,
        ),
        logp,
    )
    assert got.item() == pytest.approx(expect.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(got_grad, expect_grad, rtol=1e-10, atol=1e-12)
    assert (got_grad[mask == 0] == 0).all() and got_grad.abs().max() > 0

    # stats: token means; the clip (or CISPO's cap) binds on some tokens, not all
    _, stats = grpo_loss(logp, old, ref, adv, mask, **kw, is_weight=w, importance_sampling_level=level)
    m = mask.bool()
    if level == "token":
        ratio = torch.exp(logp - old)
    else:
        seq = ((logp - old) * mask).sum(1) / mask.sum(1).clamp(min=1)
        ratio = torch.exp(seq).unsqueeze(1).expand_as(logp)
    a = adv.unsqueeze(1).expand_as(ratio)
    if loss_type == "cispo":
        low, high = torch.zeros_like(m), (ratio > 1 + eh) & (a != 0)
    else:
        low, high = (ratio < 1 - el) & (a < 0), (ratio > 1 + eh) & (a > 0)
    assert stats["clip_low"].item() == pytest.approx(low[m].double().mean().item())
    assert stats["clip_high"].item() == pytest.approx(high[m].double().mean().item())
    assert stats["clip_fraction"].item() == pytest.approx((low | high)[m].double().mean().item())
    assert stats["ratio"].item() == pytest.approx(ratio[m].mean().item())
    assert stats["num_tokens"].item() == mask.sum().item()
    assert 0 < stats["clip_fraction"].item() < 1

    # micro-batches given the whole batch's totals add up to the full-batch loss
    n, total = logp.shape[0], 0.0
    for rows in (slice(0, 2), slice(2, 3), slice(3, n)):
        part, _ = grpo_loss(
            logp[rows], old[rows], ref[rows], adv[rows], mask[rows], **kw, is_weight=w[rows] if weighted else None,
            importance_sampling_level=level, num_sequences=n, num_tokens=int(mask.sum()),
        )
        total += part.item()
    assert total == pytest.approx(got.item(), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_sequence_level_gradient_is_gspos(loss_type):
    """Without IS weights the GSPO-token form has the value and gradient of GSPO's sequence
    objective, -min(s A, clip(s) A) per sequence with s differentiated through its mean
    (averaged over sequences for "grpo", weighted by length / token count for "dapo")."""
    logp, old, _, adv, mask, _ = loss_inputs(seed=1)
    el, eh = EPSILONS["sequence"]
    kw = dict(epsilon_low=el, epsilon_high=eh, beta=0.0, loss_type=loss_type, max_new_tokens=5)
    got, got_grad = loss_and_grad(
        lambda lp: grpo_loss(lp, old, None, adv, mask, **kw, importance_sampling_level="sequence")[0], logp
    )

    def gspo(lp):
        lengths = mask.sum(1)
        s = torch.exp(((lp - old) * mask).sum(1) / lengths.clamp(min=1))
        per_seq = -torch.min(s * adv, torch.clamp(s, 1 - el, 1 + eh) * adv) * (lengths > 0)
        if loss_type == "grpo":
            return per_seq.mean()
        return (per_seq * lengths).sum() / lengths.sum()

    expect, expect_grad = loss_and_grad(gspo, logp)
    assert got.item() == pytest.approx(expect.item(), rel=1e-10)
    torch.testing.assert_close(got_grad, expect_grad, rtol=1e-10, atol=1e-12)


def test_cispo_keeps_the_gradient_of_capped_tokens():
    """Where PPO's clip zeroes a token's gradient, CISPO keeps it, weighted by the cap 1 + eh."""
    old = torch.zeros(4, 1, dtype=torch.float64)
    logp = torch.log(torch.tensor([[0.5], [1.0], [1.5], [1.5]], dtype=torch.float64))
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0], dtype=torch.float64)
    mask = torch.ones(4, 1)
    kw = dict(epsilon_low=0.2, epsilon_high=0.28, beta=0.0, max_new_tokens=1)
    _, clip_grad = loss_and_grad(lambda lp: grpo_loss(lp, old, None, adv, mask, loss_type="dapo", **kw)[0], logp)
    _, cispo_grad = loss_and_grad(lambda lp: grpo_loss(lp, old, None, adv, mask, loss_type="cispo", **kw)[0], logp)
    assert clip_grad[2, 0] == 0.0  # ratio 1.5 > 1.28 with A > 0: clipped away
    torch.testing.assert_close(cispo_grad[:, 0], -torch.tensor([0.5, 1.0, 1.28, -1.28], dtype=torch.float64) / 4)


# ---------------------------------------------------------------- policy_update


def padded_reference_logprobs(model, rollout, t_max):
    """Per-row unpadded forwards (with gradients), right-padded with 0 into (N, t_max)."""
    rows = reference_logprobs(model, rollout, 0.9)
    return torch.stack([torch.cat([r, r.new_zeros(t_max - len(r))]) for r in rows])


def reference_update(model, rollout, adv, *, loss_type, level, el, eh, beta=0.0, old_logp=None, ref_logp=None):
    """Full-batch gradient and loss of the per-token reference on unpadded per-row forwards."""
    m = copy.deepcopy(model)
    logp = padded_reference_logprobs(m, rollout, 5)  # (N, T)
    old = logp.detach() if old_logp is None else old_logp
    loss = reference_loss(
        logp, old, ref_logp, adv, rollout.completion_mask.tolist(), el=el, eh=eh, beta=beta,
        loss_type=loss_type, level=level, t_max=5,
    )
    loss.backward()
    return torch.cat([p.grad.flatten() for p in m.parameters()]), float(loss.detach())


@pytest.fixture(scope="module")
def setup():
    model = tiny_model(torch.float64, seed=3)
    rollout = make_rollout([4, 2, 6, 3, 5, 1, 2, 4], [5, 2, 3, 5, 1, 4, 5, 2], t_max=5, seed=4)
    rewards = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    args = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        current = completion_logprobs(model, *args, temperature=0.9)
        old = current + 0.3 * torch.randn(current.shape, generator=g, dtype=torch.float64)
        ref = completion_logprobs(tiny_model(torch.float64, seed=9), *args, temperature=0.9)
    return model, rollout, group_advantages(rewards, 4), old, ref


@pytest.mark.parametrize("loss_type", ["dapo", "cispo"])
@pytest.mark.parametrize("level", LEVELS)
def test_micro_batches_give_the_full_batch_update(setup, loss_type, level):
    """Micro-batches of 1, 2 and 8 rows: the loss and gradient of the full-batch reference."""
    model, rollout, adv, old, ref = setup
    el, eh = EPSILONS[level]
    expect, expect_loss = reference_update(
        model, rollout, adv, loss_type=loss_type, level=level, el=el, eh=eh, beta=0.05, old_logp=old, ref_logp=ref
    )
    assert expect.abs().max() > 1e-6
    for micro in (1, 2, 8):
        cfg = train_cfg(micro_batch_size=micro, loss_type=loss_type, importance_sampling_level=level,
                        epsilon_low=el, epsilon_high=eh, beta=0.05)
        delta, metrics = one_sgd_step(model, rollout, adv, cfg, old_logp=old, ref_logp=ref)
        torch.testing.assert_close(delta, expect, atol=1e-9, rtol=1e-7, msg=lambda m, k=micro: f"micro {k}: {m}")
        assert metrics["loss"] == pytest.approx(expect_loss, rel=1e-9, abs=1e-12)
        assert metrics["grad_norm"] == pytest.approx(expect.norm().item(), rel=1e-9)
        assert 0 < metrics["clip_fraction"] < 1 and metrics["kl"] > 0


@pytest.mark.parametrize("loss_type,level", [("dapo", "token"), ("cispo", "token"), ("dapo", "sequence"),
                                             ("cispo", "sequence"), ("grpo", "sequence")])
@pytest.mark.parametrize("micro", [8, 2])
def test_zero_advantage_rows_are_skipped_with_the_same_result(setup, loss_type, level, micro):
    """beta 0, one epoch, no old log-probs: the rows of a group of equal rewards do not run, and
    the update is the reference's over all rows (dapo/cispo still divide by all rows' tokens)."""
    model, rollout, _, _, _ = setup
    adv = group_advantages(torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 2.0], dtype=torch.float64), 4)
    el, eh = EPSILONS[level]
    cfg = train_cfg(micro_batch_size=micro, loss_type=loss_type, importance_sampling_level=level,
                    epsilon_low=el, epsilon_high=eh)
    delta, metrics = one_sgd_step(model, rollout, adv, cfg)
    expect, expect_loss = reference_update(model, rollout, adv, loss_type=loss_type, level=level, el=el, eh=eh)
    assert metrics["skipped_rows"] == 4 and expect.abs().max() > 1e-6
    torch.testing.assert_close(delta, expect, atol=1e-9, rtol=1e-7)
    assert metrics["loss"] == pytest.approx(expect_loss, rel=1e-9, abs=1e-12)
    assert metrics["ratio"] == pytest.approx(1.0) and metrics["clip_fraction"] == 0.0


def _rows(rollout, sl):
    """The rollout's rows `sl` (every tensor and list field sliced)."""
    return type(rollout)(**{k: v[sl] for k, v in vars(rollout).items()})


@pytest.mark.parametrize("loss_type", ["dapo", "cispo"])
def test_data_parallel_mean_gradient_is_the_global_token_mean(setup, loss_type, monkeypatch):
    """Two simulated ranks with 15 and 12 tokens: each divides its token sum by 27 / 2 (the
    all-reduced count over the world size), so the mean of their gradients, what
    `average_gradients` applies, is the gradient of the union's token mean; their losses average to
    the union's loss."""
    model, rollout, adv, old, ref = setup
    el, eh = EPSILONS["token"]
    cfg = train_cfg(loss_type=loss_type, micro_batch_size=2, beta=0.05, epsilon_low=el, epsilon_high=eh)
    full, full_loss = reference_update(
        model, rollout, adv, loss_type=loss_type, level="token", el=el, eh=eh, beta=0.05, old_logp=old, ref_logp=ref
    )
    halves = [slice(0, 4), slice(4, 8)]
    counts = [float(rollout.completion_mask[h].sum()) for h in halves]
    assert counts == [15.0, 12.0]
    calls = []
    monkeypatch.setattr(algorithm, "world_size", lambda: 2)
    monkeypatch.setattr(algorithm, "global_sum", lambda x: calls.append(x) or sum(counts))
    grads, losses = [], []
    for h in halves:
        m = copy.deepcopy(model)
        captured = []
        metrics = policy_update(
            m, torch.optim.SGD(m.parameters(), lr=0.0), _rows(rollout, h), adv[h], cfg=cfg, temperature=0.9,
            max_new_tokens=5, old_logp=old[h], ref_logp=ref[h],
            grad_hook=lambda params, out=captured: out.append(torch.cat([p.grad.flatten() for p in params])),
        )
        grads.append(captured[0])
        losses.append(metrics["loss"])
    assert calls == counts  # each rank all-reduces its own step token count
    torch.testing.assert_close((grads[0] + grads[1]) / 2, full, atol=1e-9, rtol=1e-7)
    assert sum(losses) / 2 == pytest.approx(full_loss, rel=1e-9)
    # weighting the ranks equally (each rank's own token mean) would be another gradient
    equal = [g * sum(counts) / (2 * c) for g, c in zip(grads, counts)]  # grad of local sum / local count
    assert not torch.allclose((equal[0] + equal[1]) / 2, full, atol=1e-6, rtol=1e-4)


def test_collectives_without_a_process_group_return_the_value():
    assert global_sum(3.5) == 3.5
    assert global_max(7) == 7 and isinstance(global_max(7), int)


# ---------------------------------------------------------------- GDPO


def test_sum_then_normalize_is_todays_advantage():
    """The weighted nansum of `grpo.rewards.score`, then `group_advantages`, bit for bit."""
    a = [1.0, None, 0.0, 1.0, 0.5, 0.5]
    b = [0.2, 0.7, None, 0.1, 0.9, 0.4]
    fns = [("a", lambda texts, **_: a), ("b", lambda texts, **_: b)]
    scores = score(["x"] * 6, {}, fns, [1.0, 0.3])
    per_reward = torch.stack([scores.per_fn["a"], scores.per_fn["b"]], dim=1)  # (6, 2) with NaN
    got = combined_advantages(per_reward, torch.tensor([1.0, 0.3]), 3, scale="group")
    assert torch.equal(got, group_advantages(scores.total, 3, scale="group"))
    for scale in ("batch", "none"):
        got = combined_advantages(per_reward, torch.tensor([1.0, 0.3]), 3, scale=scale)
        assert torch.equal(got, group_advantages(scores.total, 3, scale=scale))


def test_normalize_then_sum_by_hand():
    """2 groups of 2 completions x 2 rewards, weights (1, 0.5). Group 1: reward 1 = (1, 0), reward 2
    constant (0, 0); group 2: reward 1 constant (1, 1), reward 2 = (2, 0).
    Reward 1 in group 1: mean 0.5, sample std sqrt(0.5), z = +-0.5 / (sqrt(0.5) + 1e-4);
    reward 2 in group 2: mean 1, std sqrt(2), z = +-1 / (sqrt(2) + 1e-4), weighted 0.5; the constant
    ones give 0. Summed: (z1, -z1, z2, -z2), batch mean 0, batch sample std sqrt((2 z1^2 + 2 z2^2) / 3),
    advantage = summed / (std + 1e-4)."""
    per_reward = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 2.0], [1.0, 0.0]], dtype=torch.float64)
    weights = torch.tensor([1.0, 0.5], dtype=torch.float64)
    z1 = 0.5 / (math.sqrt(0.5) + 1e-4)  # 0.70700...
    z2 = 0.5 * 1.0 / (math.sqrt(2.0) + 1e-4)  # 0.35353...
    std = math.sqrt((2 * z1**2 + 2 * z2**2) / 3)
    expect = torch.tensor([z1, -z1, z2, -z2], dtype=torch.float64) / (std + 1e-4)
    got = combined_advantages(per_reward, weights, 2, aggregation="normalize_then_sum")
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12)
    assert got[0].item() == pytest.approx(1.09523, abs=1e-4) and got[2].item() == pytest.approx(0.54766, abs=1e-4)
    # sum_then_normalize of the same rewards: group advantages of (1, 0) and (2, 1), both +-1/(std + eps)
    plain = combined_advantages(per_reward, weights, 2)
    torch.testing.assert_close(plain, torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64) * (
        0.5 / (math.sqrt(0.5) + 1e-4)), rtol=1e-12, atol=1e-12)


def test_normalize_then_sum_ignores_silent_rewards():
    """NaN: the reward had no opinion. It is normalised over the completions it scored; with
    fewer than 2 of them in a group, or all equal, it adds 0 there; a completion no reward scored
    gets advantage 0 and stays out of the batch statistics."""
    nan = math.nan
    per_reward = torch.tensor(
        [[1.0, nan], [0.0, 3.0], [0.5, nan],  # group 1: reward 2 scored once -> silent
         [nan, nan], [2.0, 1.0], [0.0, 2.0]],  # group 2: row 3 unscored
        dtype=torch.float64,
    )
    got = combined_advantages(per_reward, torch.tensor([1.0, 1.0]), 3, aggregation="normalize_then_sum")
    # group 1, reward 1: (1, 0, 0.5), mean 0.5, std 0.5 -> (0.5, -0.5, 0) / 0.5001
    # group 2, reward 1 over rows 4, 5: (2, 0), mean 1, std sqrt(2); reward 2: (1, 2), mean 1.5, std sqrt(0.5)
    z = 0.5 / (0.5 + 1e-4)
    r1 = 1 / (math.sqrt(2) + 1e-4)
    r2 = 0.5 / (math.sqrt(0.5) + 1e-4)
    summed = torch.tensor([z, -z, 0.0, r1 - r2, -r1 + r2], dtype=torch.float64)  # the 5 scored rows
    expect = (summed - summed.mean()) / (summed.std() + 1e-4)
    expect = torch.cat([expect[:3], torch.zeros(1, dtype=torch.float64), expect[3:]])
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        combined_advantages(per_reward, torch.ones(3), 3)
    with pytest.raises(ValueError):
        combined_advantages(per_reward, torch.ones(2), 3, aggregation="bogus")


# ---------------------------------------------------------------- entropy


def reference_entropies(model, rollout, temperature: float) -> list[torch.Tensor]:
    """Each row alone, without padding: the entropy of softmax(logits / temperature) at every
    position that predicts a completion token, -sum p log p written out."""
    out = []
    for pr, co in zip(rollout.prompts, rollout.completions):
        logits = model(input_ids=torch.tensor([pr + co])).logits[0] / temperature  # (P+T, V)
        pos = torch.arange(len(pr) - 1, len(pr) + len(co) - 1)
        p = torch.softmax(logits[pos], dim=-1)  # (T, V)
        out.append(-(p * torch.log(p)).sum(dim=-1))  # (T,)
    return out


def test_entropy_metric_and_bonus(setup):
    """`entropy` is the token mean of the completions' entropies from the update's own forward;
    with `entropy_coef`, the update is the reference's on loss - coef * entropy sum / tokens, in
    any micro-batch split, and zero-advantage rows are no longer skipped (the bonus covers them)."""
    model, rollout, _, _, _ = setup
    adv = group_advantages(torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 2.0], dtype=torch.float64), 4)
    mask = rollout.completion_mask
    tokens = float(mask.sum())

    m = copy.deepcopy(model)
    logp = padded_reference_logprobs(m, rollout, 5)  # (N, T)
    ents = reference_entropies(m, rollout, 0.9)
    ent = torch.stack([torch.cat([e, e.new_zeros(5 - len(e))]) for e in ents])  # (N, T)
    loss = reference_loss(logp, logp.detach(), None, adv, mask.tolist(), el=0.2, eh=0.2, beta=0.0,
                          loss_type="dapo", level="token", t_max=5) - 0.1 * (ent * mask).sum() / tokens
    loss.backward()
    expect = torch.cat([p.grad.flatten() for p in m.parameters()])
    mean_entropy = float((ent.detach() * mask).sum() / tokens)

    for micro in (2, 8):
        cfg = train_cfg(micro_batch_size=micro, loss_type="dapo", entropy_coef=0.1)
        delta, metrics = one_sgd_step(model, rollout, adv, cfg)
        # The batched (padded) graph sums the two terms' gradients to within 1e-8 of the per-row
        # reference (each term alone agrees to 1e-16); the bonus itself moves the update by 4e-4.
        torch.testing.assert_close(delta, expect, atol=1e-7, rtol=1e-6)
        assert metrics["skipped_rows"] == 0
        assert metrics["entropy"] == pytest.approx(mean_entropy, rel=1e-9)
        assert metrics["loss"] == pytest.approx(float(loss.detach()), rel=1e-9, abs=1e-12)
    _, plain = one_sgd_step(model, rollout, adv, train_cfg(micro_batch_size=8, loss_type="dapo"))
    assert plain["skipped_rows"] == 4  # without the bonus: only the rows that carry signal run
    ran = [4, 5, 6, 7]  # the second group's rows: their tokens' mean entropy
    assert plain["entropy"] == pytest.approx(float((ent.detach()[ran] * mask[ran]).sum() / mask[ran].sum()), rel=1e-9)


def test_on_policy_gspo_is_grpo_and_cispo_is_dapo():
    """With one update epoch the ratio is 1: the sequence-level gradient is the token-level one,
    and CISPO's gradient is dapo's (the clipped ratio is 1, the surrogate's gradient A * grad logp)."""
    logp, _, _, adv, mask, _ = loss_inputs(seed=5)
    kw = dict(epsilon_low=3e-4, epsilon_high=4e-4, beta=0.0, max_new_tokens=5, num_tokens=float(mask.sum()))

    def grad(loss_type, level):
        return loss_and_grad(lambda lp: grpo_loss(lp, lp.detach(), None, adv, mask, loss_type=loss_type,
                                                  importance_sampling_level=level, **kw)[0], logp)[1]

    torch.testing.assert_close(grad("grpo", "sequence"), grad("grpo", "token"), rtol=0, atol=1e-15)
    torch.testing.assert_close(grad("cispo", "token"), grad("dapo", "token"), rtol=0, atol=1e-15)
    torch.testing.assert_close(grad("cispo", "sequence"), grad("dapo", "token"), rtol=0, atol=1e-15)
