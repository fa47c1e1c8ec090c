"""Watch a pool while it works: client-side gauges, the server's view, Prometheus metrics (05).

asyncpg's :class:`~asyncpg.pool.Pool` tells you its size (``get_size()``, ``get_idle_size()``,
``get_min_size()``, ``get_max_size()``, ``is_closing()``) but keeps no counters: how many tasks
wait for a connection, how long they wait, how many acquires failed. This module measures them
by wrapping ``acquire``, and samples the rest:

* :class:`InstrumentedPool` wraps a pool. ``async with ipool.acquire() as conn`` works like the
  pool's own and counts waiters, wait times (however the acquire ended: a timed-out acquire
  waited too), hold times and errors; :meth:`~InstrumentedPool.get_stats` returns them as a
  plain dict named like psycopg_pool's ``get_stats()``, and :attr:`~InstrumentedPool.metrics`
  holds the same figures as prometheus_client metrics (:class:`PoolMetrics`).
* :class:`PoolMonitor` samples the pool every few milliseconds in a background task (and,
  given a connection, the server's ``pg_stat_activity`` for one ``application_name``) into
  DataFrames that share one clock, with phase marks; :func:`plot_timeline` draws them.
* :func:`activity_states` (``pg_stat_activity``), :func:`statement_totals`,
  :func:`top_statements` and :func:`query_id` (``pg_stat_statements``) are the server's side.
  ``pg_stat_statements`` counters are cumulative and shared by every client of the server
  (and PostgreSQL 18 computes a query id from table *names*, not their schema), so read
  *deltas* over your own time window, for your own role, database and statements' query ids,
  instead of calling ``pg_stat_statements_reset()`` on a shared server.
  :func:`statements_pool` gives a section a pool on a server that has the extension.
* :class:`MetricsExporter` serves pools' metrics on a local port in the Prometheus text format
  (prometheus_client's aiohttp handler, in the notebook's event loop, started and stopped
  cleanly).

Typical use::

    ipool = InstrumentedPool(pool, name="api")
    async with PoolMonitor(ipool, server=conn, application_name=app) as monitor:
        async with ipool.acquire() as c:
            await c.fetchval("SELECT 1")
    monitor.samples          # t_s, size, idle, in_use, waiting, wait_ms, ...
    ipool.get_stats()        # {'pool_size': 2, 'requests_waiting': 0, 'requests_num': 1, ...}
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import asyncpg
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from helpers._infra.errors import CourseError
from helpers.db import Target, execute_ddl
from helpers.retry import is_connection_lost

if TYPE_CHECKING:
    from helpers.lesson import Lesson

__all__ = [
    "WAIT_BUCKETS_S", "ERROR_KINDS", "STATES", "InstrumentedPool", "PoolMetrics", "PoolMonitor",
    "MetricsExporter", "activity_states", "statement_totals", "top_statements", "query_id",
    "statements_pool", "plot_timeline",
]

#: Upper bounds (seconds) of the acquire-wait histogram exported to Prometheus.
WAIT_BUCKETS_S: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                     0.25, 0.5, 1.0, 2.5, 5.0)
#: The ``error`` label of ``pgpool_acquire_errors_total``: a few fixed kinds (a label must not
#: take one value per exception class), every one exported from the start, at 0.
ERROR_KINDS: tuple[str, ...] = ("TimeoutError", "ConnectionLost", "PostgresError",
                                "InterfaceError", "Other")
#: ``pg_stat_activity.state`` values always present in :func:`activity_states` (others when seen).
STATES: tuple[str, ...] = ("active", "idle", "idle in transaction")


def error_kind(exc: BaseException) -> str:
    """Which of :data:`ERROR_KINDS` a failed acquire counts as."""
    if isinstance(exc, TimeoutError):
        return "TimeoutError"  # the pool stayed exhausted for `timeout` seconds
    if is_connection_lost(exc):
        return "ConnectionLost"  # opening a new connection failed: server down or restarting
    if isinstance(exc, asyncpg.PostgresError):
        return "PostgresError"  # the server refused the connection (too many, auth, ...)
    if isinstance(exc, asyncpg.InterfaceError):
        return "InterfaceError"  # "pool is closing": a shutdown, or a bug
    return "Other"


# -- the client's side: an instrumented acquire ---------------------------------------------------

class PoolMetrics:
    """One pool's figures as prometheus_client metrics, in a registry of their own.

    The counters and the histogram are updated by :class:`InstrumentedPool` as acquires happen;
    the gauges are read from the pool when Prometheus scrapes. Label ``pool`` is the pool's
    name. Metrics: ``pgpool_acquire_wait_seconds`` (histogram; every acquire, however it
    ended), ``pgpool_acquires_total``, ``pgpool_acquire_errors_total`` (label ``error``, one of
    :data:`ERROR_KINDS`), ``pgpool_connection_hold_seconds_total``, and the gauges
    ``pgpool_connections`` (label ``state`` = idle | in_use), ``pgpool_size``,
    ``pgpool_min_size``, ``pgpool_max_size``, ``pgpool_waiting_tasks``.
    """

    def __init__(self, ipool: InstrumentedPool) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        name, reg = ipool.name, self.registry
        self.wait = Histogram("pgpool_acquire_wait_seconds",
                              "Time from acquire() to a connection, or to its error",
                              ["pool"], buckets=WAIT_BUCKETS_S, registry=reg).labels(name)
        self.acquires = Counter("pgpool_acquires", "acquire() calls, failed ones included",
                                ["pool"], registry=reg).labels(name)
        errors = Counter("pgpool_acquire_errors", "Failed acquire() calls by kind of error",
                         ["pool", "error"], registry=reg)
        self.errors = {kind: errors.labels(name, kind) for kind in ERROR_KINDS}  # 0 from the start
        self.hold = Counter("pgpool_connection_hold_seconds",
                            "Total time connections were held by tasks", ["pool"],
                            registry=reg).labels(name)
        pool = ipool.pool
        gauges = {
            ("pgpool_size", "Open connections"): pool.get_size,
            ("pgpool_min_size", "Configured min_size"): pool.get_min_size,
            ("pgpool_max_size", "Configured max_size"): pool.get_max_size,
            ("pgpool_waiting_tasks", "Tasks waiting in acquire()"): lambda: ipool.waiting,
        }
        for (metric, text), read in gauges.items():
            Gauge(metric, text, ["pool"], registry=reg).labels(name).set_function(read)
        by_state = Gauge("pgpool_connections", "Open connections by state", ["pool", "state"],
                         registry=reg)
        by_state.labels(name, "idle").set_function(pool.get_idle_size)
        by_state.labels(name, "in_use").set_function(
            lambda: pool.get_size() - pool.get_idle_size())


class InstrumentedPool:
    """An asyncpg pool whose ``acquire()`` is measured: waiters, wait and hold times, errors.

    Only acquires made through this wrapper are counted (``ipool.acquire()``,
    ``ipool.fetchval(...)``, ...); the wrapped pool is ``ipool.pool``. The counters of
    :meth:`get_stats` are cumulative since creation or the last :meth:`pop_stats` /
    :meth:`reset`, like psycopg_pool's; the Prometheus ones (:attr:`metrics`) are never reset
    (Prometheus expects a counter to only grow). The last ``keep`` wait times are kept for
    percentiles (:meth:`wait_percentiles`). Use it from one event loop.
    """

    def __init__(self, pool: asyncpg.Pool, *, name: str = "default", keep: int = 100_000) -> None:
        self.pool = pool
        self.name = name
        self._ids = itertools.count()
        self._pending: dict[int, float] = {}  # acquires in progress: token -> start time
        self._no_waiters = asyncio.Event()
        self._no_waiters.set()
        self._waits: collections.deque[float] = collections.deque(maxlen=keep)
        self._window_max = 0.0
        self._held = 0
        self.metrics = PoolMetrics(self)
        self.reset()

    # -- acquiring -----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def acquire(self, *, timeout: float | None = None) -> AsyncIterator[asyncpg.Connection]:
        """``async with ipool.acquire(timeout=...) as conn``: the pool's acquire, measured.

        The wait runs from the call until a connection is handed over or the acquire fails
        (timed out, pool closing, no connection to be had); the hold time until the connection
        is back in the pool."""
        token, t0 = next(self._ids), time.perf_counter()
        queued = self.pool.get_idle_size() == 0  # no idle connection: this call must wait
        self._pending[token] = t0                # "waiting" is len(self._pending)
        self._no_waiters.clear()
        try:
            conn = await self.pool.acquire(timeout=timeout)
        except BaseException as exc:             # the failed wait counts too, and its error
            self._acquired(token, queued, exc)
            raise
        self._acquired(token, queued)
        t1 = time.perf_counter()
        try:
            yield conn
        finally:
            await self._release(conn, t1)

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list:
        """``pool.fetch`` through the measured acquire."""
        async with self.acquire() as conn:
            return await conn.fetch(query, *args, timeout=timeout)

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None) -> Any:
        """``pool.fetchrow`` through the measured acquire."""
        async with self.acquire() as conn:
            return await conn.fetchrow(query, *args, timeout=timeout)

    async def fetchval(self, query: str, *args: Any, timeout: float | None = None) -> Any:
        """``pool.fetchval`` through the measured acquire."""
        async with self.acquire() as conn:
            return await conn.fetchval(query, *args, timeout=timeout)

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        """``pool.execute`` through the measured acquire."""
        async with self.acquire() as conn:
            return await conn.execute(query, *args, timeout=timeout)

    async def drain_waiters(self) -> None:
        """Return once no task is waiting in ``acquire()``.

        For swapping pools: after pointing new requests at a new pool, let the old one serve
        the tasks already queued on it, then close it (``close()`` alone fails them with
        ``InterfaceError: pool is closing``).
        """
        await self._no_waiters.wait()

    # -- bookkeeping ---------------------------------------------------------------------------

    def _acquired(self, token: int, queued: bool, exc: BaseException | None = None) -> None:
        """An acquire ended (with a connection, or with ``exc``): count it and its wait."""
        wait_s = time.perf_counter() - self._pending.pop(token)
        if not self._pending:
            self._no_waiters.set()
        self._num += 1
        self._queued += queued
        self._wait_s += wait_s
        self._waits.append(wait_s)
        self._window_max = max(self._window_max, wait_s)
        self.metrics.acquires.inc()
        self.metrics.wait.observe(wait_s)
        if exc is not None and not isinstance(exc, asyncio.CancelledError):
            kind = type(exc).__name__
            self._errors[kind] = self._errors.get(kind, 0) + 1
            self.metrics.errors[error_kind(exc)].inc()
        elif exc is None:
            self._held += 1

    async def _release(self, conn: asyncpg.Connection, since: float) -> None:
        try:
            lost = conn.is_closed()
        except asyncpg.InterfaceError:  # closed and already handed back by the pool
            lost = True
        bad = False
        try:
            await self.pool.release(conn)
        except Exception:  # e.g. the reset timed out: the pool terminates the connection
            bad = True
            raise
        finally:
            held_s = time.perf_counter() - since
            self._held -= 1
            self._usage_s += held_s
            self._lost += lost
            self._returns_bad += bad
            self.metrics.hold.inc(held_s)

    def _take_window_max_ms(self) -> float:
        """The longest wait completed since the previous call (for the sampler), in ms."""
        peak, self._window_max = self._window_max, 0.0
        return peak * 1000

    def reset(self) -> None:
        """Zero the counters of :meth:`get_stats` and forget the recorded wait times."""
        self._num = 0
        self._queued = 0
        self._wait_s = 0.0
        self._usage_s = 0.0
        self._lost = 0
        self._returns_bad = 0
        self._errors: dict[str, int] = {}
        self._waits.clear()
        self._window_max = 0.0

    # -- reading -------------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Tasks inside ``acquire()`` right now (queued for a connection, or opening one)."""
        return len(self._pending)

    @property
    def held(self) -> int:
        """Connections acquired through this wrapper and not yet released."""
        return self._held

    def oldest_wait_ms(self) -> float:
        """How long the longest-waiting task has been inside ``acquire()`` so far (0 if none)."""
        starts = list(self._pending.values())
        return (time.perf_counter() - min(starts)) * 1000 if starts else 0.0

    def get_stats(self) -> dict[str, int]:
        """A plain dict, named like psycopg_pool's ``get_stats()``.

        Gauges: ``pool_min``, ``pool_max``, ``pool_size`` (open connections), ``pool_available``
        (idle ones), ``pool_in_use``, ``requests_waiting`` (tasks inside acquire now).
        Counters: ``requests_num`` (acquires, failed ones included), ``requests_queued`` (found
        no idle connection), ``requests_wait_ms`` (total wait, failed acquires included, as in
        psycopg_pool), ``requests_errors`` (failed acquires, any type), ``requests_timeouts``
        (of which ``TimeoutError``), ``usage_ms`` (total hold time), ``connections_lost``
        (connections found closed when handed back, e.g. a killed backend; psycopg_pool's
        counter of that name counts those its ``check`` found broken), ``returns_bad``
        (``release()`` failed, e.g. its reset timed out: the acquire's ``timeout`` applies to
        the release too, and the connection is then terminated).
        """
        pool = self.pool
        size = pool.get_size()
        idle = pool.get_idle_size()
        return {
            "pool_min": pool.get_min_size(),
            "pool_max": pool.get_max_size(),
            "pool_size": size,
            "pool_available": idle,
            "pool_in_use": size - idle,
            "requests_waiting": self.waiting,
            "requests_num": self._num,
            "requests_queued": self._queued,
            "requests_wait_ms": int(self._wait_s * 1000),
            "requests_errors": sum(self._errors.values()),
            "requests_timeouts": self._errors.get("TimeoutError", 0),
            "usage_ms": int(self._usage_s * 1000),
            "connections_lost": self._lost,
            "returns_bad": self._returns_bad,
        }

    def pop_stats(self) -> dict[str, int]:
        """:meth:`get_stats`, then zero the counters (psycopg_pool's ``pop_stats()``)."""
        stats = self.get_stats()
        self.reset()
        return stats

    def errors(self) -> dict[str, int]:
        """Failed acquires by exception type name, e.g. ``{'TimeoutError': 3}``."""
        return dict(self._errors)

    def wait_times_ms(self) -> np.ndarray:
        """The recorded acquire waits (the last ``keep``), in milliseconds, oldest first."""
        return np.array(self._waits, dtype=float) * 1000

    def wait_percentiles(self, qs: Sequence[float] = (50, 99)) -> dict[str, float]:
        """``{'mean': .., 'p50': .., 'p99': .., 'max': ..}`` of the recorded waits (ms)."""
        waits = self.wait_times_ms()
        if not len(waits):
            return {"mean": float("nan"), **{f"p{q:g}": float("nan") for q in qs},
                    "max": float("nan")}
        return {"mean": float(waits.mean()),
                **{f"p{q:g}": float(np.percentile(waits, q)) for q in qs},
                "max": float(waits.max())}

    def __repr__(self) -> str:
        s = self.get_stats()
        return (f"<InstrumentedPool {self.name!r} size={s['pool_size']} idle={s['pool_available']}"
                f" waiting={s['requests_waiting']} max={s['pool_max']}>")

# -- sampling over time ---------------------------------------------------------------------------

_ACTIVITY_SQL = """
SELECT coalesce(state, 'unknown') AS state, count(*)::int AS n
FROM pg_stat_activity
WHERE application_name = $1 AND backend_type = 'client backend' AND pid <> pg_backend_pid()
GROUP BY 1
"""


async def activity_states(conn: asyncpg.Connection, application_name: str) -> dict[str, int]:
    """Server-side connections of one ``application_name`` by state (``pg_stat_activity``).

    Always has the keys of :data:`STATES` (0 when none) plus ``total``; other states
    (e.g. ``idle in transaction (aborted)``) appear when present. The querying connection
    itself is left out.
    """
    rows = await conn.fetch(_ACTIVITY_SQL, application_name)
    states = dict.fromkeys(STATES, 0)
    for row in rows:
        states[row["state"]] = row["n"]
    states["total"] = sum(v for k, v in states.items() if k != "total")
    return states


class PoolMonitor:
    """Sample a pool every ``interval`` seconds in a background task, until stopped.

    ``async with PoolMonitor(pool) as monitor:`` starts the sampler and stops it (cancelled,
    awaited, nothing left running) when the block ends; ``start()`` / ``await stop()`` do the
    same by hand. Pass an :class:`InstrumentedPool` (or a bare ``asyncpg.Pool``, which is
    wrapped: then acquire through ``monitor.acquire()`` so waits are counted).

    With ``server`` (a connection *outside* the pool) and ``application_name``, a second
    task samples ``pg_stat_activity`` every ``server_interval`` seconds on the same clock.

    Results: :attr:`samples` (client), :attr:`server_samples` (server), :attr:`events`
    (phase marks from :meth:`mark`), all with ``t_s`` = seconds since start.
    """

    def __init__(self, pool: InstrumentedPool | asyncpg.Pool, *, interval: float = 0.005,
                 server: asyncpg.Connection | None = None, application_name: str | None = None,
                 server_interval: float = 0.05) -> None:
        if interval <= 0 or server_interval <= 0:
            raise ValueError("interval and server_interval must be positive (seconds)")
        if server is not None and not application_name:
            raise ValueError("pass application_name with server: it selects the pool's "
                             "connections in pg_stat_activity")
        self.pool = pool if isinstance(pool, InstrumentedPool) else InstrumentedPool(pool)
        self.interval = interval
        self.server = server
        self.application_name = application_name
        self.server_interval = server_interval
        self.events: list[tuple[float, str]] = []
        self._rows: list[dict[str, Any]] = []
        self._server_rows: list[dict[str, Any]] = []
        self._tasks: list[asyncio.Task] = []
        self._t0 = time.perf_counter()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> PoolMonitor:
        """Start sampling (resets the clock and the collected samples)."""
        if self.running:
            raise RuntimeError("this PoolMonitor is already running")
        self._t0 = time.perf_counter()
        self._rows, self._server_rows, self.events = [], [], []
        self._tasks = [asyncio.create_task(self._client_loop(), name="pool-monitor")]
        if self.server is not None:
            self._tasks.append(asyncio.create_task(self._server_loop(),
                                                   name="pool-monitor-server"))
        return self

    async def stop(self) -> None:
        """Cancel the sampling tasks, wait until they have ended, take a final sample."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:  # a sampler that died of a real error should not hide it
            if isinstance(result, Exception):
                raise result
        if tasks and not self.pool.pool.is_closing():
            self._rows.append(self.sample())

    async def __aenter__(self) -> PoolMonitor:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def running(self) -> bool:
        """True while the sampling task runs."""
        return any(not t.done() for t in self._tasks)

    # -- use -----------------------------------------------------------------------------------

    def acquire(self, *, timeout: float | None = None):
        """The measured acquire of the monitored pool (see :meth:`InstrumentedPool.acquire`)."""
        return self.pool.acquire(timeout=timeout)

    @property
    def elapsed(self) -> float:
        """Seconds since :meth:`start`."""
        return time.perf_counter() - self._t0

    def mark(self, label: str) -> float:
        """Mark the start of a phase (drawn by :func:`plot_timeline`); returns its time."""
        at = self.elapsed
        self.events.append((at, label))
        return at

    def sample(self) -> dict[str, Any]:
        """One row of pool state now (what the sampler records every ``interval``)."""
        ipool, pool = self.pool, self.pool.pool
        size = pool.get_size()
        idle = pool.get_idle_size()
        return {
            "t_s": self.elapsed,
            "size": size,
            "idle": idle,
            "in_use": size - idle,
            "min_size": pool.get_min_size(),
            "max_size": pool.get_max_size(),
            "waiting": ipool.waiting,
            "oldest_wait_ms": ipool.oldest_wait_ms(),
            "wait_ms": ipool._take_window_max_ms(),
            "acquires": ipool._num,
            "errors": sum(ipool._errors.values()),
        }

    @property
    def samples(self) -> pd.DataFrame:
        """Client-side samples: t_s, size, idle, in_use, min_size, max_size, waiting,
        oldest_wait_ms (longest wait in progress), wait_ms (longest wait completed since the
        previous sample), acquires and errors (failed acquires; both cumulative)."""
        return pd.DataFrame(self._rows, columns=["t_s", "size", "idle", "in_use", "min_size",
                                                 "max_size", "waiting", "oldest_wait_ms",
                                                 "wait_ms", "acquires", "errors"])

    @property
    def server_samples(self) -> pd.DataFrame:
        """Server-side samples: t_s, one column per state (see :func:`activity_states`),
        total, and ``error`` (the exception type when a sample failed, else empty)."""
        df = pd.DataFrame(self._server_rows)
        if df.empty:
            return pd.DataFrame(columns=["t_s", *STATES, "total", "error"])
        states = [c for c in df.columns if c not in ("t_s", "total", "error")]
        df[states + ["total"]] = df[states + ["total"]].fillna(0).astype(int)
        return df[["t_s", *states, "total", "error"]]

    # -- the loops -----------------------------------------------------------------------------

    async def _client_loop(self) -> None:
        while True:
            if self.pool.pool.is_closing():
                return
            self._rows.append(self.sample())
            await asyncio.sleep(self.interval)

    async def _server_loop(self) -> None:
        assert self.server is not None and self.application_name
        while not self.server.is_closed():
            t = self.elapsed
            try:
                states = await activity_states(self.server, self.application_name)
                self._server_rows.append({"t_s": t, **states, "error": ""})
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                self._server_rows.append({"t_s": t, "total": 0, "error": type(exc).__name__})
            await asyncio.sleep(self.server_interval)


# -- pg_stat_statements -------------------------------------------------------------------------

_STATEMENTS_SQL = """
SELECT queryid, (array_agg(query ORDER BY toplevel DESC, calls DESC))[1] AS query,
       sum(calls)::bigint AS calls,
       sum(total_exec_time) AS total_ms, sum(rows)::bigint AS rows
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND userid = (SELECT oid FROM pg_roles WHERE rolname = current_user)
  AND ($1::bigint[] IS NULL OR queryid = ANY($1::bigint[]))
GROUP BY queryid
"""


def _no_statements(exc: Exception) -> CourseError:
    return CourseError(f"pg_stat_statements is not available on this server ({exc}).",
                       "Add pg_stat_statements to shared_preload_libraries, restart, then run "
                       "CREATE EXTENSION pg_stat_statements (the course's server has both).")


async def statement_totals(conn: asyncpg.Connection,
                           queryids: Iterable[int] | None = None) -> pd.DataFrame:
    """Cumulative ``pg_stat_statements`` rows of this database and role (optionally only
    ``queryids``): queryid, query, calls, total_ms, rows. Keep it as the "before" of
    :func:`top_statements`."""
    ids = None if queryids is None else [int(q) for q in queryids]
    try:
        rows = await conn.fetch(_STATEMENTS_SQL, ids)
    except (asyncpg.UndefinedTableError, asyncpg.ObjectNotInPrerequisiteStateError) as exc:
        raise _no_statements(exc) from None
    return pd.DataFrame([dict(r) for r in rows],
                        columns=["queryid", "query", "calls", "total_ms", "rows"])


async def top_statements(conn: asyncpg.Connection, since: pd.DataFrame | None = None, *,
                         queryids: Iterable[int] | None = None, limit: int = 5) -> pd.DataFrame:
    """Statements by total execution time, largest first: query, calls, total_ms, mean_ms,
    rows, share (of the listed statements' time).

    With ``since`` (a :func:`statement_totals` snapshot), the figures are what happened after
    it; with ``queryids`` (from :func:`query_id`), only those statements. Together they give
    "my statements during my run" on a server others use too, without a global reset.
    """
    now = await statement_totals(conn, queryids)
    if since is not None and not since.empty:
        counters = ["calls", "total_ms", "rows"]
        before = since.groupby("queryid")[counters].sum()
        now = now.set_index("queryid")
        now[counters] = now[counters].sub(before.reindex(now.index).fillna(0))
        now = now.reset_index()
    now = now[now["calls"] > 0].copy()
    now["mean_ms"] = now["total_ms"] / now["calls"]
    total = now["total_ms"].sum()
    now["share"] = now["total_ms"] / total if total > 0 else 0.0
    now = now.sort_values("total_ms", ascending=False).head(limit)
    cols = ["queryid", "query", "calls", "total_ms", "mean_ms", "rows", "share"]
    return now[cols].astype({"calls": int, "rows": int}).reset_index(drop=True)


async def query_id(conn: asyncpg.Connection, sql: str) -> int:
    """The ``pg_stat_statements`` queryid of ``sql``, computed by the server without running it.

    Uses ``EXPLAIN (VERBOSE)`` with NULL for every parameter; the connection must have the same
    ``search_path`` as the one that runs the statement. Needs ``compute_query_id`` (on, or
    auto with pg_stat_statements loaded). Where ``pg_stat_statements.track`` is ``all`` (the
    course's servers), the EXPLAIN counts as one call of the statement: take a
    :func:`statement_totals` snapshot after it.
    """
    stmt = await conn.prepare(sql)
    nulls = [None] * len(stmt.get_parameters())
    plan = await conn.fetchval("EXPLAIN (VERBOSE, FORMAT JSON) " + sql, *nulls)
    qid = json.loads(plan)[0].get("Query Identifier")
    if qid is None:
        raise CourseError("The server computes no query ids (compute_query_id is off).",
                          "SET compute_query_id = on, or load pg_stat_statements.")
    return int(qid)


async def statements_pool(lesson: Lesson, target: Target, **kwargs: Any) -> asyncpg.Pool:
    """A pool for a section that reads ``pg_stat_statements`` on ``target`` (what
    ``lesson.server_with("pg_stat_statements")`` returned), in a schema named like the lesson's.

    On the lesson's own server (``target is lesson.admin``) this is ``lesson.create_pool``: the
    application role, the lesson's schema. On a private server it connects as that server's
    superuser, creates the extension and the schema there, and is closed by the lesson's
    cleanup before the server stops.
    """
    from helpers.lesson import close_pool

    if target is lesson.admin:
        return await lesson.create_pool(**kwargs)
    conn = await asyncpg.connect(target.url)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await execute_ddl(conn, "CREATE SCHEMA IF NOT EXISTS %I", lesson.schema)
    finally:
        await conn.close()
    kwargs["server_settings"] = lesson.server_settings(**kwargs.get("server_settings", {}))
    pool = await asyncpg.create_pool(target.url, **kwargs)

    async def close() -> None:
        await close_pool(pool)

    lesson.on_close(close)
    return pool


# -- Prometheus -----------------------------------------------------------------------------------

class _Merged(Collector):
    """Several pools' registries as one: samples of the same metric go under one family."""

    def __init__(self, registries: Iterable[CollectorRegistry]) -> None:
        self.registries = list(registries)

    def collect(self) -> Iterator[Any]:
        families: dict[str, Any] = {}
        for registry in self.registries:
            for family in registry.collect():  # new objects at every collect: safe to extend
                if family.name in families:
                    families[family.name].samples.extend(family.samples)
                else:
                    families[family.name] = family
        yield from families.values()


class MetricsExporter:
    """Serve pools' metrics over HTTP for Prometheus, on 127.0.0.1 and a free port.

    ``async with MetricsExporter(ipool, ...) as exporter:`` starts an aiohttp server with
    prometheus_client's own handler in the running event loop (so the gauges read the pools
    from the loop that owns them) and stops it at the end. Its registry holds the pools'
    metrics only (no process or GC metrics), so two exporters never clash.
    """

    def __init__(self, *pools: InstrumentedPool, addr: str = "127.0.0.1", port: int = 0) -> None:
        self.pools = pools
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_Merged(p.metrics.registry for p in pools))
        self.addr = addr
        self._port = port
        self._runner: Any = None

    async def start(self) -> MetricsExporter:
        """Start serving (port 0 picks a free one: see :attr:`url`)."""
        from aiohttp import web
        from prometheus_client.aiohttp import make_aiohttp_handler

        if self._runner is not None:
            raise RuntimeError("this MetricsExporter is already serving")
        app = web.Application()
        app.router.add_get("/metrics", make_aiohttp_handler(self.registry))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, self.addr, self._port).start()
        self._runner = runner
        return self

    async def stop(self) -> None:
        """Stop serving and close the socket (twice is fine)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> MetricsExporter:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def serving(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._runner is not None

    @property
    def port(self) -> int:
        """The port it listens on."""
        if self._runner is None:
            raise RuntimeError("the exporter is not serving: start() it first")
        return int(self._runner.addresses[0][1])

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>/metrics``."""
        return f"http://{self.addr}:{self.port}/metrics"

    def text(self, prefix: str = "pgpool_") -> str:
        """The exposition text, generated directly (no HTTP), like :meth:`scrape`."""
        return _keep(generate_latest(self.registry).decode(), prefix)

    async def scrape(self, prefix: str = "pgpool_", timeout: float = 5.0) -> str:
        """GET :attr:`url` as Prometheus would; keep the lines about ``prefix``, without the
        ``_created`` series (when each series began: Prometheus's own bookkeeping)."""
        import aiohttp

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s, \
                s.get(self.url) as response:
            return _keep(await response.text(), prefix)


def _keep(text: str, prefix: str) -> str:
    """The lines of exposition ``text`` about metrics named ``prefix...``, minus ``_created``."""
    kept = []
    for line in text.splitlines():
        name = line.split()[2] if line.startswith("#") else line.split("{")[0].split(" ")[0]
        if name.startswith(prefix) and not name.endswith("_created"):
            kept.append(line)
    return "\n".join(kept) + "\n"


# -- the picture ----------------------------------------------------------------------------------

def plot_timeline(monitor: PoolMonitor, title: str, events: Sequence[tuple[float, str]] = (),
                  height: float = 7.5) -> Figure:
    """Client and server view of one run on one time axis, phases marked.

    Top: the pool's open, in-use and idle connections, and tasks waiting to acquire.
    Middle: the longest acquire wait in progress (ms). Bottom (when the monitor sampled the
    server): ``pg_stat_activity`` states of the pool's ``application_name``, stacked.
    """
    import matplotlib

    from helpers.plots import PALETTE, STYLE, TITLE

    client = monitor.samples
    server = monitor.server_samples
    rows = 3 if not server.empty else 2
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(9, height if rows == 3 else height * 0.7), dpi=100,
                     layout="constrained")
        axes = fig.subplots(rows, 1, sharex=True, height_ratios=[3, 1.4, 2][:rows])
    for ax in axes:
        ax.set_axisbelow(True)
        ax.grid(True, alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    top, mid = axes[0], axes[1]
    t = client["t_s"]
    top.fill_between(t, 0, client["waiting"], step="post", color=PALETTE[3], alpha=0.25,
                     label="tasks waiting to acquire")
    top.step(t, client["size"], where="post", color=PALETTE[0], lw=2, label="open (size)")
    top.step(t, client["in_use"], where="post", color=PALETTE[1], lw=1.2, label="in use")
    top.step(t, client["idle"], where="post", color=PALETTE[2], lw=1.2, label="idle")
    if len(client):
        top.axhline(client["max_size"].iloc[-1], color="grey", ls="--", lw=0.8)
        top.axhline(client["min_size"].iloc[-1], color="grey", ls=":", lw=0.8)
        top.annotate("max_size", (t.iloc[-1], client["max_size"].iloc[-1]), fontsize=8,
                     ha="right", va="bottom", color="grey")
        top.annotate("min_size", (t.iloc[-1], client["min_size"].iloc[-1]), fontsize=8,
                     ha="right", va="bottom", color="grey")
    top.set_ylabel("connections / tasks")
    top.set_title("client: asyncpg pool", fontsize=10, loc="left")
    top.legend(fontsize=8, loc="upper right", ncols=2)
    mid.plot(t, client["oldest_wait_ms"], color=PALETTE[3], lw=1.2)
    mid.set_ylabel("longest wait (ms)")
    mid.set_title("client: how long the oldest waiter has waited", fontsize=10, loc="left")
    if rows == 3:
        bottom = axes[2]
        states = [c for c in server.columns if c not in ("t_s", "total", "error")]
        ok = server[server["error"] == ""]
        bottom.stackplot(ok["t_s"], *[ok[s] for s in states], labels=states, step="post",
                         colors=[PALETTE[(i + 1) % len(PALETTE)] for i in range(len(states))],
                         alpha=0.8)
        bottom.set_ylabel("backends")
        bottom.set_title(f"server: pg_stat_activity for {monitor.application_name!r}",
                         fontsize=10, loc="left")
        bottom.legend(fontsize=8, loc="upper right", ncols=len(states))
    axes[-1].set_xlabel("time since start (s)")
    for at, text in [*monitor.events, *events]:
        for ax in axes:
            ax.axvline(at, color="black", lw=0.8, ls="--")
        top.annotate(text, (at, 1), xycoords=("data", "axes fraction"), xytext=(3, -10),
                     textcoords="offset points", fontsize=9)
    fig.suptitle(title, **TITLE)
    return fig
