"""PgBouncer for the course: find (or build) the binary, run one in front of a server, read its
admin console, stop it at cleanup.

Notebook 07 puts a real PgBouncer between many application processes and PostgreSQL::

    bouncer = await start_pgbouncer(server_url, lesson=lesson, default_pool_size=8)
    pool = await asyncpg.create_pool(bouncer.url, statement_cache_size=0)
    await bouncer.show("POOLS")          # the admin console, as a DataFrame

Where the binary comes from, in this order (:func:`find_pgbouncer`):

1. ``PGBOUNCER_BIN``, the path of a ``pgbouncer`` executable;
2. the course's own build in ``.pgcourse/pgbouncer/`` (``python -m helpers pgbouncer install``
   builds PgBouncer 1.24.1 from Debian's source package, patches included, in about 15 s);
   it comes before the system one because you made it for this course;
3. ``pgbouncer`` on PATH, or ``/usr/sbin/pgbouncer`` where Debian and Ubuntu install it
   (``apt-get install pgbouncer``; ``brew install pgbouncer`` on macOS).

Each :class:`PgBouncer` gets a private folder under ``.pgcourse/pgbouncer-run/`` (mode 0700)
with a generated ``pgbouncer.ini`` and an auth file (mode 0600) holding the server password and
a generated admin password; it listens on a free 127.0.0.1 port, in ``pool_mode =
transaction`` by default. PgBouncer refuses to run as root, so as root it runs in a user
namespace or as an unprivileged account, exactly like the embedded PostgreSQL
(:mod:`helpers._infra.server`). ``stop()`` ends it and deletes the folder; a PgBouncer left
behind by a killed kernel is stopped the next time one starts.

Command line: ``python -m helpers pgbouncer check`` (which binary, which version) and
``python -m helpers pgbouncer install`` (build the course's copy). Standard library only at
import time; the admin console uses psycopg (asyncpg cannot talk to it, see :class:`Console`).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from helpers._infra.errors import CourseError
from helpers._infra.paths import state_dir
from helpers._infra.server import (
    _fallback_account,
    _reachable_by,
    accepts,
    free_port,
    pid_alive,
    unprivileged,
    unshare_works,
)
from helpers._infra.settings import settings
from helpers.db import Target

if TYPE_CHECKING:
    import pandas as pd

#: The version ``install`` builds: Debian 13's source package (upstream tarball + Debian's
#: security patches), pinned by SHA-256 so a download can never be swapped.
SOURCE_VERSION = "1.24.1"
#: What building needs, as Debian/Ubuntu packages.
BUILD_PACKAGES = "gcc libc6-dev make pkg-config libevent-dev libssl-dev patch"
#: The first version that tracks protocol-level prepared statements in transaction mode.
PREPARED_STATEMENTS_SINCE = (1, 21, 0)
ADMIN_USER = "course_admin"
START_TIMEOUT_S = 10.0

HOW_TO_GET = (
    "Get PgBouncer in one of these ways, then re-run the notebook:\n"
    "  * Debian/Ubuntu: `sudo apt-get install pgbouncer` (Debian 12 has 1.18: everything runs, "
    "but the max_prepared_statements fix needs 1.21+)\n"
    "  * build 1.24.1 for the course (about 15 s; needs `apt-get install "
    f"{BUILD_PACKAGES}`): `python -m helpers pgbouncer install`\n"
    "  * macOS: `brew install pgbouncer`\n"
    "  * any binary: `export PGBOUNCER_BIN=/path/to/pgbouncer`\n"
    "  (the `pgbouncer` service of docker-compose.yml is for your own experiments: the "
    "notebook starts its own PgBouncers from a local binary)"
)


class PgBouncerMissing(CourseError):
    """No usable pgbouncer binary on this machine."""


# -- the binary --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Binary:
    """A pgbouncer executable: where it is, where we found it, its version."""

    path: Path
    origin: str  # "PGBOUNCER_BIN", "course build" or "PATH"
    version: tuple[int, int, int]

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    @property
    def tracks_prepared_statements(self) -> bool:
        """True from 1.21, which has ``max_prepared_statements`` (on by default from 1.24)."""
        return self.version >= PREPARED_STATEMENTS_SINCE

    def describe(self) -> str:
        """One line without local paths: ``PgBouncer 1.24.1 (course build)``."""
        return f"PgBouncer {self.version_text} ({self.origin})"


def build_dir() -> Path:
    """Where ``install`` puts the course's own PgBouncer (``.pgcourse/pgbouncer``)."""
    return state_dir() / "pgbouncer"


def binary_version(path: Path, timeout: float = 10.0) -> tuple[int, int, int]:
    """Run ``pgbouncer --version`` and parse ``PgBouncer 1.24.1`` into (1, 24, 1).

    Anything that is not a working pgbouncer (cannot run, no answer within ``timeout``, no
    version in the output) raises :class:`PgBouncerMissing`.
    """
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True,
                             timeout=timeout, stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise PgBouncerMissing(f"{path} cannot be run: {exc.strerror or exc}.", HOW_TO_GET) \
            from None
    except subprocess.TimeoutExpired:
        raise PgBouncerMissing(f"{path} --version did not answer within {timeout:g} s.",
                               HOW_TO_GET) from None
    match = re.search(r"PgBouncer (\d+)\.(\d+)(?:\.(\d+))?", out.stdout + out.stderr)
    if not match:
        raise PgBouncerMissing(f"{path} --version did not print a PgBouncer version.",
                               HOW_TO_GET)
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def _candidates() -> list[tuple[str, Path]]:
    found: list[tuple[str, Path]] = []
    built = build_dir() / "bin" / "pgbouncer"
    if built.exists():
        found.append(("course build", built))
    on_path = shutil.which("pgbouncer")
    if on_path:
        found.append(("PATH", Path(on_path)))
    for folder in ("/usr/sbin", "/usr/local/sbin", "/usr/local/bin", "/opt/homebrew/bin"):
        path = Path(folder) / "pgbouncer"
        if path.exists() and all(p.resolve() != path.resolve() for _, p in found):
            found.append(("PATH", path))
    return found


def find_pgbouncer() -> Binary:
    """The pgbouncer to use: ``PGBOUNCER_BIN``, the course build, then the system's.

    Raises :class:`PgBouncerMissing`, whose message says how to get one, when there is none,
    and also when ``PGBOUNCER_BIN`` names something that is not a working pgbouncer (a missing
    file, a program that cannot run or prints no PgBouncer version): the notebooks then treat
    PgBouncer as missing (their ``%%needs pgbouncer`` cells are skipped), never as an error.
    """
    path = settings().pgbouncer_bin
    if path is not None:
        explicit = str(path)
        if not path.is_file():
            raise PgBouncerMissing(f"PGBOUNCER_BIN={explicit} is not a file.",
                                   "Point it at a pgbouncer executable, or unset it.")
        return Binary(path, "PGBOUNCER_BIN", binary_version(path))
    for origin, path in _candidates():
        with contextlib.suppress(PgBouncerMissing):
            return Binary(path, origin, binary_version(path))
    raise PgBouncerMissing("No pgbouncer binary found (PGBOUNCER_BIN, .pgcourse/pgbouncer, "
                           "PATH, /usr/sbin).", HOW_TO_GET)


# -- running one ---------------------------------------------------------------------------------


def run_root() -> Path:
    """The folder that holds one private folder per running PgBouncer."""
    return state_dir() / "pgbouncer-run"


def reap_stale() -> int:
    """Stop PgBouncers whose owning process is gone (a killed kernel); returns how many."""
    reaped = 0
    root = run_root()
    if not root.exists():
        return 0
    for folder in root.iterdir():
        try:
            state = json.loads((folder / "state.json").read_text())
        except (OSError, ValueError):
            state = {}
        owner = int(state.get("owner", 0))
        if owner and pid_alive(owner, program=None):
            continue
        if not state and time.time() - folder.stat().st_mtime < 60:
            continue  # being created right now
        pid = int(state.get("pid", 0))
        # only where /proc can prove the pid is still a PgBouncer (never kill a reused pid)
        if pid and Path("/proc").exists() and pid_alive(pid, program="pgbouncer"):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            reaped += 1
        shutil.rmtree(folder, ignore_errors=True)
    return reaped


def _quote_auth(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_RUNNING: set[PgBouncer] = set()


#: ``max_prepared_statements`` for a PgBouncer that has it, unless told otherwise: 1.24's own
#: default (1.21-1.23 default to 0, tracking off).
DEFAULT_MAX_PREPARED_STATEMENTS = 200


class PgBouncer:
    """One PgBouncer in front of one PostgreSQL database, for one user.

    ``server_url`` names the server, the database and the user whose password PgBouncer
    uses to log in there; clients connect to :attr:`url` with the same user and password.
    The keyword arguments are PgBouncer settings (see https://www.pgbouncer.org/config.html):

    * ``pool_mode``: ``transaction`` (a server connection per transaction: the mode that lets
      a few server connections serve many clients) or ``session``;
    * ``default_pool_size``: server connections per database and user;
    * ``max_client_conn``: how many clients may connect to PgBouncer at all;
    * ``max_prepared_statements``: 1.21+ only; 0 turns prepared-statement tracking off (the
      behaviour of every version before 1.21); ``None`` means the course's default:
      :data:`DEFAULT_MAX_PREPARED_STATEMENTS` (1.24's own default) on every PgBouncer that
      tracks prepared statements, so that 1.21-1.23 (whose default is 0) behave like 1.24;
    * ``settings``: any other ``[pgbouncer]`` setting, e.g. ``{"max_db_connections": "10"}``.
    """

    def __init__(self, server_url: str, *, pool_mode: str = "transaction",
                 default_pool_size: int = 10, max_client_conn: int = 500,
                 max_prepared_statements: int | None = None,
                 settings: dict[str, str] | None = None, binary: Binary | None = None) -> None:
        server = Target(server_url, "server")
        self.server = server
        self.user = server.user
        self.password = server.password or ""
        self.database = server.database if server.database != "(default)" else self.user
        self.server_host = server.host
        self.server_port = server.port
        for what, value in (("user", self.user), ("database", self.database),
                            ("host", self.server_host)):
            if not _SAFE_NAME.match(value):
                raise CourseError(f"PgBouncer helper: unsupported {what} name {value!r}.",
                                  "Use letters, digits, '_', '.' and '-' only.")
        if not self.password:
            raise CourseError("PgBouncer needs the server password in the URL it is given.",
                              "Pass a URL like postgresql://user:password@host:port/db.")
        self.binary = binary or find_pgbouncer()
        if max_prepared_statements is not None and not self.binary.tracks_prepared_statements:
            if max_prepared_statements != 0:
                raise CourseError(
                    f"{self.binary.describe()} has no max_prepared_statements (it came in "
                    "PgBouncer 1.21).",
                    "Build a newer one with `python -m helpers pgbouncer install`, or use "
                    "asyncpg's statement_cache_size=0.")
            max_prepared_statements = None  # 0 is what an old PgBouncer does anyway
        elif max_prepared_statements is None and self.binary.tracks_prepared_statements:
            max_prepared_statements = DEFAULT_MAX_PREPARED_STATEMENTS
        self.settings: dict[str, str] = {
            "pool_mode": pool_mode,
            "default_pool_size": str(int(default_pool_size)),
            "max_client_conn": str(int(max_client_conn)),
        }
        if max_prepared_statements is not None:
            self.settings["max_prepared_statements"] = str(int(max_prepared_statements))
        self.settings.update({k: str(v) for k, v in (settings or {}).items()})
        self.admin_password = secrets.token_urlsafe(18)
        self.port: int | None = None
        self.home: Path = run_root() / f"{os.getpid()}-{secrets.token_hex(4)}"
        self._proc: subprocess.Popen[bytes] | None = None

    # -- what clients use --------------------------------------------------------------------

    @property
    def target(self) -> Target:
        """Where clients connect, as a :class:`helpers.db.Target` (``.masked()`` to print)."""
        self._require_running()
        return self.server.replace(host="127.0.0.1", port=self.port, database=self.database,
                                   sslmode=None, source="PgBouncer")

    @property
    def url(self) -> str:
        """Where clients connect: this PgBouncer, with the server's user and password."""
        return self.target.url

    @property
    def admin_url(self) -> str:
        """The admin console (database ``pgbouncer``, user ``course_admin``)."""
        self._require_running()
        return self.server.replace(user=ADMIN_USER, password=self.admin_password,
                                   host="127.0.0.1", port=self.port, database="pgbouncer",
                                   sslmode=None).url

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def max_prepared_statements(self) -> int:
        """The effective setting: 0 means "not tracked" (always 0 before 1.21)."""
        if not self.binary.tracks_prepared_statements:
            return 0
        return int(self.settings["max_prepared_statements"])  # always set from 1.21

    def describe(self) -> str:
        """One line for a notebook: version, port, mode, pool size (no password)."""
        state = f"127.0.0.1:{self.port}" if self.running else "stopped"
        return (f"{self.binary.describe()} on {state}, pool_mode={self.settings['pool_mode']}, "
                f"default_pool_size={self.settings['default_pool_size']}, "
                f"max_prepared_statements={self.max_prepared_statements}")

    def __repr__(self) -> str:
        return f"<PgBouncer {self.describe()}>"

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> PgBouncer:
        """Write the config and auth file, start PgBouncer on a free port, wait until it
        accepts connections (a few hundredths of a second). Returns ``self``."""
        if self.running:
            return self
        reap_stale()
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.home, 0o700)
        auth = self.home / "users.txt"
        fd = os.open(auth, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{_quote_auth(self.user)} {_quote_auth(self.password)}\n")
            fh.write(f"{_quote_auth(ADMIN_USER)} {_quote_auth(self.admin_password)}\n")
        account = self._account()
        if account is not None:
            if not _reachable_by(self.home.parent, account):
                self.stop()
                raise CourseError(
                    "PgBouncer refuses to run as root; user namespaces are blocked and the "
                    f"fallback account '{account.pw_name}' cannot reach the project folder.",
                    "Run as a normal user, or set PGBOUNCER_BIN and run the notebook as one.")
            for path in (self.home, auth):
                os.chown(path, account.pw_uid, account.pw_gid)
        last_log = ""
        for _ in range(5):
            self.port = free_port()
            self._write_config(auth)
            self._launch(account)
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline and self._proc and self._proc.poll() is None:
                if accepts(self.port, timeout=0.2):
                    _track(self)
                    return self
                time.sleep(0.02)
            last_log = self.log_tail()
            self._kill()
            if "Address already in use" not in last_log:
                break
        self.stop()
        raise CourseError(f"{self.binary.describe()} did not start: {last_log or 'no log'}",
                          "Check the settings you passed; `python -m helpers pgbouncer check`.")

    def stop(self) -> None:
        """Stop PgBouncer (clients are disconnected) and delete its folder. Idempotent."""
        self._kill()
        _RUNNING.discard(self)
        shutil.rmtree(self.home, ignore_errors=True)

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        # Immediate shutdown: SIGQUIT from 1.23 (SIGTERM there waits for every client to
        # leave), SIGTERM before.
        sig = signal.SIGQUIT if self.binary.version >= (1, 23, 0) else signal.SIGTERM
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(3)

    async def __aenter__(self) -> PgBouncer:
        import asyncio

        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: object) -> None:
        import asyncio

        await asyncio.to_thread(self.stop)

    def log_tail(self, lines: int = 3) -> str:
        """The last lines of PgBouncer's log (errors it reported), joined by `` | ``."""
        try:
            text = (self.home / "pgbouncer.log").read_text(errors="replace")
        except OSError:
            return ""
        kept = [re.sub(r"^\S+ \S+ \S+ \[\d+\] ", "", ln) for ln in text.splitlines()
                if ln.strip()]
        return " | ".join(kept[-lines:])

    def _require_running(self) -> None:
        if not self.running or self.port is None:
            raise CourseError("This PgBouncer is not running.", "Call start() first.")

    def _write_config(self, auth: Path) -> None:
        lines = [
            "; generated by helpers/pgbouncer.py for one notebook run; deleted at stop()",
            "[databases]",
            f"{self.database} = host={self.server_host} port={self.server_port} "
            f"dbname={self.database}",
            "",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            "auth_type = scram-sha-256",
            f"auth_file = {auth}",
            f"admin_users = {ADMIN_USER}",
            f"stats_users = {ADMIN_USER}",
            f"logfile = {self.home / 'pgbouncer.log'}",
            "log_connections = 0",
            "log_disconnections = 0",
            "server_login_retry = 1",
            *(f"{key} = {value}" for key, value in self.settings.items()),
        ]
        config = self.home / "pgbouncer.ini"
        config.write_text("\n".join(lines) + "\n")
        account = self._account()
        if account is not None:
            os.chown(config, account.pw_uid, account.pw_gid)

    def _account(self) -> pwd.struct_passwd | None:
        """The unprivileged account to run as when we are root and cannot use unshare."""
        if os.geteuid() != 0 or unshare_works():
            return None
        return pwd.getpwnam(_fallback_account())

    def _launch(self, account: pwd.struct_passwd | None) -> None:
        cmd, kwargs = unprivileged([str(self.binary.path), "-q", str(self.home / "pgbouncer.ini")],
                                   account)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, env=env,
                                      start_new_session=True, **kwargs)
        (self.home / "state.json").write_text(json.dumps(
            {"pid": self._proc.pid, "owner": os.getpid(), "port": self.port}))

    # -- the admin console ---------------------------------------------------------------------

    def console(self) -> Console:
        """The admin console, kept open for repeated commands::

            async with bouncer.console() as console:
                pools = await console.show("POOLS")
        """
        return Console(self)

    async def admin(self, command: str) -> list[dict[str, Any]]:
        """Run one admin console command (``SHOW POOLS``, ``RELOAD``...): rows as dicts."""
        async with self.console() as console:
            return await console.admin(command)

    async def show(self, what: str) -> pd.DataFrame:
        """``SHOW <what>`` on the admin console as a DataFrame (``POOLS``, ``STATS``,
        ``CLIENTS``, ``SERVERS``, ``CONFIG``...), this PgBouncer's database only."""
        async with self.console() as console:
            return await console.show(what)


class Console:
    """A connection to PgBouncer's admin console (the virtual database ``pgbouncer``).

    The console speaks only the simple query protocol. asyncpg sends every query that
    returns rows through the extended protocol (Parse/Bind/Execute), which the console
    rejects with ``extended query protocol not supported by admin console`` whatever
    ``statement_cache_size`` is; so this uses psycopg's client-side-binding cursor, which
    sends plain text queries.
    """

    def __init__(self, bouncer: PgBouncer) -> None:
        self.bouncer = bouncer
        self._conn: Any = None

    async def __aenter__(self) -> Console:
        import psycopg

        self._conn = await psycopg.AsyncConnection.connect(
            self.bouncer.admin_url, autocommit=True, cursor_factory=psycopg.AsyncClientCursor,
            connect_timeout=5)
        return self

    async def __aexit__(self, *exc: object) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def admin(self, command: str) -> list[dict[str, Any]]:
        """Run a console command; its rows as dicts (an empty list for RELOAD, PAUSE...)."""
        if self._conn is None:
            raise CourseError("The console is not open.", "Use `async with bouncer.console()`.")
        cur = await self._conn.execute(command)
        if cur.description is None:
            return []
        names = [d.name for d in cur.description]
        rows = await cur.fetchall()
        return [dict(zip(names, (_plain(v) for v in row), strict=True)) for row in rows]

    async def show(self, what: str) -> pd.DataFrame:
        """``SHOW <what>`` as a DataFrame, only the bouncer's own database when the result has
        a ``database`` column (the console's ``pgbouncer`` database is left out)."""
        import pandas as pd

        word = what.strip().upper()
        if not re.fullmatch(r"[A-Z_]+", word):
            raise ValueError(f"not a SHOW command: {what!r}")
        df = pd.DataFrame(await self.admin(f"SHOW {word}"))
        if "database" in df.columns:
            df = df[df["database"] == self.bouncer.database].reset_index(drop=True)
        return df


def _plain(value: Any) -> Any:
    """Decimals from the console (bigint counters) as ints, so they print and compare simply."""
    from decimal import Decimal

    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def _track(bouncer: PgBouncer) -> None:
    """Remember a running PgBouncer; the first one also registers :func:`_stop_all` to run
    when the interpreter exits (a kernel shut down without its cleanup cell)."""
    if not _RUNNING:
        atexit.register(_stop_all)
    _RUNNING.add(bouncer)


def _stop_all() -> None:
    for bouncer in list(_RUNNING):
        with contextlib.suppress(Exception):
            bouncer.stop()


# -- notebooks ------------------------------------------------------------------------------------


def close_with(lesson: Any, resource: Any, first: bool = False) -> None:
    """Make ``await lesson.close()`` also stop ``resource`` (anything with a sync ``stop()``).

    It stops before the lesson's pools and private servers; ``first`` resources (application
    processes) stop before the others (PgBouncers), so that no pool loses its server under
    load and starts reconnecting.
    """
    lesson.on_close(resource.stop, first=first)


async def start_pgbouncer(server_url: str, *, lesson: Any = None, **options: Any) -> PgBouncer:
    """Start a :class:`PgBouncer` in front of ``server_url`` (options as for the class);
    with ``lesson``, ``await lesson.close()`` stops it."""
    import asyncio

    bouncer = PgBouncer(server_url, **options)
    await asyncio.to_thread(bouncer.start)
    if lesson is not None:
        close_with(lesson, bouncer)
    return bouncer


def require_pgbouncer() -> Binary:
    """The binary to use, or :class:`PgBouncerMissing` whose message says exactly how to get
    one: for scripts and tests that cannot run without it. Notebooks never call it: they use
    :func:`helpers.scaling_out.pgbouncer_for` and ``%%needs pgbouncer`` cells."""
    return find_pgbouncer()


# -- command line ---------------------------------------------------------------------------------


def cli(argv: list[str]) -> int:
    """``python -m helpers pgbouncer check|install [--force]``."""
    parser = argparse.ArgumentParser(prog="python -m helpers pgbouncer",
                                     description="A PgBouncer for the course (notebook 07).")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("check", help="which pgbouncer the course uses, and its version")
    inst = sub.add_parser("install", help=f"build PgBouncer {SOURCE_VERSION} into "
                                          ".pgcourse/pgbouncer (about 15 s)")
    inst.add_argument("--force", action="store_true", help="rebuild even if it is there")
    args = parser.parse_args(argv)
    if args.action == "install":
        from .tools import load_tool

        binary = load_tool("build_pgbouncer").install(force=args.force)
        print(f"ready: {binary.describe()}; the course uses it from now on")
        return 0
    try:
        binary = find_pgbouncer()
    except PgBouncerMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    tracking = ("tracks prepared statements (max_prepared_statements)"
                if binary.tracks_prepared_statements else
                "no max_prepared_statements (before 1.21): `python -m helpers pgbouncer "
                "install` builds 1.24.1")
    print(f"{binary.describe()}: {binary.path}; {tracking}")
    return 0
