"""Errors a learner can act on, and how they are shown.

Every problem the helpers can diagnose (no database, wrong password, a stale lock file...)
is raised as :class:`CourseError`: one short message that names the setting, the value and
what to try. On the command line it is printed without a traceback; in Jupyter,
:func:`install_notebook_handler` makes the kernel show it the same way.

Standard library only.
"""

from __future__ import annotations

import sys
from typing import Any


class CourseError(Exception):
    """A problem with a clear cause and a clear next step (no traceback needed)."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  -> {self.hint}" if self.hint else self.message


class DatabaseUnavailable(CourseError):
    """No PostgreSQL could be reached or started."""


def install_notebook_handler() -> bool:
    """In IPython/Jupyter, show :class:`CourseError` as one short red message.

    The cell still fails (so nbval and ``make run`` notice), but the learner sees
    ``DatabaseUnavailable: ...`` and the hint instead of a 40-line traceback.
    Returns True when a handler was installed.
    """
    ipython = sys.modules.get("IPython")  # only inside a running IPython, never import it
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is None:
        return False

    def _show(self: Any, etype: type, value: BaseException, tb: Any, tb_offset: Any = None):
        stb = [f"\x1b[0;31m{etype.__name__}\x1b[0m: {value}"]
        self._showtraceback(etype, value, stb)
        return stb

    shell.set_custom_exc((CourseError,), _show)
    return True
