"""The maintainers' scripts in ``.ci/`` (benchmark harness, PgBouncer build), loaded by path.

They are not part of the package a learner reads; ``python -m helpers bench`` and
``python -m helpers pgbouncer install`` load them from the checkout. Standard library only.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from .errors import CourseError
from .paths import TOOLS


def load_tool(name: str) -> ModuleType:
    """The module ``.ci/<name>.py`` (loaded once per process, as ``course_tools.<name>``)."""
    key = f"course_tools.{name}"
    if key in sys.modules:
        return sys.modules[key]
    path = TOOLS / f"{name}.py"
    if not path.exists():
        raise CourseError(f"{path} is missing from this checkout.",
                          "It ships with the repository: `git status` shows what changed.")
    spec = importlib.util.spec_from_file_location(key, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[key]
        raise
    return module
