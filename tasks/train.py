"""Prefect tasks of the training stage: the optional warm start and one GRPO round.

    from grpo_pipeline.tasks.train import train_round
    ckpt = train_round.fn(cfg, dataset_ref, 0, run_id, tracking_uri)   # CheckpointRef

A retry resumes: `train_round` continues from the newest complete checkpoint of the run and does
not log a metric step twice; after a finished round it returns that round's checkpoint at once.
"""

from __future__ import annotations

from prefect import task

from grpo.checkpoint import CheckpointRef
from grpo.config import RunConfig
from grpo.data import DatasetRef
from grpo.stages import train
from grpo.stages import warm_start as warm
from grpo_pipeline.tasks.retry import RETRY_OPTIONS


@task(name="warm-start", **RETRY_OPTIONS)
def warm_start(config: RunConfig, dataset_ref: DatasetRef, run_id: str, tracking_uri: str) -> str:
    """Supervised warm start (sft.enabled); returns the folder of the warm-started base model."""
    return warm.warm_start(config, dataset_ref, run_id, tracking_uri)


@task(name="train-round", task_run_name="train-round-{round_index}", **RETRY_OPTIONS)
def train_round(
    config: RunConfig, dataset_ref: DatasetRef, round_index: int, run_id: str, tracking_uri: str
) -> CheckpointRef:
    """`pipeline.steps_per_round` GRPO steps from the run's newest checkpoint; returns the new one."""
    return train.train_round(config, dataset_ref, round_index, run_id, tracking_uri)
