"""Errors a user can cause (config, data, paths, servers), each ending in one clear line.

The CLI prints `error: <message>` for any `UserError` and exits with status 2; everything else is
a bug and keeps its traceback. The pipeline's tasks retry a failure unless it is a `UserError`
that is not `retryable` (a bad config does not heal by waiting; a store that failed to answer may).
"""


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


class TrackingReadError(TrackingError):
    """MLflow could not return something a decision depends on (a run's config, say): the store
    failed or the data is unreadable. Never read as "absent"; tasks retry it, then it ends the
    flow in one line."""

    retryable = True
