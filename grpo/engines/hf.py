"""The `hf` engine: plain transformers + peft, on any device.

    engine = HFEngine(model, tokenizer, cfg.generation)
    rollout = engine.generate(prompts, num_samples=8, generator=torch.Generator().manual_seed(0))
    logp = engine.logprobs(rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                           rollout.completion_mask)                       # (N, T), in autograd

Sampling is a lean KV-cached loop (not `model.generate`): each unique prompt is prefilled once,
its cache is repeated for its G samples, then one token per step is decoded for all N rows with
left-padding-aware position ids. It samples from the model as given, so a `PeftModel` samples with
its adapter active. Log-probs are `grpo.algorithm.completion_logprobs` on the same model (the
reference policy: the adapter disabled).

Legend: B prompts, G samples per prompt, N = B*G rows, U unique prompts, P prompt tokens,
T completion tokens, V vocabulary.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from grpo.algorithm import completion_logprobs
from grpo.config import GenerationConfig
from grpo.engines.base import (
    Rollout,
    finish_rollout,
    pick_tokens,
    stop_and_pad_ids,
    tokenize_prompts,
    unique_prompts,
)

if TYPE_CHECKING:
    from grpo.config import RunConfig


def model_logprobs(
    model: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
    micro_batch_size: int | None = None,
    *,
    adapter: bool = True,
    with_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token log-probs (N, T) under `model`, with its adapter or (adapter=False) without; with
    `with_entropy`, also each position's entropy (N, T), differentiable."""
    args = (prompt_ids, prompt_mask, completion_ids, completion_mask)
    if adapter:
        return completion_logprobs(model, *args, temperature, micro_batch_size, with_entropy=with_entropy)
    with model.disable_adapter():
        return completion_logprobs(model, *args, temperature, micro_batch_size, with_entropy=with_entropy)


def cache_kwarg(model: Any) -> str:
    """Name of the KV-cache argument of `model.forward` (`cache` in transformers 5.x)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class HFEngine:
    """Transformers + peft: KV-cached sampling and log-probs with the training model itself (any
    device; nothing to copy after an update)."""

    name: ClassVar[str] = "hf"
    sampler_is_trainer: ClassVar[bool] = True

    @classmethod
    def build(cls, model: Any, tokenizer: Any, cfg: RunConfig, *, sampler_logprobs: bool = False) -> HFEngine:
        """The engine for a run (`grpo.engines.make_engine`); this sampler reports no log-probs of
        its own (it is the trainer's forward pass)."""
        return cls(model, tokenizer, cfg.generation)

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        gen: GenerationConfig,
        *,
        stop_ids: list[int] | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.gen = gen
        self.stop_ids, self.pad_id = stop_and_pad_ids(tokenizer, stop_ids)

    def sync(self, model: Any) -> None:
        """Nothing to copy: this engine samples from `model` itself."""
        self.model = model

    def sleep(self) -> None:
        """No-op (vLLM frees its memory here)."""

    def wake(self) -> None:
        """No-op."""

    def close(self) -> None:
        """No-op: the model belongs to the caller."""

    def logprobs(
        self,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        completion_ids: Tensor,
        completion_mask: Tensor,
        temperature: float = 1.0,
        micro_batch_size: int | None = None,
        *,
        adapter: bool = True,
        with_entropy: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Per-token log-probs (N, T) by the model's own forward (`grpo.algorithm.completion_logprobs`)."""
        return model_logprobs(
            self.model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature,
            micro_batch_size, adapter=adapter, with_entropy=with_entropy,
        )  # (N, T), and (N, T) with_entropy

    def generate(
        self,
        prompts: list[str],
        num_samples: int,
        *,
        greedy: bool = False,
        max_new_tokens: int | None = None,
        min_new_tokens: int = 0,
        generator: torch.Generator | None = None,
    ) -> Rollout:
        """`num_samples` completions of each prompt; rows grouped per prompt."""
        was_training = self.model.training
        if was_training:
            self.model.eval()  # no adapter dropout while sampling
        try:
            raw = self._generate(
                prompts, num_samples, greedy=greedy,
                max_new_tokens=self.gen.max_new_tokens if max_new_tokens is None else max_new_tokens,
                min_new_tokens=min_new_tokens, generator=generator,
            )
        finally:
            if was_training:
                self.model.train()
        return finish_rollout(self.tokenizer, *raw)  # outside inference mode: the loss needs the ids

    @torch.inference_mode()
    def _generate(
        self,
        prompts: list[str],
        g: int,
        *,
        greedy: bool,
        max_new_tokens: int,
        min_new_tokens: int,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(prompt ids (N, P), prompt mask (N, P), completion ids (N, T), lengths (N,), stopped (N,))."""
        from peft import PeftModel
        from transformers import DynamicCache

        if not prompts or g < 1 or max_new_tokens < 1:
            raise ValueError("generate needs at least one prompt, num_samples >= 1, max_new_tokens >= 1")
        model = self.model
        # The adapter layers live inside the base module tree, so calling the base applies them.
        net = model.get_base_model() if isinstance(model, PeftModel) else model
        device = next(net.parameters()).device
        min_new_tokens = min(min_new_tokens, max_new_tokens)

        uniq, inverse = unique_prompts(prompts)
        u_ids, u_mask = tokenize_prompts(self.tokenizer, uniq)  # (U, P), (U, P)
        u_ids, u_mask = u_ids.to(device), u_mask.to(device)
        rows = torch.tensor(inverse, device=device).repeat_interleave(g)  # (N,) unique prompt per row
        prompt_ids = u_ids.index_select(0, rows)  # (N, P)
        prompt_mask = u_mask.index_select(0, rows)  # (N, P)
        n = prompt_ids.shape[0]

        # Prefill each unique prompt once; only the last position's logits are computed.
        u_pos = (u_mask.cumsum(-1) - 1).clamp(min=0)  # (U, P)
        cache = DynamicCache(config=net.config)
        cache_kw = cache_kwarg(net)
        out = net(
            input_ids=u_ids, attention_mask=u_mask, position_ids=u_pos,
            use_cache=True, logits_to_keep=1, **{cache_kw: cache},
        )
        logits = out.logits[:, -1, :].float().index_select(0, rows)  # (N, V)
        if n != u_ids.shape[0] or inverse != list(range(len(inverse))):
            cache.reorder_cache(rows)  # (U, ...) -> (N, ...) per layer
        del out

        stop = torch.tensor(self.stop_ids, device=device)  # (S,)
        attn = prompt_mask  # (N, P + t)
        next_pos = u_pos[:, -1].index_select(0, rows) + 1  # (N,)
        finished = torch.zeros(n, dtype=torch.bool, device=device)  # (N,)
        lengths = torch.full((n,), max_new_tokens, dtype=torch.long, device=device)  # (N,)
        steps: list[torch.Tensor] = []
        ones = torch.ones(n, 1, dtype=attn.dtype, device=device)  # (N, 1)
        for t in range(max_new_tokens):
            if t < min_new_tokens:
                logits = logits.index_fill(1, stop, float("-inf"))  # (N, V)
            token = self._pick(logits, greedy, generator)  # (N,)
            token = torch.where(finished, torch.full_like(token, self.pad_id), token)  # (N,)
            steps.append(token)
            hit = torch.isin(token, stop) & ~finished  # (N,)
            lengths = torch.where(hit, torch.full_like(lengths, t + 1), lengths)  # (N,)
            finished = finished | hit  # (N,)
            if t == max_new_tokens - 1 or bool(finished.all()):
                break
            attn = torch.cat([attn, ones], dim=1)  # (N, P + t + 1)
            out = net(
                input_ids=token[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                use_cache=True, logits_to_keep=1, **{cache_kw: cache},
            )
            logits = out.logits[:, -1, :].float()  # (N, V)
            next_pos = next_pos + 1  # (N,)

        completion_ids = torch.stack(steps, dim=1)  # (N, T)
        return prompt_ids, prompt_mask, completion_ids, lengths, finished

    def _pick(self, logits: torch.Tensor, greedy: bool, generator: torch.Generator | None) -> torch.Tensor:
        """Next token per row: argmax, or a sample after temperature, top-k and top-p."""
        g = self.gen
        return pick_tokens(logits, greedy, generator, g.temperature, g.top_k, g.top_p, g.sampler)  # (N,)
