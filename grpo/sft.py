"""Optional supervised warm start: teach a model the output format on reference completions.

Offline on CPU there are no pretrained weights, so the tiny model first learns the format and some
of the task by supervised fine-tuning on the environment's reference completions
(`Env.reference_completion`), continued after the prefilled `<think>`; for Countdown a solver
writes them:

    93+4=97,97-68=29</think>
    <answer>(93+4)-68</answer><|im_end|>

Each reference scores 1.0 with the environment's `correct` and `"<think>" + completion` scores 1.0
with `format_reward`; rows without one are skipped. The loss covers the completion tokens only
(prompt labels are -100).

    from grpo.sft import build_examples, save_sft, train_sft
    summary = train_sft(model, tokenizer, train_rows, cfg, on_step=print)   # cfg: RunConfig
    save_sft(model, tokenizer, "runs/tiny-cpu/sft")   # a plain HF folder: GRPO's model.name_or_path

`train_sft` trains whatever requires grad: a plain (randomly initialised) model is fully fine-tuned,
a `peft.PeftModel` trains its adapter only; the caller decides. AdamW at `sft.learning_rate`, linear
warmup over `sft.warmup_steps`, then cosine decay to 0; batches of `sft.batch_size` in a seeded
order (`sft.seed`), right-padded to the longest sequence of the batch. It stops at `sft.max_steps`
or after `sft.max_minutes` of wall clock, whichever comes first; the cosine follows whichever
budget is further along, so a time budget still ends at a low learning rate. With a steps-only
budget the run is reproducible; with a time budget the number of steps (and the schedule) depend on
the machine's speed.

Departure from the reference recipe: the recipe starts GRPO from a pretrained model and has no warm
start; this stage is off there (`sft.enabled: false`) and on in the embedded tiny CPU default.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from grpo.algorithm import check_finite_update, check_finite_weights
from grpo.config import Conversation, RunConfig
from grpo.engines import keep_freed_memory
from grpo.envs import Env, env_for
from grpo.errors import DataError, TrainingDiverged

IGNORE_INDEX = -100
"""Label of tokens the loss skips (prompt and padding)."""
EOS_TOKEN = "<|im_end|>"
"""End of the assistant turn in the ChatML template; appended to every completion."""


# -------------------------------------------------------------------------------------- examples


def end_token(tokenizer: Any) -> str:
    """The token that ends a completion: `<|im_end|>` when the vocabulary has it, else eos."""
    vocab = tokenizer.get_vocab()
    return EOS_TOKEN if EOS_TOKEN in vocab else tokenizer.eos_token


def build_examples(
    rows: Any, tokenizer: Any, conversation: Conversation, env: Env | None = None
) -> list[dict[str, list[int]]]:
    """Tokenised examples `{"input_ids", "labels"}`: prompt + completion + end token.

    The prompt is `env.prompt(...)` tokenised on its own (as generation sees it), the completion
    is `env.reference_completion(row)` followed by the end token; labels are -100 on the prompt
    tokens and equal to the input ids on the completion tokens. Rows without a reference are
    skipped. `rows` is a `datasets.Dataset` (or any iterable of dicts); `env` None = Countdown.
    """
    if env is None:
        from grpo.envs import get_env

        env = get_env("countdown")
    end_id = tokenizer.convert_tokens_to_ids(end_token(tokenizer))
    prompts, completions = [], []
    for row in rows:
        reference = env.reference_completion(row)
        if reference is None:
            continue
        completions.append(reference)
        prompts.append(env.prompt(tokenizer, conversation, row))
    if not prompts:
        return []
    p_all = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    c_all = tokenizer(completions, add_special_tokens=False)["input_ids"]
    examples = []
    for p_ids, c_ids in zip(p_all, c_all):
        c_ids = list(c_ids) + [end_id]
        examples.append({"input_ids": list(p_ids) + c_ids, "labels": [IGNORE_INDEX] * len(p_ids) + c_ids})
    return examples


def collate(examples: Sequence[dict[str, list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example: (input_ids, labels), each (B, L) with L the longest P + T;
    labels are -100 on padding."""
    length = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)  # (B, L)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)  # (B, L)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(e["labels"], dtype=torch.long)
    return ids, labels


def lr_factor(step: int, warmup_steps: int, progress: float) -> float:
    """Linear warmup over `warmup_steps`, times a cosine from 1 at progress 0 to 0 at progress 1."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    return warm * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))


# -------------------------------------------------------------------------------------- training


def train_sft(
    model: torch.nn.Module,
    tokenizer: Any,
    train_rows: Any,
    cfg: RunConfig,
    *,
    on_step: Callable[[dict[str, float]], None] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Supervised warm start of `model` on the reference completions of `train_rows`.

    Trains the parameters that require grad: the adapter of a PeftModel, or a plain model's
    trainable parameters (all of them when none is trainable, as `load_base_model` freezes them).
    `on_step(metrics)` gets `step`, `sft/loss`, `sft/tokens_per_s` and `sft/lr` after every step.
    Returns a summary: steps, examples, tokens, seconds, tokens_per_s, final_loss, stopped_by.
    """
    s = cfg.sft
    env = env_for(cfg)
    examples = build_examples(train_rows, tokenizer, cfg.data.conversation, env)
    if not examples:
        raise DataError(
            f"data.source: no training row of task {env.name!r} has a reference completion; the warm "
            "start needs rows with an answer (or set sft.enabled=false)"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    if not params and not hasattr(model, "peft_config"):  # a frozen plain base: fine-tune it all
        model.requires_grad_(True)
        params = list(model.parameters())
    if not params:
        raise ValueError("the model has no trainable parameters")
    device = next(model.parameters()).device
    if device.type == "cpu":
        keep_freed_memory()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    optimizer = torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=0.0)
    budget_s = s.max_minutes * 60.0 if s.max_minutes else None
    torch.manual_seed(s.seed)  # dropout, if any

    was_training = model.training
    model.train()
    n, bs = len(examples), min(s.batch_size, len(examples))
    perm: list[int] = []
    epoch, pos = -1, n
    losses: list[float] = []
    tokens_total, step, stopped_by = 0, 0, "steps"
    bar = tqdm(total=s.max_steps, desc="SFT", unit="step", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    while step < s.max_steps:
        elapsed = time.perf_counter() - start
        if budget_s is not None and elapsed >= budget_s:
            stopped_by = "time"
            break
        t0 = time.perf_counter()
        if pos + bs > n:  # a new seeded epoch order; the short tail of the last one is dropped
            epoch += 1
            perm = np.random.default_rng([s.seed, epoch]).permutation(n).tolist()
            pos = 0
        batch = [examples[i] for i in perm[pos : pos + bs]]
        pos += bs
        ids, labels = collate(batch, pad_id)
        ids, labels = ids.to(device), labels.to(device)  # (B, L) each

        frac = step / s.max_steps if budget_s is None else max(step / s.max_steps, elapsed / budget_s)
        lr = s.learning_rate * lr_factor(step, s.warmup_steps, frac)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Right padding under a causal mask: real tokens never attend to the pads after them,
        # so no attention mask is needed (and the fast causal kernel is used).
        logits = model(input_ids=ids).logits  # (B, L, V)
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)).float(),  # (B*(L-1), V)
            labels[:, 1:].reshape(-1),  # (B*(L-1),)
            ignore_index=IGNORE_INDEX,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        try:
            check_finite_update(float(loss.detach()), grad_norm)
            optimizer.step()
            check_finite_weights(params)
        except TrainingDiverged as e:
            raise TrainingDiverged(
                f"warm start step {step + 1}: {e}; lower sft.learning_rate ({s.learning_rate:g})"
            ) from None

        step += 1
        dt = time.perf_counter() - t0
        tokens = sum(len(e["input_ids"]) for e in batch)
        tokens_total += tokens
        losses.append(loss.item())
        metrics = {"step": step, "sft/loss": losses[-1], "sft/tokens_per_s": tokens / dt, "sft/lr": lr}
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / dt:.0f}")
        if on_step:
            on_step(metrics)
    bar.close()
    seconds = time.perf_counter() - start
    if not was_training:
        model.eval()
    tail = losses[-10:]
    return {
        "steps": step,
        "examples": n,
        "tokens": tokens_total,
        "seconds": seconds,
        "tokens_per_s": tokens_total / seconds if seconds else 0.0,
        "final_loss": sum(tail) / len(tail) if tail else float("nan"),
        "stopped_by": stopped_by,
    }


# ---------------------------------------------------------------------------------------- saving


def save_sft(model: torch.nn.Module, tokenizer: Any, out_dir: str | os.PathLike) -> Path:
    """Save the warm-started model as a plain Hugging Face folder (model + tokenizer), atomically.

    A PeftModel is merged into a copy of its base first (the caller's model is left as it is), so
    the folder always loads with `AutoModelForCausalLM` and can be GRPO's `model.name_or_path`.
    The folder is written under a temporary name and renamed into place; an existing folder is
    replaced only once the new one is complete.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    plain = model
    if hasattr(model, "merge_and_unload"):  # a PeftModel
        plain = copy.deepcopy(model).merge_and_unload()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
