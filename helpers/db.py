"""Which PostgreSQL the course uses, and connections to it that fail with a clear message.

In order: ``DATABASE_URL`` (used as given: password auth, odd ports, ``?sslmode=...``), then the
standard libpq variables (``PGHOST``, ``PGPORT``, ``PGUSER``, ``PGPASSWORD``, ``PGDATABASE``)
when ``PGHOST`` is set, and otherwise the embedded server (``helpers/_infra/server.py``),
started on demand.

One type, :class:`Target`, is the only place that takes a connection URL apart or puts one
together: :meth:`Target.replace` gives the same server with another user, port or database,
:meth:`Target.masked` is safe to print, and :meth:`Target.libpq_env` hands the credentials to
a command-line tool (``psql``, ``pgbench``) through its environment, never its command line.

:func:`connect` is ``asyncpg.connect`` with a short timeout, and every way a connection can fail
(nothing listening, unknown host, wrong password, missing database, no answer) becomes one
:class:`DatabaseUnavailable` that names host, port and what to try. :func:`execute_ddl` is the
one rule for identifiers in SQL: the server's own ``format('%I')``, with the values bound.

:class:`Target` needs only the standard library (the command line uses it before the virtual
environment exists); asyncpg is imported where a connection is made.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from ._infra.errors import CourseError, DatabaseUnavailable
from ._infra.settings import settings

if TYPE_CHECKING:
    import asyncpg

    from ._infra.server import EmbeddedServer

#: Seconds to wait for a server to answer before saying so (asyncpg's default is 60).
CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Target:
    """A database to connect to: its URL, where the URL came from, and the server if ours."""

    url: str
    source: str  # "DATABASE_URL", "PG* variables", "embedded", ...
    embedded: EmbeddedServer | None = None

    # -- the parts of the URL ---------------------------------------------------------------

    @property
    def _parts(self):
        return urlsplit(self.url)

    @property
    def host(self) -> str:
        return self._parts.hostname or settings().env.get("PGHOST", "localhost")

    @property
    def port(self) -> int:
        try:
            port = self._parts.port
        except ValueError:
            port = None
        return port or int(settings().env.get("PGPORT", "5432"))

    @property
    def user(self) -> str:
        name = self._parts.username
        return unquote(name) if name else settings().env.get("PGUSER", "") or "(default)"

    @property
    def password(self) -> str | None:
        password = self._parts.password
        return unquote(password) if password is not None else settings().env.get("PGPASSWORD")

    @property
    def database(self) -> str:
        path = unquote(self._parts.path.lstrip("/"))
        return path or settings().env.get("PGDATABASE", "") or "(default)"

    @property
    def query(self) -> dict[str, str]:
        """The URL's query parameters (``sslmode``, ``target_session_attrs``, ...)."""
        return dict(parse_qsl(self._parts.query))

    @property
    def restartable(self) -> bool:
        """True when the course controls the server process (it may restart it in a lesson)."""
        return self.embedded is not None

    # -- new targets from this one ----------------------------------------------------------

    def replace(self, *, user: str | None = None, password: str | None = None,
                host: str | None = None, port: int | None = None, database: str | None = None,
                source: str | None = None, **query: str | None) -> Target:
        """The same target with some parts changed, e.g. another role's credentials
        (``replace(user=name, password=pw)``), a PgBouncer's port, or a query parameter
        (``replace(sslmode="disable")``; ``None`` removes one). A new ``user`` without a
        ``password`` drops the old password."""
        parts = self._parts
        new_user = user if user is not None else (unquote(parts.username or "") or None)
        if password is not None:
            new_password: str | None = password
        elif user is not None:
            new_password = None
        else:
            new_password = unquote(parts.password) if parts.password is not None else None
        new_host = host if host is not None else (parts.hostname or "")
        if ":" in new_host and not new_host.startswith("["):
            new_host = f"[{new_host}]"
        try:
            old_port = parts.port
        except ValueError:
            old_port = None
        new_port = port if port is not None else old_port
        netloc = ""
        if new_user:
            netloc = quote(new_user, safe="")
            if new_password is not None:
                netloc += ":" + quote(new_password, safe="")
            netloc += "@"
        netloc += new_host + (f":{new_port}" if new_port else "")
        path = "/" + quote(database, safe="") if database is not None else parts.path
        params = dict(parse_qsl(parts.query))
        for key, value in query.items():
            if value is None:
                params.pop(key, None)
            else:
                params[key] = str(value)
        url = urlunsplit((parts.scheme or "postgresql", netloc, path, urlencode(params), ""))
        return dataclasses.replace(self, url=url, source=source or self.source)

    def masked(self) -> str:
        """The URL with its password replaced by ``***``: safe to print and to store."""
        return mask_url(self.url)

    def describe(self) -> str:
        """One line for a setup cell: where the database comes from (no password)."""
        return f"{self.source}: {self.masked()}"

    def libpq_env(self, **extra: str) -> dict[str, str]:
        """The ``PG*`` variables for a libpq tool (``psql``, ``pgbench``): host, port, user,
        database, password (and ``sslmode`` if the URL has one). Pass them as the tool's
        environment: a password on a command line is visible to every user in ``ps``."""
        env = {"PGHOST": self.host, "PGPORT": str(self.port)}
        if self._parts.username:
            env["PGUSER"] = self.user
        if self._parts.path.strip("/"):
            env["PGDATABASE"] = self.database
        if self.password is not None:
            env["PGPASSWORD"] = self.password
        if "sslmode" in self.query:
            env["PGSSLMODE"] = self.query["sslmode"]
        return {**env, **extra}


def mask_url(url: str) -> str:
    """Replace the password in a postgres URL with ``***`` (handles odd URLs gracefully)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)[1]
        userinfo = f"{parts.username}:***" if parts.username else ":***"
        return urlunsplit(parts._replace(netloc=f"{userinfo}@{netloc}"))
    except ValueError:
        return "<unparseable URL>"


def _url_from_pg_env(env: dict[str, str]) -> str:
    return Target("postgresql://", "PG* variables").replace(
        user=env.get("PGUSER") or None, password=env.get("PGPASSWORD"),
        host=env.get("PGHOST", "localhost"), port=int(env.get("PGPORT", "5432")),
        database=env.get("PGDATABASE", ""),
    ).url


def configured_target() -> Target | None:
    """The target named by the environment, or None when the embedded server should be used."""
    env = settings().env
    url = env.get("DATABASE_URL", "").strip()
    if url:
        if not url.startswith(("postgres://", "postgresql://")):
            raise CourseError(
                f"DATABASE_URL must start with postgresql:// (got {mask_url(url)[:40]!r}).",
                "Example: postgresql://user:password@localhost:5432/course",
            )
        return Target(url, "DATABASE_URL")
    if env.get("PGHOST"):
        return Target(_url_from_pg_env(env), "PG* variables")
    return None


def resolve(start: bool = True) -> Target:
    """The database to use; starts the embedded server if needed and ``start`` is True."""
    from ._infra.server import EmbeddedServer

    target = configured_target()
    if target is not None:
        return target
    server = EmbeddedServer()
    port = server.start().port if start else None
    return Target(server.url(port), "embedded", server)


# -- connecting ---------------------------------------------------------------------------------


def explain(exc: BaseException, target: Target) -> DatabaseUnavailable:
    """Translate a connection failure into one short, actionable message."""
    import asyncpg

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
    import asyncpg

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
    sql = await format_sql(conn, template, *args)
    await conn.execute(sql)
    return sql


async def format_sql(conn: asyncpg.Connection, template: str, *args: str) -> str:
    """The server's ``format(template, *args)``: the one way the course quotes identifiers
    (``%I``) and literals (``%L``) that come from values, for SQL that cannot take ``$n``."""
    placeholders = "".join(f", ${i + 2}::text" for i in range(len(args)))
    return str(await conn.fetchval(f"SELECT format($1{placeholders})", template, *args))


async def server_version(target: Target) -> str:
    """The server's ``version()`` string (a quick end-to-end check of the connection)."""
    conn = await connect(target)
    try:
        return str(await conn.fetchval("SELECT version()"))
    finally:
        await conn.close()
