"""Prefect tasks of the data stage: the preflight checks and the prepared, cached splits.

    from grpo_pipeline.tasks.data import prepare_dataset
    ref = prepare_dataset.fn(cfg)        # DatasetRef; a second call with the same config reuses it

The splits are cached on disk by their inputs (`grpo.stages.data.prepare`), so a rerun of the
flow with the same data config reuses them (`ref.reused` is True) instead of regenerating.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from grpo.config import RunConfig
from grpo.data import DatasetRef
from grpo.stages import data
from grpo_pipeline.tasks.retry import RETRY_OPTIONS


@task(name="preflight", cache_policy=NO_CACHE)
def preflight(config: RunConfig) -> None:
    """Fail before any work, in one line, on anything the user can fix (no retries)."""
    data.preflight(config)


@task(name="prepare-dataset", **RETRY_OPTIONS)
def prepare_dataset(config: RunConfig) -> DatasetRef:
    """Train/test splits on disk with their content hash; reused when the inputs are unchanged."""
    return data.prepare(config)
