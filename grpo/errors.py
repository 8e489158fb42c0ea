"""Errors a user can cause (config, data, paths, servers), each ending in one clear line.

The CLI prints `error: <message>` for any `UserError` and exits with status 2; everything else is
a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake the user can fix; the message names the field or path and the fix."""


class ConfigError(UserError):
    """A run configuration value is unknown or invalid."""


class DataError(UserError):
    """A dataset is missing, unreadable or lacks the needed columns or values."""


class ModelLoadError(UserError):
    """A model or tokenizer cannot be loaded (e.g. a hub id offline that is not cached)."""


class TrackingError(UserError):
    """The MLflow tracking server does not answer, or the registry refuses a request."""
