"""The GRPO math: group advantages, per-token log-probs, the clipped loss and one policy update.

Pure torch; the trainer calls one function per phase of a step:

    adv = group_advantages(rewards, group_size=G)                      # (N,)
    with torch.no_grad():                                              # only if num_iterations > 1
        old = completion_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    metrics = policy_update(model, opt, r, adv, cfg=cfg.train, temperature=1.0,
                            max_new_tokens=48, old_logp=old)

Shape legend: B prompts, G group size, N = B*G sequences, T completion tokens, P prompt tokens,
V vocabulary. Run the tests with `pytest -q tests/test_algorithm.py`.

Departures from the GRPO paper (DeepSeekMath, arXiv 2402.03300), all as in TRL's GRPOTrainer:
- the ratio is clipped asymmetrically (`epsilon_low`, `epsilon_high`: clip-higher of DAPO, Yu et al.
  2025, arXiv 2503.14476);
- the loss is selectable (`loss_type`): "grpo" (per-sequence token mean, then mean over sequences,
  as the paper), "bnpo" (mean over all tokens of this rank's step), "dr_grpo" (sum / (N *
  max_new_tokens), Dr. GRPO, Liu et al. 2025, arXiv 2503.20783), "dapo" (sum over every token of the
  step / the step's token count, across micro-batches and data-parallel ranks, DAPO's token-level
  loss) and "cispo" (the clipped ratio, detached, weighs each token's log-prob: -sg(min(ratio,
  1 + epsilon_high)) * A * logp, token-level as "dapo"; CISPO of MiniMax-M1, arXiv 2506.13585);
- the ratio is per token or, with `importance_sampling_level="sequence"`, per sequence: exp of the
  mean of the sequence's token log-ratios, in GSPO's "GSPO-token" form (Zheng et al. 2025, arXiv
  2507.18071), with every loss type;
- advantages may be scaled by the group std (paper), the batch std, or not at all, and several
  rewards may be normalised each within its group before their weighted sum (GDPO, NVIDIA, arXiv
  2601.05242; `combined_advantages`);
- the KL term (k3 estimator, as the paper) is only added when `beta > 0`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from grpo.config import TrainConfig
from grpo.distributed import global_sum, world_size
from grpo.errors import TrainingDiverged

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo"]
ImportanceSamplingLevel = Literal["token", "sequence"]
AdvantageScale = Literal["group", "batch", "none"]
RewardAggregation = Literal["sum_then_normalize", "normalize_then_sum"]
TOKEN_LEVEL_LOSSES = ("dapo", "cispo")  # divided by the step's token count over all ranks


def group_advantages(
    rewards: Tensor, group_size: int, scale: AdvantageScale = "group", eps: float = 1e-4
) -> Tensor:
    """Advantages A = r - mean(r of the group), optionally divided by a standard deviation.

    Rows i*G .. i*G+G-1 form group i. `scale`: "group" divides by (std of the group + eps),
    "batch" by (std of all N rewards + eps), "none" does not divide (Dr. GRPO). The std is the
    sample std (Bessel-corrected, `torch.std`'s default), as TRL. A group whose rewards are all
    equal gets zero advantages.
    """
    if group_size < 2:
        raise ValueError(f"group_size is {group_size}; advantages need groups of 2 or more")
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards of shape {tuple(rewards.shape)} cannot be split into groups of {group_size}"
        )
    r = rewards.float() if not rewards.is_floating_point() else rewards  # (N,)
    grouped = r.view(-1, group_size)  # (B, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # (B, G)
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)  # (B, G)
    elif scale == "batch":
        centred = centred / (r.std() + eps)  # (B, G)
    elif scale != "none":
        raise ValueError(f"scale is {scale!r}; use 'group', 'batch' or 'none'")
    return centred.reshape(-1)  # (N,)


def combined_advantages(
    per_reward: Tensor,
    weights: Tensor,
    group_size: int,
    *,
    scale: AdvantageScale = "group",
    aggregation: RewardAggregation = "sum_then_normalize",
    eps: float = 1e-4,
) -> Tensor:
    """Advantages (N,) of K rewards per completion, `per_reward` (N, K) (NaN: the reward has no
    opinion on that completion), `weights` (K,).

    "sum_then_normalize": `group_advantages` of the weighted sum, NaN counting 0 (TRL's nansum;
    the same sum, term by term, as `grpo.rewards.score`). "normalize_then_sum" (GDPO; TRL's
    multi_objective_aggregation="normalize_then_sum"): each reward is normalised within its group,
    (r - mean) / (std + eps) over the completions it scored (sample std), a reward constant in a
    group (or scoring fewer than 2 of it) contributing 0 there; then the weighted sum; then, as TRL
    and the GDPO paper, that sum is normalised over the batch, (s - mean) / (std + eps), to keep
    the advantages' scale independent of K and the weights. `scale` applies to
    "sum_then_normalize" only (TRL's `scale_rewards` is likewise not used by normalize_then_sum).
    Rows no reward scored get advantage 0. The batch is this call's N rows (one rank's).
    """
    if per_reward.ndim != 2 or weights.shape != (per_reward.shape[1],):
        raise ValueError(
            f"per_reward of shape {tuple(per_reward.shape)} and weights of shape {tuple(weights.shape)}: "
            "expected (N, K) and (K,)"
        )
    r = per_reward.float() if not per_reward.is_floating_point() else per_reward  # (N, K)
    w = weights.to(dtype=r.dtype, device=r.device)  # (K,)
    if aggregation == "sum_then_normalize":
        total = torch.zeros(r.shape[0], dtype=r.dtype, device=r.device)  # (N,)
        for k in range(r.shape[1]):
            total = total + w[k] * torch.nan_to_num(r[:, k], nan=0.0)  # (N,)
        return group_advantages(total, group_size, scale=scale, eps=eps)  # (N,)
    if aggregation != "normalize_then_sum":
        raise ValueError(f"aggregation is {aggregation!r}; use 'sum_then_normalize' or 'normalize_then_sum'")
    if group_size < 2 or r.shape[0] % group_size:
        raise ValueError(f"{r.shape[0]} rows cannot be split into groups of {group_size} (>= 2)")
    grouped = r.view(-1, group_size, r.shape[1])  # (B, G, K)
    present = ~torch.isnan(grouped)  # (B, G, K)
    values = torch.where(present, grouped, torch.zeros_like(grouped))  # (B, G, K)
    count = present.sum(dim=1, keepdim=True)  # (B, 1, K)
    mean = values.sum(dim=1, keepdim=True) / count.clamp(min=1)  # (B, 1, K)
    centred = torch.where(present, values - mean, torch.zeros_like(values))  # (B, G, K)
    std = ((centred**2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()  # (B, 1, K)
    high = torch.where(present, grouped, torch.full_like(grouped, -math.inf)).amax(dim=1, keepdim=True)  # (B, 1, K)
    low = torch.where(present, grouped, torch.full_like(grouped, math.inf)).amin(dim=1, keepdim=True)  # (B, 1, K)
    silent = (count < 2) | (high == low)  # (B, 1, K) no spread: this reward says nothing here
    normed = torch.where(silent, torch.zeros_like(centred), centred / (std + eps))  # (B, G, K)
    summed = (normed * w).sum(dim=2).reshape(-1)  # (N,)
    scored = present.reshape(r.shape).any(dim=1)  # (N,) rows at least one reward scored
    if int(scored.sum()) < 2:
        return torch.zeros_like(summed)  # (N,)
    batch = summed[scored]  # (n_scored,)
    adv = (summed - batch.mean()) / (batch.std() + eps)  # (N,)
    return torch.where(scored, adv, torch.zeros_like(adv))  # (N,)


def selective_log_softmax(logits: Tensor, index: Tensor) -> Tensor:
    """log softmax(logits)[index] without building a (N, T, V) log-softmax tensor.

    float32/float64: gather the chosen logits and subtract a row-by-row logsumexp. bfloat16 and
    float16: each row is upcast to float32 and log-softmaxed, so the log-probs are float32 (in
    bfloat16 they would be off by 0.01-0.05 nats, as much as the sampler mismatch measured
    against vLLM's).
    """
    if logits.dtype in (torch.float32, torch.float64):
        chosen = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)  # (N, T)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])  # (N, T)
        return chosen - lse  # (N, T)
    rows = []
    for row_logits, row_index in zip(logits, index):  # (T, V), (T,)
        row_logp = row_logits.float().log_softmax(dim=-1)  # (T, V) float32
        rows.append(row_logp.gather(-1, row_index.unsqueeze(-1)).squeeze(-1))  # (T,)
    return torch.stack(rows)  # (N, T)


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy (N, T) of softmax(logits) at each position of logits (N, T, V), in float32 at least
    (half precisions are upcast), one row at a time (no (N, T, V) copy at once); differentiable."""
    rows = []
    for row in logits:  # (T, V)
        logp = (row if row.dtype in (torch.float32, torch.float64) else row.float()).log_softmax(dim=-1)  # (T, V)
        rows.append(-(logp.exp() * logp).sum(dim=-1))  # (T,)
    return torch.stack(rows)  # (N, T)


def completion_logprobs(
    model: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
    micro_batch_size: int | None = None,
    *,
    with_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token log-probs (N, T) of the completion tokens under `model`, at `temperature`; with
    `with_entropy`, also the entropy (N, T) of the distribution each token was drawn from, from
    the same logits (no extra forward).

    Prompts are left-padded, completions right-padded; position ids count only real tokens so a
    padded row gives the same log-probs as the same row alone. Logits are computed for the last
    T + 1 positions only (`logits_to_keep`). Values at masked completion positions are finite
    but meaningless. Gradients flow unless the caller wraps this in `torch.no_grad()`.
    """
    out = in_row_blocks(
        lambda *block: _forward_logprobs(model, *block, temperature, with_entropy),
        (prompt_ids, prompt_mask, completion_ids, completion_mask),
        micro_batch_size,
    )  # (N, T), or (N, T, 2) with the entropy
    return (out[..., 0], out[..., 1]) if with_entropy else out


def in_row_blocks(fn: Callable[..., Tensor], tensors: tuple[Tensor, ...], block_rows: int | None) -> Tensor:
    """fn(*(t[rows] for t in tensors)) on consecutive blocks of `block_rows` rows (all rows at
    once when None), results concatenated along dim 0: e.g. (N, P), (N, T) inputs -> (N, T)."""
    n = tensors[0].shape[0]
    step = block_rows or n
    chunks = [fn(*(t[start : start + step] for t in tensors)) for start in range(0, n, step)]
    return torch.cat(chunks, dim=0) if len(chunks) > 1 else chunks[0]


def _forward_logprobs(
    model: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float,
    with_entropy: bool = False,
) -> Tensor:
    """One forward pass over a block of rows -> (N, T), or (N, T, 2) log-probs and entropies;
    see `completion_logprobs`."""
    t = completion_ids.shape[1]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (N, P+T)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1).long()  # (N, P+T)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # (N, P+T)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=t + 1,
        use_cache=False,
    )
    logits = out.logits[:, -(t + 1) : -1, :]  # (N, T, V): position j predicts completion token j
    logits = logits / temperature  # (N, T, V)
    logp = selective_log_softmax(logits, completion_ids)  # (N, T)
    return torch.stack([logp, token_entropy(logits)], dim=-1) if with_entropy else logp  # (N, T, 2) | (N, T)


def importance_log_ratio(
    logp: Tensor, old_logp: Tensor, mask: Tensor, level: ImportanceSamplingLevel = "token"
) -> Tensor:
    """Log importance ratio (N, T) of each completion token against the sampling policy.

    "token": logp - old_logp. "sequence" (GSPO): the mean of logp - old_logp over the sequence's
    masked tokens, the same value at each of its tokens, in the GSPO-token form
    sg[seq] + logp - sg[logp]: its gradient w.r.t. logp[i, t] is 1 at (i, t), so exp() of it,
    s_i * pi_t / sg[pi_t], has the value of the sequence ratio s_i and d/dlogp[i, t] = s_i.
    """
    if level == "token":
        return logp - old_logp  # (N, T)
    if level != "sequence":
        raise ValueError(f"importance_sampling_level is {level!r}; use 'token' or 'sequence'")
    m = mask.to(logp.dtype)  # (N, T)
    delta = torch.where(mask.bool(), logp - old_logp, torch.zeros_like(logp))  # (N, T)
    seq = delta.sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # (N,)
    return seq.detach().unsqueeze(1) + (logp - logp.detach())  # (N, T)


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    beta: float,
    loss_type: LossType,
    max_new_tokens: int,
    num_sequences: int | None = None,
    num_tokens: float | Tensor | None = None,
    is_weight: Tensor | None = None,
    importance_sampling_level: ImportanceSamplingLevel = "token",
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped GRPO surrogate (or CISPO's) (+ beta * k3 KL), aggregated per `loss_type`.

    Per token: ratio = exp(`importance_log_ratio`) (per token, or GSPO's per sequence);
    loss = -min(ratio * A, clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * A) + beta * KL,
    for "cispo" loss = -sg(min(ratio, 1 + epsilon_high)) * A * logp + beta * KL;
    KL = exp(ref - logp) - (ref - logp) - 1. Aggregation over the masked tokens:
    "grpo" = mean over sequences of each sequence's token mean (a fully masked sequence adds 0
    but still counts), "bnpo", "dapo" and "cispo" = sum / `num_tokens` (default: this call's
    mask tokens), "dr_grpo" = sum / (N * max_new_tokens).

    For gradient accumulation pass `num_sequences` and `num_tokens` of the WHOLE batch: the
    losses of its micro-batches then sum to the full-batch loss. For "dapo"/"cispo" under data
    parallelism `num_tokens` is the step's token count over all ranks divided by the world size
    (`policy_update` does this), so that the ranks' averaged gradients are the global token mean's.
    Stats are detached masked token means over this call's tokens (weight them by
    stats["num_tokens"] to combine micro-batches): "kl"; "ratio"; "clip_low" = (ratio < 1 -
    epsilon_low) & (A < 0) and "clip_high" = (ratio > 1 + epsilon_high) & (A > 0), the tokens
    whose gradient the clip removes (TRL's definition); for "cispo" "clip_low" is 0 (no lower
    bound) and "clip_high" = (ratio > 1 + epsilon_high) & (A != 0), the tokens whose weight the cap
    lowers; "clip_fraction" = either of them. At sequence level a sequence's tokens share its ratio.

    `is_weight` (N, T), optional: the importance-sampling correction between the sampler that drew
    the completions (vLLM) and this model (`importance_weights`); it multiplies each token's
    surrogate, before the KL term is added (as TRL applies it).
    """
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (the reference model's log-probs); pass it or set beta=0")
    m = mask.to(logp.dtype)  # (N, T)
    adv = advantages.to(logp.dtype).unsqueeze(1)  # (N, 1)
    ratio = torch.exp(importance_log_ratio(logp, old_logp, mask, importance_sampling_level))  # (N, T)
    if loss_type == "cispo":
        weight = torch.clamp(ratio, max=1 + epsilon_high).detach()  # (N, T)
        per_token = -weight * adv * logp  # (N, T)
    else:
        clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)  # (N, T)
        per_token = -torch.min(ratio * adv, clipped * adv)  # (N, T)
    if is_weight is not None:
        per_token = per_token * is_weight.to(per_token.dtype)  # (N, T)
    if ref_logp is not None:
        delta = ref_logp - logp  # (N, T)
        kl = torch.exp(delta) - delta - 1  # (N, T)
        if beta > 0:
            per_token = per_token + beta * kl  # (N, T)
    else:
        kl = torch.zeros_like(logp)  # (N, T)

    n = num_sequences if num_sequences is not None else logp.shape[0]
    total = m.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=m.dtype, device=m.device)  # ()
    if loss_type == "grpo":
        seq_mean = (per_token * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # (N,)
        loss = seq_mean.sum() / n  # ()
    elif loss_type == "bnpo":
        loss = (per_token * m).sum() / total.clamp(min=1.0)  # ()
    elif loss_type in TOKEN_LEVEL_LOSSES:
        # a rank's share of the global count may be below 1; no tokens anywhere: the sum is 0
        loss = (per_token * m).sum() / torch.where(total > 0, total, torch.ones_like(total))  # ()
    elif loss_type == "dr_grpo":
        loss = (per_token * m).sum() / (n * max_new_tokens)  # ()
    else:
        raise ValueError(f"loss_type is {loss_type!r}; use 'grpo', 'bnpo', 'dr_grpo', 'dapo' or 'cispo'")

    with torch.no_grad():
        count = m.sum()  # ()
        denom = count.clamp(min=1.0)  # ()
        if loss_type == "cispo":
            low = torch.zeros_like(m)  # (N, T)
            high = ((ratio > 1 + epsilon_high) & (adv != 0)).to(m.dtype)  # (N, T)
        else:
            low = ((ratio < 1 - epsilon_low) & (adv < 0)).to(m.dtype)  # (N, T)
            high = ((ratio > 1 + epsilon_high) & (adv > 0)).to(m.dtype)  # (N, T)
        stats = {
            "kl": (kl * m).sum() / denom,  # ()
            "clip_low": (low * m).sum() / denom,  # ()
            "clip_high": (high * m).sum() / denom,  # ()
            "clip_fraction": (torch.maximum(low, high) * m).sum() / denom,  # ()
            "ratio": (ratio * m).sum() / denom,  # ()
            "num_tokens": count,  # ()
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def check_finite_update(loss: float, grad_norm: float) -> None:
    """Raise `TrainingDiverged` before an optimizer step that would write NaN/inf into the weights."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise TrainingDiverged(f"the loss is {loss} and the gradient norm {grad_norm}; the update was not applied")


def check_finite_weights(params: list[Tensor]) -> None:
    """Raise `TrainingDiverged` when an optimizer step left a non-finite trainable weight."""
    norms = torch.stack(torch._foreach_norm([p.detach() for p in params]))  # (len(params),)
    if not bool(torch.isfinite(norms).all()):
        raise TrainingDiverged("the optimizer step made the trainable weights non-finite")


def importance_weights(
    trainer_logp: Tensor,
    sampler_logp: Tensor,
    mask: Tensor,
    *,
    level: str = "sequence",
    mode: str = "mask",
    cap: float = 3.0,
) -> tuple[Tensor, dict[str, float]]:
    """Weights (N, T) that correct for the sampler (vLLM) not being exactly the trained policy:
    ratio = exp(trainer - sampler log-prob) per token (`level="token"`) or exp of its mean over the
    sequence's tokens, broadcast (`"sequence"`); above `cap` a weight is cut to `cap` (`"truncate"`,
    TIS) or set to 0 (`"mask"`, the token or sequence is left out). TRL's vllm_importance_sampling
    modes, whose default is sequence + mask with cap 3. Both inputs are detached log-probs (N, T).
    Metrics: mean |trainer - sampler| per token, the weights' mean and p95, the fraction capped."""
    m = mask.to(torch.float32)  # (N, T)
    delta = (trainer_logp.float() - sampler_logp.float()) * m  # (N, T)
    if level == "token":
        ratio = torch.exp(delta)  # (N, T)
    elif level == "sequence":
        per_seq = delta.sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # (N,)
        ratio = torch.exp(per_seq).unsqueeze(1).expand_as(delta)  # (N, T)
    else:
        raise ValueError(f"level is {level!r}; use 'token' or 'sequence'")
    capped = ratio > cap  # (N, T)
    if mode == "truncate":
        weight = ratio.clamp(max=cap)  # (N, T)
    elif mode == "mask":
        weight = torch.where(capped, torch.zeros_like(ratio), ratio)  # (N, T)
    else:
        raise ValueError(f"mode is {mode!r}; use 'truncate' or 'mask'")
    count = m.sum().clamp(min=1.0)
    real = weight[m.bool()]  # (k,)
    stats = {
        "is/delta_abs_mean": float(delta.abs().sum() / count),
        "is/weight_mean": float((weight * m).sum() / count),
        "is/weight_p95": float(torch.quantile(real, 0.95)) if real.numel() else 1.0,
        "is/capped_fraction": float((capped.float() * m).sum() / count),
    }
    return weight * m, stats


def policy_update(
    model: Any,
    optimizer: torch.optim.Optimizer,
    rollout: Any,
    advantages: Tensor,
    *,
    cfg: TrainConfig,
    temperature: float,
    max_new_tokens: int,
    old_logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
    scheduler: Any = None,
    grad_hook: Callable[[list[Tensor]], None] | None = None,
    logprobs_fn: Callable[..., Tensor] | None = None,
    is_weight: Tensor | None = None,
) -> dict[str, float]:
    """`cfg.num_iterations` optimizer steps on one rollout batch, in micro-batches of
    `cfg.micro_batch_size` rows whose gradients add up to the full-batch gradient.

    `old_logp` (N, T): the log-probs at sampling time. With `num_iterations == 1` it may be
    omitted: the detached current log-probs serve (ratio = 1, no extra forward pass). With
    `num_iterations > 1` compute it once under `torch.no_grad()` before calling. `ref_logp` (N, T)
    is needed when `cfg.beta > 0`. `grad_hook(params)`, if given, is called with the trainable
    parameters once all micro-batches' gradients are accumulated and before clipping (data
    parallelism averages them across ranks there). The caller sets train/eval mode. Returns
    loss, kl, clip_low, clip_high, clip_fraction, ratio, entropy (the mean token entropy of the
    rows the update ran, from the same forward pass), grad_norm (before clipping) and
    skipped_rows, averaged over the epochs, and the seconds spent in forward, backward and
    optimizer (`time/forward_s`, `time/backward_s`, `time/optimizer_s`, summed). With beta 0,
    one epoch, no `old_logp` and no entropy bonus, rows whose advantage is exactly 0 (groups of
    equal rewards) add nothing to the loss or its gradient and are not run (`skipped_rows`);
    results are the same. `cfg.entropy_coef` > 0 subtracts coef * (entropy token sum) / (the
    loss's token divisor) from the loss. `logprobs_fn` replaces `completion_logprobs` (same
    signature, `with_entropy` included), e.g. by an engine's `logprobs` (`grpo.engines`).
    `is_weight` (N, T): the importance-sampling weights of `importance_weights`, applied to every
    token's surrogate. `cfg.loss_type` "dapo"/"cispo":
    each rank divides its token sum by (the step's token count summed over the data-parallel
    ranks) / (world size) (one all-reduce, `grpo.distributed.global_sum`; every rank must call
    this), so the ranks' averaged gradient is exactly the global token mean's, and their "loss"
    values average to the global loss.
    """
    if cfg.num_iterations > 1 and old_logp is None:
        raise ValueError(
            f"num_iterations={cfg.num_iterations} needs old_logp: compute completion_logprobs "
            "under torch.no_grad() once before the first update and pass it"
        )
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    keep = (~rollout.truncated.to(device)).unsqueeze(1) if cfg.mask_truncated else None  # (N, 1)
    mask = rollout.completion_mask.to(device)  # (N, T)
    mask = mask * keep if keep is not None else mask  # (N, T)
    num_tokens = float(mask.sum())
    loss_tokens = num_tokens  # the loss's divisor: this rank's step token count (bnpo)
    if cfg.loss_type in TOKEN_LEVEL_LOSSES:  # sum_rank(local_sum) / global_count = mean_rank(local_sum / (global / W))
        loss_tokens = global_sum(num_tokens) / world_size()
    adv = advantages.to(device)  # (N,)
    totals: dict[str, float] = {}
    for _ in range(cfg.num_iterations):
        epoch = _accumulate_gradients(
            model, rollout, adv, mask, old_logp, ref_logp, cfg=cfg, temperature=temperature,
            max_new_tokens=max_new_tokens, num_tokens=num_tokens, loss_tokens=loss_tokens, device=device,
            logprobs_fn=logprobs_fn or completion_logprobs, is_weight=is_weight,
        )
        t0 = time.perf_counter()
        if grad_hook is not None:
            grad_hook(params)
        for p in params:  # every row skipped: the optimizer still steps, as on a zero gradient
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        epoch["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        check_finite_update(epoch["loss"], epoch["grad_norm"])
        optimizer.step()
        check_finite_weights(params)
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        epoch["time/optimizer_s"] = time.perf_counter() - t0
        for k, v in epoch.items():
            share = 1.0 if k.startswith("time/") else 1.0 / cfg.num_iterations  # times add up
            totals[k] = totals.get(k, 0.0) + v * share
    return totals


def _accumulate_gradients(
    model: Any,
    rollout: Any,
    adv: Tensor,
    mask: Tensor,
    old_logp: Tensor | None,
    ref_logp: Tensor | None,
    *,
    cfg: TrainConfig,
    temperature: float,
    max_new_tokens: int,
    num_tokens: float,
    device: torch.device,
    logprobs_fn: Callable[..., Tensor],
    is_weight: Tensor | None = None,
    loss_tokens: float | None = None,
) -> dict[str, float]:
    """Forward + backward of every micro-batch of one epoch; returns its summed loss and stats.

    `num_tokens`: the step's mask tokens on this rank (weights the stats); `loss_tokens`: the
    divisor passed to `grpo_loss` (default `num_tokens`). Shapes with a lower-case n are those of
    one micro-batch (n <= N rows).
    """
    n = mask.shape[0]
    loss_sum = t_forward = t_backward = entropy_sum = entropy_tokens = 0.0
    weighted = {"kl": 0.0, "clip_low": 0.0, "clip_high": 0.0, "clip_fraction": 0.0, "ratio": 0.0}
    order = torch.arange(n)  # (n_run,) the rows that run forward and backward
    if cfg.beta == 0 and ref_logp is None and old_logp is None and cfg.num_iterations == 1 and not cfg.entropy_coef:
        # Without a KL term and with ratio = 1, a row whose advantage is 0 adds exactly 0 to the
        # loss and to its gradient, for every loss type and level (each row's loss is A times a
        # function of its own tokens; the divisors count all rows): only the other rows run. The
        # skipped tokens' stats are known (kl 0, no clipping, ratio 1) and are added below.
        order = (adv != 0).nonzero().squeeze(1).cpu()  # (n_run,)
        weighted["ratio"] = num_tokens - float(mask[order.to(mask.device)].sum())
    for start in range(0, int(order.shape[0]), cfg.micro_batch_size):
        rows = order[start : start + cfg.micro_batch_size]  # (n,) row indices
        t0 = time.perf_counter()
        logp, entropy = logprobs_fn(
            model,
            rollout.prompt_ids[rows].to(device),  # (n, P)
            rollout.prompt_mask[rows].to(device),  # (n, P)
            rollout.completion_ids[rows].to(device),  # (n, T)
            rollout.completion_mask[rows].to(device),  # (n, T)
            temperature=temperature,
            with_entropy=True,
        )  # (n, T), (n, T)
        if not cfg.entropy_coef:
            entropy = entropy.detach()  # (n, T) a metric only
        old = old_logp[rows].to(device) if old_logp is not None else logp.detach()  # (n, T)
        ref = ref_logp[rows].to(device) if ref_logp is not None else None  # (n, T)
        loss, stats = grpo_loss(
            logp, old, ref, adv[rows], mask[rows],
            epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high, beta=cfg.beta,
            loss_type=cfg.loss_type, max_new_tokens=max_new_tokens,
            num_sequences=n, num_tokens=num_tokens if loss_tokens is None else loss_tokens,
            is_weight=is_weight[rows].to(device) if is_weight is not None else None,
            importance_sampling_level=cfg.importance_sampling_level,
        )
        if cfg.entropy_coef:  # the bonus: the entropy's token sum over the loss's token divisor
            divisor = max(num_tokens if loss_tokens is None else loss_tokens, 1.0)
            loss = loss - cfg.entropy_coef * (entropy * mask[rows]).sum() / divisor
        entropy_sum += float((entropy.detach() * mask[rows]).sum())
        entropy_tokens += float(mask[rows].sum())
        t1 = time.perf_counter()
        loss.backward()
        t_forward += t1 - t0
        t_backward += time.perf_counter() - t1
        loss_sum += float(loss.detach())
        for k in weighted:
            weighted[k] += float(stats[k]) * float(stats["num_tokens"])
    out = {k: v / max(num_tokens, 1.0) for k, v in weighted.items()}
    out["loss"] = loss_sum
    out["entropy"] = entropy_sum / entropy_tokens if entropy_tokens else math.nan
    out["skipped_rows"] = float(n - order.shape[0])
    out["time/forward_s"] = t_forward
    out["time/backward_s"] = t_backward
    return out
