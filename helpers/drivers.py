"""The same workloads for asyncpg and for psycopg 3 (with psycopg_pool), side by side.

Notebook 08 and ``make bench`` (``.ci/bench.py``) compare the two drivers through these
functions, so both measure one implementation:

* **lookups**: request factories for :func:`helpers.load.run_load` / ``compare`` that fetch one
  row by primary key through an asyncpg pool, a psycopg pool, one persistent connection per load
  worker (no pool at all) or a new connection per request;
* **bulk inserts**: psycopg's ``executemany`` and ``COPY``, shaped like the asyncpg methods
  of :mod:`helpers.batch_inserts` so that :func:`helpers.batch_inserts.compare_inserts` times
  both drivers side by side (wrap a psycopg method with :func:`on_psycopg`);
* **set-up**: :func:`role_on` makes the throw-away role whose statements notebook 08 counts.

What a request costs is mostly how many round trips it makes, and that depends on the pool's
defaults more than on the driver (count them with ``pg_stat_statements``, as notebook 08 does):

* asyncpg pool: the query, then on release a reset (``SELECT pg_advisory_unlock_all(); CLOSE
  ALL; UNLISTEN *; RESET ALL``, one message): 2 round trips (behind PgBouncer in transaction
  mode, 2 transactions: notebook 07);
* psycopg pool with its default connections (autocommit off): ``BEGIN``, the query, ``COMMIT``
  when ``pool.connection()`` exits: 3 round trips;
* psycopg pool with ``autocommit=True``: the query only, and no reset, so session settings
  (``SET ...``) leak to the next user unless you pass ``reset=``.

Queries are written once, asyncpg style (``$1``); :func:`psycopg_sql` turns them into
psycopg's ``%s`` style.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import asyncpg
import psycopg
from psycopg import sql as psql
from psycopg_pool import AsyncConnectionPool

from helpers.batch_inserts import COLUMNS, InsertMethod, Row
from helpers.db import Target, connect, execute_ddl
from helpers.load import Request, current_worker

#: The course's single-row lookup (a primary-key read of the seed's 100,000 users).
LOOKUP_SQL = "SELECT name FROM shop.users WHERE id = $1"
#: How many keys the lookup spreads over (ids 1..USERS exist in ``shop.users``).
USERS = 100_000
_PLACEHOLDER = re.compile(r"\$(\d+)")


# -- SQL and connection settings ---------------------------------------------------------------


def psycopg_sql(query: str) -> str:
    """An asyncpg-style query (``$1, $2``) in psycopg's style (``%s, %s``).

    Literal ``%`` signs are doubled. Placeholders must appear in order, each once (as in the
    course's queries); anything else raises ``ValueError`` rather than silently binding the
    wrong values.
    """
    numbers = [int(n) for n in _PLACEHOLDER.findall(query)]
    if numbers != list(range(1, len(numbers) + 1)):
        raise ValueError(f"placeholders must be $1, $2, ... in order, each once: {query!r}")
    return _PLACEHOLDER.sub("%s", query.replace("%", "%%"))


def key(i: int, n: int = USERS) -> int:
    """The ``i``-th key of a lookup workload: 1..n, spread over the table, no repeats in n."""
    return 1 + (i * 7919) % n  # 7919 is prime, so i -> key is a permutation of 1..n


def libpq_options(settings: Mapping[str, str]) -> str:
    """``server_settings`` as a libpq ``options`` string (``-c key=value``, spaces escaped).

    psycopg has no ``server_settings``: the same startup settings travel in ``options``, e.g.
    ``libpq_options(lesson.server_settings())`` puts a psycopg connection in the lesson's schema.
    """
    def escape(value: str) -> str:
        return value.replace("\\", "\\\\").replace(" ", "\\ ")

    return " ".join(f"-c {escape(k)}={escape(str(v))}" for k, v in settings.items())


async def psycopg_connect(dsn: str, *, server_settings: Mapping[str, str] | None = None,
                          autocommit: bool = False, **kwargs: Any) -> psycopg.AsyncConnection:
    """``psycopg.AsyncConnection.connect`` with asyncpg-style ``server_settings``."""
    if server_settings:
        kwargs["options"] = libpq_options(server_settings)
    return await psycopg.AsyncConnection.connect(dsn, autocommit=autocommit, **kwargs)


async def open_psycopg_pool(
    dsn: str, *, min_size: int = 4, max_size: int | None = None,
    server_settings: Mapping[str, str] | None = None, autocommit: bool = False,
    open_timeout: float = 10.0, **pool_kwargs: Any,
) -> AsyncConnectionPool:
    """An opened ``psycopg_pool.AsyncConnectionPool`` with ``min_size`` connections ready.

    ``server_settings`` (e.g. ``lesson.server_settings()``) go into every connection's startup
    packet, like asyncpg's argument of the same name. ``autocommit=False`` is psycopg's default:
    ``async with pool.connection()`` then wraps the block in BEGIN ... COMMIT. ``pool_kwargs``
    are passed on (``timeout=`` for ``getconn``, 30 s by default; ``check=``, ``reset=``,
    ``max_lifetime=``, ``name=`` ...). The pool is opened explicitly (opening in the
    constructor is deprecated), waiting up to ``open_timeout`` seconds for ``min_size``
    connections; close it with ``await pool.close()``.
    """
    kwargs: dict[str, Any] = {"autocommit": autocommit}
    if server_settings:
        kwargs["options"] = libpq_options(server_settings)
    pool = AsyncConnectionPool(dsn, min_size=min_size, max_size=max_size, kwargs=kwargs,
                               open=False, **pool_kwargs)
    await pool.open(wait=True, timeout=open_timeout)
    return pool


async def role_on(lesson: Any, server: Target, suffix: str = "drivers") -> Target:
    """A throw-away login role on ``server`` that may read ``shop``, as a :class:`Target`.

    ``server`` is what ``lesson.server_with(...)`` returned: the lesson's admin role (then the
    role comes from ``lesson.create_role``, dropped by ``lesson.close()``) or a private
    embedded server's superuser (the role goes away with that server).
    """
    if server == lesson.admin:
        name, password = await lesson.create_role(suffix)
    else:
        name, password = f"{lesson.schema}_{suffix}"[:63], secrets.token_urlsafe(16)
        conn = await connect(server)
        try:
            await execute_ddl(conn, "CREATE ROLE %I LOGIN PASSWORD %L", name, password)
            await execute_ddl(conn, "GRANT USAGE ON SCHEMA shop TO %I", name)
            await execute_ddl(conn, "GRANT SELECT ON ALL TABLES IN SCHEMA shop TO %I", name)
        finally:
            await conn.close()
    return server.replace(user=name, password=password)


# -- lookups (requests for helpers.load) -------------------------------------------------------


def asyncpg_lookup(pool: asyncpg.Pool, query: str = LOOKUP_SQL, keys: int = USERS) -> Request:
    """A request that runs ``query`` with one key through an asyncpg pool (acquire, release)."""
    async def request(i: int) -> Any:
        return await pool.fetchval(query, key(i, keys))

    return request


def psycopg_lookup(pool: AsyncConnectionPool, query: str = LOOKUP_SQL,
                   keys: int = USERS) -> Request:
    """The same request through a psycopg pool (``query`` in asyncpg style, converted)."""
    converted = psycopg_sql(query)

    async def request(i: int) -> Any:
        async with pool.connection() as conn:
            cur = await conn.execute(converted, (key(i, keys),))
            row = await cur.fetchone()
            return row[0] if row else None

    return request


def per_worker_lookup(conns: Sequence[asyncpg.Connection], query: str = LOOKUP_SQL,
                      keys: int = USERS) -> Request:
    """The same request with no pool: each load worker uses its own connection, all run long.

    The ceiling a pool is measured against ("persistent connections"): worker ``w`` of
    :func:`helpers.load.run_load` uses ``conns[w]``, so it needs as many connections as the
    run's concurrency.
    """
    async def request(i: int) -> Any:
        w = current_worker()
        if w >= len(conns):
            raise RuntimeError(f"per_worker_lookup has {len(conns)} connections: "
                               "run it at that concurrency or below")
        return await conns[w].fetchval(query, key(i, keys))

    return request


def connect_per_request_lookup(dsn: str, query: str = LOOKUP_SQL, keys: int = USERS,
                               **connect_kwargs: Any) -> Request:
    """The same request opening (and closing) a new asyncpg connection every time."""
    async def request(i: int) -> Any:
        conn = await asyncpg.connect(dsn, **connect_kwargs)
        try:
            return await conn.fetchval(query, key(i, keys))
        finally:
            await conn.close()

    return request


async def noop_reset(conn: asyncpg.Connection) -> None:
    """An asyncpg pool ``reset=`` that sends nothing: one round trip less per request.

    On release the pool still rolls back a transaction left open and forgets the connection's
    ``add_listener`` callbacks (``Connection._reset``), but sends no ``pg_advisory_unlock_all();
    CLOSE ALL; UNLISTEN *; RESET ALL``: session state (``SET``, advisory locks, the server's
    ``LISTEN``, cursors ``WITH HOLD``) then leaks to the next user. Behind PgBouncer in
    transaction mode that reset is a second transaction per request, on whichever server
    connection PgBouncer lends, and it blanks the client's ``application_name`` (notebook 07):
    there, this is the reset to use.
    """


# -- bulk inserts (psycopg's side; asyncpg's methods are in helpers.batch_inserts) ---------------


async def psycopg_executemany(conn: psycopg.AsyncConnection, table: str, rows: Sequence[Row], *,
                              schema: str | None = None) -> None:
    """psycopg's ``executemany`` (pipelined since psycopg 3.1), in one transaction like
    asyncpg's (which is atomic)."""
    query = psql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
        _psycopg_table(table, schema), psql.SQL(", ").join(map(psql.Identifier, COLUMNS)),
        psql.SQL(", ").join(psql.Placeholder() * len(COLUMNS)))
    async with conn.transaction():
        async with conn.cursor() as cur:
            await cur.executemany(query, rows)


async def psycopg_copy(conn: psycopg.AsyncConnection, table: str, rows: Sequence[Row], *,
                       schema: str | None = None) -> None:
    """psycopg's ``COPY ... FROM STDIN`` fed row by row with ``write_row``, in a transaction."""
    query = psql.SQL("COPY {} ({}) FROM STDIN").format(
        _psycopg_table(table, schema), psql.SQL(", ").join(map(psql.Identifier, COLUMNS)))
    async with conn.transaction():
        async with conn.cursor() as cur, cur.copy(query) as copy:
            for row in rows:
                await copy.write_row(row)


def _psycopg_table(table: str, schema: str | None) -> psql.Composable:
    return psql.Identifier(schema, table) if schema else psql.Identifier(table)


def on_psycopg(conn: psycopg.AsyncConnection,
               method: Callable[..., Awaitable[Any]]) -> InsertMethod:
    """A psycopg insert method as a :class:`helpers.batch_inserts.InsertMethod`, so that
    :func:`helpers.batch_inserts.compare_inserts` times it next to asyncpg's methods (it passes
    its asyncpg connection, used only to create, truncate and count the tables)."""
    async def insert(_asyncpg_conn: asyncpg.Connection, table: str, rows: Sequence[Row], *,
                     schema: str | None = None) -> None:
        await method(conn, table, rows, schema=schema)

    return insert
