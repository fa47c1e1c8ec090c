"""What this machine and this database server can do, and what each notebook does with it (00).

The course runs on the servers learners bring: PostgreSQL 15 to 18, trust, md5 or SCRAM auth,
often as a role that is not a superuser, with or without ``pg_stat_statements``, with or
without a PgBouncer on the machine. :func:`probe` finds out once, at a lesson's setup; a
section that needs what is missing runs on a private embedded server instead
(:meth:`helpers.lesson.Lesson.server_with`) or, for PgBouncer, is skipped with its reason.
``00-setup`` prints the table of :func:`table`.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import asdict, dataclass

import asyncpg
import pandas as pd

from helpers._infra.check import report
from helpers.db import Target

__all__ = ["AUTH_METHODS", "Capabilities", "NEEDS", "auth_method", "probe", "report", "table"]

#: The AuthenticationRequest codes of the wire protocol, by name.
AUTH_METHODS = {0: "trust", 3: "password (cleartext)", 5: "md5", 10: "SCRAM-SHA-256"}

#: What a capability means, for messages ("... needs <this>").
NEEDS = {
    "superuser": "a superuser",
    "createrole": "a role that may create throw-away roles and clean them up (a superuser)",
    "pg_stat_statements": "pg_stat_statements (preloaded and created in this database)",
    "signal_backends": "the right to end other roles' sessions (pg_signal_backend)",
    "alter_system": "ALTER SYSTEM (a superuser)",
    "restart": "a server the course may restart (its own embedded one)",
    "pgbouncer": "a pgbouncer binary on this machine",
}


@dataclass(frozen=True)
class Capabilities:
    """One probe of a server (and of this machine, for PgBouncer)."""

    server_version: str
    server_version_num: int
    auth: str
    user: str
    superuser: bool
    createrole: bool
    signal_backends: bool
    pg_stat_statements: bool
    restart: bool
    max_connections: int
    pgbouncer: str | None  # "PgBouncer 1.24.1 (course build)", or None

    @property
    def major(self) -> int:
        return self.server_version_num // 10000

    @property
    def alter_system(self) -> bool:
        return self.superuser

    def has(self, need: str) -> bool:
        """Whether the capability named ``need`` (a key of :data:`NEEDS`) is there."""
        if need not in NEEDS:
            raise ValueError(f"unknown capability {need!r}; one of {', '.join(NEEDS)}")
        return bool(getattr(self, need))

    def missing(self, *needs: str) -> list[str]:
        """The ``needs`` that are not there."""
        return [need for need in needs if not self.has(need)]


async def auth_method(target: Target, timeout: float = 5.0) -> str:
    """How the server authenticates ``target.user``: its first AuthenticationRequest, read
    over the wire (no password sent, no SSL: what a plain ``sslmode=disable`` login sees)."""

    async def ask() -> str:
        reader, writer = await asyncio.open_connection(target.host, target.port)
        try:
            database = target.database if target.database != "(default)" else target.user
            body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in
                            {"user": target.user, "database": database}.items())
            writer.write(struct.pack("!ii", len(body) + 9, 196608) + body + b"\0")
            await writer.drain()
            kind = await reader.readexactly(1)
            length = struct.unpack("!i", await reader.readexactly(4))[0]
            payload = await reader.readexactly(length - 4)
            if kind != b"R":
                return "unknown (the server refused: " + payload[1:80].decode(errors="replace") + ")"
            code = struct.unpack("!i", payload[:4])[0]
            return AUTH_METHODS.get(code, f"request {code}")
        finally:
            writer.close()

    try:
        return await asyncio.wait_for(ask(), timeout)
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        return f"unknown ({type(exc).__name__})"


def _pgbouncer() -> str | None:
    from helpers._infra.pgbouncer import PgBouncerMissing, find_pgbouncer

    try:
        return find_pgbouncer().describe()
    except PgBouncerMissing:
        return None


async def probe(conn: asyncpg.Connection, target: Target) -> Capabilities:
    """The capabilities of ``target``'s server for the role of ``conn`` (one round trip for
    the catalog questions, one wire-level login for the auth method)."""
    row = await conn.fetchrow("""
        SELECT current_setting('server_version') AS version,
               current_setting('server_version_num')::int AS version_num,
               current_setting('max_connections')::int AS max_connections,
               current_user AS name, r.rolsuper,
               r.rolsuper OR pg_has_role(current_user, 'pg_signal_backend', 'MEMBER') AS signal,
               EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements') AS pgss
        FROM pg_roles r WHERE r.rolname = current_user""")
    pgss = bool(row["pgss"])
    if pgss:  # created in this database, but is it preloaded (and readable) too?
        try:
            await conn.fetchval("SELECT count(*) FROM pg_stat_statements WHERE false")
        except asyncpg.PostgresError:
            pgss = False
    auth, bouncer = await asyncio.gather(auth_method(target), asyncio.to_thread(_pgbouncer))
    return Capabilities(
        server_version=row["version"], server_version_num=row["version_num"], auth=auth,
        # CREATEROLE alone is not enough: a non-superuser cannot DROP OWNED BY the roles it
        # made, nor end their sessions, so a lesson could not clean up after itself.
        user=row["name"], superuser=row["rolsuper"], createrole=row["rolsuper"],
        signal_backends=row["signal"], pg_stat_statements=pgss, restart=target.restartable,
        max_connections=row["max_connections"], pgbouncer=bouncer,
    )


#: Per notebook: (capability, what the notebook does without it).
WITHOUT = {
    "01": [("createrole", "the connection-limit demo runs on a private embedded server")],
    "05": [("pg_stat_statements", "the statement statistics run on a private embedded server")],
    "06": [("restart", "restarts happen on a private embedded server (always)")],
    "07": [("pgbouncer", "the PgBouncer sections are skipped, with the command to install it")],
    "08": [("pg_stat_statements", "round trips are counted on a private embedded server")],
    "10": [("pgbouncer", "the PgBouncer section is skipped, with the command to install it")],
}


def table(caps: Capabilities) -> pd.DataFrame:
    """The capability table of ``00-setup``: what the server has, and what the notebooks do
    where it lacks something."""
    rows = [
        ("server", f"PostgreSQL {caps.server_version}", "15 to 18 are supported"),
        ("authentication", caps.auth, "any works; 01 times the phases your server uses"),
        ("role", f"{caps.user} ({'superuser' if caps.superuser else 'not a superuser'})",
         "admin demonstrations that need more run on a private embedded server"),
    ]
    for need in ("createrole", "signal_backends", "pg_stat_statements", "restart", "pgbouncer"):
        value = getattr(caps, need)
        have = value if isinstance(value, str) else ("yes" if value else "no")
        uses = [f"{nb}: {what}" for nb, items in WITHOUT.items() for n, what in items
                if n == need] if not value else []
        rows.append((need, have or "no", "; ".join(uses) or "used as is"))
    return pd.DataFrame(rows, columns=["capability", "this server / machine", "without it"])


def as_dict(caps: Capabilities) -> dict[str, object]:
    """The probe as a plain dict (for ``make run``'s summary and tests)."""
    return asdict(caps)
