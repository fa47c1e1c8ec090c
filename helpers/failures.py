"""Failure drills for pooled connections: a leak detector, a faulty network, a server restart.

Notebook 06 uses these tools from here:

* :class:`LeakDetector`: HikariCP's ``leakDetectionThreshold`` for asyncpg, which has none.
  Pass ``setup=detector.setup`` to ``create_pool``; every acquire then records the acquiring
  task's stack, and a connection still checked out after ``threshold_s`` is reported (a
  logged warning with that stack, and an entry in ``detector.leaks``). It finds leaks; it
  does not fix them: the connection stays checked out.
* :class:`FaultProxy`: a small TCP proxy between the pool and PostgreSQL that can do what
  networks do: drop every flow silently (``blackhole()``, a NAT or firewall that forgot an
  idle connection: no FIN, no RST, packets vanish) or reset them (``cut()``).
* :func:`executing` lists the backends inside a given query's execution,
  :func:`terminate_when_active` kills the one that runs it, and
  :func:`outage` measures, from a load run, when errors started and when requests
  succeeded again.
* :func:`throwaway_roles`: login roles for a demonstration of privileges (on a server where
  the given role may create roles: a private one), dropped afterwards.

Which errors mean "the connection went away" is :func:`helpers.retry.is_connection_lost`
(one definition for the course).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import sys
import sysconfig
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pandas as pd

from helpers.db import Target, connect, execute_ddl

logger = logging.getLogger(__name__)

# -- leak detection ---------------------------------------------------------------------------

#: Frames from these folders are the machinery (asyncio, asyncpg, IPython), not your code.
_LIBRARY_DIRS = tuple(
    str(Path(p).resolve()) + os.sep
    for p in {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"],
              sysconfig.get_paths()["platlib"]}
)
_THIS_FILE = str(Path(__file__).resolve())


def _is_user_frame(frame: traceback.FrameSummary) -> bool:
    name = str(Path(frame.filename).resolve()) if not frame.filename.startswith("<") else ""
    return bool(name) and name != _THIS_FILE and not name.startswith(_LIBRARY_DIRS)


def _where(filename: str) -> str:
    """A short, path-free name for a frame's file: ``Cell In[7]`` in Jupyter, else relative."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    cells = getattr(getattr(shell, "compile", None), "_filename_map", {}) or {}
    if filename in cells:
        return f"Cell In[{cells[filename]}]"
    with contextlib.suppress(ValueError):
        return str(Path(filename).resolve().relative_to(Path.cwd().parent))
    return Path(filename).name


@dataclass
class Leak:
    """A connection held longer than the threshold: who acquired it, where, and for how long."""

    server_pid: int | None
    task: str
    held_s: float
    stack: list[traceback.FrameSummary] = field(repr=False)
    returned_after_s: float | None = None

    def format(self) -> str:
        """HikariCP-style text: what leaked, for how long, and the acquiring stack."""
        lines = [f"Connection leak: backend pid {self.server_pid} acquired by task "
                 f"{self.task!r} {self.held_s:.2f} s ago and not released. Acquired at:"]
        frames = [f for f in self.stack if _is_user_frame(f)] or self.stack[-3:]
        for f in frames:
            lines.append(f"  {_where(f.filename)}, line {f.lineno}, in {f.name}")
            if f.line:
                lines.append(f"    {f.line.strip()}")
        return "\n".join(lines)


@dataclass
class _Checkout:
    proxy: Any
    pid: int | None
    task: str
    since: float
    stack: list[traceback.FrameSummary]
    leak: Leak | None = None

    def released(self) -> bool:
        # asyncpg detaches the proxy from its connection on release (``_con`` becomes None).
        return getattr(self.proxy, "_con", None) is None


class LeakDetector:
    """Report pooled connections held longer than ``threshold_s``, with the acquiring stack.

    Usage::

        leaks = LeakDetector(threshold_s=2.0)
        pool = await asyncpg.create_pool(dsn, setup=leaks.setup)

    Every acquire (``pool.acquire()``, ``pool.fetch()``...) then costs one ``extract_stack``
    (tens of microseconds) and a timer. When a connection is still checked out after
    ``threshold_s``, ``on_leak`` is called once with a :class:`Leak` (default: a logged
    warning with the stack, like HikariCP's "Connection leak detection triggered"). If the
    connection comes back later, ``Leak.returned_after_s`` is filled in and an INFO line is
    logged. Pick a threshold above your slowest legitimate checkout, or it reports slow
    requests as leaks.

    ``setup`` chains to your own ``setup`` coroutine, if you had one.
    """

    def __init__(self, threshold_s: float, *,
                 on_leak: Callable[[Leak], None] | None = None,
                 setup: Callable[[Any], Awaitable[None]] | None = None) -> None:
        if threshold_s <= 0:
            raise ValueError("threshold_s must be positive")
        self.threshold_s = threshold_s
        self.on_leak = on_leak or (lambda leak: logger.warning(leak.format()))
        self.leaks: list[Leak] = []
        self.acquisitions = 0
        self._user_setup = setup
        self._open: dict[int, _Checkout] = {}
        self._timers: set[asyncio.TimerHandle] = set()

    async def setup(self, conn: Any) -> None:
        """The ``setup=`` hook for ``asyncpg.create_pool``: runs at every acquire."""
        stack = traceback.extract_stack()[:-1]
        task = asyncio.current_task()
        checkout = _Checkout(conn, conn.get_server_pid(), task.get_name() if task else "?",
                             time.monotonic(), stack)
        self.acquisitions += 1
        self._open[id(checkout)] = checkout
        self._arm(checkout, self.threshold_s)
        if self._user_setup is not None:
            await self._user_setup(conn)

    def held(self) -> list[tuple[int | None, float]]:
        """The connections checked out right now: (backend pid, seconds held)."""
        now = time.monotonic()
        return [(c.pid, now - c.since) for c in self._open.values() if not c.released()]

    def close(self) -> None:
        """Cancel the pending checks (the pool itself is not touched)."""
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        self._open.clear()

    def _arm(self, checkout: _Checkout, delay: float) -> None:
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle | None = None

        def fire() -> None:
            self._timers.discard(handle)  # type: ignore[arg-type]
            self._check(checkout)

        handle = loop.call_later(delay, fire)
        self._timers.add(handle)

    def _check(self, checkout: _Checkout) -> None:
        held = time.monotonic() - checkout.since
        if checkout.released():
            self._open.pop(id(checkout), None)
            if checkout.leak is not None:  # reported earlier, back now
                checkout.leak.returned_after_s = held
                logger.info("Previously reported leaked connection (backend pid %s) was "
                            "returned after %.2f s", checkout.pid, held)
            return
        if checkout.leak is None:
            checkout.leak = Leak(checkout.pid, checkout.task, held, checkout.stack)
            self.leaks.append(checkout.leak)
            self.on_leak(checkout.leak)
        else:
            checkout.leak.held_s = held
        self._arm(checkout, self.threshold_s)  # keep watching: it may come back


# -- a network that fails on demand -----------------------------------------------------------


class _Link:
    """One client connection through the proxy and its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.blackholed = False
        self.tasks: list[asyncio.Task[None]] = []

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if not self.blackholed:  # a black hole swallows packets; it closes nothing
                    writer.write(data)
                    await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if not self.blackholed:  # pass the close on, as a real connection would
                writer.close()

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            writer.transport.abort()


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of a PostgreSQL server, with faults on demand.

    ``await proxy.start()``, then connect to ``proxy.url(dsn)`` instead of ``dsn``:

    * :meth:`blackhole` - every current connection stops delivering data in both directions,
      and nothing is closed: what a NAT gateway, firewall or load balancer does to a flow it
      dropped after its idle timeout. The client notices nothing until it waits for an answer.
      New connections work.
    * :meth:`cut` - every current connection is reset (the client sees the connection die).

    It runs in the caller's event loop; it is a teaching tool, not a production proxy.
    """

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.port: int | None = None
        self.links: list[_Link] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        """Listen on a free port of 127.0.0.1; returns it."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def url(self, dsn: str) -> str:
        """``dsn`` with its host and port replaced by the proxy's (credentials kept)."""
        if self.port is None:
            raise RuntimeError("start() the proxy first")
        return Target(dsn, "fault proxy").replace(host="127.0.0.1", port=self.port).url

    @property
    def open_links(self) -> int:
        """Connections currently passing through (not counting black-holed ones)."""
        return sum(1 for link in self.links
                   if not link.blackholed and not link.client.transport.is_closing())

    def blackhole(self) -> int:
        """Silently drop every current connection's traffic; returns how many."""
        live = [link for link in self.links if not link.blackholed]
        for link in live:
            link.blackholed = True
        return len(live)

    def cut(self) -> int:
        """Reset every current connection; returns how many."""
        links, self.links = self.links, []
        for link in links:
            link.abort()
        return len(links)

    async def close(self) -> None:
        """Stop listening and reset every connection."""
        if self._server is not None:
            self._server.close()
        self.cut()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()  # the client sees "connection reset", like a dead server
            return
        link = _Link(writer, up_writer)
        self.links.append(link)
        link.tasks = [asyncio.ensure_future(link.pump(reader, up_writer)),
                      asyncio.ensure_future(link.pump(up_reader, writer))]


# -- server restarts and outages --------------------------------------------------------------


async def executing(conn: asyncpg.Connection, query_like: str, *,
                    application_name: str | None = None, running_for_s: float = 0.05) -> list[int]:
    """The pids of the other backends (oldest query first) that have been running a query
    ``LIKE query_like`` (and, if given, have this ``application_name``) for at least
    ``running_for_s``: past its parse, inside its execution.

    A backend is ``active``, with the query's text, while it still parses it. A client cut off
    then (its backend killed, its connection terminated) may be between asyncpg's prepare and
    execute, and fail with an error of that moment (``InternalClientError``, or an
    ``AttributeError`` from inside asyncpg) instead of the lost connection a demo shows. Waiting
    for a query this function reports avoids that moment.
    """
    rows = await conn.fetch(
        "SELECT pid FROM pg_stat_activity WHERE state = 'active' AND query LIKE $1 "
        "AND ($2::text IS NULL OR application_name = $2) AND pid <> pg_backend_pid() "
        "AND clock_timestamp() - query_start >= make_interval(secs => $3) "
        "ORDER BY query_start", query_like, application_name, running_for_s)
    return [int(r["pid"]) for r in rows]


async def terminate_when_active(conn: asyncpg.Connection, query_like: str, *,
                                application_name: str | None = None, timeout_s: float = 5.0,
                                poll_s: float = 0.005, running_for_s: float = 0.05) -> int:
    """Wait until another backend has been running a query ``LIKE query_like`` (and, if given,
    has this ``application_name``) for ``running_for_s``, then terminate it with
    ``pg_terminate_backend``.

    The wait puts the cut inside the query's execution (see :func:`executing`): killed while it
    is parsed, the client may read the server's goodbye between asyncpg's prepare and execute
    and raise ``InternalClientError`` instead of ``ConnectionDoesNotExistError`` (both lost
    connections; see :func:`helpers.retry.is_connection_lost`), which makes a demo's output
    depend on timing.

    Returns the terminated backend's pid. ``conn`` needs the rights ``pg_terminate_backend``
    needs: the privileges of the victim's role, or of ``pg_signal_backend`` (a superuser's
    backend only a superuser may end).
    Raises ``TimeoutError`` when no such query shows up within ``timeout_s``.
    """
    async with asyncio.timeout(timeout_s):
        while True:
            pids = await executing(conn, query_like, application_name=application_name,
                                   running_for_s=running_for_s)
            if pids and await conn.fetchval("SELECT pg_terminate_backend($1)", pids[0]):
                return pids[0]
            await asyncio.sleep(poll_s)


def outage(df: pd.DataFrame) -> dict[str, float]:
    """When a load run's requests failed and when they worked again (seconds from its start).

    ``df`` is :attr:`helpers.load.LoadResult.df`. Returns ``first_error_s``, ``last_error_s``,
    ``recovered_s`` (start of the first success after the last error), ``downtime_s``
    (``recovered_s - first_error_s``) and ``errors``; all NaN but ``errors`` when nothing
    failed.
    """
    bad = df.loc[~df["ok"], "start_s"]
    if bad.empty:
        nan = float("nan")
        return {"first_error_s": nan, "last_error_s": nan, "recovered_s": nan,
                "downtime_s": nan, "errors": 0}
    first, last = float(bad.min()), float(bad.max())
    after = df.loc[df["ok"] & (df["start_s"] > last), "start_s"]
    recovered = float(after.min()) if not after.empty else float("nan")
    return {"first_error_s": first, "last_error_s": last, "recovered_s": recovered,
            "downtime_s": recovered - first, "errors": int(len(bad))}


# -- privileges -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def throwaway_roles(target: Target, *names: str) -> AsyncIterator[dict[str, Target]]:
    """``async with throwaway_roles(server, "app", "watchdog") as roles:`` creates login roles
    (generated passwords) on ``target``'s server and yields a :class:`~helpers.db.Target` per
    name (``roles["watchdog"].url`` connects as it); at the end their sessions are ended and
    the roles dropped. ``target``'s role needs CREATEROLE: use a private server
    (``lesson.private_server()``) rather than a shared one.
    """
    admin = await connect(target)
    created: list[str] = []
    try:
        roles = {}
        for name in names:
            password = secrets.token_urlsafe(16)
            await execute_ddl(admin, "CREATE ROLE %I LOGIN PASSWORD %L", name, password)
            created.append(name)
            roles[name] = target.replace(user=name, password=password,
                                         source=f"role {name} (throw-away)")
        yield roles
    finally:
        try:
            for name in created:
                await admin.execute("SELECT pg_terminate_backend(pid, 1000) "
                                    "FROM pg_stat_activity WHERE usename = $1", name)
                await execute_ddl(admin, "DROP OWNED BY %I", name)
                await execute_ddl(admin, "DROP ROLE IF EXISTS %I", name)
        finally:
            await admin.close()
