"""Create the project's virtual environment from the pins, and re-run a command inside it.

``python3 -m helpers <command>`` works on a machine with nothing but Python 3.11+: the first
call makes ``.venv`` and installs ``pyproject.toml`` (with its ``dev`` extra) into it; later
calls only check a stamp (a hash of the pins) and reinstall when the pins changed.
Set ``PGCOURSE_NO_VENV=1`` to use the current environment instead (conda, Colab, Binder).

Standard library only.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

from helpers._infra.errors import CourseError
from helpers._infra.paths import ROOT, VENV

STAMP = VENV / ".course-installed"


def venv_python() -> Path:
    return VENV / "bin" / "python"


def in_project_venv() -> bool:
    """True when this interpreter is the project's ``.venv``."""
    return Path(sys.prefix).resolve() == VENV.resolve()


def wanted_stamp() -> str:
    """A hash of the pinned dependencies: .venv is reinstalled when they change."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    return hashlib.sha256("\n".join(pins).encode()).hexdigest()


def ensure_venv(quiet: bool = False) -> Path:
    """Make ``.venv`` and install the pinned dependencies if missing or outdated."""
    if sys.version_info < (3, 11):  # noqa: UP036 (this module runs under any python3)
        raise CourseError(
            f"The course needs Python 3.11 or newer; this is {sys.version.split()[0]}.",
            "Install Python 3.11+ (python.org, pyenv, or your package manager) and run again.",
        )
    python = venv_python()
    if not python.exists():
        _say(quiet, f"Creating {VENV.relative_to(ROOT)} with {sys.executable} ...")
        proc = subprocess.run([sys.executable, "-m", "venv", str(VENV)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise CourseError(
                f"Could not create a virtual environment: {proc.stderr.strip()[-300:]}",
                "On Debian/Ubuntu: `apt-get install python3-venv`; or use conda with "
                "environment.yml and set PGCOURSE_NO_VENV=1.",
            )
    if not STAMP.exists() or STAMP.read_text().strip() != wanted_stamp():
        t0 = time.perf_counter()
        _say(quiet, "Installing the pinned dependencies into .venv (about a minute, once) ...")
        cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check",
               "--root-user-action=ignore", "-q", "-e", f"{ROOT}[dev]"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [ln[:200] for ln in proc.stderr.splitlines() if "is ignored" not in ln]
            tail = "\n".join(lines[-4:])
            raise CourseError(f"pip install failed:\n{tail}",
                              "Check your network access to PyPI and run the command again.")
        STAMP.write_text(wanted_stamp() + "\n")
        _say(quiet, f"Installed in {time.perf_counter() - t0:.0f} s.")
    return python


def reexec_in_venv(argv: list[str]) -> None:
    """Replace this process with ``.venv/bin/python -m helpers <argv>`` (never returns)."""
    python = ensure_venv()
    os.execv(str(python), [str(python), "-m", "helpers", *argv])


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)
