"""What every engine shares: the `Engine` protocol, the `Rollout` it returns, prompt tokenization,
the token draw, and the CPU process's memory setting.

Legend: B prompts, G samples per prompt, N = B*G rows, U unique prompts, P prompt tokens,
T completion tokens, V vocabulary.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

from grpo.config import GenerationConfig


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

    def select(self, rows: Tensor) -> Rollout:
        """The rollout of `rows` (n,) only, in that order."""
        rows = rows.to(self.completion_ids.device)
        logp = self.sampler_logp
        return Rollout(
            prompt_ids=self.prompt_ids[rows],  # (n, P)
            prompt_mask=self.prompt_mask[rows],  # (n, P)
            completion_ids=self.completion_ids[rows],  # (n, T)
            completion_mask=self.completion_mask[rows],  # (n, T)
            texts=[self.texts[i] for i in rows.tolist()],
            truncated=self.truncated[rows],  # (n,)
            sampler_logp=logp[rows] if logp is not None else None,  # (n, T)
        )

    @staticmethod
    def concat(parts: list[Rollout], pad_id: int) -> Rollout:
        """Several rollouts as one, rows in order: prompts left-padded and completions right-padded
        to the longest of them (masks 0 on the padding)."""
        if len(parts) == 1:
            return parts[0]
        p_len = max(r.prompt_ids.shape[1] for r in parts)
        t_len = max(r.completion_ids.shape[1] for r in parts)

        def left(x: Tensor, value: int) -> Tensor:  # (n, p) -> (n, P)
            return torch.nn.functional.pad(x, (p_len - x.shape[1], 0), value=value)

        def right(x: Tensor, value: float) -> Tensor:  # (n, t) -> (n, T)
            return torch.nn.functional.pad(x, (0, t_len - x.shape[1]), value=value)

        logps = [r.sampler_logp for r in parts]
        return Rollout(
            prompt_ids=torch.cat([left(r.prompt_ids, pad_id) for r in parts]),  # (N, P)
            prompt_mask=torch.cat([left(r.prompt_mask, 0) for r in parts]),  # (N, P)
            completion_ids=torch.cat([right(r.completion_ids, pad_id) for r in parts]),  # (N, T)
            completion_mask=torch.cat([right(r.completion_mask, 0) for r in parts]),  # (N, T)
            texts=[t for r in parts for t in r.texts],
            truncated=torch.cat([r.truncated for r in parts]),  # (N,)
            sampler_logp=None if any(x is None for x in logps) else torch.cat([right(x, 0.0) for x in logps]),
        )


# --------------------------------------------------------------------------- helpers


def unique_prompts(prompts: list[str]) -> tuple[list[str], list[int]]:
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

    sampler="multinomial" is exactly `HFEngine`'s draw (torch.multinomial; on CPU it
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


def completion_texts(
    tokenizer: Any, ids: list[list[int]], lengths: list[int], stopped: list[bool]
) -> list[str]:
    """Decode each row's first `length` tokens, dropping a final stop token, skipping specials."""
    rows = [row[: n - 1] if s else row[:n] for row, n, s in zip(ids, lengths, stopped)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


@runtime_checkable
class Engine(Protocol):
    """What one GRPO step needs from the policy's runtime (`grpo.engines.make_engine` builds one).

    - `generate(prompts, num_samples, ...)`: `num_samples` completions per prompt from the current
      policy, rows grouped per prompt, as a `Rollout` (greedy, or drawn with `generator`).
    - `logprobs(prompt_ids, prompt_mask, completion_ids, completion_mask, temperature, ...)`: per-token
      log-probs (N, T) of the completions under the trained model, with the adapter (`adapter=True`)
      or without it (the reference policy); differentiable unless called under `torch.no_grad()`.
    - `sync(model)`: follow the model's weights after an optimizer step (or a loaded checkpoint).
    - `sleep()` / `wake()`: free the runtime's device memory during training and take it back.
    - `close()`: release what this engine holds (adapter folders, weight copies); idempotent.

    `name` is the registry's name; `sampler_is_trainer` says whether sampling runs the trained
    model's own forward pass (no importance-sampling correction is needed then); `gen` holds the
    sampling settings `generate` reads (a population, `grpo.pbt`, sets each member's before it
    samples).
    """

    name: ClassVar[str]
    sampler_is_trainer: ClassVar[bool]
    gen: GenerationConfig

    def generate(
        self,
        prompts: list[str],
        num_samples: int,
        *,
        greedy: bool = False,
        max_new_tokens: int | None = None,
        min_new_tokens: int = 0,
        generator: torch.Generator | None = None,
    ) -> Rollout: ...

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
    ) -> Tensor | tuple[Tensor, Tensor]: ...

    def sync(self, model: Any) -> None: ...

    def sleep(self) -> None: ...

    def wake(self) -> None: ...

    def close(self) -> None: ...


def stop_and_pad_ids(tokenizer: Any, stop_ids: list[int] | None = None) -> tuple[list[int], int]:
    """The ids that end a completion (the tokenizer's, unless given) and the padding id."""
    from grpo.models import stop_token_ids

    stops = list(stop_token_ids(tokenizer) if stop_ids is None else stop_ids)
    pad = tokenizer.pad_token_id
    return stops, int(pad if pad is not None else stops[0])


def finish_rollout(
    tokenizer: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    lengths: Tensor,
    finished: Tensor,
) -> Rollout:
    """A `Rollout` from sampled ids (N, T), each row's length (N,) and whether it stopped (N,).

    Tensors made under inference_mode cannot enter autograd (the loss needs ids and masks), so
    they are cloned out of it."""
    t_len = completion_ids.shape[1]
    completion_mask = (
        torch.arange(t_len, device=completion_ids.device)[None, :] < lengths[:, None]
    ).long()  # (N, T)
    texts = completion_texts(
        tokenizer, completion_ids.tolist(), lengths.clamp(max=t_len).tolist(), finished.tolist()
    )
    return Rollout(
        prompt_ids=prompt_ids.clone(),
        prompt_mask=prompt_mask.clone(),
        completion_ids=completion_ids.clone(),
        completion_mask=completion_mask,
        texts=texts,
        truncated=~finished.clone(),
    )


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks of up to 32 MiB in the process (mallopt
    M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 2 GiB) instead of returning each to the kernel.

    Every GRPO step allocates and frees the same activation tensors (several MiB each). By
    default glibc maps each one afresh and unmaps it on free, so the next step page-faults all of
    it in again: about a fifth of a small-model step on this project's CPUs. Process-wide and
    idempotent, like `MALLOC_MMAP_THRESHOLD_`/`MALLOC_TRIM_THRESHOLD_` in the environment; peak
    memory is unchanged (freed blocks are reused, not added). Returns False where there is no
    glibc (macOS, Windows, musl): nothing is changed there.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return libc.mallopt(m_mmap_threshold, 32 << 20) == 1 and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1
    except (OSError, AttributeError):
        return False
