"""The monitoring helpers against the real server: instrumented acquire, sampler, server views,
Prometheus exporter."""

from __future__ import annotations

import asyncio
import io
import secrets
import urllib.error
import urllib.request

import asyncpg
import pytest
from matplotlib.figure import Figure
from prometheus_client.parser import text_string_to_metric_families

from helpers.lesson import start_lesson
from helpers.monitoring import (
    ERROR_KINDS,
    WAIT_BUCKETS_S,
    InstrumentedPool,
    MetricsExporter,
    PoolMonitor,
    activity_states,
    plot_timeline,
    query_id,
    statement_totals,
    statements_pool,
    top_statements,
)
from tests.conftest import run

SLEEP_SQL = "SELECT pg_sleep($1::float8)"


def _app() -> str:
    return f"test_monitor/{secrets.token_hex(4)}"


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_instrumented_acquire_counts_waiters_waits_and_timeouts(target) -> None:
    async def scenario():
        async with asyncpg.create_pool(target.url, min_size=1, max_size=2) as pool:
            ipool = InstrumentedPool(pool, name="t")

            async def hold(i: int) -> None:
                async with ipool.acquire() as conn:
                    await conn.fetchval(SLEEP_SQL, 0.02)

            tasks = [asyncio.create_task(hold(i)) for i in range(6)]
            await asyncio.sleep(0.005)
            waiting, held = ipool.waiting, ipool.held
            await ipool.drain_waiters()  # returns once the last queued task got a connection
            after_drain = ipool.waiting
            await asyncio.gather(*tasks)
            stats = ipool.get_stats()
            waits = ipool.wait_percentiles((50, 99))
            times = ipool.wait_times_ms()

            # both connections held: acquires with a 10 ms timeout fail
            async with ipool.acquire(), ipool.acquire():
                failed = await asyncio.gather(
                    *(_acquire_with_timeout(ipool, 0.01) for _ in range(3)),
                    return_exceptions=True)
            errors = ipool.errors()
            popped = ipool.pop_stats()
            zero = ipool.get_stats()
            return waiting, held, after_drain, stats, waits, times, failed, errors, popped, zero

    (waiting, held, after_drain, stats, waits, times, failed, errors, popped,
     zero) = run(scenario())
    assert held <= 2 and waiting >= 3 and after_drain == 0
    assert stats["requests_num"] == 6 and stats["requests_errors"] == 0
    assert stats["requests_queued"] >= 4  # found no idle connection
    assert stats["pool_size"] == 2 and stats["pool_max"] == 2 and stats["requests_waiting"] == 0
    assert stats["usage_ms"] >= 6 * 20 * 0.9  # six holds of at least 20 ms each
    assert stats["requests_wait_ms"] >= 20  # the later tasks waited for the first ones
    assert len(times) == 6 and waits["p50"] <= waits["p99"] <= waits["max"]
    assert all(isinstance(f, TimeoutError) for f in failed)
    assert errors == {"TimeoutError": 3}
    assert popped["requests_timeouts"] == 3 and popped["requests_errors"] == 3
    assert popped["requests_num"] == 6 + 2 + 3
    assert zero["requests_num"] == 0 and zero["requests_errors"] == 0
    assert set(stats) >= {"pool_min", "pool_max", "pool_size", "pool_available",
                          "requests_waiting", "requests_num", "requests_queued",
                          "requests_wait_ms", "requests_errors", "usage_ms"}


async def _acquire_with_timeout(ipool: InstrumentedPool, timeout: float) -> None:
    async with ipool.acquire(timeout=timeout) as conn:
        await conn.fetchval("SELECT 1")


def test_lost_connections_and_bad_returns_are_counted(target) -> None:
    async def scenario():
        async with asyncpg.create_pool(target.url, min_size=1, max_size=1) as pool:
            ipool = InstrumentedPool(pool)
            async with ipool.acquire() as conn:
                conn.terminate()
            value = await ipool.fetchval("SELECT 41 + 1")  # the pool reconnects
            with pytest.raises(TimeoutError):  # the acquire timeout also bounds the reset
                async with ipool.acquire(timeout=0.000001) as conn:
                    await conn.fetchval("SELECT 1")
            return ipool.get_stats(), value
    stats, value = run(scenario())
    assert stats["connections_lost"] == 1 and value == 42
    assert stats["returns_bad"] == 1 and stats["requests_errors"] == 0


def test_monitor_samples_both_sides_and_stops_cleanly(target) -> None:
    app = _app()

    async def scenario():
        watcher = await asyncpg.connect(target.url)
        try:
            async with asyncpg.create_pool(
                    target.url, min_size=1, max_size=3, max_inactive_connection_lifetime=0.2,
                    server_settings={"application_name": app}) as pool:
                monitor = PoolMonitor(pool, interval=0.005, server=watcher,
                                      application_name=app, server_interval=0.02)
                async with monitor:
                    running = monitor.running
                    monitor.mark("burst")

                    async def hold() -> None:
                        async with monitor.acquire() as conn:
                            await conn.fetchval(SLEEP_SQL, 0.03)

                    await asyncio.gather(*(hold() for _ in range(8)))
                    monitor.mark("idle")
                    await asyncio.sleep(0.5)
                left = [t for t in asyncio.all_tasks() if t.get_name().startswith("pool-monitor")]
            for _ in range(100):  # closed backends leave pg_stat_activity within moments
                states = await activity_states(watcher, app)
                if states["total"] == 0:
                    break
                await asyncio.sleep(0.02)
            return monitor, running, left, states
        finally:
            await watcher.close()

    monitor, running, left, states = run(scenario())
    assert running and not monitor.running and left == []
    client, server = monitor.samples, monitor.server_samples
    assert list(client.columns) == ["t_s", "size", "idle", "in_use", "min_size", "max_size",
                                    "waiting", "oldest_wait_ms", "wait_ms", "acquires", "errors"]
    assert len(client) > 20 and client["t_s"].is_monotonic_increasing
    assert client["size"].max() == 3 and client["waiting"].max() >= 3
    assert client["size"].iloc[-1] == 1  # shrunk back to min_size after the lifetime
    assert client["acquires"].iloc[-1] == 8 and client["errors"].iloc[-1] == 0
    assert client["oldest_wait_ms"].max() > 10
    assert [label for _, label in monitor.events] == ["burst", "idle"]
    assert {"t_s", "active", "idle", "idle in transaction", "total", "error"} <= set(server)
    assert server["total"].max() == 3 and (server["error"] == "").all()
    assert states == {"active": 0, "idle": 0, "idle in transaction": 0, "total": 0}  # closed
    for fig in (plot_timeline(monitor, "t"), plot_timeline(_client_only(monitor), "t")):
        assert isinstance(fig, Figure)
        fig.savefig(io.BytesIO(), format="png")


def _client_only(monitor: PoolMonitor) -> PoolMonitor:
    copy = PoolMonitor(monitor.pool)
    copy._rows = monitor._rows
    return copy


def test_monitor_rejects_bad_arguments(target) -> None:
    async def scenario():
        async with asyncpg.create_pool(target.url, min_size=1, max_size=1) as pool:
            with pytest.raises(ValueError, match="application_name"):
                PoolMonitor(pool, server=await asyncpg.connect(target.url))
            with pytest.raises(ValueError, match="positive"):
                PoolMonitor(pool, interval=0)
            monitor = PoolMonitor(pool).start()
            with pytest.raises(RuntimeError, match="already running"):
                monitor.start()
            await monitor.stop()
            await monitor.stop()  # twice is fine
    run(scenario())


def test_statement_deltas_for_own_query_ids(target) -> None:
    marker = secrets.randbelow(10**6)
    sql = "SELECT $1::int + id FROM shop.products WHERE id = $2"

    async def scenario():
        conn = await asyncpg.connect(target.url)
        try:
            await conn.fetchval(sql, marker, 1)  # make sure the statement exists
            qid = await query_id(conn, sql)
            before = await statement_totals(conn, [qid])
            for i in range(7):
                await conn.fetchval(sql, marker, i + 1)
            top = await top_statements(conn, since=before, queryids=[qid])
            everything = await top_statements(conn, limit=3)
            return qid, before, top, everything
        finally:
            await conn.close()

    qid, before, top, everything = run(scenario())
    assert list(before["queryid"]) == [qid]
    assert list(top.columns) == ["queryid", "query", "calls", "total_ms", "mean_ms", "rows",
                                 "share"]
    assert len(top) == 1 and top["calls"][0] == 7 and top["rows"][0] == 7  # the delta only
    assert top["query"][0].startswith("SELECT $1::int + id FROM shop.products")
    assert top["share"][0] == pytest.approx(1.0)
    assert 1 <= len(everything) <= 3
    assert everything["total_ms"].is_monotonic_decreasing


def test_exporter_serves_scrapes_and_stops(target) -> None:
    async def scenario():
        async with asyncpg.create_pool(target.url, min_size=1, max_size=2) as pool:
            a, b = InstrumentedPool(pool, name="a"), InstrumentedPool(pool, name="b")
            fresh = MetricsExporter(b).text()  # before anything happened
            await a.fetchval("SELECT 1")
            async with a.acquire(), a.acquire():  # both connections held
                with pytest.raises(TimeoutError):
                    await _acquire_with_timeout(a, 0.02)
            async with MetricsExporter(a, b) as exporter, MetricsExporter(a) as other:
                assert exporter.serving and exporter.port != other.port
                scraped = await exporter.scrape()
                full = await asyncio.to_thread(
                    lambda: urllib.request.urlopen(exporter.url, timeout=5).read().decode())
                url = exporter.url
            return fresh, scraped, full, url, exporter, a.get_stats()

    fresh, scraped, full, url, exporter, stats = run(scenario())
    values = _samples(scraped)
    assert values[("pgpool_acquires_total", (("pool", "a"),))] == stats["requests_num"] == 4
    assert values[("pgpool_acquires_total", (("pool", "b"),))] == 0
    assert values[("pgpool_acquire_errors_total",
                   (("error", "TimeoutError"), ("pool", "a")))] == 1
    for kind in ERROR_KINDS:  # every kind of error exists from the start, at 0
        assert _samples(fresh)[("pgpool_acquire_errors_total",
                                (("error", kind), ("pool", "b")))] == 0
    assert values[("pgpool_size", (("pool", "a"),))] == stats["pool_size"]
    assert values[("pgpool_max_size", (("pool", "a"),))] == 2
    assert values[("pgpool_connections", (("pool", "a"), ("state", "idle")))] == \
        stats["pool_available"]
    # the timed-out acquire is in the wait histogram too, with at least its timeout
    assert values[("pgpool_acquire_wait_seconds_count", (("pool", "a"),))] == 4
    assert values[("pgpool_acquire_wait_seconds_bucket", (("le", "0.01"), ("pool", "a")))] <= 3
    assert values[("pgpool_acquire_wait_seconds_sum", (("pool", "a"),))] >= 0.02
    buckets = [k for k in values if k[0] == "pgpool_acquire_wait_seconds_bucket"
               and ("pool", "a") in k[1]]
    assert len(buckets) == len(WAIT_BUCKETS_S) + 1
    assert all(line.startswith(("pgpool_", "# HELP pgpool_", "# TYPE pgpool_"))
               for line in scraped.splitlines())
    assert "_created" not in scraped and "_created" in full  # scrape() leaves out bookkeeping
    assert full.count("# TYPE pgpool_acquires_total counter") == 1  # two pools, one family
    assert "python_gc" not in full  # its own registry: no default process metrics
    assert not exporter.serving
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)
    with pytest.raises(RuntimeError, match="not serving"):
        exporter.port  # noqa: B018


def test_statements_pool_on_a_private_server(target) -> None:
    """Where the lesson's server lacks pg_stat_statements the section runs on a private server:
    the pool lands there, with the extension created and the lesson's schema first on its
    search_path, and it is closed by the lesson's cleanup."""
    async def scenario():
        lesson = await start_lesson("95-monitoring", pool=False)
        try:
            own = await statements_pool(lesson, lesson.admin, min_size=1, max_size=1)
            own_user = await own.fetchval("SELECT current_user")
            private = await lesson.private_server()
            pool = await statements_pool(lesson, private, min_size=1, max_size=1)
            async with pool.acquire() as conn:
                await conn.execute("CREATE TABLE t (id int)")
                schema = await conn.fetchval(
                    "SELECT relnamespace::regnamespace::text FROM pg_class WHERE relname = 't'")
                qid = await query_id(conn, "SELECT count(*) FROM t WHERE id = $1")
                before = await statement_totals(conn, [qid])  # EXPLAIN counts with track=all
                await conn.fetchval("SELECT count(*) FROM t WHERE id = $1", 1)
                top = await top_statements(conn, since=before, queryids=[qid])
            return lesson, own_user, schema, top, pool
        finally:
            await lesson.close()

    lesson, own_user, schema, top, pool = run(scenario())
    assert own_user == lesson.target.user  # the application role on the lesson's own server
    assert schema == lesson.schema and list(top["calls"]) == [1]
    assert pool.is_closing()  # closed by lesson.close()
