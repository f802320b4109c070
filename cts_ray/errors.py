"""The errors a user sees as one line, never as a traceback: ``cli.py`` catches them by class.

Each message names what is wrong (a config field, a file, a table) and what would be right. This
module imports nothing, so any layer can raise them.
"""


class ConfigError(ValueError):
    """A bad config value or key; the message is one line naming the field and what is allowed."""


class SchemaError(ValueError):
    """A results table written under a schema version this cts-ray does not read."""


class AnalysisError(ValueError):
    """The data cannot answer the question; the message says why, in one line."""


class CompactError(ValueError):
    """A model ``compact.py`` cannot turn into a smaller dense network (the transformers)."""


class DivergedError(RuntimeError):
    """Training produced a non-finite loss: a result of the settings, not a bug."""
