"""Exceptions that reach the user through the single boundary in ``__main__``.

A ``BcvkError`` is an expected failure the user can act on: it renders as one
``error:`` line plus an optional ``hint:`` line.  Anything else that escapes is
a bug and deserves a traceback.
"""

from __future__ import annotations

import errno
import shlex
from collections.abc import Sequence


class BcvkError(Exception):
    """A failure the user can fix; rendered as ``error: msg`` + ``hint: …``."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(BcvkError):
    """Bad command-line input (exit 2, like the CLI framework's own errors)."""

    exit_code = 2


class NotFoundError(BcvkError):
    """A named thing (image, VM, file) does not exist."""


class ToolMissingError(BcvkError):
    """A host program bcvk needs is not installed."""


class ImageContentError(BcvkError):
    """An image holds something bcvk cannot read (a crafted or broken file)."""


class WaitTimeout(BcvkError):
    """A deadline passed while waiting for a named condition."""


class CommandError(BcvkError):
    """A child process failed; carries argv, exit status and stderr's tail."""

    def __init__(
        self,
        argv: Sequence[str],
        returncode: int,
        stderr: str = "",
        hint: str | None = None,
    ) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr_tail = tail(stderr)
        name = self.argv[0] if self.argv else "?"
        detail = last_line(stderr)
        message = f"{name} failed with exit status {returncode}"
        if returncode < 0:
            message = f"{name} was killed by signal {-returncode}"
        if detail:
            message += f": {detail}"
        super().__init__(message, hint or "rerun with --debug to see the command and its output")

    @property
    def command_line(self) -> str:
        return shlex.join(self.argv)


def tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def last_line(text: str) -> str:
    for line in reversed(text.strip().splitlines()):
        if line.strip():
            return line.strip()
    return ""


_OS_HINTS = {
    errno.ENAMETOOLONG: "use a shorter path or file name",
    errno.EACCES: "check the permissions, or run as a user who may use it",
    errno.EPERM: "check the permissions, or run as a user who may use it",
    errno.ENOSPC: "free some space, or choose a bigger filesystem",
    errno.EDQUOT: "free some space, or choose a bigger filesystem",
    errno.EFBIG: "ask for a smaller size: the filesystem cannot hold a file that large",
    errno.EEXIST: "remove it or choose another path",
    errno.ENOTDIR: "a directory was expected there",
    errno.EISDIR: "a file was expected there",
    errno.EROFS: "choose a writable location",
    errno.ENOENT: "check that the path exists and is on a regular filesystem",
}


def os_hint(exc: OSError) -> str:
    """What a user can do about EXC, by its errno."""
    return _OS_HINTS.get(exc.errno or 0, "rerun with --debug for details")
