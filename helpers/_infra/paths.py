"""Where the project's files live: the repository root, its data and its state folder.

Standard library only, so the command line can use it before the virtual environment exists.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent
#: The repository checkout (``helpers/`` is installed in editable mode, so this is the clone).
ROOT = PACKAGE_DIR.parent
NOTEBOOKS = ROOT / "notebooks"
DATA = ROOT / "data"
BUILD = ROOT / "build"
VENV = ROOT / ".venv"
#: Maintainers' scripts: the CI entry point, the benchmark harness, the PgBouncer source build.
TOOLS = ROOT / ".ci"


def state_dir() -> Path:
    """The gitignored folder that holds the embedded server (data, password, log, lock).

    ``PGCOURSE_HOME`` overrides it (tests use a temporary folder); the default is
    ``<repo>/.pgcourse``.
    """
    from helpers._infra.settings import settings

    return settings().home
