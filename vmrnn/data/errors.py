"""Errors raised for bad or missing data.

Every problem with a user's data (a missing file, a wrong key, a truncated archive, an image of the
wrong size, a tree with no usable window, a bad option) raises a :class:`DataError`. The `vmrnn`
command prints such errors as one line and exits with status 2; library callers can catch
``DataError`` (it is a ``ValueError``) without also catching programming errors.
"""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad, missing or inconsistent data, or a bad data option. The message names the file."""


class DatasetNotFoundError(DataError):
    """A dataset (or one of its files) is not where it is expected.

    The message names the expected path(s) and where the data comes from.
    """

    def __init__(self, message: str, expected: Path | str | None = None):
        super().__init__(message)
        self.expected = Path(expected) if expected is not None else None

    def __reduce__(self):  # keep it picklable across DataLoader workers
        return (type(self), (self.args[0], self.expected))


class DataFormatError(DataError):
    """A file exists but its content is not in the expected format (keys, shape, dtype, corruption)."""

    def __init__(self, message: str, path: Path | str | None = None):
        super().__init__(message)
        self.path = Path(path) if path is not None else None

    def __reduce__(self):
        return (type(self), (self.args[0], self.path))


class NoWindowsError(DataFormatError):
    """A KTH tree (or one of its splits) has no window that passes the official selection rule."""


__all__ = ["DataError", "DatasetNotFoundError", "DataFormatError", "NoWindowsError"]
