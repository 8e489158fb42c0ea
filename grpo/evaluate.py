"""Held-out evaluation: greedy accuracy, format rate and the configured rewards, plus sampled
accuracy/pass@k, for any environment.

    result = evaluate(model, tokenizer, test_rows, cfg)
    print(result.accuracy, result.accuracy_se, result.rewards, result.samples[:3])

Accuracy is the environment's answer check (`Env.correct`) on the greedy completion; its standard
error is the binomial sqrt(p (1 - p) / n). `mean_reward` is the mean weighted sum of the rewards
`train.rewards` names (each one's mean in `rewards`), as training scores them.

With `eval.sampled_problems > 0` each of those problems also gets `max(eval.pass_k, 1)` samples
at the training temperature: sampled accuracy is the mean over all samples, pass@k the share of
problems with at least one correct sample (the unbiased estimator of Chen et al. with n = k).
`mcnemar` compares two evaluations of the same problems, paired.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from grpo.config import RunConfig
from grpo.engines import Engine, Rollout, make_engine
from grpo.envs import Env, env_for
from grpo.rewards import RewardFn, format_reward, get_rewards, score


class EvalResult(BaseModel):
    """What one evaluation measured; small enough to pass between pipeline tasks."""

    step: int = 0
    n: int
    accuracy: float
    accuracy_se: float
    format_rate: float
    mean_reward: float
    rewards: dict[str, float] = Field(default_factory=dict, description="Mean of each configured reward.")
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
        out = {prefix + k: float(getattr(self, k)) for k in keys if getattr(self, k) is not None}
        return {**out, **{f"{prefix}reward/{name}": v for name, v in self.rewards.items()}}


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


def _columns(rows: Any) -> dict[str, list[Any]]:
    return {c: list(rows[c]) for c in rows.column_names}


def _completion_ids(out: Rollout) -> list[list[int]]:
    """Each completion's token ids (what rewards get as `completion_ids`, as in training)."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(out.completion_ids, out.completion_mask)]


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Any,
    cfg: RunConfig,
    *,
    engine: Engine | None = None,
    env: Env | None = None,
    reward_fns: list[tuple[str, RewardFn]] | None = None,
    step: int = 0,
    progress: bool = True,
) -> EvalResult:
    """Evaluate `model` on the first `eval.num_problems` rows of `rows` (a held-out split)."""
    e = cfg.eval
    env = env or env_for(cfg)
    reward_fns = reward_fns or get_rewards(cfg.train.rewards or env.default_rewards, env, cfg)
    rows = rows.select(range(min(e.num_problems, len(rows))))
    own = engine is None
    engine = engine or make_engine(model, tokenizer, cfg)
    try:
        result = _evaluate(engine, model, tokenizer, rows, cfg, env, reward_fns, step, progress)
    finally:
        if own:
            engine.close()
    result.finished_at = time.time()
    return result


def _evaluate(
    engine: Engine, model: Any, tokenizer: Any, rows: Any, cfg: RunConfig, env: Env,
    reward_fns: list[tuple[str, RewardFn]], step: int, progress: bool,
) -> EvalResult:
    """`evaluate` with its engine built: greedy pass, rewards, then the sampled pass."""
    e = cfg.eval
    prompts = env.prompts(tokenizer, cfg.data.conversation, rows)
    columns = _columns(rows)
    was_training = model.training
    model.eval()

    texts: list[str] = []
    ids: list[list[int]] = []
    for start in tqdm(range(0, len(prompts), e.batch_size), desc="eval", unit="batch", disable=not progress):
        out = engine.generate(prompts[start : start + e.batch_size], 1, greedy=True)
        texts.extend(out.texts)
        ids.extend(_completion_ids(out))
    right = env.correct(texts, **columns)
    fmt = format_reward(texts)
    scores = score(texts, {**columns, "completion_ids": ids}, reward_fns, cfg.train.reward_weights)
    n = len(texts)
    acc = sum(right) / n
    result = EvalResult(
        step=step,
        n=n,
        accuracy=acc,
        accuracy_se=binomial_se(acc, n),
        format_rate=sum(fmt) / n,
        mean_reward=scores.total.mean().item(),
        rewards={k: v for k, v in scores.metrics(prefix="").items() if not k.endswith("/errors")},
        correct=[int(x) for x in right],
        samples=[
            {**env.describe(rows[i]), "completion": texts[i], "format": fmt[i], "correct": right[i]}
            for i in range(min(e.samples_logged, n))
        ],
    )
    if e.sampled_problems:
        device = next(model.parameters()).device
        _add_sampled(result, engine, prompts, columns, env, cfg, step, device)
    if was_training:
        model.train()
    return result


def _add_sampled(
    result: EvalResult, engine: Engine, prompts: list[str], columns: dict[str, list[Any]], env: Env,
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
        out = engine.generate(prompts[start:stop], k, generator=gen)
        repeated = {c: [v for v in values[start:stop] for _ in range(k)] for c, values in columns.items()}
        right = env.correct(out.texts, **repeated)
        hits.extend(right[i * k : (i + 1) * k] for i in range(stop - start))
    flat = [h for row in hits for h in row]
    result.sampled_accuracy = sum(flat) / len(flat)
    result.sampled_accuracy_se = binomial_se(result.sampled_accuracy, len(flat))
    if e.pass_k:
        result.pass_at_k = sum(1.0 for row in hits if any(row)) / len(hits)
        result.k = k
