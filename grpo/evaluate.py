"""Held-out evaluation: greedy accuracy, format rate and mean reward, plus sampled accuracy/pass@k.

    result = evaluate(model, tokenizer, test_rows, cfg)
    print(result.accuracy, result.accuracy_se, result.samples[:3])

Accuracy is the mean equation reward of the greedy completion; its standard error is the binomial
sqrt(p (1 - p) / n). With `eval.sampled_problems > 0` each of those problems also gets
`max(eval.pass_k, 1)` samples at the training temperature: sampled accuracy is the mean over all
samples, pass@k the share of problems with at least one correct sample (the unbiased estimator of
Chen et al. with n = k). `mcnemar` compares two evaluations of the same problems, paired.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from grpo.config import RunConfig
from grpo.countdown import build_prompt
from grpo.rewards import equation_reward, format_reward
from grpo.rollout import make_generator


class EvalResult(BaseModel):
    """What one evaluation measured; small enough to pass between pipeline tasks."""

    step: int = 0
    n: int
    accuracy: float
    accuracy_se: float
    format_rate: float
    mean_reward: float
    sampled_accuracy: float | None = None
    sampled_accuracy_se: float | None = None
    pass_at_k: float | None = None
    k: int | None = None
    finished_at: float = Field(0.0, description="Unix time the evaluation finished.")
    correct: list[int] = Field(default_factory=list, description="Greedy 0/1 per problem, in order.")
    samples: list[dict[str, Any]] = Field(default_factory=list, description="A few completions.")

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """Flat metrics for MLflow (None values left out)."""
        keys = ["accuracy", "accuracy_se", "format_rate", "mean_reward",
                "sampled_accuracy", "sampled_accuracy_se", "pass_at_k"]
        return {prefix + k: float(getattr(self, k)) for k in keys if getattr(self, k) is not None}


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else 0.0


def mcnemar(before: list[int], after: list[int]) -> dict[str, float]:
    """Paired comparison of two 0/1 vectors on the same problems: z > 2 calls the gain real."""
    if len(before) != len(after):
        raise ValueError(f"paired vectors differ in length: {len(before)} vs {len(after)}")
    gained = sum(1 for a, b in zip(before, after) if not a and b)
    lost = sum(1 for a, b in zip(before, after) if a and not b)
    z = (gained - lost) / math.sqrt(gained + lost) if gained + lost else 0.0
    return {"gained": gained, "lost": lost, "z": z}


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Any,
    cfg: RunConfig,
    *,
    generator: Any = None,
    step: int = 0,
    progress: bool = True,
) -> EvalResult:
    """Evaluate `model` on the first `eval.num_problems` rows of `rows` (a held-out split)."""
    e = cfg.eval
    rows = rows.select(range(min(e.num_problems, len(rows))))
    generator = generator or make_generator(model, tokenizer, cfg.generation, cfg.model)
    conv = cfg.data.conversation
    nums, targets = list(rows["nums"]), list(rows["target"])
    prompts = [build_prompt(tokenizer, n, t, conv) for n, t in zip(nums, targets)]
    was_training = model.training
    model.eval()

    texts: list[str] = []
    for start in tqdm(range(0, len(prompts), e.batch_size), desc="eval", unit="batch", disable=not progress):
        out = generator.generate(prompts[start : start + e.batch_size], 1, greedy=True)
        texts.extend(out.texts)
    fmt = format_reward(texts)
    eq = equation_reward(texts, target=targets, nums=nums)
    n = len(texts)
    acc = sum(eq) / n
    result = EvalResult(
        step=step,
        n=n,
        accuracy=acc,
        accuracy_se=binomial_se(acc, n),
        format_rate=sum(fmt) / n,
        mean_reward=(sum(fmt) + sum(eq)) / n,
        correct=[int(x) for x in eq],
        samples=[
            {"nums": list(map(int, nums[i])), "target": int(targets[i]), "completion": texts[i],
             "format": fmt[i], "equation": eq[i]}
            for i in range(min(e.samples_logged, n))
        ],
    )
    if e.sampled_problems:
        device = next(model.parameters()).device
        _add_sampled(result, generator, prompts, nums, targets, cfg, step, device)
    if was_training:
        model.train()
    result.finished_at = time.time()
    return result


def _add_sampled(
    result: EvalResult, generator: Any, prompts: list[str], nums: list, targets: list,
    cfg: RunConfig, step: int, device: torch.device,
) -> None:
    """Sampled accuracy and pass@k at the training temperature, seeded by the step."""
    e = cfg.eval
    k = max(e.pass_k, 1)
    m = min(e.sampled_problems, len(prompts))
    per_call = max(1, e.batch_size // k)
    gen = torch.Generator(device=device).manual_seed(10_007 + step)
    hits: list[list[float]] = []
    for start in range(0, m, per_call):
        stop = min(start + per_call, m)
        out = generator.generate(prompts[start:stop], k, generator=gen)
        rep_t = [t for t in targets[start:stop] for _ in range(k)]
        rep_n = [x for x in nums[start:stop] for _ in range(k)]
        eq = equation_reward(out.texts, target=rep_t, nums=rep_n)
        hits.extend(eq[i * k : (i + 1) * k] for i in range(stop - start))
    flat = [h for row in hits for h in row]
    result.sampled_accuracy = sum(flat) / len(flat)
    result.sampled_accuracy_se = binomial_se(result.sampled_accuracy, len(flat))
    if e.pass_k:
        result.pass_at_k = sum(1.0 for row in hits if any(row)) / len(hits)
        result.k = k

