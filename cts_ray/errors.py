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


class DataFileError(RuntimeError):
    """A data file that cannot be read mid-run (streamed data decode as they are used); the message
    names it. The run's saved epochs are kept: fix the file, then resume."""


class StorageError(OSError):
    """The sweep's storage cannot take a write: full (ENOSPC), read-only or gone. The message names
    the cause and the folder, e.g. ``storage full: /mnt/sweeps/x (0.4 MB free)``."""


class SweepBusyError(RuntimeError):
    """Another live driver holds the sweep's lease; the message names it (host, pid, since when)."""


# The exit codes of `cts-ray` (README "Exit codes"); one place, so the CLI, tests and docs agree.
EXIT_OK = 0            # everything finished (trials a configured scheduler stopped included)
EXIT_FAILED = 1        # a single run failed or diverged (`cts-ray run`, `eval`, `export`)
EXIT_BAD_INPUT = 2     # bad input, refused before any work; nothing written
EXIT_TRIALS_FAILED = 3  # the sweep ended, and one or more trials failed or diverged (the count is printed)
EXIT_STORAGE = 4       # the sweep's storage filled up, went read-only or vanished; free space, then --resume
EXIT_BUSY = 5          # another driver is running this sweep (named in the message)
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM: the last line is the command that resumes
