"""The `cpu_fast` engine: the CPU speed plug-in for Qwen2-architecture policies with LoRA.

    engine = CpuFastEngine(model, tokenizer, cfg.generation)    # the `Engine` protocol
    rollout = engine.generate(prompts, num_samples=8, generator=torch.Generator().manual_seed(0))
    logp = engine.logprobs(rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                           rollout.completion_mask)               # (N, T), in autograd
    ...; optimizer.step(); engine.sync(model)                     # re-merge for the next rollout

Same math as the `hf` engine, float rounding aside (`tests/test_fastpath.py` checks tokens,
log-probs, losses and LoRA gradients against it): `qwen2.FastQwen2` re-runs the decoder as a few
functional torch calls and `native` compiles a handful of kernels (`native_kernels.c`). The whole
plug-in is this folder and its line in `grpo.engines.ENGINES`: delete both and every run takes the
`hf` engine. `grpo.engines.make_engine` chooses it on the CPU only unless `generation.fast_path`
says otherwise (on CUDA no GPU check has proven it yet).

Legend: B prompts, G samples per prompt, N = B*G rows, U unique prompts, P prompt tokens,
T completion tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from grpo.config import GenerationConfig
from grpo.engines.base import SAMPLERS, Rollout, finish_rollout, tokenize_prompts, unique_prompts
from grpo.engines.cpu_fast.qwen2 import FastQwen2, completion_logprobs_fast, unsupported_reason
from grpo.engines.hf import HFEngine

if TYPE_CHECKING:
    from grpo.config import RunConfig

__all__ = ["CpuFastEngine"]


class CpuFastEngine(HFEngine):
    """The `Engine` protocol on a `FastQwen2`: prompts in, a `Rollout` out; log-probs with the LoRA
    unmerged (gradients land on peft's own parameters).

    Generation weights are a merged snapshot: `sync(model)` after every optimizer step (the
    trainer does it), or the next rollout samples from the previous adapter.
    """

    name: ClassVar[str] = "cpu_fast"
    sampler_is_trainer: ClassVar[bool] = True

    @classmethod
    def unavailable(cls, model: Any, cfg: RunConfig) -> str | None:
        """Why this engine is not taken for `model` under `cfg` (one line), or None when it is."""
        device = next(model.parameters()).device
        if cfg.generation.fast_path is False:
            return "generation.fast_path=false"
        if cfg.generation.fast_path is None and device.type != "cpu":
            return (f"on {device.type} it is opt-in until a GPU check has proven it (generation.fast_path=true "
                    "turns it on)")
        if cfg.train.gradient_checkpointing:
            return "train.gradient_checkpointing=true (this engine keeps every activation)"
        if cfg.train.entropy_coef:
            return "train.entropy_coef > 0 (this engine's entropy carries no gradient)"
        return unsupported_reason(model)

    @classmethod
    def build(cls, model: Any, tokenizer: Any, cfg: RunConfig, *, sampler_logprobs: bool = False) -> CpuFastEngine:
        """The engine for a run (`grpo.engines.make_engine`)."""
        return cls(model, tokenizer, cfg.generation)

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        gen: GenerationConfig,
        *,
        stop_ids: list[int] | None = None,
        sampler: str | None = None,
    ) -> None:
        super().__init__(model, tokenizer, gen, stop_ids=stop_ids)
        self.sampler = sampler or gen.sampler
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler is {self.sampler!r}; use one of {SAMPLERS}")
        self.fast: FastQwen2 | None = FastQwen2(model)

    def sync(self, model: Any) -> None:
        """Merge the current adapter into the generation weights."""
        self.model = model
        self._fast().sync(model)

    def close(self) -> None:
        """Drop the merged generation weights (the model's own stay with the caller)."""
        self.fast = None

    def _fast(self) -> FastQwen2:
        if self.fast is None:
            raise RuntimeError("this cpu_fast engine is closed; build a new one")
        return self.fast

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
        """Per-token log-probs (N, T); `qwen2.completion_logprobs_fast` (its entropy carries no
        gradient: an entropy bonus takes the hf engine)."""
        return completion_logprobs_fast(
            self._fast(), prompt_ids, prompt_mask, completion_ids, completion_mask, temperature,
            use_adapter=adapter, micro_batch_size=micro_batch_size, with_entropy=with_entropy,
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
        if not prompts:
            raise ValueError("generate needs at least one prompt, num_samples >= 1, max_new_tokens >= 1")
        fast = self._fast()
        max_new = self.gen.max_new_tokens if max_new_tokens is None else max_new_tokens
        dev = fast.device
        uniq, inverse = unique_prompts(prompts)
        u_ids, u_mask = tokenize_prompts(self.tokenizer, uniq)  # (U, P), (U, P)
        u_ids, u_mask = u_ids.to(dev), u_mask.to(dev)
        rows = torch.tensor(inverse, device=dev).repeat_interleave(num_samples)  # (N,)
        ids, lengths, finished = fast.generate(
            u_ids, u_mask, num_samples, max_new_tokens=max_new, min_new_tokens=min_new_tokens,
            temperature=self.gen.temperature, top_k=self.gen.top_k, top_p=self.gen.top_p,
            stop_ids=self.stop_ids, pad_id=self.pad_id, greedy=greedy, generator=generator, rows=rows,
            sampler=self.sampler,
        )  # (N, T), (N,), (N,)
        return finish_rollout(
            self.tokenizer, u_ids.index_select(0, rows), u_mask.index_select(0, rows), ids, lengths, finished
        )
