"""Plumbing for notebook 09 (production pitfalls): certificates for a TLS server, a hot standby
for failover, and multi-host URLs. The lessons themselves (what asyncpg does) stay in the
notebook; this module only builds the servers it needs.

* :func:`make_certificates` writes a throw-away certificate authority and a server certificate
  signed by it (``openssl`` command line, EC P-256 keys, valid two days, every file 0600).
* :func:`wait_for_tls` waits until a server that was told to turn SSL on (``ALTER SYSTEM SET
  ssl = on`` and ``pg_reload_conf()``) accepts TLS connections.
* :func:`start_standby` makes a streaming-replication hot standby of a lesson's private server
  (``pg_basebackup -R``) and starts it next to it; the lesson stops and deletes it at cleanup.
* :func:`multi_host_url` writes ``postgresql://user:pw@h1:p1,h2:p2/db?...``, the URL form
  for several hosts that asyncpg (and libpq) accept.

Private servers are the course's embedded PostgreSQL, so all of this works when
``DATABASE_URL`` names a server where the course is a plain user.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode

import asyncpg

from helpers._infra.errors import CourseError
from helpers._infra.server import EmbeddedServer, find_bin_dir, unprivileged
from helpers.db import Target
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


def make_certificates(folder: Path, hostname: str = "localhost",
                      owner: EmbeddedServer | None = None) -> TlsFiles:
    """Write a new CA (``ca.crt``) and a server certificate for ``hostname`` signed by it
    (``server.crt``, ``server.key``) into ``folder``; every file is 0600.

    The certificate names ``hostname`` only (subjectAltName ``DNS:<hostname>``), so a client
    that checks host names accepts it for that name and for no other, not even the IP address
    it resolves to. The CA's key is deleted once it has signed: nobody needs it again. When
    ``owner`` (the server that will read the key) runs as another account, the server's files
    are given to that account, as PostgreSQL requires for its key file.
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
    account = _server_account(owner) if owner is not None else None
    for path in (files.ca_cert, files.server_cert, files.server_key):
        os.chmod(path, 0o600)
        if account is not None:
            os.chown(path, account.pw_uid, account.pw_gid)
    if account is not None:
        os.chown(folder, account.pw_uid, account.pw_gid)
    return files


async def wait_for_tls(target: Target, timeout: float = 10.0) -> None:
    """Wait until ``target`` accepts a TLS connection (``sslmode=require``), e.g. after
    ``ALTER SYSTEM SET ssl = on`` and ``pg_reload_conf()``, which take effect a moment later."""
    deadline = time.monotonic() + timeout
    url = target.replace(sslmode="require").url
    while True:
        try:
            conn = await asyncpg.connect(url, timeout=5)
        except (OSError, asyncpg.PostgresError) as exc:
            if time.monotonic() > deadline:
                log = target.embedded.log_file if target.embedded is not None else "its log"
                raise CourseError(f"{target.masked()} does not accept TLS connections: {exc}",
                                  f"See {log}: a bad certificate or key is reported there."
                                  ) from None
            await asyncio.sleep(0.05)
        else:
            await conn.close()
            return


def multi_host_url(*targets: Target, **query: str) -> str:
    """One URL naming several servers, in order, with the first one's user, password and
    database: ``postgresql://user:pw@h1:p1,h2:p2/db?target_session_attrs=...``."""
    if not targets:
        raise ValueError("multi_host_url needs at least one target")
    first = targets[0]
    userinfo = quote(first.user, safe="")
    if first.password is not None:
        userinfo += ":" + quote(first.password, safe="")
    hosts = ",".join(f"{t.host}:{t.port}" for t in targets)
    tail = f"?{urlencode(query)}" if query else ""
    return f"postgresql://{userinfo}@{hosts}/{quote(first.database, safe='')}{tail}"


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


async def start_standby(lesson: Lesson, primary: Target, **settings: str) -> Target:
    """Start a hot standby of ``primary`` (a :meth:`Lesson.private_server`), streaming from
    it; stopped and deleted by ``lesson.close()``. ``settings`` are ``postgresql.conf``
    settings for the standby. Takes about a second.

    The primary is first told to accept replication connections from loopback (one line in its
    ``pg_hba.conf``, then ``pg_reload_conf()``). The standby's superuser and password are the
    primary's (it is a copy).
    """
    server = primary.embedded
    if server is None:
        raise CourseError("start_standby needs a private server (lesson.private_server()).")
    with open(server.data_dir / "pg_hba.conf", "a") as hba:
        hba.write(REPLICATION_HBA)
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
    await asyncio.to_thread(_basebackup, primary, server, standby.data_dir)
    result = await asyncio.to_thread(standby.start)
    return Target(standby.url(result.port), "embedded hot standby (private to this lesson)",
                  standby)
