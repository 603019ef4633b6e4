"""Errors that mean "bad input", shown to users as one line without a traceback."""


class UserError(ValueError):
    """Base of every error caused by input the user can fix (file, row, key or value)."""


class ConfigError(UserError):
    """A config file or override that does not fit the schema."""


class PromptError(UserError):
    """A prompt source that cannot be used."""


class MissingDependencyError(UserError, ImportError):
    """An optional extra (xformers, bitsandbytes, wandb) was asked for but is not installed."""
