"""Errors a user can cause (config, data, paths, servers), each ending in one clear line.

The CLI prints `error: <message>` for any `UserError` and exits with status 2; everything else is
a bug and keeps its traceback. The pipeline's tasks retry a failure unless it is a `UserError`
that is not `retryable` (a bad config does not heal by waiting; a store that failed to answer may).

An OSError of a full disk, an exhausted quota or a read-only file system is not retried either, and
the CLI prints it in one line (`disk_problem`).
"""

import errno

DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
"""OSError numbers that waiting does not heal: a full disk, an exhausted quota, a read-only file system."""


def disk_problem(e: BaseException) -> str | None:
    """One line for an OSError of `DISK_ERRNOS` (what and where, and what to do), else None."""
    if not (isinstance(e, OSError) and e.errno in DISK_ERRNOS):
        return None
    where = f": {e.filename}" if e.filename else ""
    return (f"{e.strerror}{where}; free space (or point the folder at another disk) and continue the "
            "run with `grpo run --resume`: nothing saved so far is lost")


class UserError(Exception):
    """A mistake the user can fix; the message names the field or path and the fix."""

    retryable: bool = False
    """Whether a task retries it before the flow fails (a transient cause is possible)."""


class ConfigError(UserError):
    """A run configuration value is unknown or invalid."""


class DataError(UserError):
    """A dataset is missing, unreadable or lacks the needed columns or values."""


class ModelLoadError(UserError):
    """A model or tokenizer cannot be loaded (e.g. a hub id offline that is not cached)."""


class TrackingError(UserError):
    """The MLflow tracking server does not answer, or the registry refuses a request."""


class RewardError(UserError):
    """A reward function returned something other than one number (or None) per completion."""


class TrainingDiverged(UserError):
    """A loss, gradient, reward or weight became non-finite: the update is not applied and nothing
    non-finite is saved or registered. The message names the step and the likely cause."""


class TrackingReadError(TrackingError):
    """MLflow could not return something a decision depends on (a run's config, say): the store
    failed or the data is unreadable. Never read as "absent"; tasks retry it, then it ends the
    flow in one line."""

    retryable = True
