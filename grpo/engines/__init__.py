"""The policy's runtime behind one seam: what a GRPO step, an evaluation and a promotion need from it.

    from grpo.engines import make_engine
    engine = make_engine(model, tokenizer, cfg)          # logs one line: which engine, and why
    rollout = engine.generate(prompts, num_samples=cfg.train.group_size, generator=gen)
    engine.sleep()                                        # free device memory for the update
    logp = engine.logprobs(rollout.prompt_ids, rollout.prompt_mask,
                           rollout.completion_ids, rollout.completion_mask)   # (N, T)
    ...; optimizer.step(); engine.sync(model)             # the next rollout samples the update
    engine.close()

The protocol is `grpo.engines.base.Engine`. Implementations, by name (`ENGINES`):
- `hf`: transformers + peft, any device (`grpo.engines.hf`);
- `cpu_fast`: the CPU speed plug-in for Qwen2 + LoRA (`grpo.engines.cpu_fast`; deletable with its
  line below);
- `vllm`: a colocated vLLM engine, one per process (`grpo.engines.vllm`).

`generation.backend=vllm` takes `vllm`; otherwise `cpu_fast` when it is registered and takes the
model here (`generation.fast_path`: None = on the CPU only), else `hf`.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import TYPE_CHECKING, Any

from grpo.engines.base import Engine, Rollout, keep_freed_memory

if TYPE_CHECKING:
    from grpo.config import RunConfig

__all__ = ["ENGINES", "Engine", "Rollout", "choose_engine", "close_engines", "keep_freed_memory", "make_engine"]

log = logging.getLogger(__name__)

ENGINES: dict[str, str] = {
    "hf": "grpo.engines.hf:HFEngine",
    "cpu_fast": "grpo.engines.cpu_fast:CpuFastEngine",
    "vllm": "grpo.engines.vllm:VLLMEngine",
}
"""Engine name -> "module:Class". A class has `build(model, tokenizer, cfg, *, sampler_logprobs)`
and, when it may be declined, `unavailable(model, cfg) -> reason | None`."""


def engine_class(name: str) -> Any:
    """The class registered under `name`."""
    module, _, cls = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def choose_engine(model: Any, cfg: RunConfig) -> tuple[str, str]:
    """(engine name, why) for `model` under `cfg`: `vllm` when asked for, else `cpu_fast` when it
    is registered and takes the model, else `hf` with the reason `cpu_fast` was not taken."""
    if cfg.generation.backend == "vllm":
        return "vllm", "generation.backend=vllm"
    if "cpu_fast" not in ENGINES:
        return "hf", "cpu_fast is not installed"
    reason = engine_class("cpu_fast").unavailable(model, cfg)
    if reason is None:
        device = next(model.parameters()).device.type
        return "cpu_fast", f"{device}, a Qwen2 it covers"
    return "hf", f"cpu_fast not taken: {reason}"


def make_engine(model: Any, tokenizer: Any, cfg: RunConfig, *, sampler_logprobs: bool = False) -> Engine:
    """The engine `choose_engine` picks, built for `model`; one INFO line says which and why.
    `sampler_logprobs`: ask the sampler for its own log-probs (vLLM; for the correction)."""
    name, why = choose_engine(model, cfg)
    log.info("engine: %s (%s)", name, why)
    return engine_class(name).build(model, tokenizer, cfg, sampler_logprobs=sampler_logprobs)


def close_engines() -> None:
    """Shut down what outlives one engine object: the process's vLLM engine, if one was built
    (also done at interpreter exit)."""
    vllm_engines = sys.modules.get("grpo.engines.vllm")
    if vllm_engines is not None:
        vllm_engines.SHARED.close()
