"""Lessons: own schema per run, one shared pool per kernel, cleanup leaves nothing behind."""

from __future__ import annotations

import json
import time

import asyncpg

from helpers.db import connect, execute_ddl
from helpers.lesson import STALE_AFTER_S, start_lesson
from tests.conftest import run


async def _count_connections(target, app: str) -> int:
    conn = await connect(target)
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app)
    finally:
        await conn.close()


async def _schema_exists(target, schema: str) -> bool:
    conn = await connect(target)
    try:
        return await conn.fetchval("SELECT to_regnamespace($1) IS NOT NULL", schema)
    finally:
        await conn.close()


def test_two_runs_have_separate_schemas(target) -> None:
    async def scenario():
        a = await start_lesson("97-isolation", min_size=1, max_size=2)
        # A second learner on the same server: in another process in real life; here the
        # module-level "current lesson" would close `a`, so build the second one by hand.
        import helpers.lesson as lesson_module
        lesson_module._current = None
        b = await start_lesson("97-isolation", min_size=1, max_size=2)
        try:
            assert a.schema != b.schema
            await a.pool.execute("CREATE TABLE items (id int)")
            await a.pool.execute("INSERT INTO items VALUES (1)")
            await b.pool.execute("CREATE TABLE items (id int)")
            assert await a.pool.fetchval("SELECT count(*) FROM items") == 1
            assert await b.pool.fetchval("SELECT count(*) FROM items") == 0
            assert await b.pool.fetchval("SELECT count(*) FROM users") == 100_000  # shop seed
        finally:
            await a.close()
            await b.close()
        assert not await _schema_exists(target, a.schema)
        assert not await _schema_exists(target, b.schema)
    run(scenario())


def test_rerunning_setup_replaces_the_pool_without_leaks(target) -> None:
    async def scenario():
        first = await start_lesson("96-rerun", min_size=3, max_size=3)
        assert await _count_connections(target, first.application_name) == 3
        second = await start_lesson("96-rerun", min_size=3, max_size=3)
        assert first.pool.is_closing() and first.closed
        assert not await _schema_exists(target, first.schema)
        assert await _count_connections(target, second.application_name) == 3
        extra = await second.create_pool(min_size=2, max_size=2)
        conn = await second.connect()
        assert await conn.fetchval("SHOW search_path") == f"{second.schema}, shop, public"
        await second.close()
        assert extra.is_closing() and conn.is_closed()
        assert await _count_connections(target, second.application_name) == 0
    run(scenario())


def test_close_survives_an_unreleased_connection(target) -> None:
    async def scenario():
        lesson = await start_lesson("95-leak", min_size=1, max_size=1)
        await lesson.pool.acquire()  # never released: pool.close() alone would wait forever
        t0 = time.perf_counter()
        await lesson.close()
        assert time.perf_counter() - t0 < 15
        assert await _count_connections(target, lesson.application_name) == 0
    run(scenario())


def test_roles_are_dropped(target) -> None:
    async def scenario():
        lesson = await start_lesson("94-roles", pool=False)
        name, password = await lesson.create_role("limited", connection_limit="1")
        conn = await asyncpg.connect(lesson.url_for(name, password))
        await conn.close()
        await lesson.close()
        admin = await connect(target)
        try:
            assert not await admin.fetchval("SELECT count(*) FROM pg_roles WHERE rolname=$1", name)
        finally:
            await admin.close()
    run(scenario())


def test_stale_schemas_from_crashed_runs_are_dropped(target) -> None:
    async def scenario():
        conn = await connect(target)
        old = f"lesson_93_stale{int(time.time()) % 10000}"
        try:
            await execute_ddl(conn, "CREATE SCHEMA %I", old)
            note = json.dumps({"lesson": "93", "created": time.time() - STALE_AFTER_S - 60})
            await execute_ddl(conn, "COMMENT ON SCHEMA %I IS %L", old, note)
        finally:
            await conn.close()
        lesson = await start_lesson("93-stale", pool=False)
        await lesson.close()
        assert not await _schema_exists(target, old)
    run(scenario())


def test_record_writes_figures(tmp_path, monkeypatch, target) -> None:
    monkeypatch.setenv("PGCOURSE_FIGURES_DIR", str(tmp_path))
    async def scenario():
        lesson = await start_lesson("92-figures", pool=False)
        lesson.record("speedup", 38.5, "x", "Pooling speed-up")
        await lesson.close()
    run(scenario())
    data = json.loads((tmp_path / "92-figures.json").read_text())
    assert data["speedup"]["value"] == 38.5


def test_private_server_is_started_and_removed(target) -> None:
    async def scenario():
        lesson = await start_lesson("91-private", pool=False)
        private = await lesson.private_server(max_connections="12")
        conn = await connect(private)
        try:
            assert await conn.fetchval("SHOW max_connections") == "12"
        finally:
            await conn.close()
        assert private.restartable and private.port != target.port
        home = private.embedded.home
        await lesson.close()
        return home
    home = run(scenario())
    assert not home.exists()


def _exited_pid() -> int:
    """The pid of a process that has exited (what a killed kernel leaves in owner.json)."""
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_private_server_of_a_dead_run_is_stopped(target) -> None:
    """A kernel that dies before cleanup leaves its private server running; the next lesson's
    setup stops and deletes it, because the kernel that owned it is gone."""

    async def scenario():
        import helpers.lesson as lesson_module

        dead = await start_lesson("89-dead", pool=False)
        private = await dead.private_server()
        lesson_module._current = None  # the kernel "died": close() never runs
        owner = lesson_module._private_root() / dead.schema / "owner.json"
        owner.write_text(json.dumps({"pid": _exited_pid()}))
        fresh = await start_lesson("89-next", pool=False)
        await fresh.close()
        return private, dead
    private, dead = run(scenario())
    assert not private.embedded.status().running
    assert not private.embedded.home.exists()
    run(dead.close())


def test_private_server_of_a_live_run_is_never_touched(target) -> None:
    """Another run's private server survives a lesson's setup while its kernel lives, even
    when its schema is not in this database (a DATABASE_URL run beside an embedded one)."""

    async def scenario():
        import helpers.lesson as lesson_module

        other = await start_lesson("88-other", pool=False)
        private = await other.private_server()
        lesson_module._current = None  # set up by "another kernel" (this live process)
        admin = await connect(target)
        try:
            await execute_ddl(admin, "DROP SCHEMA %I CASCADE", other.schema)
        finally:
            await admin.close()
        fresh = await start_lesson("88-next", pool=False)
        await fresh.close()
        alive = private.embedded.status().running
        await other.close()
        return alive
    assert run(scenario()), "a live run's private server was stopped by another run's setup"
