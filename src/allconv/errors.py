"""Every error a user can cause or meet. Each ends a command with one line and an exit status.

The entry points catch AllConvError in one place (cli.fail): the message is the line, exit_code the
status. 2: bad input (a setting, a file, a folder); 1: the run itself failed (non-finite loss, a
write that the disk refused); interrupted runs exit 128 + the signal number, as shells report them.
"""

from __future__ import annotations


class AllConvError(Exception):
    """Base class; str(e) is one line naming the value or file and what is allowed or what went wrong."""

    exit_code = 2


class ConfigError(AllConvError, ValueError):
    """A bad setting."""


class DataError(AllConvError, ValueError):
    """A missing, corrupt or malformed dataset file."""


class CheckpointError(AllConvError, ValueError):
    """A file that is not a loadable allconv checkpoint (missing, truncated, foreign, unsafe)."""


class ResumeError(AllConvError, ValueError):
    """A folder that cannot be resumed."""


class RunFolderError(AllConvError, ValueError):
    """A run or sweep folder whose record is damaged, linked out of the folder, or another run's."""


class VisualizeError(AllConvError, ValueError):
    """A layer, unit or method that the network does not have."""


class ReportError(AllConvError, ValueError):
    """Nothing to report."""


class NonFiniteLossError(AllConvError, RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and step."""

    exit_code = 1


class WriteError(AllConvError, OSError):
    """A file could not be written (disk full, no permission, read-only); names the file and the reason.

    An OSError too (errno is the system's), so code that already tolerates a failed write keeps doing so.
    """

    exit_code = 1


class Interrupted(AllConvError):
    """SIGTERM or SIGINT stopped the run at a step boundary; the message says how to resume it.

    status is what a sweep records for the job; exit_code is 128 + the signal number, as shells report it.
    """

    status = "interrupted"

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
