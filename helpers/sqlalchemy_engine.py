"""Plumbing for notebook 10 (SQLAlchemy's async engine over asyncpg) and its bench figures.

The notebook shows the engines, sessions and requests themselves; this module holds what
only serves to *look* at them:

* :func:`async_url`: a course URL (``postgresql://...``, as in ``DATABASE_URL``) as the
  SQLAlchemy URL of the asyncpg dialect, ``postgresql+asyncpg://...``; the one libpq
  parameter asyncpg spells differently (``sslmode``, asyncpg's ``ssl``) is translated;
* :class:`PoolMonitor`: the pool events (``connect``, ``checkout``, ``checkin``,
  ``invalidate``) turned into plain counters plus the pool's own gauges, one dict per
  :meth:`~PoolMonitor.stats` call, for the monitoring of notebook 05;
* :func:`statements_per_request`: what a request sends to the server, counted with
  ``pg_stat_statements`` for one role (a private embedded server has it preloaded);
* :class:`ServerLog`: the protocol messages (``parse``, ``bind``, ``execute``, simple-query
  ``statement``) a server of our own logs per ``application_name`` when a session runs with
  ``log_min_duration_statement = 0``: what ``pg_stat_statements`` does not count;
* :func:`hop_probe`: run a statement, then run it again while another client holds the
  server connection it ran on, so that (behind PgBouncer in transaction mode) the second
  run lands on a *different* server connection: the situation in which cached prepared
  statements break, made deterministic.

Written for SQLAlchemy 2.1.9 (``sqlalchemy==2.1.9``, ``greenlet==3.5.6``) and asyncpg 0.32.0.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
from sqlalchemy import event
from sqlalchemy.engine import URL, make_url

if TYPE_CHECKING:
    import pandas as pd
    from sqlalchemy.ext.asyncio import AsyncEngine
    from sqlalchemy.sql import Executable

#: The SQLAlchemy dialect + driver this module builds URLs for.
DRIVERNAME = "postgresql+asyncpg"
#: libpq URL parameters that asyncpg takes under another name (SQLAlchemy's asyncpg dialect
#: passes the URL's query string to ``asyncpg.connect()`` as keyword arguments, as is).
_RENAMED = {"sslmode": "ssl"}
#: The pool events :class:`PoolMonitor` counts.
EVENTS = ("connect", "checkout", "checkin", "invalidate")


def async_url(dsn: str | URL) -> URL:
    """``dsn`` (``postgresql://``, ``postgres://`` or already a SQLAlchemy URL) as a
    ``postgresql+asyncpg://`` URL with the same user, password, host, port and database.

    ``sslmode=...`` becomes asyncpg's ``ssl=...`` (same values: ``disable``, ``prefer``,
    ``require``, ``verify-ca``, ``verify-full``): passed on as is, ``asyncpg.connect()`` would
    reject the unknown keyword ``sslmode``. The URL object prints with its password masked
    (``str(url)`` and ``repr(url)`` show ``***``); ``url.render_as_string(hide_password=False)``
    is the only way to get it back.
    """
    url = make_url(dsn).set(drivername=DRIVERNAME)
    renamed = {new: url.query[old] for old, new in _RENAMED.items() if old in url.query}
    if renamed:
        url = url.difference_update_query(list(_RENAMED)).update_query_dict(renamed)
    return url


def libpq_url(url: URL) -> str:
    """The plain ``postgresql://`` URL of a SQLAlchemy URL, password included: for
    ``asyncpg.connect()`` next to an engine (never print it; print the URL object instead)."""
    plain = url.set(drivername="postgresql")
    present = {old: new for old, new in _RENAMED.items() if new in plain.query}
    if present:
        renamed = {old: plain.query[new] for old, new in present.items()}
        plain = plain.difference_update_query(list(present.values())).update_query_dict(renamed)
    return plain.render_as_string(hide_password=False)


class PoolMonitor:
    """Counters fed by an engine's pool events, plus the pool's gauges.

    ::

        monitor = PoolMonitor(engine)      # listens on engine.sync_engine
        ...
        monitor.stats()                    # {"connects": 2, "checkouts": 40, ...}
        monitor.detach()                   # stop listening

    Pool events are synchronous and attach to ``engine.sync_engine`` (SQLAlchemy raises
    ``NotImplementedError`` for listeners on the ``AsyncEngine`` itself). They run inside the
    pool's bookkeeping, so they only count and read the clock: no I/O.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.counts = dict.fromkeys(EVENTS, 0)
        self.hold_s: list[float] = []  # checkout -> checkin of every returned connection
        self._out_since: dict[int, float] = {}
        self._listeners: list[tuple[str, Callable[..., None]]] = []
        for name in EVENTS:
            listener = self._listener(name)
            event.listen(engine.sync_engine, name, listener)
            self._listeners.append((name, listener))

    def _listener(self, name: str) -> Callable[..., None]:
        def on_event(dbapi_connection: Any, record: Any, *rest: Any) -> None:
            self.counts[name] += 1
            if name == "checkout":
                self._out_since[id(record)] = time.perf_counter()
            elif name == "checkin":
                started = self._out_since.pop(id(record), None)
                if started is not None:
                    self.hold_s.append(time.perf_counter() - started)

        return on_event

    def stats(self) -> dict[str, float]:
        """Counters since the monitor was attached and the pool's gauges right now.

        Keys: ``connects``, ``checkouts``, ``checkins``, ``invalidated`` (counters);
        ``size``, ``checked_in``, ``checked_out``, ``overflow`` (``engine.pool``'s own numbers,
        those of ``pool.status()``); ``hold_ms_mean``, ``hold_ms_max`` (how long returned
        connections were held). A ``NullPool`` has no gauges: only counters and hold times.
        """
        pool = self.engine.pool
        out: dict[str, float] = {
            "connects": self.counts["connect"],
            "checkouts": self.counts["checkout"],
            "checkins": self.counts["checkin"],
            "invalidated": self.counts["invalidate"],
        }
        for key, method in (("size", "size"), ("checked_in", "checkedin"),
                            ("checked_out", "checkedout"), ("overflow", "overflow")):
            if hasattr(pool, method):
                out[key] = getattr(pool, method)()
        held = self.hold_s
        out["hold_ms_mean"] = 1000 * sum(held) / len(held) if held else 0.0
        out["hold_ms_max"] = 1000 * max(held) if held else 0.0
        return out

    def detach(self) -> None:
        """Remove the listeners (idempotent)."""
        for name, listener in self._listeners:
            if event.contains(self.engine.sync_engine, name, listener):
                event.remove(self.engine.sync_engine, name, listener)
        self._listeners.clear()


async def statements_per_request(admin: asyncpg.Connection, role: str,
                                 request: Callable[[int], Awaitable[Any]],
                                 n: int = 50) -> pd.Series:
    """Run ``request(i)`` ``n`` times and count, with ``pg_stat_statements``, the statements
    the server executed for ``role`` per request (a Series: statement text -> calls / n).

    ``admin`` must be allowed to reset and read the role's statistics (a superuser on a
    private server). One warm-up request runs first, so connecting and preparing are not
    counted. ``pg_stat_statements`` records every statement, ``BEGIN`` and ``ROLLBACK``
    included, but not an empty query such as the dialect's ping (``;``).
    """
    import pandas as pd

    await admin.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    oid = await admin.fetchval("SELECT oid FROM pg_roles WHERE rolname = $1", role)
    if oid is None:
        raise ValueError(f"no role {role!r} on this server")
    await request(0)
    await admin.execute("SELECT pg_stat_statements_reset($1::oid)", oid)
    for i in range(n):
        await request(i + 1)
    rows = await admin.fetch(
        "SELECT query, calls FROM pg_stat_statements WHERE userid = $1", oid)
    counts = pd.Series({r["query"]: r["calls"] / n for r in rows}, dtype=float)
    counts = counts.groupby(level=0).sum().sort_values(ascending=False)
    counts.index = [" ".join(q.split()) for q in counts.index]  # one line per statement
    return counts


class ServerLog:
    """A server's log file, read from where it ended when this object was made.

    With ``log_min_duration_statement = 0`` a session logs every protocol message it sends:
    ``parse`` / ``bind`` / ``execute`` for the extended protocol (asyncpg's queries) and
    ``statement`` for a simple query (``BEGIN;``, ``ROLLBACK;``). :meth:`counts` counts them
    for one ``application_name``. Needs the line prefix of the course's embedded servers
    (``log_line_prefix = '%m [%p] %a '``, :data:`helpers._infra.server.SERVER_SETTINGS`) and a
    session allowed to set the parameter (a superuser, or ``GRANT SET ON PARAMETER
    log_min_duration_statement TO role``, PostgreSQL 15+).
    """

    _LINE = re.compile(r"\] (?P<app>\S*) LOG:  duration: [\d.]+ ms  "
                       r"(?P<kind>parse|bind|execute|statement)\b")

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.start = self.path.stat().st_size

    def counts(self, application_name: str) -> Counter[str]:
        """Messages logged since this object was made by sessions named ``application_name``,
        by kind: ``Counter({"parse": 10, "bind": 10, ...})``."""
        with open(self.path, errors="replace") as fh:
            fh.seek(self.start)
            text = fh.read()
        found: Counter[str] = Counter()
        for match in self._LINE.finditer(text):
            if match["app"] == application_name:
                found[match["kind"]] += 1
        return found


async def hop_probe(engine: AsyncEngine, statement: Executable, params: dict[str, Any],
                    bouncer_url: str) -> str:
    """Two requests through ``engine`` (each its own checkout and transaction), the second
    while another client (a plain asyncpg connection to ``bouncer_url``) holds the PgBouncer
    server connection the first one used. Returns ``"ok"`` or ``"<asyncpg exception type>:
    <first line of its message>"``.

    Behind PgBouncer in transaction mode with two server connections, the second request then
    runs on the *other* one, where a prepared statement cached by the first is not. Use an
    engine with ``pool_size=1`` (so both requests get the same client connection, as busy
    requests do) or ``NullPool`` (a new client connection per checkout), and a PgBouncer
    with ``default_pool_size=2``.
    """
    async with engine.connect() as conn:
        await conn.execute(statement, params)  # its transaction ends when the block does
    holder = await asyncpg.connect(bouncer_url, statement_cache_size=0)
    try:
        hold = holder.transaction()
        await hold.start()
        await holder.execute("SELECT 1")  # PgBouncer lends the free server connection
        try:
            async with engine.connect() as conn:
                await conn.execute(statement, params)
            return "ok"
        except Exception as exc:  # the outcome is the data here
            return describe_error(exc)
        finally:
            await hold.rollback()
    finally:
        await holder.close()


def describe_error(exc: BaseException) -> str:
    """``"<type>: <first line>"`` of the driver's exception under a SQLAlchemy one (asyncpg's
    own class, e.g. ``InvalidSQLStatementNameError``, is the ``__cause__`` of the dialect's
    ``exc.orig``), else of ``exc`` itself."""
    inner: BaseException = exc
    orig = getattr(exc, "orig", None)
    if orig is not None:
        inner = orig.__cause__ or orig
    text = str(inner).strip().splitlines()[0] if str(inner).strip() else ""
    return f"{type(inner).__name__}: {text}" if text else type(inner).__name__
