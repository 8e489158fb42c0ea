"""Thin Prefect tasks: each calls one stage of `grpo.stages` and passes small pydantic refs.

    from grpo_pipeline.tasks.train import train_round
    ckpt = train_round.fn(cfg, dataset_ref, 0, run_id, tracking_uri)   # the logic, no Prefect run

Retries: every task that does work retries with exponential backoff (1 s, 2 s, ...) on anything
but a `grpo.errors.UserError` (a config, data or path mistake does not heal by waiting). The
stages are idempotent, so a retry resumes instead of redoing: `train_round` continues from the
newest complete checkpoint and skips metric steps already logged; `register_elite` finds the
version a previous attempt registered. Prefect's own result cache is off (`NO_CACHE`): the
stages carry their own caches (prepared splits on disk, checkpoints, registry tags).
"""

from __future__ import annotations

from grpo_pipeline.tasks.retry import BACKOFF_SECONDS, RETRIES, RETRY_OPTIONS, retry_unless_user_error

__all__ = ["BACKOFF_SECONDS", "RETRIES", "RETRY_OPTIONS", "retry_unless_user_error"]
