"""The GRPO loop: one step reads as named phases, and every step is reproducible on its own.

    trainer = GRPOTrainer(cfg, model, tokenizer, train_rows)
    trainer.train(num_steps=10, on_step=print)

One step: sample (then the engine sleeps: vLLM frees its memory) -> score -> advantages ->
old/reference log-probs -> loss + optimizer step -> sync weights to the engine (see
`GRPOTrainer.step`). Sampling and log-probs go through the policy's engine (`grpo.engines`).
With `train.dynamic_sampling` (DAPO) the sample and score phases repeat on further prompts until
B groups carry signal (`GRPOTrainer.gather`).

Resumability: the data order is a seeded permutation per epoch, read from the position of the
prompts consumed so far, and the random state at the start of step `s` is seeded from
(train.seed, s). A step therefore depends only on the adapter weights, the optimizer and scheduler
state, the step number and the data position, which is exactly what a checkpoint holds:
N steps straight and N/2 + save + load + N/2 give the same adapter.

Departures from the paper: the reference policy is the base model with the adapter disabled (no
second copy of the weights); with one update epoch the "old" log-probs are the detached current
ones, so no extra forward pass is made (the ratio is 1 and the gradient is the policy gradient).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from grpo.algorithm import combined_advantages, importance_weights, policy_update
from grpo.config import RunConfig
from grpo.distributed import average_gradients, gather_metrics
from grpo.distributed import global_max as dp_max
from grpo.engines import Engine, Rollout, keep_freed_memory, make_engine
from grpo.engines.base import stop_and_pad_ids
from grpo.envs import Env, env_for
from grpo.errors import TrainingDiverged
from grpo.rewards import RewardFn, Scores, check_reward_columns, get_rewards, score

__all__ = ["Batch", "GRPOTrainer", "make_scheduler", "score", "seed_everything", "step_seed"]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_seed(seed: int, step: int) -> int:
    """The seed of one step: distinct per (seed, step), stable across processes."""
    return (seed * 1_000_003 + step * 7_919 + 17) % 2**31


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then constant or cosine decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "cosine":
            span = max(1, total_steps - warmup_steps)
            progress = min(1.0, (step - warmup_steps) / span)
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class Batch:
    """B prompts of one step: their rendered prompts and the dataset columns rewards need."""

    indices: list[int]
    prompts: list[str]
    columns: dict[str, list[Any]] = field(default_factory=dict)

    def repeat(self, group_size: int) -> dict[str, list[Any]]:
        """Columns repeated per completion: row i*G + j belongs to prompt i."""
        return {k: [v for v in vals for _ in range(group_size)] for k, vals in self.columns.items()}


class _Clock:
    """Wall-clock seconds per named phase, summed over its uses: `with clock("generation"): ...` ->
    time/generation_s."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        key = f"time/{name}_s"
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


class GRPOTrainer:
    """GRPO on a LoRA-adapted causal LM; the policy is `model` (a peft model).

    Data parallel (`grpo.launch` under torchrun): rank `rank` of `world_size` takes prompts
    [(step * world_size + rank) * B, ... + B) of the data order, samples with seed + rank,
    averages gradients across ranks before clipping (`grad_hook`) and returns metrics averaged
    over the ranks. With world_size 1 (the default) this is the single-process trainer.
    """

    def __init__(
        self,
        cfg: RunConfig,
        model: torch.nn.Module,
        tokenizer: Any,
        train_rows: Any,
        *,
        engine: Engine | None = None,
        reward_fns: Sequence[tuple[str, RewardFn]] | None = None,
        env: Env | None = None,
        total_steps: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.cfg = cfg
        self.model = model
        if next(model.parameters()).device.type == "cpu":
            keep_freed_memory()  # activations are re-used across steps instead of re-faulted
        self.tokenizer = tokenizer
        self.rows = train_rows
        wanted = cfg.train.vllm_importance_sampling.enabled
        self.importance_sampling = cfg.generation.backend == "vllm" if wanted is None else wanted
        self.engine = engine or make_engine(model, tokenizer, cfg, sampler_logprobs=self.importance_sampling)
        self.env = env or env_for(cfg)
        names = cfg.train.rewards or self.env.default_rewards
        self.reward_fns = list(reward_fns or get_rewards(names, self.env, cfg))
        if train_rows is not None:  # None: a caller that builds its own batches (benchmarks)
            check_reward_columns(self.reward_fns, train_rows.column_names, self.env.name)
        t = cfg.train
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters; attach a LoRA adapter first")
        self.optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
        self.total_steps = total_steps or cfg.total_steps
        self.scheduler = make_scheduler(self.optimizer, t.lr_schedule, t.warmup_steps, self.total_steps)
        self.step_count = 0
        self.position = 0
        """Prompts of the data order consumed by all ranks so far (B * W per generation batch)."""
        self.sampled_indices: list[int] = []
        """Dataset rows this rank sampled for in the last step (dynamic sampling: every batch's)."""
        self.trained_indices: list[int] = []
        """Dataset rows of the groups the last step trained on (dynamic sampling: the informative ones)."""
        self._perm_epoch = -1
        self._perm: list[int] = []
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        self.rank, self.world_size = rank, world_size
        self.grad_hook: Callable[[list[torch.Tensor]], None] | None = (
            average_gradients if world_size > 1 else None
        )
        if t.gradient_checkpointing:  # the frozen base needs grad-requiring inputs for the recompute
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()

    # -- state -------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Counters a checkpoint stores next to the adapter, optimizer and scheduler."""
        return {"step": self.step_count, "data_position": self.position}

    def load_state(self, state: dict[str, Any]) -> None:
        """Take the counters of a loaded checkpoint; the engine re-syncs the loaded adapter."""
        self.step_count = int(state["step"])
        b = self.cfg.train.prompts_per_step
        self.position = int(state.get("data_position", self.step_count * b * self.world_size))
        self.engine.sync(self.model)

    # -- phases ------------------------------------------------------------------------------

    def next_batch(self, k: int = 0) -> Batch:
        """B rows in a seeded per-epoch order: this rank's share of the step's k-th generation
        batch (k > 0: dynamic sampling's refills), from the prompts consumed so far (`position`)."""
        b, n = self.cfg.train.prompts_per_step, len(self.rows)
        indices = []
        first = self.position + (k * self.world_size + self.rank) * b
        for pos in range(first, first + b):
            epoch, i = divmod(pos, n)
            if epoch != self._perm_epoch:
                self._perm = np.random.default_rng([self.cfg.train.seed, epoch]).permutation(n).tolist()
                self._perm_epoch = epoch
            indices.append(self._perm[i])
        rows = self.rows.select(indices)
        prompts = self.env.prompts(self.tokenizer, self.cfg.data.conversation, rows)
        columns = {c: list(rows[c]) for c in rows.column_names}
        return Batch(indices, prompts, columns)

    def sample(self, batch: Batch, seed: int) -> Rollout:
        gen = torch.Generator(device=self.device).manual_seed(seed)
        self.model.eval()  # no LoRA dropout while sampling
        return self.engine.generate(
            batch.prompts, self.cfg.train.group_size, generator=gen,
            min_new_tokens=self.cfg.generation.min_new_tokens,
        )

    def score(self, batch: Batch, rollout: Rollout) -> Scores:
        """Every reward on every completion (the batch's columns repeated per completion, plus the
        completion token ids)."""
        columns = batch.repeat(self.cfg.train.group_size)
        columns["completion_ids"] = [
            ids[mask.bool()].tolist() for ids, mask in zip(rollout.completion_ids, rollout.completion_mask)
        ]
        return score(rollout.texts, columns, self.reward_fns, self.cfg.train.reward_weights)

    def informative(self, scores: Scores) -> torch.Tensor:
        """(B,) bool: groups whose advantages are not all zero, i.e. whose total reward varies (with
        normalize_then_sum: any one reward varies)."""
        g = self.cfg.train.group_size
        values = scores.total[:, None]  # (N, 1)
        if self.cfg.train.reward_aggregation == "normalize_then_sum":
            values = scores.matrix().nan_to_num(nan=0.0)  # (N, K)
        grouped = values.view(-1, g, values.shape[1])  # (B, G, K)
        return (grouped.std(dim=1) > 1e-6).any(dim=1)  # (B,)

    def gather(self, seed: int, clock: _Clock) -> tuple[Rollout, Scores, Rollout, Scores, dict[str, float]]:
        """Sample and score the step's B prompts -> (trained rollout, its scores, every sampled
        rollout, their scores, dynamic-sampling metrics). With `train.dynamic_sampling` (DAPO),
        groups whose rewards all agree are dropped and further batches of B prompts are sampled
        until B informative groups are kept or `max_generation_batches` is reached (then the step
        trains on what there is; on the first batch when none is informative)."""
        t, g = self.cfg.train, self.cfg.train.group_size
        ds = t.dynamic_sampling
        rollouts: list[Rollout] = []
        scored: list[Scores] = []
        kept: list[int] = []  # informative groups, numbered across the batches
        indices: list[int] = []
        for k in range(ds.max_generation_batches if ds.enabled else 1):
            with clock("generation"):
                batch = self.next_batch(k)
                rollouts.append(self.sample(batch, seed + k * 104_729))  # N = B*G rows per batch
            with clock("score"):
                scored.append(self.score(batch, rollouts[-1]))
            indices += batch.indices
            if not ds.enabled:
                break
            kept += [k * len(batch.indices) + i for i in self.informative(scored[-1]).nonzero().flatten().tolist()]
            if len(kept) >= t.prompts_per_step:
                break
        self.engine.sleep()  # vLLM frees its memory for the passes below; generate wakes it
        self.sampled_indices = indices
        batches = len(rollouts)
        used = dp_max(batches) if ds.enabled and self.world_size > 1 else batches  # the same on every rank
        self.position += self.world_size * t.prompts_per_step * used
        sampled, sampled_scores = Rollout.concat(rollouts, stop_and_pad_ids(self.tokenizer)[1]), Scores.concat(scored)
        if not ds.enabled:
            self.trained_indices = indices
            return sampled, sampled_scores, sampled, sampled_scores, {}
        groups = kept[: t.prompts_per_step] or list(range(len(rollouts[0].texts) // g))
        rows = torch.tensor([q * g + j for q in groups for j in range(g)])  # (n,) rows of the kept groups
        self.trained_indices = [indices[q] for q in groups]
        metrics = {
            "dynamic/generation_batches": float(batches),
            "dynamic/prompts_sampled": float(len(indices)),
            "dynamic/groups_dropped": float(len(indices) - len(kept)),
            "dynamic/groups_trained": float(len(groups)),
        }
        return sampled.select(rows), sampled_scores.select(rows.tolist()), sampled, sampled_scores, metrics

    def advantages(self, scores: Scores) -> torch.Tensor:
        """(N,) advantages of the scored completions (`train.reward_aggregation`)."""
        t = self.cfg.train
        weights = torch.tensor(t.reward_weights or [1.0] * len(scores.per_fn))  # (K,)
        return combined_advantages(
            scores.matrix(), weights, t.group_size, scale=t.advantage_scale, aggregation=t.reward_aggregation
        )  # (N,)

    def logprobs(self, rollout: Rollout, *, adapter: bool = True) -> torch.Tensor:
        """Per-token log-probs (N, T) of the rollout's completions, with or without the adapter,
        by the engine."""
        return self.engine.logprobs(
            rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask,
            self.cfg.generation.temperature, self.cfg.train.micro_batch_size, adapter=adapter,
        )  # (N, T)

    @torch.no_grad()
    def old_and_reference_logprobs(
        self, rollout: Rollout
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Old log-probs only for several update epochs; reference only when beta > 0."""
        old = ref = None
        if self.cfg.train.num_iterations > 1:
            self.model.train()  # the same dropout regime as the update
            old = self.logprobs(rollout)  # (N, T)
        if self.cfg.train.beta > 0:
            ref = self.logprobs(rollout, adapter=False)  # (N, T)
        return old, ref

    @torch.no_grad()
    def correction(self, rollout: Rollout) -> tuple[torch.Tensor | None, dict[str, float]]:
        """Importance-sampling weights (N, T) between the sampler's log-probs and this model's (one
        forward pass in eval mode, float32 log-probs), when enabled and the sampler reported its
        log-probs; else (None, {})."""
        if not self.importance_sampling or rollout.sampler_logp is None:
            return None, {}
        s = self.cfg.train.vllm_importance_sampling
        self.model.eval()
        trainer_logp = self.logprobs(rollout)  # (N, T)
        return importance_weights(
            trainer_logp, rollout.sampler_logp, rollout.completion_mask, level=s.level, mode=s.mode, cap=s.cap
        )

    def update(
        self, rollout: Rollout, adv: torch.Tensor, old: torch.Tensor | None, ref: torch.Tensor | None,
        is_weight: torch.Tensor | None = None,
    ) -> dict[str, float]:
        self.model.train()
        return policy_update(
            self.model,
            self.optimizer,
            rollout,
            adv,
            cfg=self.cfg.train,
            temperature=self.cfg.generation.temperature,
            max_new_tokens=self.cfg.generation.max_new_tokens,
            old_logp=old,
            ref_logp=ref,
            scheduler=self.scheduler,
            grad_hook=self.grad_hook,
            logprobs_fn=lambda _model, *args, **kw: self.engine.logprobs(*args, **kw),  # (n, T)
            is_weight=is_weight,
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- one step ------------------------------------------------------------------------------

    def step(self) -> dict[str, float]:
        """One GRPO step; returns its metrics (also `step`, 1-based after the update)."""
        clock = _Clock()
        seed = step_seed(self.cfg.train.seed, self.step_count) + self.rank
        torch.manual_seed(seed)
        rollout, scores, sampled, sampled_scores, dynamic = self.gather(seed, clock)  # N = B*G rows
        with clock("score"):
            adv = self.advantages(scores)  # (N,)
        with clock("reference"):
            old, ref = self.old_and_reference_logprobs(rollout)
            is_weight, is_stats = self.correction(rollout)
        try:
            update = self.update(rollout, adv.to(self.device), old, ref, is_weight)
        except TrainingDiverged as e:
            raise TrainingDiverged(
                f"GRPO step {self.step_count + 1}: {e}; lower train.learning_rate "
                f"({self.cfg.train.learning_rate:g}) or train.max_grad_norm, or check the rewards"
            ) from None
        with clock("sync"):
            self.engine.sync(self.model)
        self.step_count += 1
        gen_s = clock.seconds["time/generation_s"]
        metrics = {
            "step": self.step_count,
            **self.rollout_metrics(sampled, sampled_scores),
            **dynamic,
            **update,
            **is_stats,
            **clock.seconds,
            "lr": self.scheduler.get_last_lr()[0],
            "step_time_s": clock.elapsed(),
            "completion_tokens_per_s": float(sampled.completion_mask.sum()) / max(gen_s, 1e-9),
        }
        return gather_metrics(metrics) if self.world_size > 1 else metrics

    def rollout_metrics(self, rollout: Rollout, scores: Scores) -> dict[str, float]:
        g = self.cfg.train.group_size
        rewards = scores.total  # (N,)
        lengths = rollout.completion_mask.sum(dim=1).float()  # (N,)
        group_std = rewards.view(-1, g).std(dim=1)  # (B,)
        out = {
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item(),
            "frac_zero_std_groups": (group_std < 1e-6).float().mean().item(),
            "completion_length_mean": lengths.mean().item(),
            "completion_length_max": lengths.max().item(),
            "truncated_fraction": rollout.truncated.float().mean().item(),
        }
        return {**out, **scores.metrics()}

    def train(
        self,
        num_steps: int,
        *,
        on_step: Callable[[dict[str, float]], None] | None = None,
        every: int = 0,
        callback: Callable[[GRPOTrainer], None] | None = None,
        progress: bool = True,
        eval_accuracy: float | None = None,
    ) -> list[dict[str, float]]:
        """Run `num_steps` steps; `on_step(metrics)` after each, `callback(self)` every `every`.

        The progress bar shows what moves: the mean reward, the share of groups whose rewards all
        agree (no signal), the gradient norm and the last evaluation's accuracy (`eval_accuracy`,
        when the caller has one), not the loss, which is ~0 by construction with beta 0 and one
        update epoch (see the README)."""
        history = []
        bar = tqdm(total=num_steps, desc="GRPO", unit="step", disable=not progress, dynamic_ncols=True)
        shown = {} if eval_accuracy is None else {"eval_acc": f"{eval_accuracy:.3f}"}
        for _ in range(num_steps):
            metrics = self.step()
            history.append(metrics)
            bar.update(1)
            bar.set_postfix(
                reward=f"{metrics['reward_mean']:.3f}", zero_std=f"{metrics['frac_zero_std_groups']:.2f}",
                grad_norm=f"{metrics['grad_norm']:.3f}", **shown,
            )
            if on_step:
                on_step(metrics)
            if callback and every and self.step_count % every == 0:
                callback(self)
        bar.close()
        return history
