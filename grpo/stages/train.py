"""Training stage: one round of GRPO steps from the run's newest complete checkpoint.

    from grpo.stages import train
    ckpt = train.train_round(cfg, dataset_ref, 0, run_id, uri)   # CheckpointRef at step steps_per_round

A retry resumes where the failed attempt stopped (the newest complete checkpoint, the metric
steps it already logged); a retry after a finished round returns that round's checkpoint at once.
With `pipeline.processes` > 1 the round runs in that many ranks (`grpo.launch.launch_ranks`).
"""

from __future__ import annotations

from grpo import tracking
from grpo.checkpoint import (
    CheckpointRef,
    checkpoint_path,
    checkpoint_ref,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from grpo.config import RunConfig
from grpo.data import DatasetRef, load_split
from grpo.models import POLICY_CACHE, PolicyCache, load_policy_at, policy_key
from grpo.stages.runs import STEP_METRIC, run_dir


def train_round(
    cfg: RunConfig,
    dataset_ref: DatasetRef,
    round_index: int,
    run_id: str,
    tracking_uri: str,
    *,
    cache: PolicyCache = POLICY_CACHE,
    progress: bool = True,
) -> CheckpointRef:
    """Train until global step (round_index + 1) * steps_per_round and save a checkpoint there.

    Starts from the newest complete checkpoint of the run (a fresh adapter when there is none),
    so a retry after a crash resumes where it stopped and a retry after a finished round returns
    that round's checkpoint without training. Per-step metrics go to the MLflow run at the global
    step; steps already logged (by a failed attempt) are not logged again.
    """
    from grpo.trainer import GRPOTrainer

    folder = run_dir(cfg, run_id)
    target = (round_index + 1) * cfg.pipeline.steps_per_round
    intact = list_checkpoints(folder)  # each folder verified once; a damaged one is skipped with a warning
    done = dict(intact)
    if target in done:
        return checkpoint_ref(done[target])
    latest = intact[-1][1] if intact else None
    if latest is not None and checkpoint_ref(latest).step >= target:
        return checkpoint_ref(latest)

    if cfg.pipeline.processes > 1:  # data parallel: the round in N ranks, the same checkpoints and MLflow run
        from grpo.launch import launch_ranks

        return checkpoint_ref(launch_ranks(
            cfg, folder, target, cfg.pipeline.processes, tracking_uri=tracking_uri, run_id=run_id,
        ))
    hit = cache.take(policy_key(cfg, latest))
    model, tokenizer = hit if hit is not None else load_policy_at(cfg, None)
    rows = load_split(dataset_ref.train_path)
    trainer = GRPOTrainer(cfg, model, tokenizer, rows, total_steps=cfg.total_steps)
    if latest is not None:
        state = load_checkpoint(latest, model=model, optimizer=trainer.optimizer, scheduler=trainer.scheduler)
        trainer.load_state(state)

    logged = tracking.logged_steps(tracking_uri, run_id, STEP_METRIC)

    def on_step(metrics: dict[str, float]) -> None:
        step = int(metrics["step"])
        if step not in logged:
            values = {k: v for k, v in metrics.items() if k != "step"}
            tracking.log_metrics(tracking_uri, run_id, values, step=step)
            logged.add(step)

    evaluations = tracking.metric_history(tracking_uri, run_id, "eval/accuracy")  # shown in the bar
    last_accuracy = max(evaluations, key=lambda m: m.step).value if evaluations else None
    trainer.train(target - trainer.step_count, on_step=on_step, progress=progress, eval_accuracy=last_accuracy)
    state = {**trainer.state(), "round": round_index, "run_id": run_id}
    path = save_checkpoint(
        checkpoint_path(folder, trainer.step_count), model=model, tokenizer=tokenizer,
        optimizer=trainer.optimizer, scheduler=trainer.scheduler, state=state,
    )
    cache.put(policy_key(cfg, path), model, tokenizer)
    return checkpoint_ref(path)
