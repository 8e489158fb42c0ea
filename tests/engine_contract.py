"""One contract for every `grpo.engines` implementation: same interface, same shapes, same
semantics on the tiny model. `tests/test_engines.py` runs it on `hf`, `cpu_fast` and `vllm` (a
fake vLLM engine); `tests/vllm_tier/test_engine_contract.py` on the real vLLM engine (CPU build).

`reference` is the `hf` engine on the same model: engines that sample from the model itself (and
real vLLM in float32) must match its greedy tokens; a fake vLLM engine has no model inside, so its
samples are only checked for shape and semantics (`same_samples=False`).
"""

from __future__ import annotations

from typing import Any

import torch

from grpo.engines import ENGINES, Engine, Rollout
from grpo.engines.hf import model_logprobs
from grpo.models import stop_token_ids

PROMPTS = ["nums: 1 2 3 target: 6", "nums: 93 4 68 target: 29, and a longer prompt than the others", "x"]


def check_rollout(rollout: Rollout, tokenizer: Any, n_prompts: int, g: int, max_new: int) -> None:
    """Shapes, dtypes and the stop-token / truncation semantics every engine's rollout has."""
    n = n_prompts * g
    assert rollout.num_sequences == n and len(rollout.texts) == n
    assert rollout.prompt_ids.shape == rollout.prompt_mask.shape and rollout.prompt_ids.shape[0] == n
    assert rollout.completion_ids.shape == rollout.completion_mask.shape
    assert rollout.completion_ids.shape[1] <= max_new
    assert rollout.prompt_mask.dtype == rollout.completion_mask.dtype == torch.long
    assert rollout.truncated.dtype == torch.bool and rollout.truncated.shape == (n,)
    assert not rollout.completion_ids.is_inference()  # the loss takes them into autograd
    stops = set(stop_token_ids(tokenizer))
    for i in range(n):
        mask = rollout.completion_mask[i]
        length = int(mask.sum())
        assert length >= 1 and bool(mask[:length].all()) and not bool(mask[length:].any())  # a prefix
        ids = rollout.completion_ids[i, :length].tolist()
        stopped = ids[-1] in stops
        assert not any(t in stops for t in ids[:-1])  # nothing after the first stop token
        assert bool(rollout.truncated[i]) == (not stopped)
        assert stopped or length == max_new
    for i in range(n_prompts):  # rows i*G .. i*G+G-1 share prompt i
        block = rollout.prompt_ids[i * g : (i + 1) * g]
        assert bool((block == block[:1]).all())


def _same(a: Rollout, b: Rollout) -> bool:
    return torch.equal(a.completion_ids.cpu(), b.completion_ids.cpu()) and a.texts == b.texts


def check_engine(
    engine: Engine, model: Any, tokenizer: Any, reference: Engine, *, same_samples: bool = True,
    logprob_atol: float = 1e-4,
) -> None:
    """The whole contract; changes the model's LoRA weights (then syncs), closes the engine."""
    assert isinstance(engine, Engine) and engine.name in ENGINES
    device = next(model.parameters()).device
    seed = torch.Generator(device=device)

    # generate: shapes and semantics; seeded samples repeat; greedy equals the reference's
    sampled = engine.generate(PROMPTS, 4, max_new_tokens=10, generator=seed.manual_seed(0))
    check_rollout(sampled, tokenizer, len(PROMPTS), 4, 10)
    assert _same(sampled, engine.generate(PROMPTS, 4, max_new_tokens=10, generator=seed.manual_seed(0)))
    greedy = engine.generate(PROMPTS, 1, greedy=True, max_new_tokens=10)
    check_rollout(greedy, tokenizer, len(PROMPTS), 1, 10)
    if same_samples:
        assert _same(greedy, reference.generate(PROMPTS, 1, greedy=True, max_new_tokens=10))
    if same_samples:  # stop tokens held back until min_new_tokens (a fake engine ignores it)
        forced = engine.generate(PROMPTS[:1], 2, max_new_tokens=6, min_new_tokens=6, generator=seed.manual_seed(1))
        assert bool(forced.truncated.all()) and forced.completion_mask.sum(1).tolist() == [6, 6]

    # logprobs: the trained model's, with and without the adapter; in autograd unless no_grad
    args = (sampled.prompt_ids, sampled.prompt_mask, sampled.completion_ids, sampled.completion_mask)
    mask = sampled.completion_mask.bool()
    for adapter in (True, False):
        with torch.no_grad():
            got = engine.logprobs(*args, 0.7, 4, adapter=adapter)  # (N, T)
            want = model_logprobs(model, *args, 0.7, adapter=adapter)  # (N, T)
        assert got.shape == sampled.completion_ids.shape and not got.requires_grad
        assert bool((got[mask] <= 0).all())
        torch.testing.assert_close(got[mask], want[mask], rtol=0, atol=logprob_atol)
    with torch.no_grad():
        assert not torch.allclose(engine.logprobs(*args)[mask], engine.logprobs(*args, adapter=False)[mask])
        logp, entropy = engine.logprobs(*args, with_entropy=True)  # (N, T) each, from one pass
        _, want_entropy = model_logprobs(model, *args, with_entropy=True)  # (N, T)
    torch.testing.assert_close(logp[mask], engine.logprobs(*args)[mask].detach(), rtol=0, atol=logprob_atol)
    torch.testing.assert_close(entropy[mask], want_entropy[mask], rtol=0, atol=10 * logprob_atol)
    logp = engine.logprobs(*args)  # (N, T)
    assert logp.requires_grad
    (logp * sampled.completion_mask).sum().backward()
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in model.named_parameters() if "lora_" in n)
    model.zero_grad(set_to_none=True)

    # sync: an update to the adapter reaches the next rollout
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(-3.0)
    engine.sync(model)
    moved = engine.generate(PROMPTS, 1, greedy=True, max_new_tokens=10)
    if same_samples:
        assert _same(moved, reference.generate(PROMPTS, 1, greedy=True, max_new_tokens=10))
        assert not _same(moved, greedy)

    # sleep / wake, then close (twice: idempotent)
    engine.sleep()
    engine.wake()
    check_rollout(engine.generate(PROMPTS[:1], 2, max_new_tokens=4, generator=seed.manual_seed(2)), tokenizer, 1, 2, 4)
    engine.close()
    engine.close()
