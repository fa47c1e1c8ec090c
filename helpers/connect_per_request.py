"""Where a new connection's time goes, phase by phase, and what a pooled request pays (01).

:func:`probe_connect` opens one connection by speaking the PostgreSQL wire protocol itself
(asyncio streams and ``hashlib``, no driver), so that every phase is timed on its own:

====================  ========================================================================
``tcp_connect``       the TCP handshake (``asyncio.open_connection``)
``ssl_request``       the SSLRequest round trip that ``ssl='prefer'`` (asyncpg's and libpq's
                      default) sends first; the server answers ``N`` when SSL is off (plus the
                      TLS handshake when it answers ``S``). The answer comes from the backend
                      process forked for this connection, so this wait overlaps the next one
``startup``           startup message until the server asks for a password: the new backend
                      process has started, read the settings and looked up ``pg_hba.conf``.
                      With ``trust`` no password is asked for: the server sends
                      AuthenticationOk only together with ReadyForQuery, so this phase holds
                      the session setup too
``scram_hashing``     SCRAM-SHA-256 only: PBKDF2 on the client, with the server's iteration
                      count (md5's hash takes microseconds and stays in the next phase)
``auth_session``      the password messages to and fro (SCRAM, md5 or cleartext), and the
                      backend setting up the session: the server sends AuthenticationOk only
                      together with ReadyForQuery. Zero with ``trust``
``first_query``       the first query on the new backend (its caches are cold)
``close``             Terminate, then wait until the server has closed the socket
====================  ========================================================================

plus ``next_query``: the same query again on the still-open connection, one round trip of the
raw protocol. :func:`profile_connects` repeats the probe and returns a DataFrame with the
authentication method the server asked for (``auth``); :func:`phase_medians` labels the phases
for that method.

:func:`time_calls` times what a pooled request really pays with asyncpg (acquire, the query
from the connection's statement cache, and the release with its reset query: a second round
trip) against the same query on a connection that is simply open, interleaved.

:func:`asyncpg_costs` asks the same questions of asyncpg itself, interleaved: ``connect()``
with the default ``ssl='prefer'`` vs ``ssl=False``, the first query vs the next, ``close()``
vs ``terminate()``.
"""

from __future__ import annotations

import asyncio
import base64
import getpass
import hashlib
import hmac
import secrets
import ssl as ssl_module
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pandas as pd

from helpers._infra.settings import settings
from helpers.capabilities import AUTH_METHODS
from helpers.db import Target

#: The phases :func:`probe_connect` times, in the order they happen.
PHASES = ("tcp_connect", "ssl_request", "startup", "scram_hashing", "auth_session",
          "first_query", "close")
#: Readable names for plots and tables (SCRAM's; :func:`labels` gives them per method).
LABELS = {
    "tcp_connect": "TCP connect",
    "ssl_request": "SSL request",
    "startup": "backend start",
    "scram_hashing": "SCRAM hashing (client)",
    "auth_session": "SCRAM exchange + session setup",
    "first_query": "first query",
    "close": "close",
    "next_query": "query on an open connection",
}

_PROTOCOL_3_0 = 196608
_SSL_REQUEST = 80877103


def labels(auth: str) -> dict[str, str]:
    """:data:`LABELS` for the authentication method ``auth`` (a value of
    :data:`helpers.capabilities.AUTH_METHODS`): what each phase holds with that method."""
    names = dict(LABELS)
    if auth == "trust":
        names["startup"] = "backend start + session setup"
        names["auth_session"] = "session setup"  # always 0 with trust: it is in the startup
    elif auth == "md5":
        names["auth_session"] = "md5 exchange + session setup"
    elif auth != "SCRAM-SHA-256":
        names["auth_session"] = f"{auth} exchange + session setup"
    return names


class ProbeError(Exception):
    """The server refused the probe (its SQLSTATE and message), or spoke unexpectedly."""

    def __init__(self, message: str, sqlstate: str = "") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@dataclass(frozen=True)
class Probe:
    """One probed connection: the authentication method the server asked for, and the
    milliseconds of each phase (:data:`PHASES`, then ``next_query``)."""

    auth: str
    ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Params:
    host: str
    port: int
    user: str
    password: str
    database: str
    ssl_request: bool


def _as_target(target: Target | str) -> Target:
    return target if isinstance(target, Target) else Target(target, "URL")


def _host(target: Target) -> str:
    return target.query.get("host") or target.host  # libpq's ?host= wins over the netloc


def over_tcp(target: Target | str) -> bool:
    """Whether ``target`` is reached over TCP (not a Unix socket, e.g. ``?host=/var/run/...``),
    which is what :func:`probe_connect` times."""
    return not _host(_as_target(target)).startswith("/")


def _params(target: Target | str) -> _Params:
    """What the probe needs, taken from a :class:`~helpers.db.Target` (or a URL), with libpq's
    and asyncpg's defaults for what the URL leaves out."""
    t = _as_target(target)
    if not over_tcp(t):
        raise ValueError("probe_connect measures TCP connections; this URL names a Unix socket")
    user = t.user if t.user != "(default)" else getpass.getuser()
    database = t.database if t.database != "(default)" else user
    sslmode = t.query.get("sslmode") or settings().env.get("PGSSLMODE", "prefer")
    return _Params(_host(t), t.port, user, t.password or "", database,
                   sslmode not in ("disable", "allow"))


class _Wire:
    """Just enough of the frontend/backend protocol v3 to time a connection's phases."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def send(self, kind: bytes, payload: bytes) -> None:
        self.writer.write(kind + struct.pack("!i", len(payload) + 4) + payload)

    async def receive(self) -> tuple[bytes, bytes]:
        head = await self.reader.readexactly(5)
        kind, length = head[:1], struct.unpack("!i", head[1:])[0]
        payload = await self.reader.readexactly(length - 4)
        if kind == b"E":
            fields = {f[:1]: f[1:].decode(errors="replace") for f in payload.split(b"\0") if f}
            raise ProbeError(fields.get(b"M", "error"), fields.get(b"C", ""))
        return kind, payload

    async def until(self, wanted: bytes) -> bytes:
        """Read messages (notices, parameter status...) until one of type ``wanted``."""
        while True:
            kind, payload = await self.receive()
            if kind == wanted:
                return payload


def _scram_client_final(password: str, client_first_bare: str, server_first: str,
                        nonce: str) -> tuple[str, bytes]:
    """SCRAM-SHA-256 (RFC 5802/7677): the client-final message and the expected server
    signature. The PBKDF2 below is the expensive part."""
    attrs = dict(item.split("=", 1) for item in server_first.split(","))
    if not attrs["r"].startswith(nonce):
        raise ProbeError("SCRAM: the server's nonce does not extend ours")
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs["s"]),
                                 int(attrs["i"]))
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    without_proof = f"c=biws,r={attrs['r']}"  # biws = base64("n,,"): no channel binding
    auth_message = f"{client_first_bare},{server_first},{without_proof}".encode()
    signature = hmac.digest(hashlib.sha256(client_key).digest(), auth_message, "sha256")
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    server_signature = hmac.digest(server_key, auth_message, "sha256")
    return f"{without_proof},p={base64.b64encode(proof).decode()}", server_signature


async def probe_connect(target: Target | str, *, ssl_request: bool | None = None,
                        query: str = "SELECT 1", timeout: float = 10.0) -> Probe:
    """Open, use and close one connection over the wire protocol, timing each phase (ms).

    ``target`` is a :class:`~helpers.db.Target` or a URL. ``ssl_request`` defaults to what its
    ``sslmode`` implies (``prefer`` when absent, as in asyncpg). Returns a :class:`Probe`: the
    authentication method and ``{phase: ms}`` for :data:`PHASES` plus ``next_query`` (phases
    that did not happen, such as ``scram_hashing`` with md5 or trust, are 0). Raises
    :class:`ProbeError` when the server refuses (e.g. too many connections).
    """
    return await asyncio.wait_for(_probe(_params(target), ssl_request, query), timeout)


async def _probe(p: _Params, ssl_request: bool | None, query: str) -> Probe:
    perf = time.perf_counter
    ms: dict[str, float] = dict.fromkeys([*PHASES, "next_query"], 0.0)
    t = perf()
    reader, writer = await asyncio.open_connection(p.host, p.port)
    wire = _Wire(reader, writer)
    try:
        ms["tcp_connect"], t = (perf() - t) * 1000, perf()
        if p.ssl_request if ssl_request is None else ssl_request:
            writer.write(struct.pack("!ii", 8, _SSL_REQUEST))
            answer = await reader.readexactly(1)
            if answer == b"S":  # the server speaks TLS: do what sslmode=prefer does
                context = ssl_module.SSLContext(ssl_module.PROTOCOL_TLS_CLIENT)
                context.check_hostname = False
                context.verify_mode = ssl_module.CERT_NONE
                await writer.start_tls(context)
            ms["ssl_request"], t = (perf() - t) * 1000, perf()

        options = {"user": p.user, "database": p.database, "application_name": "connect-probe"}
        body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in options.items())
        writer.write(struct.pack("!ii", len(body) + 9, _PROTOCOL_3_0) + body + b"\0")
        request = await wire.until(b"R")
        code = struct.unpack("!i", request[:4])[0]
        auth = AUTH_METHODS.get(code, f"request {code}")
        if code == 0:  # trust: AuthenticationOk arrives with ReadyForQuery, after the setup
            await wire.until(b"Z")
            ms["startup"], t = (perf() - t) * 1000, perf()
        else:
            ms["startup"], t = (perf() - t) * 1000, perf()
            hashing = 0.0
            if code == 10:  # SASL: SCRAM-SHA-256
                mechanisms = request[4:].split(b"\0")
                if b"SCRAM-SHA-256" not in mechanisms:
                    raise ProbeError(f"SASL mechanisms {mechanisms} lack SCRAM-SHA-256")
                nonce = base64.b64encode(secrets.token_bytes(18)).decode()
                first_bare = f"n=,r={nonce}"
                first = f"n,,{first_bare}".encode()
                wire.send(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first)
                server_first = (await wire.until(b"R"))[4:].decode()
                h = perf()
                final, expected = _scram_client_final(p.password, first_bare, server_first,
                                                      nonce)
                hashing = (perf() - h) * 1000
                wire.send(b"p", final.encode())
                server_final = (await wire.until(b"R"))[4:].decode()
                if base64.b64decode(server_final.split("v=", 1)[1]) != expected:
                    raise ProbeError("SCRAM: the server's signature does not match")
                request = await wire.until(b"R")
            elif code == 5:  # md5
                inner = hashlib.md5((p.password + p.user).encode()).hexdigest()
                digest = "md5" + hashlib.md5(inner.encode() + request[4:8]).hexdigest()
                wire.send(b"p", digest.encode() + b"\0")
                request = await wire.until(b"R")
            elif code == 3:  # cleartext
                wire.send(b"p", p.password.encode() + b"\0")
                request = await wire.until(b"R")
            final_code = struct.unpack("!i", request[:4])[0]
            if final_code != 0:
                raise ProbeError(f"unsupported authentication request {final_code}"
                                 + (f" (after {auth})" if final_code != code else ""))
            await wire.until(b"Z")
            ms["scram_hashing"] = hashing
            ms["auth_session"], t = (perf() - t) * 1000 - hashing, perf()
        for phase in ("first_query", "next_query"):
            wire.send(b"Q", query.encode() + b"\0")
            await wire.until(b"Z")
            ms[phase], t = (perf() - t) * 1000, perf()

        wire.send(b"X", b"")
        await writer.drain()
        while await reader.read(4096):  # the server closes the socket when its backend exits
            pass
        ms["close"] = (perf() - t) * 1000
    finally:
        writer.close()
    return Probe(auth, ms)


async def profile_connects(target: Target | str, n: int = 50, *, ssl_request: bool | None = None,
                           query: str = "SELECT 1") -> pd.DataFrame:
    """Run :func:`probe_connect` ``n`` times in a row: one row per connection, one column per
    phase (ms), plus ``connect_total`` (every phase but ``next_query``) and ``auth`` (the
    method the server asked for)."""
    probes = [await probe_connect(target, ssl_request=ssl_request, query=query)
              for _ in range(n)]
    df = pd.DataFrame([probe.ms for probe in probes])
    df["connect_total"] = df[list(PHASES)].sum(axis=1)
    df["auth"] = [probe.auth for probe in probes]
    return df


async def time_calls(calls: Mapping[str, Callable[[], Awaitable[Any]]], n: int = 200, *,
                     warmup: int = 20) -> pd.DataFrame:
    """Time each call ``n`` times, one after another and interleaved (A, B, A, B, ...) so that
    a noisy moment hits them alike: one column per call, ms per call. ``warmup`` calls of each
    first, not recorded (the first call of a query on a connection also prepares it).

    E.g. what a pooled request pays, ``lambda: pool.fetchval("SELECT 1")`` (acquire, the
    query, and the release, which awaits the pool's reset: one more round trip), against the
    same query on a connection that is simply open, ``lambda: conn.fetchval("SELECT 1")``.
    """
    perf = time.perf_counter
    for _ in range(warmup):
        for call in calls.values():
            await call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(n):
        for name, call in calls.items():
            t = perf()
            await call()
            times[name].append((perf() - t) * 1000)
    return pd.DataFrame(times)


async def asyncpg_costs(target: Target | str, n: int = 40, *, query: str = "SELECT 1",
                        **connect_kwargs: Any) -> pd.DataFrame:
    """The same questions asked of asyncpg, interleaved so noise hits every column alike.

    Per iteration: ``connect()`` with the default ``ssl`` (``prefer``), the first query, the
    next query, ``close()``; then ``connect(ssl=False)`` and ``terminate()``. One row per
    iteration, columns in ms: ``connect_prefer``, ``connect_no_ssl``, ``first_query``,
    ``next_query``, ``close``, ``terminate``.
    """
    url = _as_target(target).url
    perf = time.perf_counter
    rows = []
    for _ in range(n):
        row: dict[str, float] = {}
        t = perf()
        conn = await asyncpg.connect(url, **connect_kwargs)
        row["connect_prefer"], t = (perf() - t) * 1000, perf()
        try:
            await conn.fetchval(query)
            row["first_query"], t = (perf() - t) * 1000, perf()
            await conn.fetchval(query)
            row["next_query"], t = (perf() - t) * 1000, perf()
        finally:
            await conn.close()
        row["close"], t = (perf() - t) * 1000, perf()
        conn = await asyncpg.connect(url, ssl=False, **connect_kwargs)
        row["connect_no_ssl"], t = (perf() - t) * 1000, perf()
        conn.terminate()
        row["terminate"] = (perf() - t) * 1000
        rows.append(row)
    return pd.DataFrame(rows)[["connect_prefer", "connect_no_ssl", "first_query",
                               "next_query", "close", "terminate"]]


def phase_medians(df: pd.DataFrame, phases: tuple[str, ...] = PHASES,
                  labels: bool = True) -> dict[str, float]:
    """Median ms per phase, in order, for the phases that happened (median above 0: no SSL
    request when ``sslmode=disable``, no SCRAM hashing with md5 or trust, no separate
    exchange with trust). Keyed by phase name, or with ``labels`` by its readable name for
    the method in ``df["auth"]`` (for ``plots.stacked_bars``)."""
    names = _labels_for(df)
    return {(names.get(p, p) if labels else p): float(df[p].median()) for p in phases
            if p in df and df[p].median() > 0}


def _labels_for(df: pd.DataFrame) -> dict[str, str]:
    if "auth" in df and len(df):
        return labels(str(df["auth"].iloc[0]))
    return LABELS
