"""Plumbing for notebook 09 (production pitfalls): certificates and a TLS endpoint, a hot
standby for failover, multi-host URLs and a scratch folder. The lessons themselves (what
asyncpg does) stay in the notebook; this module only builds what they run against.

* :func:`make_certificates` writes a throw-away certificate authority and a server certificate
  signed by it (``openssl`` command line, EC P-256 keys, valid two days, every file 0600).
* :class:`TlsFront` ends TLS in front of a PostgreSQL server, the way a server with
  ``ssl = on`` does it (it answers the client's SSLRequest, then the handshake), and passes
  the decrypted protocol on. The course's embedded PostgreSQL is built without SSL support,
  so this is where notebook 09's clients meet a certificate. It can also play a man in the
  middle: its own certificate, TLS stripped (``files=None`` answers "no SSL"), and a record
  of the plaintext it passed on.
* :func:`start_standby` makes a streaming-replication hot standby of a lesson's private server
  (``pg_basebackup -R``) and starts it next to it; the lesson stops and deletes it at cleanup.
* :func:`multi_host_url` writes ``postgresql://user:<password>@h1:p1,h2:p2/db?...``, the URL form
  for several hosts that asyncpg (and libpq) accept.
* :func:`scratch_folder` is a folder for the files a run writes, deleted at cleanup.

Private servers are the course's embedded PostgreSQL, so all of this works when
``DATABASE_URL`` names a server where the course is a plain user.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import pwd
import secrets
import shutil
import ssl
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from helpers._infra.errors import CourseError
from helpers._infra.paths import state_dir
from helpers._infra.server import EmbeddedServer, find_bin_dir, unprivileged
from helpers.db import Target

if TYPE_CHECKING:  # not imported at run time: importing this module stays light
    from helpers.lesson import Lesson

#: Lines added to a primary's ``pg_hba.conf`` so that a standby on loopback may replicate.
REPLICATION_HBA = "host replication all 127.0.0.1/32 scram-sha-256\n"


@dataclass(frozen=True)
class TlsFiles:
    """The files :func:`make_certificates` wrote: the CA certificate a client trusts, and the
    server's certificate and key (PostgreSQL's ``ssl_cert_file`` and ``ssl_key_file``)."""

    folder: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    hostname: str


def _openssl(*args: str, cwd: Path) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise CourseError(
            "The TLS section needs the `openssl` command to make its certificates.",
            "Install it (Debian/Ubuntu: `sudo apt-get install openssl`; macOS has one).",
        )
    proc = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise CourseError(f"openssl {args[0]} failed: {proc.stderr.strip()[-300:]}")


def _server_account(server: EmbeddedServer) -> pwd.struct_passwd | None:
    """The unprivileged account a private server runs as when we are root and user
    namespaces are blocked (it owns the data folder); None otherwise."""
    if os.geteuid() != 0 or not server.data_dir.exists():
        return None
    owner = server.data_dir.stat().st_uid
    return pwd.getpwuid(owner) if owner != 0 else None


def make_certificates(folder: Path, hostname: str = "localhost") -> TlsFiles:
    """Write a new CA (``ca.crt``) and a server certificate for ``hostname`` signed by it
    (``server.crt``, ``server.key``) into ``folder``; every file is 0600.

    The certificate names ``hostname`` only (subjectAltName ``DNS:<hostname>``), so a client
    that checks host names accepts it for that name and for no other, not even the IP address
    it resolves to. The CA's key is deleted once it has signed: nobody needs it again.
    """
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=pooling course throw-away CA", cwd=folder)
    _openssl("req", "-new", *ec, "-keyout", "server.key", "-out", "server.csr",
             "-subj", f"/CN={hostname}", cwd=folder)
    (folder / "server.ext").write_text(
        f"subjectAltName = DNS:{hostname}\nbasicConstraints = CA:FALSE\n"
        "keyUsage = critical, digitalSignature\nextendedKeyUsage = serverAuth\n"
        "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid, issuer\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-set_serial", "0x" + secrets.token_hex(8), "-days", "2", "-extfile", "server.ext",
             "-out", "server.crt", cwd=folder)
    for leftover in ("ca.key", "server.csr", "server.ext"):
        (folder / leftover).unlink()
    files = TlsFiles(folder, folder / "ca.crt", folder / "server.crt", folder / "server.key",
                     hostname)
    for path in (files.ca_cert, files.server_cert, files.server_key):
        os.chmod(path, 0o600)
    return files


#: The first message of a client that asks for TLS (PostgreSQL protocol: length 8, code).
SSL_REQUEST = 80877103
#: The same for GSSAPI encryption, which the front always declines.
GSSENC_REQUEST = 80877104


class TlsFront:
    """A TLS endpoint on 127.0.0.1 in front of a PostgreSQL server without TLS of its own.

    It speaks PostgreSQL's SSL negotiation as a server with ``ssl = on`` does: to an
    SSLRequest it answers ``S`` and performs the TLS handshake with ``files``' certificate and
    key, then relays the (decrypted) protocol to ``upstream`` over plain TCP. With
    ``files=None`` it answers ``N`` ("no SSL here"), like a server with ``ssl = off`` or an
    attacker who strips TLS. ``record=True`` keeps a copy of everything clients sent, after
    decryption (:meth:`seen`): what a man in the middle gets to read.

    It runs its own event loop in a thread, so its half of the handshake runs beside the
    client's, as a server's would. A teaching tool, not a production proxy.
    """

    def __init__(self, upstream: Target, files: TlsFiles | None, *, record: bool = False
                 ) -> None:
        self.upstream = (upstream.host, upstream.port)
        self.files = files
        self.record = record
        self.port: int | None = None
        self.handshakes: list[str] = []  # the TLS version of each completed handshake
        self._upstream_target = upstream
        self._seen: list[bytes] = []
        self._context: ssl.SSLContext | None = None
        if files is not None:
            self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._context.load_cert_chain(files.server_cert, files.server_key)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def target(self) -> Target:
        """The upstream's URL (credentials, database) with the front's host and port."""
        if self.port is None:
            raise RuntimeError("start() the front first")
        return self._upstream_target.replace(host="127.0.0.1", port=self.port,
                                             source="TLS front")

    def seen(self) -> bytes:
        """Everything clients sent through the front so far, in plaintext (``record=True``)."""
        return b"".join(self._seen)

    async def start(self) -> TlsFront:
        """Listen on a free port of 127.0.0.1 (in the front's own thread); returns self."""
        self._thread = threading.Thread(target=self._run, name="tls-front", daemon=True)
        self._thread.start()
        await asyncio.to_thread(self._ready.wait, 10)
        if self._error is not None or self.port is None:
            raise CourseError(f"The TLS front did not start: {self._error!r}")
        return self

    async def close(self) -> None:
        """Stop listening, drop every connection, end the thread."""
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            await asyncio.to_thread(self._thread.join, 10)

    async def __aenter__(self) -> TlsFront:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the front's own thread ------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            server = loop.run_until_complete(
                asyncio.start_server(self._handle, "127.0.0.1", 0))
            self.port = int(server.sockets[0].getsockname()[1])
        except OSError as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._shutdown(server))
            loop.close()

    async def _shutdown(self, server: asyncio.Server) -> None:
        server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        self._writers.add(writer)
        up_writer: asyncio.StreamWriter | None = None
        try:
            first = await reader.readexactly(8)
            length, code = struct.unpack("!ii", first)
            while length == 8 and code in (SSL_REQUEST, GSSENC_REQUEST):
                if code == SSL_REQUEST and self._context is not None:
                    writer.write(b"S")
                    await writer.drain()
                    await writer.start_tls(self._context)
                    ssl_object = writer.get_extra_info("ssl_object")
                    self.handshakes.append(ssl_object.version() if ssl_object else "?")
                    first = b""
                    break
                writer.write(b"N")  # no TLS (or no GSSAPI) here: the client decides
                await writer.drain()
                first = await reader.readexactly(8)
                length, code = struct.unpack("!ii", first)
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            self._writers.add(up_writer)
            if first:
                self._keep(first)
                up_writer.write(first)
            pumps = [asyncio.ensure_future(self._pump(reader, up_writer, keep=True)),
                     asyncio.ensure_future(self._pump(up_reader, writer, keep=False))]
            # PostgreSQL has no half-closed connections: when one side hangs up (the server
            # after a CancelRequest, the client after Terminate), close the other one too.
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass  # a client that gave up (e.g. it rejected the certificate), or a reset
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    self._writers.discard(w)
                    w.close()  # flushes what is buffered; over TLS it sends close_notify

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    keep: bool) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            while data := await reader.read(65536):
                if keep:
                    self._keep(data)
                writer.write(data)
                await writer.drain()

    def _keep(self, data: bytes) -> None:
        if self.record:
            self._seen.append(bytes(data))


def scratch_folder(lesson: Lesson) -> Path:
    """A folder for files this run writes (e.g. a small app to run in a subprocess), deleted
    by ``lesson.close()``; given relative to the working directory, so printed paths stay
    short and say nothing about this machine."""
    folder = state_dir() / "scratch" / lesson.schema
    folder.mkdir(parents=True, exist_ok=True)
    lesson.on_close(lambda: shutil.rmtree(folder, ignore_errors=True))
    return Path(os.path.relpath(folder))


def multi_host_url(*targets: Target, **query: str) -> str:
    """One URL naming several servers, in order, with the first one's user, password and
    database: ``postgresql://user:<password>@h1:p1,h2:p2/db?target_session_attrs=...``.

    :class:`~helpers.db.Target` holds one host, so this is the first target's URL (credentials,
    database and ``query`` quoted by :meth:`Target.replace`) with its host list put in place of
    its one host.
    """
    if not targets:
        raise ValueError("multi_host_url needs at least one target")
    first = targets[0]
    parts = urlsplit(first.replace(database=first.database, **query).url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    hosts = ",".join(f"[{t.host}]:{t.port}" if ":" in t.host else f"{t.host}:{t.port}"
                     for t in targets)
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{hosts}"))


def _append(path: Path, text: str) -> None:
    with open(path, "a") as fh:
        fh.write(text)


def _basebackup(primary: Target, server: EmbeddedServer, data_dir: Path) -> None:
    """``pg_basebackup -R`` of ``primary`` into ``data_dir``, with the privileges the primary
    runs with (so the standby can run the same way)."""
    bins = find_bin_dir()
    account = _server_account(server)
    cmd, kwargs = unprivileged(
        [str(bins / "pg_basebackup"), "-D", str(data_dir), "-X", "stream", "-R", "-c", "fast",
         "--no-sync"], account)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(primary.replace(database="postgres").libpq_env(LC_ALL="C"))
    deadline = time.monotonic() + 10
    while True:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120,
                              stdin=subprocess.DEVNULL, **kwargs)
        if proc.returncode == 0:
            return
        # The primary reloads pg_hba.conf a moment after pg_reload_conf() returns.
        if "pg_hba.conf" not in proc.stderr or time.monotonic() > deadline:
            raise CourseError(f"pg_basebackup failed: {proc.stderr.strip()[-400:]}")
        shutil.rmtree(data_dir, ignore_errors=True)
        time.sleep(0.1)


def _stop_at_exit(server: EmbeddedServer) -> None:
    with contextlib.suppress(Exception):
        server.stop()


async def start_standby(lesson: Lesson, primary: Target, **settings: str) -> Target:
    """Start a hot standby of ``primary`` (a :meth:`Lesson.private_server`), streaming from
    it; stopped and deleted by ``lesson.close()``. ``settings`` are ``postgresql.conf``
    settings for the standby (a base backup, then the standby's start).

    The primary is first told to accept replication connections from loopback (one line in its
    ``pg_hba.conf``, then ``pg_reload_conf()``). The standby's superuser and password are the
    primary's (it is a copy).
    """
    server = primary.embedded
    if server is None:
        raise CourseError("start_standby needs a private server (lesson.private_server()).")
    await asyncio.to_thread(_append, server.data_dir / "pg_hba.conf", REPLICATION_HBA)
    conn = await asyncpg.connect(primary.url, timeout=5)
    try:
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()
    home = Path(tempfile.mkdtemp(prefix="standby-", dir=server.home.parent))
    account = _server_account(server)
    if account is not None:
        os.chown(home, account.pw_uid, account.pw_gid)
    shutil.copy2(server.password_file, home / "password")  # 0600, like the original
    standby = EmbeddedServer(home, settings={k: str(v) for k, v in settings.items()})
    lesson.on_close(standby.stop)  # runs before the lesson deletes its private folder
    # A kernel shut down before its cleanup cell: stop the standby at interpreter exit, as the
    # lesson does for its own private servers (the standby is not one of them).
    atexit.register(_stop_at_exit, standby)
    await asyncio.to_thread(_basebackup, primary, server, standby.data_dir)
    result = await asyncio.to_thread(standby.start)
    return Target(standby.url(result.port), "embedded hot standby (private to this lesson)",
                  standby)
