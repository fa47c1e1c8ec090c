"""The driver workloads (asyncpg and psycopg 3 side by side), against the real server."""

from __future__ import annotations

import itertools
import secrets
from types import SimpleNamespace

import asyncpg
import pytest

from helpers import batch_inserts as bulk
from helpers import drivers
from helpers.db import connect, execute_ddl
from helpers.load import compare, run_load
from tests.conftest import run


def test_psycopg_sql_converts_placeholders() -> None:
    assert drivers.psycopg_sql("SELECT $1, $2") == "SELECT %s, %s"
    assert drivers.psycopg_sql("SELECT 5 % 2, $1") == "SELECT 5 %% 2, %s"
    assert drivers.psycopg_sql("SELECT 1") == "SELECT 1"
    with pytest.raises(ValueError):
        drivers.psycopg_sql("SELECT $2, $1")
    with pytest.raises(ValueError):
        drivers.psycopg_sql("SELECT $1, $1")


def test_keys_cover_the_table_without_repeats() -> None:
    assert sorted(drivers.key(i, 1000) for i in range(1000)) == list(range(1, 1001))
    assert drivers.key(0) == 1


def test_libpq_options_escape_spaces() -> None:
    options = drivers.libpq_options({"search_path": "a, shop", "application_name": "x"})
    assert options == "-c search_path=a,\\ shop -c application_name=x"


def test_lookups_agree_across_drivers(target) -> None:
    settings = {"search_path": "shop, public", "application_name": "test/drivers"}

    async def scenario():
        pool = await asyncpg.create_pool(target.url, min_size=2, max_size=2,
                                         server_settings=settings)
        ppool = await drivers.open_psycopg_pool(target.url, min_size=2, max_size=2,
                                                server_settings=settings)
        conns = [await asyncpg.connect(target.url) for _ in range(3)]
        try:
            query = "SELECT name FROM users WHERE id = $1"  # found through search_path
            a = [await drivers.asyncpg_lookup(pool, query)(i) for i in range(5)]
            p = [await drivers.psycopg_lookup(ppool, query)(i) for i in range(5)]
            c = [await drivers.connect_per_request_lookup(target.url)(i) for i in range(2)]
            direct = drivers.per_worker_lookup(conns)
            both = await compare({"direct": direct}, requests=30, concurrency=3, repeats=2)
            too_many = await run_load(direct, requests=8, concurrency=4, progress=False)
            async with ppool.connection() as conn:
                cur = await conn.execute("SHOW search_path")
                path = (await cur.fetchone())[0]
            return a, p, c, both, too_many, path
        finally:
            for conn in conns:
                await conn.close()
            await pool.close()
            await ppool.close()

    a, p, c, both, too_many, path = run(scenario())
    assert a == p and a[:2] == c and all(isinstance(x, str) for x in a)
    assert both["direct"].errors == 0 and len(both["direct"].df) == 60
    # 3 connections, 4 tasks: the fourth worker gets none and says so
    assert set(too_many.df["outcome"]) == {"ok", "RuntimeError"}
    assert path == "shop, public"


def test_noop_reset_leaks_session_state_and_the_default_does_not(target) -> None:
    async def leaked(reset) -> str:
        async with asyncpg.create_pool(target.url, min_size=1, max_size=1, reset=reset) as pool:
            async with pool.acquire() as conn:
                await conn.execute("SET application_name = 'leaked'")
            return await pool.fetchval("SHOW application_name")

    assert run(leaked(drivers.noop_reset)) == "leaked"
    assert run(leaked(None)) != "leaked"


def test_psycopg_inserts_next_to_asyncpg_ones(target) -> None:
    schema = f"test_drivers_{secrets.token_hex(3)}"
    rows = bulk.read_users(300)

    async def scenario():
        conn = await asyncpg.connect(target.url)
        pconn = await drivers.psycopg_connect(target.url)
        try:
            await execute_ddl(conn, "CREATE SCHEMA %I", schema)
            methods = {
                "asyncpg copy": (bulk.insert_copy, rows),
                "psycopg copy": (drivers.on_psycopg(pconn, drivers.psycopg_copy), rows),
                "psycopg executemany": (drivers.on_psycopg(pconn, drivers.psycopg_executemany),
                                        rows),
            }
            # compare_inserts checks the row count of every run
            return await bulk.compare_inserts(conn, methods, repeats=2, schema=schema)
        finally:
            await execute_ddl(conn, "DROP SCHEMA IF EXISTS %I CASCADE", schema)
            await conn.close()
            await pconn.close()

    table = run(scenario())
    assert len(table) == 6 and set(table["rows"]) == {300}
    assert (table["rows_per_s"] > 0).all()


def test_psycopg_pool_waits_30_s_by_default_and_takes_a_timeout(target) -> None:
    async def scenario() -> tuple[float, float]:
        default = await drivers.open_psycopg_pool(target.url, min_size=1, max_size=1)
        short = await drivers.open_psycopg_pool(target.url, min_size=1, max_size=1, timeout=2.5)
        try:
            return default.timeout, short.timeout
        finally:
            await default.close()
            await short.close()

    assert run(scenario()) == (30.0, 2.5)


def test_queue_order_psycopg_fifo_asyncpg_overtaken(target) -> None:
    """What notebook 08 teaches about the two queues (100 tasks, 4 connections): psycopg_pool
    serves the oldest waiter first, asyncpg lets later requests overtake."""

    async def served_late(acquire, run_query) -> int:
        tickets, served = itertools.count(), []

        async def request(i: int) -> None:
            ticket = next(tickets)
            async with acquire() as conn:
                served.append(ticket)
                await run_query(conn)

        await run_load(request, requests=300, concurrency=100, progress=False)
        return max(position - ticket for position, ticket in enumerate(served))

    async def scenario() -> tuple[int, int]:
        apool = await asyncpg.create_pool(target.url, min_size=4, max_size=4,
                                          reset=drivers.noop_reset)
        ppool = await drivers.open_psycopg_pool(target.url, min_size=4, max_size=4,
                                                autocommit=True)
        try:
            a = await served_late(apool.acquire, lambda c: c.fetchval("SELECT 1"))
            p = await served_late(ppool.connection, lambda c: c.execute("SELECT 1"))
            return a, p
        finally:
            await apool.close()
            await ppool.close()

    asyncpg_late, psycopg_late = run(scenario())
    assert psycopg_late <= 4 and asyncpg_late > 20, (asyncpg_late, psycopg_late)


def test_role_on_a_private_server_reads_shop(target) -> None:
    """role_on() with a server that is not the lesson's admin makes the role itself."""
    async def scenario() -> tuple[str, int]:
        admin = await connect(target)
        try:
            if not await admin.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
                pytest.skip("needs a superuser (the embedded server)")
            lesson = SimpleNamespace(admin=None, schema=f"test_drivers_{secrets.token_hex(3)}")
            role = await drivers.role_on(lesson, target, "reader")
            try:
                conn = await connect(role)
                try:
                    return role.user, await conn.fetchval("SELECT count(*) > 0 FROM shop.users")
                finally:
                    await conn.close()
            finally:
                await execute_ddl(admin, "DROP OWNED BY %I", role.user)
                await execute_ddl(admin, "DROP ROLE %I", role.user)
        finally:
            await admin.close()

    user, readable = run(scenario())
    assert user.endswith("_reader") and readable
