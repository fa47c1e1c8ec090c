"""helpers.web_service against the real thing: uvicorn subprocesses serving helpers.shop_api on
the course database, an aiohttp load generator in another process, and pg_stat_activity to
check that nothing is left behind. No mocks."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import time

import asyncpg
import pytest

from helpers import web_service as ws
from helpers.db import Target
from helpers.load import LoadResult
from tests.conftest import run


def _app_name() -> str:
    return f"test/web/{secrets.token_hex(4)}"  # unique: counts only this test's connections


async def _count(target: Target, name: str) -> int:
    conn = await asyncpg.connect(target.url)
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", name)
    finally:
        await conn.close()


async def _count_settles(target: Target, name: str, want: int, within: float = 5.0) -> int:
    n = await _count(target, name)
    for _ in range(int(within / 0.05)):  # backends exit a moment after their client closed
        if n == want:
            break
        await asyncio.sleep(0.05)
        n = await _count(target, name)
    return n


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split(")")[-1].split()[0] != "Z"


def test_server_starts_serves_and_stops_leaving_no_connection(target: Target) -> None:
    name = _app_name()

    async def scenario() -> None:
        env = {"DATABASE_URL": target.url, "DB_POOL_MIN": "3", "DB_POOL_MAX": "3",
               "DB_APPLICATION_NAME": name}
        server = await ws.start_server(env, ready_path="/health/ready")
        try:
            assert server.command.startswith("uvicorn helpers.shop_api:app --host 127.0.0.1")
            assert target.password is None or target.password not in server.command
            assert await server.get("/ping") == (200, {"pong": True})
            status, body = await server.get("/users/42")
            assert status == 200 and body["id"] == 42
            status, body = await server.get("/users/42/summary")
            assert status == 200 and set(body) >= {"orders", "last_order"}
            assert (await server.get("/users/0"))[0] == 404
            assert (await server.get("/connect-per-request/users/7"))[0] == 200
            assert await _count(target, name) == 3  # the pool, opened in lifespan
        finally:
            code = await server.stop()
        assert not server.running and code is not None
        assert "pool closed" in server.log()
        assert await _count_settles(target, name, 0) == 0
        server.cleanup()
        assert not server.log_path.exists()

    run(scenario())


def test_a_server_that_cannot_start_is_reported_and_stopped(target: Target) -> None:
    async def scenario() -> None:
        bad = target.replace(password="not-the-password-" + secrets.token_hex(4)).url
        with pytest.raises(ws.ServerFailed) as info:
            await ws.start_server({"DATABASE_URL": bad}, timeout=20)
        assert "password" in str(info.value).lower() or "Error" in str(info.value)
        assert "not-the-password" not in str(info.value)

    run(scenario())


def test_load_client_closed_and_open_loops(target: Target) -> None:
    async def scenario() -> None:
        env = {"DATABASE_URL": target.url, "DB_POOL_MIN": "2", "DB_POOL_MAX": "2",
               "DB_ACQUIRE_TIMEOUT": "0.05", "DB_APPLICATION_NAME": _app_name()}
        server = await ws.start_server(env)
        client = await ws.start_client()
        try:
            cpu0 = server.cpu_s()
            closed = await client.closed(server.url, "/users/{key}", concurrency=4,
                                         duration_s=0.3, warmup_s=0.05,
                                         probes={"live": "/health/live"})
            assert server.cpu_s() > cpu0  # the server's own CPU seconds, read from outside
            assert isinstance(closed, LoadResult) and closed.errors == 0 and len(closed.df) > 10
            assert closed.warmup_requests > 0  # answered, not recorded
            assert {"start_s", "latency_ms", "status", "outcome", "ok"} <= set(closed.df)
            assert (closed.df["db_ms"] > 0).all()  # every point read's Server-Timing header
            assert set(closed.df["status"]) == {200} and closed.summary()["rps"] > 0
            assert closed.probes is not None and set(closed.probes["outcome"]) == {"ok"}
            assert 0 < closed.client_cpu_share < 2
            both = await client.together({"ping": (server.url, "/ping"),
                                          "read": (server.url, "/users/{key}")},
                                         concurrency=2, duration_s=0.3)
            assert set(both) == {"ping", "read"}
            assert all(r.errors == 0 and len(r.df) > 5 for r in both.values())
            assert both["ping"].started_at == both["read"].started_at
            # A burst on a pool of 2 holding connections 50 ms: fast 503s with Retry-After.
            burst = await client.open(server.url, "/reports/slow?seconds=0.05", rate=200,
                                      duration_s=0.3)
            assert len(burst.df) == 60
            busy = burst.df[burst.df["status"] == 503]
            assert len(busy) > 0 and (busy["retry_after"] == 1).all()
            assert busy["latency_ms"].max() < 2000
            assert burst.df["start_s"].is_monotonic_increasing
        finally:
            client.stop()
            await server.stop()
            server.cleanup()

    run(scenario())


def test_sigterm_lets_in_flight_requests_finish(target: Target) -> None:
    name = _app_name()

    async def scenario() -> None:
        env = {"DATABASE_URL": target.url, "DB_POOL_MIN": "2", "DB_POOL_MAX": "2",
               "DB_APPLICATION_NAME": name}
        server = await ws.start_server(env)
        client = await ws.start_client()
        try:
            async def terminate_soon() -> float:
                await asyncio.sleep(0.3)
                server.send()
                return time.time()

            run_, at = await asyncio.gather(
                client.closed(server.url, "/reports/slow?seconds=0.3", concurrency=2,
                              duration_s=1.0), terminate_soon())
            await server.wait()
        finally:
            client.stop()
            server.cleanup()
        df, t = run_.df, at - run_.started_at
        in_flight = df[(df["start_s"] < t) & (df["start_s"] + df["latency_ms"] / 1000 > t)]
        assert len(in_flight) == 2 and in_flight["ok"].all()
        # uvicorn answers what was in flight when it began shutting down with "Connection: close"
        assert df["closing"].any() and df.loc[df["closing"], "ok"].all()
        ended = df["start_s"] + df["latency_ms"] / 1000
        assert not df.loc[ended < t, "closing"].any()  # answered before the signal: kept alive
        assert await _count_settles(target, name, 0) == 0

    run(scenario())


def test_a_full_server_is_busy_not_an_error() -> None:
    """A pool that cannot grow because the server has no slot left answers 503, like a pool
    whose connections are all in use (notebook 11, section 6)."""
    from helpers import shop_api

    handlers = shop_api.app.exception_handlers
    assert handlers[asyncpg.TooManyConnectionsError] is shop_api.database_busy
    assert handlers[TimeoutError] is shop_api.database_busy


def test_a_server_outlives_no_parent(target: Target, tmp_path) -> None:
    """The watchdog: a kernel that dies without cleanup takes its server with it."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import asyncio, os, sys\n"
        "from helpers.web_service import start_server\n"
        "server = asyncio.run(start_server({'DATABASE_URL': sys.argv[1], 'DB_POOL_MIN': '1'}))\n"
        "print(server.log_path, server.pid, flush=True)\n"
        "os._exit(0)  # no cleanup at all, as a killed kernel\n")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, str(script), target.url], capture_output=True,
                         text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    log_path, pid = out.stdout.split()[-2], int(out.stdout.split()[-1])
    deadline = time.monotonic() + 15
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), "the server outlived its parent"
    assert not os.path.exists(log_path), "and its log folder went with it"


def test_fork_demo_inherited_pool_fails_and_a_pool_after_fork_works(target: Target) -> None:
    runs = ws.fork_demo(target.url, queries=5)
    before, after = runs["before"], runs["after"]
    assert len(before) == len(after) == 2
    assert all(r["ok"] == 0 and r["errors"] for r in before)
    assert all(r["ok"] == 5 and not r["errors"] for r in after)


def test_last_error_finds_the_exception_line() -> None:
    log = "INFO: x\nTraceback (most recent call last):\n  File ...\nValueError: boom\nINFO: y\n"
    assert ws.last_error(log) == "ValueError: boom"
    assert ws.last_error("just a line\n") == "just a line"
    assert ws.key(0, 10) == 1 and sorted(ws.key(i, 10) for i in range(10)) == list(range(1, 11))
