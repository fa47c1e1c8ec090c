"""The failure-drill helpers against the real server: leak detection, a faulty network,
restarting a private server in place, killing a running query, measuring an outage, throw-away
roles for a privilege demonstration."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pandas as pd
import pytest

from helpers.failures import (
    FaultProxy,
    LeakDetector,
    executing,
    outage,
    terminate_when_active,
    throwaway_roles,
)
from helpers.lesson import start_lesson
from helpers.retry import is_connection_lost
from tests.conftest import run


async def _forgetful_handler(pool: asyncpg.Pool) -> int:
    conn = await pool.acquire()  # never released: the bug the detector must point at
    return await conn.fetchval("SELECT 1")


def test_leak_detector_reports_the_acquiring_stack(target) -> None:
    async def scenario():
        lesson = await start_lesson("96-resilience", pool=False)
        reported = []
        leaks = LeakDetector(0.1, on_leak=reported.append)
        pool = await lesson.create_pool(min_size=0, max_size=2, setup=leaks.setup)
        try:
            async with pool.acquire() as conn:  # released in time: not a leak
                await conn.fetchval("SELECT 1")
            await _forgetful_handler(pool)
            await asyncio.sleep(0.35)
            return reported, leaks.leaks, leaks.held(), leaks.acquisitions
        finally:
            leaks.close()
            pool.terminate()
            await lesson.close()

    reported, leaks, held, acquisitions = run(scenario())
    assert acquisitions == 2
    assert len(reported) == 1 and reported == leaks, "reported once, not at every check"
    text = leaks[0].format()
    assert "_forgetful_handler" in text and "conn = await pool.acquire()" in text
    assert "asyncpg" not in text.split("Acquired at:")[1], "library frames are left out"
    assert len(held) == 1 and held[0][1] >= 0.3


def test_leak_detector_notices_a_late_return(target) -> None:
    async def scenario():
        lesson = await start_lesson("96-resilience", pool=False)
        leaks = LeakDetector(0.1, on_leak=lambda leak: None)
        pool = await lesson.create_pool(min_size=0, max_size=1, setup=leaks.setup)
        try:
            conn = await pool.acquire()
            await asyncio.sleep(0.15)  # reported as a leak...
            await pool.release(conn)  # ...then given back
            await asyncio.sleep(0.15)
            return leaks.leaks, leaks.held()
        finally:
            leaks.close()
            await pool.close()
            await lesson.close()

    leaks, held = run(scenario())
    assert len(leaks) == 1 and leaks[0].returned_after_s is not None
    assert held == []


def test_leak_detector_rejects_a_nonpositive_threshold() -> None:
    with pytest.raises(ValueError):
        LeakDetector(0)


def test_blackholed_connection_needs_command_timeout(target) -> None:
    """A silently dropped flow: without command_timeout even wait_for cannot return (the pool
    waits for the cancelled query forever); with it, the query fails within about twice the
    timeout and the pool replaces the connection."""
    async def scenario():
        lesson = await start_lesson("96-resilience", pool=False)
        proxy = FaultProxy(lesson.target.host, lesson.target.port)
        await proxy.start()
        url = proxy.url(lesson.dsn)
        naive = await asyncpg.create_pool(url, min_size=1, max_size=1)
        guarded = await asyncpg.create_pool(url, min_size=1, max_size=1, command_timeout=0.3)
        try:
            await naive.fetchval("SELECT 1")
            await guarded.fetchval("SELECT 1")
            assert proxy.blackhole() == 2
            stuck = asyncio.ensure_future(asyncio.wait_for(naive.fetchval("SELECT 1"), 0.3))
            done, _ = await asyncio.wait({stuck}, timeout=1.0)
            t0 = time.perf_counter()
            with pytest.raises(TimeoutError):
                await guarded.fetchval("SELECT 1")
            bounded = time.perf_counter() - t0
            after = await guarded.fetchval("SELECT 2")  # a new connection, new flow
            proxy.cut()  # end the drill: the stuck call now fails
            with pytest.raises(Exception) as info:  # noqa: B017 - which one is checked next
                await asyncio.wait_for(stuck, 5)
            assert isinstance(info.value, TimeoutError) or is_connection_lost(info.value)
            return bool(done), bounded, after
        finally:
            naive.terminate()
            guarded.terminate()
            await proxy.close()
            await lesson.close()

    stuck_done, bounded, after = run(scenario())
    assert not stuck_done, "wait_for(0.3) was still waiting after 1 s"
    assert 0.25 < bounded < 3.0
    assert after == 2


def test_cut_connection_raises_a_reconnect_error(target) -> None:
    async def scenario():
        lesson = await start_lesson("96-resilience", pool=False)
        async with FaultProxy(lesson.target.host, lesson.target.port) as proxy:
            conn = await asyncpg.connect(proxy.url(lesson.dsn))
            try:
                task = asyncio.ensure_future(conn.fetchval("SELECT pg_sleep(2)"))
                await asyncio.sleep(0.2)
                cut = proxy.cut()
                with pytest.raises(Exception) as info:  # noqa: B017 - which one is checked next
                    await asyncio.wait_for(task, 5)
                assert is_connection_lost(info.value), repr(info.value)
                return cut, type(info.value).__name__
            finally:
                conn.terminate()
                await lesson.close()

    cut, error = run(scenario())
    assert cut == 1
    assert error == "ConnectionDoesNotExistError"


def test_restart_keeps_port_and_committed_rows(target) -> None:
    async def scenario():
        lesson = await start_lesson("96-resilience", pool=False)
        try:
            private = await lesson.private_server()
            conn = await asyncpg.connect(private.url)
            await conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
            await conn.execute("INSERT INTO t SELECT generate_series(1, 100)")
            took = await asyncio.to_thread(private.embedded.restart)
            with pytest.raises(Exception) as info:  # noqa: B017 - which one is checked next
                await conn.fetchval("SELECT 1")
            # the loss itself, or (asyncpg already noticed it) a connection object that is dead
            assert is_connection_lost(info.value) or (
                isinstance(info.value, asyncpg.InterfaceError)
                and str(info.value) == "connection is closed"), repr(info.value)
            conn = await asyncpg.connect(private.url)  # same URL, same port
            rows = await conn.fetchval("SELECT count(*) FROM t")
            await conn.close()
            return took, rows, private.embedded.status().port, private.port
        finally:
            await lesson.close()

    took, rows, port_after, port_before = run(scenario())
    assert rows == 100
    assert port_after == port_before
    assert 0 < took < 30


def test_terminate_when_active_kills_the_running_query(target) -> None:
    async def scenario():
        lesson = await start_lesson("96-resilience", pool=False)
        admin = await lesson.connect()
        victim = await lesson.connect()
        try:
            t0 = time.perf_counter()
            task = asyncio.ensure_future(victim.fetchval("SELECT pg_sleep(3) /* victim-96 */"))
            for _ in range(200):  # reported once it has run 50 ms, not while it is parsed
                if found := await executing(admin, "%victim-96%"):
                    break
                await asyncio.sleep(0.01)
            assert found == [victim.get_server_pid()] and time.perf_counter() - t0 >= 0.05
            pid = await terminate_when_active(admin, "%victim-96%", running_for_s=0.2)
            assert time.perf_counter() - t0 >= 0.2  # killed inside the execution, not the parse
            with pytest.raises(asyncpg.ConnectionDoesNotExistError):
                await asyncio.wait_for(task, 5)
            with pytest.raises(TimeoutError):
                await terminate_when_active(admin, "%nothing-runs-this%", timeout_s=0.1)
            return pid, victim.get_server_pid()
        finally:
            await lesson.close()

    pid, victim_pid = run(scenario())
    assert pid == victim_pid


def test_outage_window_from_a_load_frame() -> None:
    df = pd.DataFrame({"start_s": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
                       "ok": [True, False, True, False, True, True]})
    window = outage(df)
    assert window["errors"] == 2
    assert window["first_error_s"] == 0.1 and window["last_error_s"] == 0.3
    assert window["recovered_s"] == 0.4
    assert window["downtime_s"] == pytest.approx(0.3)
    clean = outage(df.assign(ok=True))
    assert clean["errors"] == 0 and pd.isna(clean["downtime_s"])


def test_throwaway_roles_on_a_private_server(target) -> None:
    """Roles for a privilege demonstration: created with passwords, usable, dropped after (their
    sessions ended first), on a private server as the notebook does."""
    async def scenario():
        lesson = await start_lesson("96-resilience", pool=False)
        try:
            private = await lesson.private_server()
            async with throwaway_roles(private, "victim", "watchdog") as roles:
                victim = await asyncpg.connect(roles["victim"].url)
                watchdog = await asyncpg.connect(roles["watchdog"].url)
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await watchdog.fetchval("SELECT pg_terminate_backend($1)",
                                            victim.get_server_pid())
                whoami = await watchdog.fetchval("SELECT current_user")
                await watchdog.close()
                # victim stays connected: the context ends its session before dropping it
            boss = await asyncpg.connect(private.url)
            left = await boss.fetchval(
                "SELECT count(*) FROM pg_roles WHERE rolname IN ('victim', 'watchdog')")
            await boss.close()
            return whoami, left, victim.is_closed() or await _is_dead(victim)
        finally:
            await lesson.close()

    whoami, left, victim_gone = run(scenario())
    assert whoami == "watchdog" and left == 0 and victim_gone


async def _is_dead(conn: asyncpg.Connection) -> bool:
    try:
        await conn.fetchval("SELECT 1")
    except Exception as exc:  # any failure means the session was ended
        return is_connection_lost(exc) or isinstance(exc, asyncpg.InterfaceError)
    return False
