"""Retry policy shared by the pipeline's Prefect tasks.

    @task(name="train-round", **RETRY_OPTIONS)

A `grpo.errors.UserError` (config, data, path) does not heal by waiting, so it is not retried,
unless it says it may be transient (`retryable`, e.g. `TrackingReadError`); neither is a full disk
or a read-only file system.
"""

from __future__ import annotations

from typing import Any

from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from grpo.errors import UserError, disk_problem

RETRIES = 2
"""Retries of the tasks that do work (a third attempt after two failures)."""
BACKOFF_SECONDS = 1.0
"""First retry delay; each later retry waits twice as long."""


def retry_unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry any failure except a `UserError` that is not `retryable`."""
    try:
        state.result()
    except UserError as e:
        return e.retryable
    except OSError as e:
        return disk_problem(e) is None  # a full disk or a read-only folder does not heal by waiting
    except BaseException:  # noqa: BLE001 - the failure to judge, whatever it is
        return True
    return True


RETRY_OPTIONS: dict[str, Any] = {
    "retries": RETRIES,
    "retry_delay_seconds": exponential_backoff(BACKOFF_SECONDS),
    "retry_condition_fn": retry_unless_user_error,
    "cache_policy": NO_CACHE,  # stages resume from disk and MLflow, not from Prefect's cache
}
"""The `@task` options every pipeline task with work to redo shares."""
