"""A lesson's database context: its own schema, the kernel's shared pool, cleanup.

Every notebook's setup cell is::

    lesson = await start_lesson("02-pooling")

which finds the database (``DATABASE_URL`` or the embedded server), makes sure the seed data is
loaded, creates a schema unique to this run (``lesson_02_<random>``) and opens the shared pool
with ``search_path`` set to that schema, then ``shop``. Running the setup cell again closes the
previous lesson first (its pools and its schema), so nothing leaks. The notebook's last cell is
``await lesson.close()``.

Two learners on one server, or two runs at once, never collide: each run has its own schema,
and its connections carry an ``application_name`` unique to the run
(``course/<lesson>/<random>``), so whatever a notebook counts or terminates is its own.

The application connects as an ordinary role, as learners' apps do. On a server where the
course's role is a superuser (the embedded server), each run creates a throw-away login role
that owns the run's schema and may read ``shop``: :attr:`Lesson.target` (and ``dsn``, ``pool``,
``connect``, ``create_pool``) use it, and :attr:`Lesson.admin` is the superuser, for set-up and
for the admin demonstrations that say they need it. On a server where the course's role is not
a superuser (a workshop's ``DATABASE_URL``), both are that role. :attr:`Lesson.caps` says what
the server can do (:mod:`helpers.capabilities`); :meth:`Lesson.server_with` gives a section
that needs more a private embedded server, and says so in one line.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import inspect
import json
import os
import re
import secrets
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg

from helpers._infra.errors import CourseError, install_notebook_handler
from helpers._infra.paths import state_dir
from helpers._infra.seed import SeedInfo, ensure_seed
from helpers._infra.server import EmbeddedServer, pid_alive
from helpers._infra.settings import settings
from helpers.capabilities import NEEDS, Capabilities, probe
from helpers.db import Target, connect, execute_ddl, explain, resolve

#: Lesson schemas older than this are left-overs of crashed runs and are dropped at setup.
STALE_AFTER_S = 12 * 3600
SCHEMA_PREFIX = "lesson_"
#: Where ``make run`` collects the headline figures that notebooks record.
FIGURES_ENV = "PGCOURSE_FIGURES_DIR"
#: How a section that cannot run here tells the learner (and ``make run``'s summary).
SKIP_PREFIX = "skipped:"

_current: Lesson | None = None


class Lesson:
    """One run of one notebook: a schema, the shared pool, and everything to clean up."""

    def __init__(self, lesson_id: str, target: Target, schema: str, seed: SeedInfo,
                 admin: Target | None = None, caps: Capabilities | None = None,
                 app_role: str | None = None) -> None:
        self.id = lesson_id
        #: Where the application connects: an ordinary role (see the module docstring).
        self.target = target
        #: The role the course was given (DATABASE_URL or the embedded superuser).
        self.admin = admin or target
        self.caps = caps
        self.schema = schema
        self.seed = seed
        self.app_role = app_role
        self.application_name = f"course/{lesson_id}/{schema.rsplit('_', 1)[-1]}"[:63]
        self.skipped: list[str] = []
        self.pool: asyncpg.Pool | None = None
        self._pools: list[asyncpg.Pool] = []
        self._connections: list[asyncpg.Connection] = []
        self._roles: list[str] = []
        self._servers: list[EmbeddedServer] = []
        self._on_close: list[tuple[Callable[[], Any], bool]] = []
        self.figures: dict[str, dict[str, Any]] = {}
        self.closed = False

    # -- connecting ----------------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        """The connection URL. In an application this is ``os.environ["DATABASE_URL"]``."""
        return self.target.url

    def server_settings(self, **extra: str) -> dict[str, str]:
        """``server_settings`` that put a connection in this lesson's schema (then ``shop``)."""
        return {"search_path": f"{self.schema}, shop, public",
                "application_name": self.application_name, **extra}

    async def connect(self, **kwargs: Any) -> asyncpg.Connection:
        """A new connection in the lesson's schema; closed by :meth:`close` if you forget."""
        kwargs["server_settings"] = self.server_settings(**kwargs.get("server_settings", {}))
        conn = await connect(self.target, **kwargs)
        self._connections.append(conn)
        return conn

    async def create_pool(self, **kwargs: Any) -> asyncpg.Pool:
        """``asyncpg.create_pool`` in the lesson's schema; closed by :meth:`close`."""
        kwargs["server_settings"] = self.server_settings(**kwargs.get("server_settings", {}))
        kwargs.setdefault("timeout", 5.0)
        try:
            pool = await asyncpg.create_pool(self.target.url, **kwargs)
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            raise explain(exc, self.target) from None
        self._pools.append(pool)
        return pool

    async def connect_admin(self, **kwargs: Any) -> asyncpg.Connection:
        """A connection as :attr:`admin` (set-up, monitoring, admin demonstrations), in the
        lesson's schema; closed by :meth:`close` if you forget."""
        kwargs["server_settings"] = self.server_settings(**kwargs.get("server_settings", {}))
        conn = await connect(self.admin, **kwargs)
        self._connections.append(conn)
        return conn

    async def create_role(self, suffix: str, **options: str) -> tuple[str, str]:
        """A throw-away login role for this run (dropped by :meth:`close`): (name, password).

        ``options`` are role attributes, e.g. ``connection_limit="2"``. Needs a superuser (to
        clean up: DROP OWNED BY, ending the role's sessions): elsewhere, use a private server,
        ``await lesson.server_with("createrole")``.
        """
        if self.caps is not None and not self.caps.createrole:
            raise CourseError(f"Role {self.caps.user!r} may not create roles on this server.",
                              "Run this section on `await lesson.server_with(\"createrole\")`.")
        name = f"{self.schema}_{suffix}"[:63]
        password = secrets.token_urlsafe(16)
        attrs = " ".join(f"{k.upper().replace('_', ' ')} {int(v)}" for k, v in options.items())
        conn = await connect(self.admin)
        try:
            await execute_ddl(conn, f"CREATE ROLE %I LOGIN PASSWORD %L {attrs}", name, password)
            await execute_ddl(conn, "GRANT USAGE ON SCHEMA %I, shop TO %I", self.schema, name)
            await execute_ddl(conn, "GRANT SELECT ON ALL TABLES IN SCHEMA shop TO %I", name)
        finally:
            await conn.close()
        self._roles.append(name)
        return name, password

    async def private_server(self, *, seed: bool = False, **settings: str) -> Target:
        """Start a throw-away embedded PostgreSQL for this run only; stopped and deleted by
        :meth:`close`.

        For lessons that restart a server or need different settings (e.g.
        ``max_connections="20"``) without disturbing anyone else on the shared database. It
        starts in about a second; its superuser password is generated like the main one's.
        With ``seed=True`` the shop data is loaded into it too (about a second more).
        """
        folder = _private_root() / self.schema
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "owner.json").write_text(json.dumps({"pid": os.getpid()}))
        home = folder / str(len(self._servers))
        server = EmbeddedServer(home, settings={k: str(v) for k, v in settings.items()})
        if not self._servers:  # a kernel shut down before its cleanup cell stops them too
            atexit.register(self._stop_servers_at_exit)
        self._servers.append(server)
        result = await asyncio.to_thread(server.start)
        target = Target(server.url(result.port), "embedded (private to this lesson)", server)
        if seed:
            conn = await connect(target)
            try:
                await ensure_seed(conn)
            finally:
                await conn.close()
        return target

    async def server_with(self, *needs: str, why: str = "", seed: bool = True,
                          **settings: str) -> Target:
        """The lesson's own server (as :attr:`admin`) when it has every capability in ``needs``
        (keys of :data:`helpers.capabilities.NEEDS`), else a private embedded server (its
        superuser; see :meth:`private_server`). Prints one line saying which, and why.

        ``settings`` always ask for a private server (they are ``postgresql.conf`` settings);
        a private server gets the shop data unless ``seed=False``.
        """
        caps = self.caps
        missing = [n for n in needs if caps is None or not caps.has(n)]
        if not missing and not settings:
            return self.admin
        target = await self.private_server(seed=seed, **settings)
        reason = "; ".join(NEEDS[n] for n in missing) or ", ".join(
            f"{k}={v}" for k, v in settings.items())
        print(f"This section runs on a private embedded PostgreSQL: it needs {reason}"
              + (f" ({why})" if why else "") + ".")
        return target

    def skip(self, reason: str, how: str = "") -> None:
        """Say that a section cannot run on this machine, and why (one line; ``make run``'s
        summary lists it). Cells of that section start with ``%%needs <capability>``."""
        line = f"{SKIP_PREFIX} {reason}" + (f"; {how}" if how else "")
        self.skipped.append(line)
        print(line)
        if settings().figures_dir:
            self._write_figures()

    def _stop_servers_at_exit(self) -> None:
        """At interpreter exit (a kernel shut down after a failed cell, before the cleanup
        cell): stop this lesson's private servers, so none is left running."""
        if self.closed:
            return
        for server in self._servers:
            with contextlib.suppress(Exception):
                server.stop()
        shutil.rmtree(_private_root() / self.schema, ignore_errors=True)

    def on_close(self, callback: Callable[[], Any], first: bool = False) -> None:
        """Run ``callback`` (a function, sync or async) in :meth:`close`, before the lesson's
        pools close and its private servers stop: e.g. stopping a PgBouncer or worker
        processes. Callbacks run in reverse order of registration; ``first`` ones before all
        others (application processes before the PgBouncer they talk to)."""
        self._on_close.append((callback, first))

    def url_for(self, user: str, password: str) -> str:
        """The lesson's URL with another role's credentials (for :meth:`create_role`)."""
        return self.target.replace(user=user, password=password).url

    # -- reporting -----------------------------------------------------------------------------

    def record(self, key: str, value: float, unit: str = "", label: str = "") -> None:
        """Keep a headline figure (``make run`` prints them in its summary)."""
        self.figures[key] = {"value": float(value), "unit": unit, "label": label or key}
        if settings().figures_dir:
            self._write_figures()

    def _write_figures(self) -> None:
        folder = settings().figures_dir
        assert folder is not None
        path = Path(folder) / f"{self.id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**self.figures, "_skipped": self.skipped}, indent=2))

    def describe(self) -> str:
        """What the setup cell prints: where the database is and which schema is ours."""
        role = (f"{self.app_role} (created for this run; admin: {self.admin.user})"
                if self.app_role else f"{self.target.user} (also the admin role)")
        return (f"database: {self.admin.describe()}\n"
                f"app role: {role}\n"
                f"schema:   {self.schema} (dropped at cleanup)\n"
                f"seed:     shop.users {self.seed.rows['users']:,} rows, "
                f"shop.orders {self.seed.rows['orders']:,} rows")

    # -- cleanup -------------------------------------------------------------------------------

    async def close(self) -> None:
        """Close every pool and connection of this lesson and drop its schema and roles."""
        global _current
        if self.closed:
            return
        self.closed = True
        ordered = [cb for cb, first in reversed(self._on_close) if first]
        ordered += [cb for cb, first in reversed(self._on_close) if not first]
        for callback in ordered:
            try:
                if inspect.iscoroutinefunction(callback):
                    await callback()
                else:
                    await asyncio.to_thread(callback)
            except Exception as exc:  # keep cleaning up; say what could not be stopped
                warnings.warn(f"cleanup step {callback!r} failed: {exc!r}", stacklevel=2)
        for pool in self._pools:
            await close_pool(pool)
        for conn in self._connections:
            if not conn.is_closed():
                conn.terminate()
        for server in self._servers:
            await asyncio.to_thread(server.stop)
        if self._servers:
            await asyncio.to_thread(shutil.rmtree, _private_root() / self.schema, True)
        conn = await connect(self.admin)
        try:
            await execute_ddl(conn, "DROP SCHEMA IF EXISTS %I CASCADE", self.schema)
            for role in [*self._roles, *([self.app_role] if self.app_role else [])]:
                await _drop_role(conn, role)
        finally:
            await conn.close()
        if _current is self:
            _current = None


async def close_pool(pool: asyncpg.Pool, timeout: float = 5.0) -> None:
    """Close a pool gracefully; if a connection is never released, terminate it after ``timeout``.

    ``pool.close()`` waits for every acquired connection to come back, forever by default.
    """
    if pool.is_closing():
        return
    try:
        await asyncio.wait_for(pool.close(), timeout)
    except (TimeoutError, asyncpg.PostgresError, OSError):
        pool.terminate()


def _slug(lesson_id: str) -> str:
    match = re.match(r"(\d+)", lesson_id)
    return match.group(1) if match else re.sub(r"\W+", "_", lesson_id.lower())[:12]


def _private_root() -> Path:
    return state_dir() / "private"


def _owner(folder: Path) -> int | None:
    """The pid of the process (a kernel) that started a run's private servers, if recorded."""
    try:
        return int(json.loads((folder / "owner.json").read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _orphaned(folder: Path, live_schemas: set[str] | None) -> bool:
    """A run's private servers are orphaned when the kernel that started them has exited;
    for folders without an owner file (older runs), when the run's schema is gone."""
    owner = _owner(folder)
    if owner is not None:
        return not pid_alive(owner, program=None)
    return live_schemas is not None and folder.name not in live_schemas


def _stop_orphaned_private_servers(live_schemas: set[str] | None) -> list[str]:
    """Stop and delete private servers of runs that are gone: their kernel has exited (or
    left no owner file) and their schema is gone (a kernel that died before its cleanup cell
    leaves its private server running). A live kernel's servers are never touched, whichever
    database its lesson uses."""
    removed = []
    root = _private_root()
    if not root.exists():
        return removed
    for folder in root.iterdir():
        if folder.is_dir() and _orphaned(folder, live_schemas):
            for home in (h for h in folder.iterdir() if h.is_dir()):
                with contextlib.suppress(CourseError, OSError):
                    EmbeddedServer(home).stop()
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed


async def _drop_stale_schemas(conn: asyncpg.Connection) -> list[str]:
    """Drop lesson schemas left by runs that died before cleanup (older than STALE_AFTER_S)."""
    rows = await conn.fetch(
        "SELECT nspname, obj_description(oid, 'pg_namespace') AS note FROM pg_namespace "
        "WHERE nspname LIKE $1", SCHEMA_PREFIX + "%",
    )
    dropped = []
    for row in rows:
        with contextlib.suppress(TypeError, ValueError, json.JSONDecodeError):
            created = json.loads(row["note"] or "{}").get("created", 0)
            if time.time() - float(created) > STALE_AFTER_S:
                await execute_ddl(conn, "DROP SCHEMA IF EXISTS %I CASCADE", row["nspname"])
                await _drop_role(conn, f"{row['nspname']}_app")
                dropped.append(row["nspname"])
    return dropped


async def _drop_role(conn: asyncpg.Connection, role: str) -> None:
    """End a run's role's sessions, then drop what it owns and the role (if it exists)."""
    if not await conn.fetchval("SELECT true FROM pg_roles WHERE rolname = $1", role):
        return
    await conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role)
    await execute_ddl(conn, "DROP OWNED BY %I", role)  # its grants, too
    await execute_ddl(conn, "DROP ROLE IF EXISTS %I", role)


async def _create_app_role(conn: asyncpg.Connection, schema: str) -> tuple[str, str]:
    """The run's application role: may log in, owns the run's schema, reads ``shop``."""
    name, password = f"{schema}_app", secrets.token_urlsafe(18)
    await execute_ddl(conn, "CREATE ROLE %I LOGIN PASSWORD %L", name, password)
    await execute_ddl(conn, "GRANT CONNECT ON DATABASE %I TO %I",
                      await conn.fetchval("SELECT current_database()"), name)
    await execute_ddl(conn, "ALTER SCHEMA %I OWNER TO %I", schema, name)
    await execute_ddl(conn, "GRANT USAGE ON SCHEMA shop TO %I", name)
    await execute_ddl(conn, "GRANT SELECT ON ALL TABLES IN SCHEMA shop TO %I", name)
    return name, password


def install_notebook_conveniences() -> None:
    """Inside Jupyter: a failed :class:`CourseError` shows as one line, figures display as
    PNG without pyplot, and cells that start with ``%%needs <capability>`` (see
    :func:`needs_transformer`). Nothing happens outside IPython. ``start_lesson`` calls it;
    importing ``helpers`` does not."""
    import sys

    install_notebook_handler()
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is None:
        return
    if getattr(shell, "kernel", None) is not None:
        from IPython.core.pylabtools import select_figure_formats

        select_figure_formats(shell, {"png"}, bbox_inches="tight")
    if needs_transformer not in shell.input_transformers_cleanup:
        shell.input_transformers_cleanup.insert(0, needs_transformer)


def needs_transformer(lines: list[str]) -> list[str]:
    """A cell that starts with ``%%needs pgbouncer`` runs as it is (top-level ``await`` and
    the displayed last value included) where the capability is there; elsewhere it is
    replaced by a call that prints why it is skipped and how to get what is missing, and
    records the skip for ``make run``'s summary. Under pytest, the course's plugin skips such
    cells with the same reason before they reach the kernel."""
    if not lines or not lines[0].startswith("%%needs"):
        return lines
    need = lines[0][len("%%needs"):].strip()
    lesson = current_lesson()
    if need not in NEEDS or lesson is None or lesson.caps is None:
        return [f"raise __import__('helpers.lesson').lesson.unknown_need({need!r})\n"]
    if lesson.caps.has(need):
        return lines[1:]
    return [f"__import__('helpers.lesson').lesson.skip_section({need!r})\n"]


def unknown_need(need: str) -> CourseError:
    """The error of a ``%%needs`` cell that names no known capability, or runs before setup."""
    return CourseError(f"%%needs {need}: unknown capability, or no lesson set up yet.",
                       f"One of: {', '.join(NEEDS)}; run the setup cell first.")


def skip_section(need: str) -> None:
    """What a ``%%needs`` cell runs where ``need`` is missing: one line, recorded once."""
    reason, how = missing_reason(need)
    lesson = current_lesson()
    already = lesson is None or any(line.startswith(f"{SKIP_PREFIX} {reason}")
                                    for line in lesson.skipped)
    if lesson is not None and not already:
        lesson.skip(reason, how)
    else:
        print(f"{SKIP_PREFIX} {reason}")


def missing_reason(need: str) -> tuple[str, str]:
    """(why a ``%%needs`` section cannot run here, the one command that fixes it)."""
    if need == "pgbouncer":
        return ("no PgBouncer on this machine",
                "install it with `sudo apt-get install pgbouncer` (or `brew install pgbouncer`)")
    return (f"this server lacks {NEEDS[need]}", "")


async def start_lesson(
    lesson_id: str, *, pool: bool = True, min_size: int = 2, max_size: int = 10,
    **pool_kwargs: Any,
) -> Lesson:
    """Set up a lesson: database, seed data, a fresh schema and (by default) the shared pool.

    Calling it again in the same kernel first closes the previous lesson (pools, schema), so
    re-running a setup cell never leaks connections.
    """
    global _current
    if _current is not None:
        previous, _current = _current, None
        await previous.close()
    try:
        target = await asyncio.wait_for(asyncio.to_thread(resolve), 90)
    except TimeoutError:
        raise CourseError("Starting the embedded PostgreSQL took over 90 s.",
                          "See .pgcourse/server.log, or set DATABASE_URL.") from None
    install_notebook_conveniences()
    conn = await connect(target)
    app_role = None
    try:
        caps = await probe(conn, target)
        seed = await ensure_seed(conn)
        await _drop_stale_schemas(conn)
        live = None  # schemas only tell for the embedded setup, whose folder this is
        if target.embedded is not None:
            live = {r[0] for r in await conn.fetch(
                "SELECT nspname FROM pg_namespace WHERE nspname LIKE $1", SCHEMA_PREFIX + "%")}
        await asyncio.to_thread(_stop_orphaned_private_servers, live)
        schema = f"{SCHEMA_PREFIX}{_slug(lesson_id)}_{secrets.token_hex(3)}"
        await execute_ddl(conn, "CREATE SCHEMA %I", schema)
        note = json.dumps({"lesson": lesson_id, "created": time.time()})
        await execute_ddl(conn, "COMMENT ON SCHEMA %I IS %L", schema, note)
        app_target = target
        if caps.superuser:  # the app gets an ordinary role of its own, as in production
            app_role, password = await _create_app_role(conn, schema)
            app_target = target.replace(user=app_role, password=password)
    finally:
        await conn.close()
    lesson = Lesson(lesson_id, app_target, schema, seed, admin=target, caps=caps,
                    app_role=app_role)
    _current = lesson
    if pool:
        lesson.pool = await lesson.create_pool(min_size=min_size, max_size=max_size,
                                               **pool_kwargs)
    return lesson


def current_lesson() -> Lesson | None:
    """The lesson this kernel set up last (None before setup or after cleanup)."""
    return _current

