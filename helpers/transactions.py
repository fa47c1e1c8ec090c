"""Two (or more) transactions, step by step: the plumbing of notebook 03's anomaly demos.

Isolation anomalies only appear when statements of concurrent transactions interleave in a
particular order. :func:`run_schedule` makes that order explicit and repeatable: each session
gets its own pooled connection and transaction, and the steps run one at a time in the order
written, like the schedules in a database textbook::

    trace = await run_schedule(pool, [
        ("A", "SELECT balance FROM accounts WHERE id = $1", 1),
        ("B", "UPDATE accounts SET balance = balance - $2 WHERE id = $1", 1, 30),
        ("B", COMMIT),
        ("A", "SELECT balance FROM accounts WHERE id = $1", 1),
        ("A", COMMIT),
    ], isolation="read_committed")
    print(format_schedule(trace))

A step that has to wait for a row lock held by another session does not stop the schedule:
the runner sees it waiting (``pg_blocking_pids()`` on an extra connection, not a timer), notes
who it waits for, and goes on with the next step; the waiting statement's result is recorded
when it finishes, with the step after which it resumed. An error (a serialization failure, a
deadlock, a CHECK violation) rolls that session's transaction back and skips its later steps,
exactly what a real application would have to do.

:func:`loop_exception_messages` collects what the event loop would log through its exception
handler (asyncpg reports a connection released with a transaction still open that way).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import asyncpg
import pandas as pd

#: Step statements that end a session's transaction (through asyncpg's Transaction object).
COMMIT = "COMMIT"
ROLLBACK = "ROLLBACK"

#: Statements whose rows are returned (``fetch``); anything else returns its status (``execute``).
_ROW_RETURNING = ("SELECT", "WITH", "SHOW", "VALUES", "TABLE")


def _kind(sql: str) -> str:
    return "fetch" if sql.lstrip().upper().startswith(_ROW_RETURNING) else "execute"


def _value(rows: list[asyncpg.Record]) -> Any:
    """One value for one row of one column, a tuple for one row, a list of tuples otherwise."""
    if len(rows) == 1:
        return rows[0][0] if len(rows[0]) == 1 else tuple(rows[0])
    return [tuple(r) for r in rows]


class _Session:
    def __init__(self, name: str, conn: Any, isolation: str | None, readonly: bool) -> None:
        self.name = name
        self.conn = conn
        self.pid = conn.get_server_pid()
        self.tx = conn.transaction(isolation=isolation, readonly=readonly)
        self.open = False
        self.aborted = False
        self.pending: tuple[int, asyncio.Task[Any]] | None = None

    async def run(self, sql: str, args: tuple[Any, ...]) -> Any:
        if sql == COMMIT:
            self.open = False
            await self.tx.commit()
            return COMMIT
        if sql == ROLLBACK:
            self.open = False
            await self.tx.rollback()
            return ROLLBACK
        if _kind(sql) == "fetch":
            return _value(await self.conn.fetch(sql, *args))
        return await self.conn.execute(sql, *args)

    async def abort(self) -> None:
        """After an error: end the transaction as an application would (ROLLBACK)."""
        self.aborted = True
        if self.open:
            self.open = False
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError):
                await self.tx.rollback()
        elif not self.conn.is_closed() and self.conn.is_in_transaction():
            await self.conn.execute("ROLLBACK")


async def run_schedule(
    pool: asyncpg.Pool,
    steps: Sequence[tuple[Any, ...]],
    *,
    isolation: str | Mapping[str, str | None] | None = None,
    readonly: bool | Collection[str] = False,
    step_timeout: float = 10.0,
    poll_s: float = 0.002,
) -> pd.DataFrame:
    """Run ``steps`` (``(session, sql, *args)``, or ``(session, COMMIT)``) one at a time, each
    session in its own transaction on its own pooled connection, and record what each returned.

    ``isolation`` is asyncpg's name (``"read_committed"``, ``"repeatable_read"``,
    ``"serializable"``; ``None`` = the server's default), for all sessions or per session
    (a mapping); ``readonly`` is True for all sessions or the collection of read-only ones
    (``{"A"}``). The pool needs one connection per session plus one to watch for lock waits.

    Returns one row per step: ``step`` (1-based), ``session``, ``statement``, ``args``,
    ``result`` (the value, status, ``COMMIT``, or the exception's type name), ``error`` (its
    message, or ""), ``waited_for`` (sessions whose locks it waited for, or "") and
    ``resumed_after`` (the step after which a waiting statement finished, or 0).
    A session whose statement fails is rolled back; its later steps show ``skipped``.
    """
    names = list(dict.fromkeys(str(s[0]) for s in steps))
    levels = {n: (isolation.get(n) if isinstance(isolation, Mapping) else isolation)
              for n in names}
    rows: list[dict[str, Any]] = [
        {"step": i + 1, "session": str(s[0]), "statement": s[1], "args": tuple(s[2:]),
         "result": None, "error": "", "waited_for": "", "resumed_after": 0}
        for i, s in enumerate(steps)
    ]
    sessions: dict[str, _Session] = {}
    watcher = None
    last_issued = 0
    try:
        watcher = await pool.acquire(timeout=step_timeout)
        for name in names:
            conn = await pool.acquire(timeout=step_timeout)
            ro = readonly if isinstance(readonly, bool) else name in readonly
            sessions[name] = _Session(name, conn, levels[name], ro)
        for session in sessions.values():
            await session.tx.start()
            session.open = True
        by_pid = {s.pid: s.name for s in sessions.values()}

        async def blockers(session: _Session) -> list[str]:
            pids = await watcher.fetchval("SELECT pg_blocking_pids($1)", session.pid)
            return sorted({by_pid.get(p, f"pid {p}") for p in pids})

        async def finish(session: _Session, step: int, task: asyncio.Task[Any],
                         resumed: bool) -> None:
            row = rows[step - 1]
            if resumed:
                row["resumed_after"] = last_issued
            try:
                row["result"] = task.result()
            except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                row["result"] = type(exc).__name__
                row["error"] = getattr(exc, "message", None) or str(exc)
                await session.abort()

        async def settle(session: _Session, step: int, task: asyncio.Task[Any],
                         resumed: bool, wait_all: bool) -> bool:
            """Wait until the statement finishes (True) or waits for a lock (False)."""
            deadline = time.monotonic() + step_timeout
            while True:
                if task.done():
                    await finish(session, step, task, resumed)
                    return True
                if not wait_all:
                    waiting_for = await blockers(session)
                    if waiting_for:
                        if not rows[step - 1]["waited_for"]:
                            rows[step - 1]["waited_for"] = ", ".join(waiting_for)
                        return False
                if time.monotonic() > deadline:
                    task.cancel()
                    raise TimeoutError(f"step {step} ({session.name}) took over "
                                       f"{step_timeout} s")
                await asyncio.sleep(poll_s)

        async def settle_pending(until: _Session | None = None) -> None:
            """Record waiting statements that have finished; block on ``until``'s."""
            progress = True
            while progress:
                progress = False
                for s in sessions.values():
                    if s.pending is None:
                        continue
                    step, task = s.pending
                    if until is s:
                        await asyncio.wait({task}, timeout=step_timeout)
                    if await settle(s, step, task, resumed=True, wait_all=False):
                        s.pending = None
                        progress = True

        for i, (name, sql, *args) in enumerate(steps, start=1):
            session = sessions[str(name)]
            if session.pending is not None:
                await settle_pending(until=session)
                if session.pending is not None:
                    raise TimeoutError(f"step {session.pending[0]} ({session.name}) still "
                                       f"waits for a lock after {step_timeout} s")
            if session.aborted:
                rows[i - 1]["result"] = "skipped"
                continue
            last_issued = i
            task = asyncio.ensure_future(session.run(sql, tuple(args)))
            if not await settle(session, i, task, resumed=False, wait_all=False):
                session.pending = (i, task)
            await settle_pending()
        for session in sessions.values():
            if session.pending is not None:
                await settle_pending(until=session)
    finally:
        for session in sessions.values():
            if session.pending is not None:
                session.pending[1].cancel()
            if not session.conn.is_closed():
                await session.abort()
            await pool.release(session.conn)
        if watcher is not None:
            await pool.release(watcher)
    return pd.DataFrame(rows)


def step_results(trace: pd.DataFrame) -> dict[int, Any]:
    """``{step: result}`` of a :func:`run_schedule` trace, for assertions."""
    return dict(zip(trace["step"], trace["result"], strict=True))


def format_schedule(trace: pd.DataFrame, width: int | None = None) -> str:
    """A :func:`run_schedule` trace as text: one line per step, each session's statements in
    its own column, waits and resumptions on a second line. Deterministic (no timings, pids)."""
    sessions = list(dict.fromkeys(trace["session"]))
    texts = []
    for row in trace.itertuples(index=False):
        sql = " ".join(str(row.statement).split())
        if row.args:
            sql += "  (" + ", ".join(f"${n}={a!r}" for n, a in enumerate(row.args, 1)) + ")"
        texts.append("    " * sessions.index(row.session) + sql)
    width = width or max(map(len, texts), default=0)
    lines = []
    for row, text in zip(trace.itertuples(index=False), texts, strict=True):
        indent = "    " * sessions.index(row.session)
        result = f"{row.result}: {row.error}" if row.error else str(row.result)
        head = f"{row.step:>2}  {row.session}  " + text.ljust(width)
        if row.waited_for:
            lines.append(f"{head} -> waits for {row.waited_for}")
            lines.append(" " * (6 + len(indent)) + f"... after step {row.resumed_after}: "
                         + result)
        else:
            lines.append(f"{head} -> {result}")
    return "\n".join(lines)


_ADDRESS = re.compile(r" at 0x[0-9a-f]+")


@contextlib.contextmanager
def loop_exception_messages() -> Iterator[list[str]]:
    """Collect the messages the running event loop's exception handler receives while the
    block runs (instead of logging them), with memory addresses removed so they print the same
    on every run. asyncpg reports a pooled connection released mid-transaction this way."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    messages: list[str] = []

    def handler(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        messages.append(_ADDRESS.sub("", str(context.get("message", ""))))

    loop.set_exception_handler(handler)
    try:
        yield messages
    finally:
        loop.set_exception_handler(previous)
