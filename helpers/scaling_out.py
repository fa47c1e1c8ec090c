"""Several application processes, each with its own asyncpg pool: how apps scale out.

A web application in production is rarely one process: it runs N worker processes (gunicorn,
uvicorn ``--workers``, several containers), and each one opens its own pool. Notebook 07
measures what that does to the server::

    fleet = await AppFleet(4).start()                 # 4 processes, started with "spawn"
    await fleet.open_pools(url, min_size=6, max_size=6)
    run = await fleet.run("SELECT $1::int", concurrency=20, duration_s=1.0,
                          watch=count_server_connections)
    run.rps, run.server_peak, run.errors, run.percentile(99)

Behind PgBouncer in transaction mode, ``open_pools(..., reset="noop")`` gives every process's
pool a reset that sends nothing on release (asyncpg's default reset is a second transaction per
request there; notebook 07 measures it).

The processes are started once with the ``spawn`` method (a fresh interpreter, as on macOS
and Windows, and safe in a Jupyter kernel, where ``fork`` would copy a running event loop) and
then take commands over a pipe, so their start-up cost is paid once. Their code must live in an
importable module, this one: a function defined in a notebook cannot be sent to a spawned
process. :meth:`AppFleet.run` starts every process at the same instant and stops it at the
same deadline, so the server sees them all at once.

:func:`pgbouncer_for` is the notebook's setup step for PgBouncer: which binary it will use, or
why the ``%%needs pgbouncer`` cells are skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import random
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from helpers._infra.errors import CourseError

# PgBouncer for notebook 07 (running the process is machinery: helpers/_infra/pgbouncer.py).
from helpers._infra.pgbouncer import (
    HOW_TO_GET,
    Binary,
    PgBouncer,
    PgBouncerMissing,
    close_with,
    find_pgbouncer,
    start_pgbouncer,
)
from helpers._infra.pipes import recv
from helpers.db import Target

#: Seconds between the "go" message and the common start, so every process is ready.
START_DELAY_S = 0.15
#: The ``reset=`` choices a process's pool accepts (a notebook's function cannot be sent to a
#: spawned process, so the choice travels by name): asyncpg's default, or one that sends nothing.
RESETS = (None, "noop")


class FleetError(CourseError):
    """One or more application processes failed a command (their errors are in the text)."""


# -- inside each application process -----------------------------------------------------------


def worker_main(conn: Any) -> None:
    """Entry point of an application process: serve commands from ``conn`` until told to exit."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(conn))


async def _serve(conn: Any) -> None:
    # Imported before "ready", so that its cost falls in start-up, not in a measurement.
    from helpers.lesson import close_pool  # the course's one "close, then terminate"

    state: dict[str, Any] = {"pools": {}, "close_pool": close_pool}
    loop = asyncio.get_running_loop()
    conn.send(("ready", os.getpid()))
    while True:
        try:
            op, kwargs = await loop.run_in_executor(None, conn.recv)
        except (EOFError, OSError):
            break
        if op == "exit":
            await _close_pool(state)
            conn.send(("ok", None))
            break
        try:
            result = await _HANDLERS[op](state, **kwargs)
            conn.send(("ok", result))
        except Exception as exc:  # reported to the parent, which raises FleetError
            conn.send(("error", (type(exc).__name__, _first_line(exc))))
    await _close_pool(state)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


async def _noop_reset(conn: Any) -> None:
    """``reset="noop"`` in a process: send nothing on release (see helpers.drivers.noop_reset)."""


async def _open_pool(state: dict[str, Any], name: str, url: str, min_size: int, max_size: int,
                     reset: str | None, pool_kwargs: dict[str, Any]) -> dict[str, Any]:
    import asyncpg

    await _close_pool(state, name)
    if reset == "noop":
        pool_kwargs = {**pool_kwargs, "reset": _noop_reset}
    pool = await asyncpg.create_pool(url, min_size=min_size, max_size=max_size, timeout=10,
                                     **pool_kwargs)
    state["pools"][name] = pool
    return {"pid": os.getpid(), "size": pool.get_size(), "max_size": max_size}


async def _close_pool(state: dict[str, Any], name: str | None = None) -> None:
    names = list(state["pools"]) if name is None else [name]
    for key in names:
        pool = state["pools"].pop(key, None)
        if pool is not None:
            await state["close_pool"](pool)


async def _run(state: dict[str, Any], pool: str, sql: str, arg_max: int | None,
               concurrency: int, start_at: float, duration_s: float) -> dict[str, Any]:
    if pool not in state["pools"]:
        raise RuntimeError(f"no pool named {pool!r}: open_pools() first")
    connections = state["pools"][pool]
    rnd = random.Random(os.getpid())
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    messages: dict[str, str] = {}
    await asyncio.sleep(max(0.0, start_at - time.time()))
    begin = time.time()
    deadline = start_at + duration_s
    perf = time.perf_counter

    async def task() -> None:
        while time.time() < deadline:
            args = (rnd.randint(1, arg_max),) if arg_max else ()
            t0 = perf()
            try:
                await connections.fetchval(sql, *args)
            except Exception as exc:  # errors are data here: counted by type
                name = type(exc).__name__
                errors[name] += 1
                messages.setdefault(name, _first_line(exc))
                await asyncio.sleep(0.001)  # an error loop must not spin the CPU
                continue
            latencies.append((perf() - t0) * 1000)

    await asyncio.gather(*(task() for _ in range(concurrency)))
    return {"pid": os.getpid(), "ok": len(latencies), "errors": dict(errors),
            "messages": messages, "window_s": time.time() - begin, "latencies_ms": latencies,
            "pool_size": connections.get_size()}


async def _ping(state: dict[str, Any]) -> int:
    return os.getpid()


_HANDLERS = {"open_pool": _open_pool, "close_pool": _close_pool, "run": _run, "ping": _ping}


# -- in the notebook's process -----------------------------------------------------------------


@dataclass
class FleetRun:
    """What one :meth:`AppFleet.run` measured, over all processes."""

    label: str
    processes: int
    concurrency: int  # per process
    client_connections: int  # connections the processes' pools held (to the server or bouncer)
    per_process: list[dict[str, Any]] = field(repr=False)
    server_samples: list[int] = field(default_factory=list, repr=False)
    started_at: float = 0.0  # wall clock (time.time()) when every process started
    duration_s: float = 0.0

    @property
    def ok(self) -> int:
        return sum(p["ok"] for p in self.per_process)

    @property
    def errors(self) -> dict[str, int]:
        """Failed requests by exception type, over all processes."""
        total: Counter[str] = Counter()
        for p in self.per_process:
            total.update(p["errors"])
        return dict(total)

    @property
    def messages(self) -> dict[str, str]:
        """The first message seen for each exception type."""
        merged: dict[str, str] = {}
        for p in self.per_process:
            for k, v in p["messages"].items():
                merged.setdefault(k, v)
        return merged

    @property
    def rps(self) -> float:
        """Successful requests per second, summed over the processes."""
        return sum(p["ok"] / p["window_s"] for p in self.per_process if p["window_s"] > 0)

    @property
    def latencies_ms(self) -> list[float]:
        return [x for p in self.per_process for x in p["latencies_ms"]]

    def percentile(self, q: float) -> float:
        """Latency percentile (ms, q in 0..100) over successful requests of all processes.

        The course's one definition (:meth:`helpers.load.LoadResult.percentile`, pandas'
        ``quantile``): linear interpolation between the closest ranks, which is numpy's default.
        """
        import numpy as np

        lat = self.latencies_ms
        return float(np.percentile(lat, q)) if lat else float("nan")

    @property
    def server_peak(self) -> int:
        """The most server connections the watch saw during the run (0 without a watch)."""
        return max(self.server_samples, default=0)

    @property
    def server_median(self) -> float:
        return statistics.median(self.server_samples) if self.server_samples else 0.0

    def summary(self) -> dict[str, Any]:
        """Plain numbers for a table row."""
        return {"label": self.label, "processes": self.processes,
                "client_conns": self.client_connections, "server_conns": self.server_peak,
                "rps": round(self.rps), "p50_ms": round(self.percentile(50), 2),
                "p99_ms": round(self.percentile(99), 2), "errors": sum(self.errors.values())}


class AppFleet:
    """``processes`` application processes (spawned once), each with its own asyncpg pool."""

    def __init__(self, processes: int) -> None:
        if processes < 1:
            raise ValueError("processes must be at least 1")
        self.size = processes
        self._procs: list[Any] = []
        self._pipes: list[Any] = []
        self.pids: list[int] = []

    async def start(self) -> AppFleet:
        """Spawn the processes and wait until each one has imported asyncpg and is ready."""
        ctx = multiprocessing.get_context("spawn")
        for n in range(self.size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(child,), daemon=True,
                               name=f"app-{n + 1}")
            proc.start()
            child.close()
            self._procs.append(proc)
            self._pipes.append(parent)
        replies = await asyncio.wait_for(
            asyncio.gather(*(recv(p, _process_gone) for p in self._pipes)), 60)
        self.pids = [pid for _, pid in replies]
        return self

    def _select(self, processes: int | None) -> list[int]:
        n = self.size if processes is None else processes
        if not 1 <= n <= self.size:
            raise ValueError(f"processes must be 1..{self.size}")
        return list(range(n))

    async def _command(self, which: Sequence[int], op: str,
                       kwargs: dict[str, Any] | None = None) -> list[Any]:
        if not self._pipes:
            raise CourseError("The application processes are not running.",
                              "Call `await fleet.start()` first.")
        for i in which:
            self._pipes[i].send((op, kwargs or {}))
        replies = await asyncio.gather(*(recv(self._pipes[i], _process_gone) for i in which))
        failed = [(i, r[1]) for i, r in zip(which, replies, strict=True) if r[0] != "ok"]
        if failed:
            detail = "; ".join(f"app-{i + 1}: {name}: {msg}" for i, (name, msg) in failed)
            raise FleetError(f"{len(failed)} of {len(which)} application processes failed: "
                             f"{detail}", "Read the error; the other processes are unchanged.")
        return [r[1] for r in replies]

    async def open_pools(self, url: str | Target, *, processes: int | None = None,
                         min_size: int = 1, max_size: int = 10, name: str = "default",
                         reset: str | None = None, **pool_kwargs: Any) -> list[dict[str, Any]]:
        """Each of the first ``processes`` processes opens ``asyncpg.create_pool(url, ...)``
        under ``name`` (replacing its pool of that name); returns each one's pid and pool size.

        A process usually has one pool; naming them lets a measurement keep two sets open and
        alternate between them without paying for the connections again. ``reset``: ``None``
        for asyncpg's reset on release, ``"noop"`` for one that sends nothing (behind a
        transaction pooler). ``pool_kwargs`` must be picklable (numbers, strings, dicts).
        """
        if reset not in RESETS:
            raise ValueError(f"reset must be one of {RESETS}, not {reset!r}")
        which = self._select(processes)
        return await self._command(which, "open_pool", {
            "name": name, "url": url.url if isinstance(url, Target) else url,
            "min_size": min_size, "max_size": max_size, "reset": reset,
            "pool_kwargs": pool_kwargs})

    async def close_pools(self, name: str | None = None) -> None:
        """Every process closes its pool ``name`` (all of them by default); the connections are
        closed when this returns."""
        await self._command(range(self.size), "close_pool", {"name": name})

    async def run(self, sql: str, *, processes: int | None = None, concurrency: int = 10,
                  duration_s: float = 1.0, arg_max: int | None = None, pool: str = "default",
                  watch: Callable[[], Awaitable[int]] | None = None,
                  watch_every_s: float = 0.02, label: str = "") -> FleetRun:
        """Run ``sql`` in the first ``processes`` processes, ``concurrency`` tasks each, on
        their pool ``pool``, for ``duration_s`` seconds, all starting at the same instant.

        ``arg_max``: pass a random ``$1`` in 1..arg_max. ``watch``: a coroutine function the
        notebook's process calls every ``watch_every_s`` during the run (e.g. counting server
        connections in ``pg_stat_activity``); its values land in ``server_samples``.
        """
        which = self._select(processes)
        start_at = time.time() + START_DELAY_S
        samples: list[int] = []

        async def watcher() -> None:
            await asyncio.sleep(max(0.0, start_at - time.time()) + 0.05)
            while time.time() < start_at + duration_s - 0.02:
                samples.append(int(await watch()))
                await asyncio.sleep(watch_every_s)

        watch_task = asyncio.ensure_future(watcher()) if watch is not None else None
        try:
            results = await self._command(which, "run", {
                "pool": pool, "sql": sql, "arg_max": arg_max, "concurrency": concurrency,
                "start_at": start_at, "duration_s": duration_s})
        except BaseException:
            if watch_task is not None:
                watch_task.cancel()
                with contextlib.suppress(BaseException):
                    await watch_task
            raise
        if watch_task is not None:
            await watch_task  # a failing watch raises here, after the processes finished
        clients = sum(r["pool_size"] for r in results)
        return FleetRun(label or f"{len(which)} processes", len(which), concurrency, clients,
                        results, samples, start_at, duration_s)

    def stop(self) -> None:
        """End the processes (closing their pools first when they still answer). Idempotent."""
        pipes, procs = self._pipes, self._procs
        self._pipes, self._procs = [], []
        for pipe in pipes:
            with contextlib.suppress(OSError, ValueError):
                pipe.send(("exit", {}))
        deadline = time.monotonic() + 5
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(2)
        for pipe in pipes:
            with contextlib.suppress(OSError):
                pipe.close()

    async def aclose(self) -> None:
        """:meth:`stop` without blocking the event loop."""
        await asyncio.to_thread(self.stop)

    @property
    def alive(self) -> int:
        """How many of the processes are running."""
        return sum(1 for p in self._procs if p.is_alive())


def _process_gone() -> FleetError:
    return FleetError("An application process exited unexpectedly.",
                      "If you run this from a script, start the processes under "
                      "`if __name__ == \"__main__\":` (the spawn method re-imports the script).")


async def start_fleet(processes: int, *, lesson: Any = None) -> AppFleet:
    """Spawn an :class:`AppFleet`; with ``lesson``, ``await lesson.close()`` ends it."""

    fleet = await AppFleet(processes).start()
    if lesson is not None:
        close_with(lesson, fleet, first=True)  # before the PgBouncers and servers it uses
    return fleet


def pgbouncer_for() -> Binary | None:
    """The PgBouncer binary notebook 07 will use, or None when there is none (then its
    ``%%needs pgbouncer`` cells are skipped with the reason). Prints one line saying which, or
    how to get one. Never raises for a missing binary, whatever ``PGBOUNCER_BIN`` says.
    """
    try:
        binary = find_pgbouncer()
    except PgBouncerMissing as exc:
        print(f"PgBouncer: none usable here ({exc.message.rstrip('.')}); the cells marked %%needs "
              "pgbouncer are skipped.\n" + HOW_TO_GET)
        return None
    print(f"PgBouncer: {binary.describe()}")
    return binary


__all__ = ["RESETS", "AppFleet", "FleetError", "FleetRun", "PgBouncer", "PgBouncerMissing",
           "pgbouncer_for", "start_fleet", "start_pgbouncer"]
