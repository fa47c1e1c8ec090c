"""Shared fixtures: the course database (embedded unless DATABASE_URL is set) and throw-away
embedded servers in temporary folders for the lifecycle tests. No mocks: real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers._infra.paths import ROOT
from helpers._infra.server import EmbeddedServer
from helpers.db import Target, resolve


def run(coro):
    """Run a coroutine from a synchronous test (no pytest plugin needed)."""
    return asyncio.run(coro)


@pytest.fixture(scope="session")
def target() -> Target:
    """The database the course uses on this machine, with the seed data (schema ``shop``)
    loaded: on a fresh server, the first test to ask for it loads it."""
    from helpers._infra.seed import ensure_seed
    from helpers.db import connect

    found = resolve()

    async def seed() -> None:
        conn = await connect(found)
        try:
            await ensure_seed(conn)
        finally:
            await conn.close()

    asyncio.run(seed())
    return found


@pytest.fixture
def tmp_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A fresh embedded server in a temporary folder, stopped at the end of the test."""
    server = EmbeddedServer(tmp_path / "pg")
    yield server
    server.stop()


def helpers_cli(*args: str, env: dict[str, str] | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m helpers ...`` as a user runs it (in the project's environment)."""
    full_env = {**os.environ, "PGCOURSE_NO_VENV": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "helpers", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(autouse=True)
def _fresh_settings() -> Iterator[None]:
    """The course reads its environment once (helpers/_infra/settings.py); a test that
    changes the environment (monkeypatch.setenv) gets it read again, and so does the next."""
    from helpers._infra.settings import settings

    settings.cache_clear()
    yield
    settings.cache_clear()
