"""The plumbing of notebook 10 (helpers/sqlalchemy_engine.py), against real servers: URLs for the
asyncpg dialect, the pool-event monitor, statement counts with pg_stat_statements, and the
PgBouncer probe that makes a cached prepared statement land on another server connection."""

from __future__ import annotations

import asyncio
import os

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from helpers.sqlalchemy_engine import (
    PoolMonitor,
    async_url,
    describe_error,
    hop_probe,
    libpq_url,
    statements_per_request,
)
from tests.conftest import run

QUERY = text("SELECT name FROM shop.users WHERE id = :id")


def test_async_url_keeps_the_credentials_and_masks_them() -> None:
    url = async_url("postgres://me:not-a-real%40pw@db.example:6543/course")
    assert url.drivername == "postgresql+asyncpg"
    assert (url.username, url.password, url.host, url.port, url.database) == (
        "me", "not-a-real@pw", "db.example", 6543, "course")
    assert "not-a-real" not in str(url) + repr(url) and "***" in str(url)
    assert async_url(url) == url  # already a SQLAlchemy URL: unchanged


def test_async_url_renames_sslmode_and_libpq_url_renames_it_back() -> None:
    url = async_url("postgresql://me:not-a-real-pw@localhost/course"
                    "?sslmode=require&target_session_attrs=any")
    assert dict(url.query) == {"ssl": "require", "target_session_attrs": "any"}
    plain = make_url(libpq_url(url))
    assert plain.drivername == "postgresql" and plain.password == "not-a-real-pw"
    assert dict(plain.query) == {"sslmode": "require", "target_session_attrs": "any"}


def test_describe_error_names_the_drivers_exception() -> None:
    assert describe_error(ValueError("first line\nsecond")) == "ValueError: first line"
    assert describe_error(RuntimeError()) == "RuntimeError"


def test_pool_monitor_counts_events_and_reads_the_gauges(target) -> None:
    async def scenario():
        engine = create_async_engine(async_url(target.url), pool_size=2, max_overflow=0)
        monitor = PoolMonitor(engine)
        try:
            async def request(i: int) -> str:
                async with engine.connect() as conn:
                    await conn.execute(text("SELECT pg_sleep(0.01)"))
                    return (await conn.execute(QUERY, {"id": i + 1})).scalar_one()

            names = await asyncio.gather(*(request(i) for i in range(6)))
            async with engine.connect() as conn:
                await conn.invalidate()  # thrown away: counted, and replaced next time
            after = monitor.stats()
            monitor.detach()
            monitor.detach()  # idempotent
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            return names, after, monitor.stats()
        finally:
            await engine.dispose()

    names, after, detached = run(scenario())
    assert len(names) == 6 and all(isinstance(n, str) for n in names)
    assert after["connects"] == 2 and after["checkouts"] == after["checkins"] == 7
    assert after["invalidated"] == 1
    assert (after["size"], after["checked_out"]) == (2, 0)
    assert after["hold_ms_max"] >= 10 > 0 < after["hold_ms_mean"]
    assert detached["checkouts"] == 7  # nothing counted after detach()


def test_pool_monitor_on_a_null_pool_has_counters_only(target) -> None:
    async def scenario():
        engine = create_async_engine(async_url(target.url), poolclass=NullPool)
        monitor = PoolMonitor(engine)
        try:
            for _ in range(3):
                async with engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
            return monitor.stats()
        finally:
            await engine.dispose()

    stats = run(scenario())
    assert stats["connects"] == stats["checkouts"] == 3 and "size" not in stats


def _app_role(server) -> tuple[str, str]:
    """A login role ``app`` that may read a small ``shop.users`` on ``server``: (the superuser's
    URL, the app's URL)."""
    async def setup() -> str:
        conn = await asyncpg.connect(server.url())
        try:
            await conn.execute("""
                CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
                CREATE ROLE app LOGIN PASSWORD 'app-test-pw';
                CREATE SCHEMA shop;
                CREATE TABLE shop.users AS SELECT g AS id, 'user ' || g AS name
                    FROM generate_series(1, 100) g;
                ALTER TABLE shop.users ADD PRIMARY KEY (id);
                GRANT USAGE ON SCHEMA shop TO app;
                GRANT SELECT ON shop.users TO app;
            """)
        finally:
            await conn.close()
        return libpq_url(async_url(server.url()).set(username="app", password="app-test-pw"))

    return server.url(), run(setup())


def test_statements_per_request_counts_what_each_layer_sends(tmp_server) -> None:
    tmp_server.start()  # its settings preload pg_stat_statements
    admin_url, app_url = _app_role(tmp_server)

    async def scenario():
        admin = await asyncpg.connect(admin_url)
        pool = await asyncpg.create_pool(app_url, min_size=1, max_size=1)
        engine = create_async_engine(async_url(app_url), pool_size=1, max_overflow=0)
        autocommit = create_async_engine(async_url(app_url), pool_size=1,
                                         isolation_level="AUTOCOMMIT")

        def core(e):
            async def request(i: int) -> str:
                async with e.connect() as conn:
                    return (await conn.execute(QUERY, {"id": i + 1})).scalar_one()
            return request

        try:
            raw = await statements_per_request(
                admin, "app", lambda i: pool.fetchval(
                    "SELECT name FROM shop.users WHERE id = $1", i + 1), n=10)
            default = await statements_per_request(admin, "app", core(engine), n=10)
            bare = await statements_per_request(admin, "app", core(autocommit), n=10)
            with pytest.raises(ValueError):
                await statements_per_request(admin, "nobody_here", core(engine))
            return raw, default, bare
        finally:
            await pool.close()
            await engine.dispose()
            await autocommit.dispose()
            await admin.close()

    raw, default, bare = run(scenario())
    query = "SELECT name FROM shop.users WHERE id = $1"
    assert dict(raw) == {query: 1.0, "SELECT pg_advisory_unlock_all()": 1.0, "CLOSE ALL": 1.0,
                         "UNLISTEN *": 1.0, "RESET ALL": 1.0}
    assert dict(default) == {"BEGIN": 1.0, query: 1.0, "ROLLBACK": 1.0}
    assert dict(bare) == {query: 1.0}


def _pgbouncer():
    """(the binary, start_pgbouncer) from wherever the course keeps them, or a skip."""
    try:
        from helpers.scaling_out import PgBouncerMissing, find_pgbouncer, start_pgbouncer
    except ImportError:  # during the restructure of helpers/ (issue 13)
        from helpers._infra.pgbouncer import PgBouncerMissing, find_pgbouncer, start_pgbouncer
    try:
        return find_pgbouncer(), start_pgbouncer
    except PgBouncerMissing:
        if os.environ.get("CI") or os.environ.get("PGCOURSE_REQUIRE_PGBOUNCER"):
            raise
        pytest.skip("no pgbouncer here; `sudo apt-get install pgbouncer` gives one")


def test_hop_probe_breaks_cached_statements_behind_pgbouncer(tmp_server) -> None:
    binary, start_pgbouncer = _pgbouncer()
    tmp_server.start()
    _, app_url = _app_role(tmp_server)

    async def scenario():
        bouncer = await start_pgbouncer(app_url, default_pool_size=2, max_prepared_statements=0)
        engines = []
        try:
            def engine(**options):
                if "poolclass" not in options:
                    options = {"pool_size": 1, "max_overflow": 0, **options}
                engines.append(create_async_engine(async_url(bouncer.url), **options))
                return engines[-1]

            return {
                "defaults": await hop_probe(engine(), QUERY, {"id": 1}, bouncer.url),
                "asyncpg cache off": await hop_probe(
                    engine(connect_args={"statement_cache_size": 0}), QUERY, {"id": 1},
                    bouncer.url),
                "NullPool": await hop_probe(engine(poolclass=NullPool), QUERY, {"id": 1},
                                            bouncer.url),
            }
        finally:
            for e in engines:
                await e.dispose()
            await asyncio.to_thread(bouncer.stop)

    outcomes = run(scenario())
    assert outcomes["defaults"].startswith("InvalidSQLStatementNameError: prepared statement")
    assert outcomes["asyncpg cache off"] == outcomes["NullPool"] == "ok", (binary, outcomes)
