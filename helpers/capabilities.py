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

__all__ = ["ALWAYS_PRIVATE", "AUTH_METHODS", "Capabilities", "NEEDS", "WITHOUT", "auth_method",
           "probe", "report", "table"]

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


#: Per notebook: (capability, what the notebook does on a server without it). ``createrole``
#: means a superuser (see :func:`probe`).
WITHOUT: dict[str, list[tuple[str, str]]] = {
    "03": [("createrole", "exercise 3's throw-away role runs on a private embedded server")],
    "05": [("pg_stat_statements", "the statement statistics run on a private embedded server")],
    "07": [("pgbouncer", "the PgBouncer sections are skipped, with the command to install it")],
    "08": [("createrole", "the section with a throw-away role runs on a private embedded "
                          "server"),
           ("pg_stat_statements", "the round-trip counts run on a private embedded server")],
    "10": [("pgbouncer", "the PgBouncer section is skipped, with the command to install it")],
}

#: Per notebook: what runs on a private embedded server whatever this server has (it needs a
#: superuser, other settings, or a server to restart, and nobody else's server is touched).
ALWAYS_PRIVATE: dict[str, str] = {
    "01": "the role CONNECTION LIMIT demo and exercise 2 (max_connections)",
    "02": "the identity leak (SET ROLE to a throw-away role)",
    "04": "the durable-commit comparison (fsync on)",
    "06": "the restarts, and the two roles of the health-checker pitfall",
    "07": "the N x M refusal (a low max_connections)",
    "09": "TLS and failover",
    "10": "PgBouncer in front, the restart, and the statement counts",
    "11": "the worker processes' refusal (max_connections = 20) and the restart",
}

#: The PostgreSQL majors the course is written for and tested on.
SUPPORTED_MAJORS = range(15, 19)


def _without(*needs: str) -> str:
    return "; ".join(f"{nb}: {what}" for nb, items in WITHOUT.items() for need, what in items
                     if need in needs)


def _uses(*needs: str) -> str:
    notebooks = sorted({nb for nb, items in WITHOUT.items() for need, _ in items
                        if need in needs})
    return f"used as is by {', '.join(notebooks)}" if notebooks else "used as is"


def _auth_note(auth: str) -> str:
    if auth == "trust":
        return "01: no password exchange to time (trust), so no SCRAM bar"
    if auth == "SCRAM-SHA-256":
        return "01 times the SCRAM exchange, the client's hashing included"
    if auth.startswith("unknown"):
        return "01 times whatever the server asks for"
    return f"01 times the {auth} exchange"


def table(caps: Capabilities) -> pd.DataFrame:
    """The capability table of ``00-setup``: what this server and machine have, and what the
    notebooks do with it (where something is missing, and what always runs privately)."""
    if caps.major in SUPPORTED_MAJORS:
        version_note = "supported (15 to 18)"
    elif caps.major < SUPPORTED_MAJORS.start:
        version_note = "too old: the course needs PostgreSQL 15 to 18"
    else:
        version_note = "newer than the course was tested on (15 to 18)"
    role_note = ("the app pool connects as a throw-away ordinary role; admin demonstrations "
                 "use this one" if caps.superuser else
                 "the app pool and the admin demonstrations use this role; runs end only "
                 "their own sessions")
    rows = [
        ("server", f"PostgreSQL {caps.server_version}", version_note),
        ("authentication", caps.auth, _auth_note(caps.auth)),
        ("role", f"{caps.user} ({'superuser' if caps.superuser else 'not a superuser'})",
         role_note),
        ("superuser", "yes" if caps.superuser else "no",
         _uses("superuser", "createrole") if caps.superuser
         else _without("superuser", "createrole")),
        ("pg_stat_statements", "yes" if caps.pg_stat_statements else "no",
         _uses("pg_stat_statements") if caps.pg_stat_statements
         else _without("pg_stat_statements")),
        ("PgBouncer", caps.pgbouncer or "no",
         _uses("pgbouncer") if caps.pgbouncer else _without("pgbouncer")),
        ("private embedded servers", "always, for",
         "; ".join(f"{nb}: {what}" for nb, what in ALWAYS_PRIVATE.items())),
    ]
    return pd.DataFrame(rows, columns=["capability", "this server / machine",
                                       "what the notebooks do"])


def as_dict(caps: Capabilities) -> dict[str, object]:
    """The probe as a plain dict (for ``make run``'s summary and tests)."""
    return asdict(caps)
