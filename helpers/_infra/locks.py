"""One file lock for the whole course: two processes that start the same thing share it.

Used by the embedded server (start/stop) and the PgBouncer build. Standard library only.
"""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import CourseError


@contextlib.contextmanager
def file_lock(path: Path, *, timeout: float | None = None, what: str = "") -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block.

    Waits for another holder up to ``timeout`` seconds (``None``: forever), then raises a
    :class:`CourseError` that names the file and ``what`` the holder is doing.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() > deadline:
                    raise CourseError(
                        f"Another process has held {path} for {timeout:.0f} s"
                        + (f" while {what}." if what else "."),
                        "Wait for it to finish, or stop stuck `python -m helpers` processes.",
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
