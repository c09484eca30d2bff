"""A lock file: one process at a time does a download into a shared folder (others wait or are told)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vmrnn.data.errors import DataError


@contextmanager
def file_lock(path: Path, *, wait: bool = True, busy: str = "") -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing). With wait=False a lock held by another
    process raises DataError(`busy` or a default message) instead of blocking. The kernel drops the lock
    when its holder exits, so a killed process never leaves a stale lock behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise DataError(busy or f"{path} is locked by another process; wait for it to finish") from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
