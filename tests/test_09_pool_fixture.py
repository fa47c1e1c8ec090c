"""Testing code that uses an asyncpg pool, with pytest-asyncio (notebook 09 runs this file).

A pool belongs to the event loop that created it. pytest-asyncio gives each test function a
new event loop by default, so a pool made once for the whole session (one set of connections,
opened once) must be made in a session-wide loop, and the tests that use it must run in that
same loop:

* the fixture: ``@pytest_asyncio.fixture(scope="session", loop_scope="session")``;
* the tests: ``pytestmark = pytest.mark.asyncio(loop_scope="session")`` for the whole module.

``scope`` says how long the fixture's value lives; ``loop_scope`` says which event loop runs
it. The last test shows what happens when a test runs in a loop of its own (the default): it
is expected to fail, and pytest fails the run if it does not (``strict=True``).

The database is ``DATABASE_URL``, or else the course's own (``helpers.db.resolve()``); when
neither answers, every test here is skipped with the reason. Run it alone with::

    python -m pytest tests/test_09_pool_fixture.py -o asyncio_default_fixture_loop_scope=function
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio

from helpers import DatabaseUnavailable  # the course's "no database here" (embedded server)

pytestmark = pytest.mark.asyncio(loop_scope="session")  # every test here: the session's loop

#: This run's connections, findable in pg_stat_activity (unique per run).
APPLICATION_NAME = f"course/09-tests/{secrets.token_hex(3)}"


def database_url() -> str:
    """The database under test: DATABASE_URL, as an application would read it."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    from helpers.db import resolve  # the course's embedded server when DATABASE_URL is unset

    return resolve().url


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def pool() -> AsyncIterator[asyncpg.Pool]:
    """One pool for the whole test session, opened in the session's event loop."""
    try:
        pool = await asyncpg.create_pool(
            database_url(), min_size=1, max_size=2, timeout=10,
            server_settings={"application_name": APPLICATION_NAME})
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
            DatabaseUnavailable) as exc:
        pytest.skip(f"cannot connect to the course database: {type(exc).__name__}: {exc}")
    async with pool:  # closed when the session ends
        yield pool


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def session_loop() -> asyncio.AbstractEventLoop:
    """The event loop of the session-scoped fixtures (and of this module's tests)."""
    return asyncio.get_running_loop()


@pytest_asyncio.fixture(loop_scope="session")
async def conn(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A connection from the session's pool, inside a transaction that is rolled back after
    the test: what a test writes, no other test sees."""
    async with pool.acquire() as connection:
        transaction = connection.transaction()
        await transaction.start()
        try:
            yield connection
        finally:
            await transaction.rollback()


async def test_the_pool_answers(pool: asyncpg.Pool) -> None:
    assert await pool.fetchval("SELECT 1") == 1


async def test_runs_in_the_loop_that_opened_the_pool(
        pool: asyncpg.Pool, session_loop: asyncio.AbstractEventLoop) -> None:
    assert asyncio.get_running_loop() is session_loop
    assert await pool.fetchval("SELECT current_setting('application_name')") == APPLICATION_NAME


async def test_runs_in_a_transaction(conn: asyncpg.Connection) -> None:
    await conn.execute("CREATE TEMP TABLE scratch (n int)")
    await conn.execute("INSERT INTO scratch VALUES (1), (2)")
    assert conn.is_in_transaction()
    assert await conn.fetchval("SELECT count(*) FROM scratch") == 2


@pytest.mark.xfail(strict=True, raises=(asyncpg.InterfaceError, RuntimeError),
                   reason="a test in its own event loop cannot use the session loop's pool")
@pytest.mark.asyncio(loop_scope="function")  # pytest-asyncio's default: a new loop per test
async def test_a_pool_from_another_loop_fails(pool: asyncpg.Pool) -> None:
    await pool.fetchval("SELECT 1")
