"""Opening connections with errors a learner can act on.

:func:`connect` is ``asyncpg.connect`` with a short timeout and every way a connection can
fail (nothing listening, unknown host, wrong password, missing database, no answer) turned
into one :class:`~helpers.errors.DatabaseUnavailable` that names host, port and what to try.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import asyncpg

from .errors import DatabaseUnavailable
from .target import Target

#: Seconds to wait for a server to answer before saying so (asyncpg's default is 60).
CONNECT_TIMEOUT_S = 5.0


def explain(exc: BaseException, target: Target) -> DatabaseUnavailable:
    """Translate a connection failure into one short, actionable message."""
    where = f"{target.host}:{target.port}"
    origin = {
        "DATABASE_URL": f"from DATABASE_URL={target.masked()}",
        "PG* variables": "from PGHOST/PGPORT/PGUSER/PGDATABASE",
        "embedded": "the course's embedded server",
    }.get(target.source, target.source)
    fix_env = (
        "Check the URL, or unset DATABASE_URL to let the course start its own embedded server."
        if target.source != "embedded"
        else "Run `python -m helpers db status`; `python -m helpers db stop` then start "
        "recreates nothing and keeps your data."
    )
    if isinstance(exc, asyncpg.InvalidPasswordError):
        return DatabaseUnavailable(
            f"PostgreSQL at {where} ({origin}) rejected the password for user {target.user!r}.",
            "Fix the password in DATABASE_URL (or PGPASSWORD / ~/.pgpass).",
        )
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return DatabaseUnavailable(
            f"PostgreSQL at {where} has no database {target.database!r} ({origin}).",
            f"Create it (`createdb -h {target.host} -p {target.port} {target.database}`) or "
            "name an existing database in DATABASE_URL.",
        )
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        return DatabaseUnavailable(
            f"PostgreSQL at {where} does not accept user {target.user!r}: {exc}.",
            "Use a role that exists and may log in, in DATABASE_URL or PGUSER.",
        )
    if isinstance(exc, asyncpg.TooManyConnectionsError):
        return DatabaseUnavailable(
            f"PostgreSQL at {where} has no free connection slots: {exc}.",
            "Close other notebooks' kernels (each holds a pool) or raise max_connections.",
        )
    if isinstance(exc, socket.gaierror):
        return DatabaseUnavailable(
            f"Cannot resolve the database host {target.host!r} ({origin}).", fix_env
        )
    if isinstance(exc, ConnectionRefusedError):
        return DatabaseUnavailable(
            f"Nothing is listening at {where} ({origin}): connection refused.",
            "Is the server running? " + fix_env,
        )
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return DatabaseUnavailable(
            f"No answer from PostgreSQL at {where} within {CONNECT_TIMEOUT_S:.0f} s ({origin}).",
            "A firewall or a wrong host? " + fix_env,
        )
    if isinstance(exc, OSError):
        return DatabaseUnavailable(
            f"Cannot reach PostgreSQL at {where} ({origin}): {exc.strerror or exc}.", fix_env
        )
    return DatabaseUnavailable(
        f"Connecting to PostgreSQL at {where} ({origin}) failed: {type(exc).__name__}: {exc}",
        fix_env,
    )


async def connect(target: Target, **kwargs: Any) -> asyncpg.Connection:
    """``asyncpg.connect(target.url, **kwargs)`` that fails fast with a clear message."""
    kwargs.setdefault("timeout", CONNECT_TIMEOUT_S)
    try:
        # The outer wait_for also bounds DNS lookups, which asyncpg's timeout does not cover.
        return await asyncio.wait_for(
            asyncpg.connect(target.url, **kwargs), kwargs["timeout"] + 1.0
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise explain(exc, target) from None


async def execute_ddl(conn: asyncpg.Connection, template: str, *args: str) -> str:
    """Run a utility statement whose identifiers or literals come from values.

    ``CREATE SCHEMA``, ``COMMENT`` and friends cannot take ``$1`` parameters, so the values are
    bound into the server's own ``format()`` (``%I`` quotes an identifier, ``%L`` a literal)
    and the result is executed: nothing is pasted into SQL on the client.
    """
    placeholders = "".join(f", ${i + 2}::text" for i in range(len(args)))
    sql = await conn.fetchval(f"SELECT format($1{placeholders})", template, *args)
    await conn.execute(sql)
    return str(sql)


async def server_version(target: Target) -> str:
    """The server's ``version()`` string (a quick end-to-end check of the connection)."""
    conn = await connect(target)
    try:
        return str(await conn.fetchval("SELECT version()"))
    finally:
        await conn.close()
