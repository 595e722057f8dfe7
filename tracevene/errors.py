"""One error hierarchy for tracevene.

Every message says what is wrong, what would be valid, and how to fix it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "TraceveneError",
    "ArgumentError",
    "ArgumentTypeError",
    "MissingKeyError",
    "MissingFileError",
    "PathExistsError",
    "DiskFullError",
    "MissingDependencyError",
    "TraceError",
    "SiteError",
    "ShapeError",
    "ScheduleError",
    "ExecutionError",
    "NotRunError",
    "ProgramFormatError",
    "BackendError",
    "RegistryError",
]


class TraceveneError(Exception):
    """Base class of every error tracevene raises on purpose."""


class ArgumentError(TraceveneError, ValueError):
    """An argument whose value is not one the function takes (also a ``ValueError``)."""


class ArgumentTypeError(TraceveneError, TypeError):
    """An argument of a type the function does not take (also a ``TypeError``)."""


class MissingKeyError(TraceveneError, KeyError):
    """A name looked up that is not there: a save of a result, a key of a batch."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MissingFileError(TraceveneError, FileNotFoundError):
    """A file tracevene needs to read is not there (also a ``FileNotFoundError``)."""


class PathExistsError(TraceveneError, FileExistsError):
    """A path that would be overwritten holds something tracevene did not write.

    Also a ``FileExistsError``: ``program.save(directory)`` refuses to replace a
    directory (or file) that is not an earlier saved program.
    """


class DiskFullError(TraceveneError, OSError):
    """A save ran out of disk space (also an ``OSError`` with ``errno.ENOSPC``).

    The earlier saved program at the path, if any, is left intact.
    """


class MissingDependencyError(TraceveneError, ImportError):
    """An optional package a feature needs is not installed (also an ``ImportError``).

    The message names the package and the ``pip install`` line. A backend whose package
    is missing raises ``BackendError`` instead.
    """


class TraceError(TraceveneError):
    """Something inside a ``with iv.trace(...)`` block cannot be recorded."""


class SiteError(TraceveneError, KeyError):
    """A site name, layer or head that does not exist on this model."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ShapeError(TraceveneError, ValueError):
    """A written value whose shape does not fit the site it is written to."""


class ScheduleError(TraceveneError):
    """A program whose values cannot exist when they are needed."""


class ExecutionError(TraceveneError):
    """A node failed while the program ran; the message names the user's line."""


class NotRunError(TraceveneError):
    """A saved value was asked for before the program ran."""


class ProgramFormatError(TraceveneError, ValueError):
    """A saved program directory that is damaged or of an unknown version."""


class BackendError(TraceveneError):
    """A backend that is missing, unknown, or lacks a capability."""


class RegistryError(TraceveneError):
    """A module that cannot be serialised because it is not registered."""


def closest(name: str, valid: Iterable[str], n: int = 3) -> list[str]:
    """The valid names closest to ``name``, best first (for error messages)."""
    valid = list(valid)
    found = difflib.get_close_matches(name, valid, n=n, cutoff=0.0)
    return found or valid[:n]
