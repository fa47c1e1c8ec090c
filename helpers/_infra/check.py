"""``python -m helpers check``: is this machine ready for the course?

Checks the pinned packages ([OK]/[FAIL] with versions), then the database: where it comes
from, that it answers, its version, and the seed data. Notebook 00 shows the same report.
With the dev packages (``make check``) it also compares every installed package with
``requirements.lock``: a difference is a warning (Colab installs only the direct pins), not a
failure.
"""

from __future__ import annotations

import asyncio
import platform
import re
import sys
import tomllib
from dataclasses import dataclass
from importlib import metadata

from helpers._infra.paths import ROOT


@dataclass(frozen=True)
class PackageCheck:
    """One pinned package: what pyproject.toml wants and what is installed."""

    name: str
    wanted: str
    found: str | None

    @property
    def ok(self) -> bool:
        return self.found == self.wanted

    def line(self) -> str:
        if self.ok:
            return f"[OK]   {self.name} {self.found}"
        if self.found is None:
            return f"[FAIL] {self.name}: not installed (want {self.wanted})"
        return f"[FAIL] {self.name}: {self.found} installed, the course pins {self.wanted}"


def pins(include_dev: bool = False) -> dict[str, str]:
    """Package name -> pinned version, from pyproject.toml (the single source of pins)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    if include_dev:
        reqs += project["optional-dependencies"]["dev"]
    out = {}
    for req in reqs:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^;\s]+)", req.strip())
        if not match:
            raise ValueError(f"pyproject.toml: {req!r} is not an exact pin (name==version)")
        out[match.group(1).lower()] = match.group(3)
    return out


def lock_differences() -> list[str]:
    """The packages of ``requirements.lock`` that apply here (their markers) and are missing
    or installed in another version, as "name: found (lock: version)"."""
    from packaging.markers import Marker

    from helpers._infra.bootstrap import read_lock

    out = []
    for entry in read_lock():
        if entry.marker and not Marker(entry.marker).evaluate():
            continue
        try:
            found: str | None = metadata.version(entry.name)
        except metadata.PackageNotFoundError:
            found = None
        if found != entry.version:
            out.append(f"{entry.name}: {found or 'not installed'} (lock: {entry.version})")
    return out


def lock_line() -> str:
    """One line on how this environment compares with ``requirements.lock``."""
    differ = lock_differences()
    if not differ:
        return "[OK]   every package as in requirements.lock"
    shown = ", ".join(differ[:5]) + (f", ... ({len(differ)} in all)" if len(differ) > 5 else "")
    return (f"[WARN] {len(differ)} package(s) differ from requirements.lock: {shown}; "
            "`python -m helpers venv` installs the lock")


def check_packages(include_dev: bool = False) -> list[PackageCheck]:
    """Compare installed versions with the pins."""
    results = []
    for name, wanted in pins(include_dev).items():
        try:
            found: str | None = metadata.version(name)
        except metadata.PackageNotFoundError:
            found = None
        results.append(PackageCheck(name, wanted, found))
    return results


def python_line() -> str:
    ok = sys.version_info >= (3, 11)
    tag = "[OK]  " if ok else "[FAIL]"
    return f"{tag} Python {platform.python_version()} ({'3.11+ needed' if not ok else 'ok'})"


async def check_database() -> list[str]:
    """Connect, report where the database is, the server version and the seed. Raises
    :class:`~helpers.errors.CourseError` with a clear message when it cannot."""
    from helpers._infra.seed import loaded_version, manifest
    from helpers.db import connect, resolve

    target = await asyncio.to_thread(resolve)
    conn = await connect(target)
    try:
        version = await conn.fetchval("SHOW server_version")
        seed = await loaded_version(conn)
        max_conn = await conn.fetchval("SHOW max_connections")
    finally:
        await conn.close()
    seed_text = ("loaded" if seed == manifest()["version"]
                 else "not loaded yet (the first lesson loads it)")
    return [
        f"[OK]   database: {target.describe()}",
        f"[OK]   PostgreSQL {version}, max_connections={max_conn}",
        f"[OK]   seed data (shop schema): {seed_text}",
    ]


def report(include_dev: bool = False) -> tuple[bool, list[str]]:
    """The package part of the check: (all ok, lines). ``include_dev`` adds the dev pins and
    the comparison with the lock (a warning only)."""
    results = check_packages(include_dev)
    lines = [python_line()] + [r.line() for r in results]
    if include_dev:
        lines.append(lock_line())
    return all(r.ok for r in results) and sys.version_info >= (3, 11), lines
