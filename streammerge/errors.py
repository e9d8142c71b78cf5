"""Exception family and exit codes. Imports nothing else from the package."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    ERROR = 1  # unexpected failure (a bug: run with --traceback and report it)
    USAGE = 2  # bad command line (argparse uses 2 as well)
    INPUT = 3  # base or adapter files missing, corrupt or malformed
    PLAN = 4  # the adapter does not fit the base (unmatched keys, shapes)
    OUTPUT = 5  # output directory refused, disk full, write failure
    DEVICE = 6  # requested device missing, budget too small
    VERIFY = 7  # `streammerge verify` found differences
    INTERRUPTED = 130  # Ctrl-C
    TERMINATED = 143  # SIGTERM


class StreamMergeError(Exception):
    """Base class: a problem the user can fix. The message is one line: what, where, the fix."""

    exit_code: ExitCode = ExitCode.ERROR


class UsageError(StreamMergeError):
    """Options that do not fit together."""

    exit_code = ExitCode.USAGE


class OptionValueError(UsageError, ValueError):
    """An option with a value it cannot take (the Python API's ValueError, the CLI's usage error)."""


class OptionTypeError(UsageError, TypeError):
    """An argument or option of the wrong type (the Python API's TypeError)."""


class InputError(StreamMergeError):
    """A base checkpoint or adapter file is missing, corrupt or malformed."""

    exit_code = ExitCode.INPUT


class DownloadError(InputError):
    """A base shard could not be fetched mid-merge: the shards already merged are kept for a rerun."""


class PlanError(StreamMergeError):
    """The adapter does not fit the base: unmatched, doubly matched or mis-shaped tensors."""

    exit_code = ExitCode.PLAN


class UnsupportedError(PlanError):
    """The adapter uses a feature this version cannot merge exactly; refused by name."""


class OutputError(StreamMergeError):
    """The output directory is refused, or writing it failed."""

    exit_code = ExitCode.OUTPUT


class DeviceError(StreamMergeError):
    """The requested device is missing, or the memory budget cannot hold the work."""

    exit_code = ExitCode.DEVICE


class Interrupted(StreamMergeError):
    """Stopped by a signal; temporary files were removed."""

    def __init__(self, message: str, *, exit_code: ExitCode) -> None:
        super().__init__(message)
        self.exit_code = exit_code
