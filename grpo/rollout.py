"""Sample G completions per prompt from the current policy: transformers (CPU/GPU) or vLLM (GPU).

    from grpo.rollout import make_generator
    gen = make_generator(model, tokenizer, cfg.generation, cfg.model)
    rollout = gen.generate(prompts, num_samples=cfg.train.group_size)   # rows grouped per prompt

`TransformersGenerator` is a lean KV-cached sampling loop (not `model.generate`): each unique
prompt is prefilled once, its cache is repeated for its G samples, then one token per step is
decoded for all N rows with left-padding-aware position ids. It samples from the model as given,
so a `PeftModel` samples with its adapter active. `VLLMGenerator` drives a colocated vLLM engine
with LoRA: after every update the adapter is saved to a fresh folder and handed to vLLM under a
new LoRA id; the engine sleeps during training. As in the reference recipe (and unlike the
paper's separate inference workers), generation and training share one device.

Legend: B prompts, G samples per prompt, N = B*G rows, U unique prompts, P prompt tokens,
T completion tokens, V vocabulary.
"""

from __future__ import annotations

import atexit
import gc
import inspect
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grpo.config import GenerationConfig, ModelConfig
from grpo.errors import UserError
from grpo.models import ensure_base_model, stop_token_ids

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    """A batch of sampled completions; rows i*G .. i*G+G-1 belong to prompt i.

    Tensors live on the model's device; masks are int64 (1 = real token).
    """

    prompt_ids: torch.Tensor  # (N, P) left-padded with the pad id
    prompt_mask: torch.Tensor  # (N, P)
    completion_ids: torch.Tensor  # (N, T) right-padded with the pad id
    completion_mask: torch.Tensor  # (N, T) 1 up to and including the first stop token
    texts: list[str]  # decoded completions, special tokens skipped, stop token excluded
    truncated: torch.Tensor  # (N,) bool: no stop token within max_new_tokens
    sampler_logp: torch.Tensor | None = None  # (N, T) float32: the sampler's log-probs (vLLM), 0 on padding

    @property
    def num_sequences(self) -> int:
        return int(self.completion_ids.shape[0])


# --------------------------------------------------------------------------- helpers


def _unique(prompts: list[str]) -> tuple[list[str], list[int]]:
    """Unique prompts in first-seen order and, per prompt, its index among them."""
    index: dict[str, int] = {}
    inverse = [index.setdefault(p, len(index)) for p in prompts]
    return list(index), inverse


def tokenize_prompts(tokenizer: Any, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask of already-templated prompts (no extra special tokens)."""
    enc = tokenizer(
        prompts, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt"
    )
    return enc["input_ids"], enc["attention_mask"]  # (U, P), (U, P)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then nucleus filtering: dropped tokens get -inf. 0 / 1.0 switch a filter off."""
    v = logits.shape[-1]
    if 0 < top_k < v:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))  # (N, V)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (N, V)
        probs = sorted_logits.softmax(dim=-1)  # (N, V)
        mass_before = probs.cumsum(dim=-1) - probs  # (N, V) mass of strictly more likely tokens
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))  # (N, V)
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)  # (N, V)
    return logits


SAMPLERS = ("multinomial", "inverse_cdf")


def pick_tokens(
    logits: torch.Tensor,
    greedy: bool,
    generator: torch.Generator | None,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    sampler: str = "multinomial",
) -> torch.Tensor:
    """Next token per row: argmax, or a draw from softmax(logits / temperature) after top-k and
    top-p (`filter_logits`).

    sampler="multinomial" is exactly `TransformersGenerator._pick` (torch.multinomial; on CPU it
    draws V exponentials per row). sampler="inverse_cdf" draws the same categorical distribution
    from ONE uniform per row (searchsorted in the float64 cumulative distribution): ~15x cheaper
    per step on CPU, but a different random stream, so its tokens differ from the plain path's.
    """
    if greedy:
        return logits.argmax(dim=-1)  # (N,)
    if temperature != 1.0:  # x / 1.0 == x: skipping the division changes no bit
        logits = logits / temperature  # (N, V)
    logits = filter_logits(logits, top_k, top_p)  # (N, V)
    probs = logits.softmax(dim=-1)  # (N, V)
    if sampler == "inverse_cdf":
        cdf = probs.double().cumsum_(dim=-1)  # (N, V) nondecreasing; flat over dropped tokens
        gen_dev = generator.device if generator is not None else probs.device
        u = torch.rand(probs.shape[0], 1, dtype=torch.float64, generator=generator, device=gen_dev)  # (N, 1)
        total = cdf[:, -1:]  # (N, 1)
        # u * total < total, so the first index whose cdf exceeds it is a token of positive mass.
        below = torch.nextafter(total, torch.zeros_like(total))  # (N, 1) largest float < total
        value = torch.minimum(u.to(probs.device) * total, below)  # (N, 1)
        return torch.searchsorted(cdf, value, right=True)[:, 0]  # (N,)
    if sampler != "multinomial":
        raise ValueError(f"sampler is {sampler!r}; use one of {SAMPLERS}")
    if generator is not None and generator.device != probs.device:
        picked = torch.multinomial(probs.to(generator.device), 1, generator=generator)  # (N, 1)
        return picked[:, 0].to(probs.device)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]  # (N,)


def _completion_texts(
    tokenizer: Any, ids: list[list[int]], lengths: list[int], stopped: list[bool]
) -> list[str]:
    """Decode each row's first `length` tokens, dropping a final stop token, skipping specials."""
    rows = [row[: n - 1] if s else row[:n] for row, n, s in zip(ids, lengths, stopped)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def _cache_kwarg(model: Any) -> str:
    """Name of the KV-cache argument of `model.forward` (`cache` in transformers 5.x)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


# --------------------------------------------------------------------------- transformers


class TransformersGenerator:
    """KV-cached sampling with the training model itself (any device; no weight sync needed)."""

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
        self.stop_ids = list(stop_token_ids(tokenizer) if stop_ids is None else stop_ids)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.stop_ids[0])

    def sync_weights(self, model: Any) -> None:
        """Nothing to copy: this backend samples from `model` itself."""
        self.model = model

    def sleep(self) -> None:
        """No-op (vLLM frees its memory here)."""

    def wake(self) -> None:
        """No-op."""

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
            r = self._generate(
                prompts, num_samples, greedy=greedy,
                max_new_tokens=self.gen.max_new_tokens if max_new_tokens is None else max_new_tokens,
                min_new_tokens=min_new_tokens, generator=generator,
            )
        finally:
            if was_training:
                self.model.train()
        # Tensors made under inference_mode cannot enter autograd (the loss needs ids and masks):
        # clone them out of it.
        return Rollout(
            prompt_ids=r.prompt_ids.clone(),
            prompt_mask=r.prompt_mask.clone(),
            completion_ids=r.completion_ids.clone(),
            completion_mask=r.completion_mask.clone(),
            texts=r.texts,
            truncated=r.truncated.clone(),
        )

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
    ) -> Rollout:
        from peft import PeftModel
        from transformers import DynamicCache

        if not prompts or g < 1 or max_new_tokens < 1:
            raise ValueError("generate needs at least one prompt, num_samples >= 1, max_new_tokens >= 1")
        model = self.model
        # The adapter layers live inside the base module tree, so calling the base applies them.
        net = model.get_base_model() if isinstance(model, PeftModel) else model
        device = next(net.parameters()).device
        min_new_tokens = min(min_new_tokens, max_new_tokens)

        uniq, inverse = _unique(prompts)
        u_ids, u_mask = tokenize_prompts(self.tokenizer, uniq)  # (U, P), (U, P)
        u_ids, u_mask = u_ids.to(device), u_mask.to(device)
        rows = torch.tensor(inverse, device=device).repeat_interleave(g)  # (N,) unique prompt per row
        prompt_ids = u_ids.index_select(0, rows)  # (N, P)
        prompt_mask = u_mask.index_select(0, rows)  # (N, P)
        n = prompt_ids.shape[0]

        # Prefill each unique prompt once; only the last position's logits are computed.
        u_pos = (u_mask.cumsum(-1) - 1).clamp(min=0)  # (U, P)
        cache = DynamicCache(config=net.config)
        cache_kw = _cache_kwarg(net)
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
        t_len = completion_ids.shape[1]
        completion_mask = (
            torch.arange(t_len, device=device)[None, :] < lengths[:, None]
        ).long()  # (N, T)
        texts = _completion_texts(
            self.tokenizer, completion_ids.tolist(), lengths.clamp(max=t_len).tolist(), finished.tolist()
        )
        return Rollout(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            texts=texts,
            truncated=~finished,
        )

    def _pick(self, logits: torch.Tensor, greedy: bool, generator: torch.Generator | None) -> torch.Tensor:
        """Next token per row: argmax, or a sample after temperature, top-k and top-p."""
        g = self.gen
        return pick_tokens(logits, greedy, generator, g.temperature, g.top_k, g.top_p, g.sampler)  # (N,)


# --------------------------------------------------------------------------- vLLM

VLLM_MISSING = "generation.backend=vllm needs the vllm extra: pip install 'grpo-pipeline[vllm]' (GPU only)"
_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


class EngineCache:
    """The process's one vLLM engine, shared by every `VLLMGenerator` (training rounds,
    evaluations, promotion): building an engine costs tens of seconds and, in-process, vLLM's
    sleep-mode allocator allows one per process. A request for different engine settings shuts
    the current engine down first. LoRA ids are counted per engine, so that adapters synced by
    different generators never share an id (vLLM caches adapters by id)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self.engine: Any = None
        self._lora_id = 0
        self.sleeping = False
        """Whether the engine sleeps (the engine's state, shared by every generator that uses it)."""

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


ENGINES = EngineCache()
"""The process's vLLM engine (see `EngineCache`); `close_engines()` at the end of a process."""


def close_engines() -> None:
    """Shut down the process's vLLM engine, if any (also run at interpreter exit)."""
    ENGINES.close()


atexit.register(close_engines)


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


class VLLMGenerator:
    """A colocated vLLM engine that samples with the current LoRA adapter.

    `engine_factory`, `sampling_params_cls` and `lora_request_cls` default to `vllm.LLM`,
    `vllm.SamplingParams` and `vllm.lora.request.LoRARequest`; tests pass fakes. The engine is the
    process's shared one (`ENGINES`). Call `sync_weights(model)` after every optimizer step and
    `sleep()` after sampling (the trainer does both); `generate` wakes the engine (no-ops unless
    `generation.vllm.sleep_mode`). Each prompt gets its own seed, so that the j-th samples of
    different prompts (vLLM seeds child j with seed + j) do not share a random stream.
    """

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
        engines: EngineCache = ENGINES,
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
        self.stop_ids = stop_token_ids(tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.stop_ids[0])
        self.sleep_mode = gen.vllm.sleep_mode
        self.sampler_logprobs = sampler_logprobs
        self._own_root = adapter_root is None
        self.adapter_root = Path(adapter_root or tempfile.mkdtemp(prefix="grpo-vllm-lora-"))
        self.adapter_root.mkdir(parents=True, exist_ok=True)
        self.lora_request: Any = None
        self._folder: Path | None = None
        self.engines = engines

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
        self.llm = engines.get(engine_factory, kwargs)
        self.sync_weights(model)

    @property
    def sleeping(self) -> bool:
        """Whether the shared engine sleeps (another generator may have put it to sleep)."""
        return self.engines.sleeping

    def sync_weights(self, model: Any) -> None:
        """Save the adapter to a fresh folder and point a new LoRA id at it (vLLM caches by id;
        ids are unique per engine, across generators)."""
        lora_id = self.engines.next_lora_id()
        folder = self.adapter_root / f"adapter-{lora_id:06d}"
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
        """Delete this generator's adapter folders; the shared engine stays for the next user
        (`close_engines()` shuts it down)."""
        self.llm = None
        if self._own_root:
            shutil.rmtree(self.adapter_root, ignore_errors=True)
        elif self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)

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
        uniq, inverse = _unique(prompts)
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
        texts = _completion_texts(self.tokenizer, completions, [len(c) for c in completions], stopped)
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


def _lora_rank(model: Any) -> int:
    """The rank of the model's active LoRA adapter (16 when it carries none)."""
    configs = getattr(model, "peft_config", None) or {}
    ranks = [int(getattr(c, "r", 0)) for c in configs.values()]
    return max(ranks, default=0) or 16


def make_generator(
    model: Any, tokenizer: Any, gen: GenerationConfig, model_cfg: ModelConfig, *, sampler_logprobs: bool = False
) -> Any:
    """The generator `gen.backend` names: `VLLMGenerator`, or for transformers the fast path
    (`grpo.fastpath.FastGenerator`) when it is allowed here (`gen.fast_path`: None = on the CPU
    only) and the model is a supported Qwen2, else `TransformersGenerator`. One INFO line says which
    and, when the fast path is not taken, why."""
    if gen.backend == "vllm":
        log.info("sampling: vLLM engine (generation.backend=vllm)")
        return VLLMGenerator(model, tokenizer, gen, model_cfg, sampler_logprobs=sampler_logprobs)
    from grpo.fastpath import FastGenerator, unsupported_reason  # fastpath imports this module

    device = next(model.parameters()).device
    if gen.fast_path is False:
        reason: str | None = "generation.fast_path=false"
    elif gen.fast_path is None and device.type != "cpu":
        reason = (f"on {device.type} it is opt-in until a GPU check has proven it (generation.fast_path=true "
                  "turns it on)")
    else:
        reason = unsupported_reason(model)
    if reason is None:
        log.info("sampling: the fast path (grpo.fastpath, %s, Qwen2 + LoRA)", device.type)
        return FastGenerator(model, tokenizer, gen)
    log.info("sampling: transformers; fast path off: %s", reason)
    return TransformersGenerator(model, tokenizer, gen)
