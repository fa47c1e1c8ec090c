"""A real web service under real HTTP load: the plumbing of notebook 11.

Three pieces, each a separate operating-system process, as in production:

* :func:`start_server` runs ``uvicorn helpers.shop_api:app`` (the app the notebook reads) on a
  free port of 127.0.0.1, with N workers, and waits until it answers. Its configuration,
  ``DATABASE_URL`` included, travels in the subprocess's *environment*: a command line is
  visible to every user in ``ps``. The server is always stopped: by :meth:`WebServer.stop`,
  by ``lesson.close()`` (registered with ``lesson.on_close``), when it fails to start, at
  interpreter exit, and, should the notebook's kernel die, by a watchdog thread in the server
  process that stops its whole process group when its parent is gone.
* :class:`LoadClient` is an HTTP load generator (aiohttp on uvloop) in a spawned process, so
  that its CPU is not the notebook's and its clock is its own. :meth:`LoadClient.closed` keeps
  C requests in flight for a while (a closed loop, like :func:`helpers.load.run_load`);
  :meth:`LoadClient.open` sends requests at a fixed rate whatever the server does (an open
  loop: a burst). Both return a :class:`HttpResult`, a :class:`helpers.load.LoadResult` whose
  DataFrame has one row per request (``start_s``, ``latency_ms``, ``status``, ``outcome``,
  ``ok``, ``retry_after``, ``db_ms``: the app's own ``Server-Timing`` figure for the time the
  request held its pooled connection, or NaN; ``closing``: the response said
  ``Connection: close``, as uvicorn's answer to a request in flight when it began a graceful
  shutdown does), so ``summary()``, ``helpers.plots`` and ``paired_ratio`` work on it
  unchanged. Optional health probes run in the same process, on the same clock.
* :func:`fork_demo` runs the "pool inherited across fork" pitfall in a throw-away process.

Standard library, aiohttp and pandas; uvicorn and FastAPI are only imported by the servers.
"""

from __future__ import annotations

import ast
import asyncio
import atexit
import contextlib
import json
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from ._infra.pipes import recv
from .load import LoadResult

#: The app notebook 11 serves (``helpers/shop_api.py``).
APP = "helpers.shop_api:app"
#: Seconds a server may take to answer its first request (imports, pool, workers).
START_TIMEOUT_S = 30.0
_ROOT = Path(__file__).resolve().parent.parent
_RUNNING: weakref.WeakSet[WebServer] = weakref.WeakSet()


class ServerFailed(RuntimeError):
    """The server exited or never answered; the message ends with its log's last error."""


class ServerError(RuntimeError):
    """A request got a 5xx answer; the message ends with the server's last logged error."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def last_error(log: str) -> str:
    """What went wrong last, from a server's log: the root exception of the last traceback
    (``SomeError: text``), followed by the one it ended with when another was raised while
    handling it; else the last non-empty line. Local folders are shortened to ``.../``."""
    chains: list[list[str]] = []
    chained = False
    for line in (ln.strip() for ln in log.splitlines()):
        if line.startswith("Traceback (most recent call last)"):
            if not chained or not chains:
                chains.append([])
            chained = False
        elif line.startswith(("During handling of the above", "The above exception was")):
            chained = True
        elif _EXCEPTION_LINE.match(line) and chains:
            chains[-1].append(line)
        elif _EXCEPTION_LINE.match(line):
            chains.append([line])
    if chains and chains[-1]:
        chain = chains[-1]
        found = chain[0] + (f" (and while handling it: {chain[-1]})" if len(chain) > 1 else "")
    else:
        lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
        found = lines[-1] if lines else ""
    return _LOCAL_PATH.sub(".../", found)


_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Z]\w*(?:Error|Exception)(?::|$)")
_LOCAL_PATH = re.compile(r"(?:/[\w.+-]+)+/(?=[\w.-]+\.py\b)")


def app_source(*names: str, path: Path = _ROOT / "helpers" / "shop_api.py") -> str:
    """The source of the app's functions or classes ``names`` (with their decorators), in the
    order given, read from the file: for a notebook to show what it runs, without importing
    FastAPI into the notebook. ``"pitfalls"`` is the whole pitfalls section at the end."""
    text = path.read_text()
    lines = text.splitlines()
    tree = ast.parse(text).body
    nodes = {getattr(n, "name", None): n for n in tree}
    for block in (n for n in tree if isinstance(n, ast.If)):  # the pitfalls' `if`
        nodes.update({getattr(n, "name", None): n for n in block.body})
    parts = []
    for name in names:
        if name == "pitfalls":
            start = next(i for i, ln in enumerate(lines) if ln.startswith("# -- Pitfalls"))
            parts.append("\n".join(lines[start:]).rstrip())
            continue
        node = nodes.get(name)
        if node is None:
            raise KeyError(f"{path.name} has no top-level {name!r}")
        first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
        parts.append(textwrap.dedent("\n".join(lines[first - 1:node.end_lineno])))
    return "\n\n\n".join(parts)


# -- the server ---------------------------------------------------------------------------------


@dataclass(eq=False)
class WebServer:
    """A running ``uvicorn`` (its own process group) and where to reach it."""

    url: str
    port: int
    workers: int
    process: subprocess.Popen = field(repr=False)
    log_path: Path = field(repr=False)
    args: list[str] = field(default_factory=list, repr=False)  # uvicorn's, no secrets
    exit_code: int | None = None
    _final_log: str | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the server has used so far, its worker processes
        included. Read before and after a run, the difference is what the run cost the server,
        whatever else the machine was doing (psutil: installed with ipykernel)."""
        import psutil

        main = psutil.Process(self.pid)
        total = 0.0
        for proc in (main, *main.children(recursive=True)):
            with contextlib.suppress(psutil.NoSuchProcess):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def log(self) -> str:
        """Everything the server wrote so far (uvicorn's log and tracebacks); kept in memory
        once the server has exited, when its log folder is deleted."""
        if self._final_log is not None:
            return self._final_log
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _finish(self) -> None:
        """Once the server has exited: keep its log in memory and delete its folder."""
        if self.process.poll() is None or self._final_log is not None:
            return
        self._final_log = self.log()
        with contextlib.suppress(OSError):
            self.log_path.unlink(missing_ok=True)
            self.log_path.parent.rmdir()
        _RUNNING.discard(self)

    @property
    def command(self) -> str:
        """The server's command line as a shell would show it (it holds no secret)."""
        return "uvicorn " + " ".join(self.args)

    def last_error(self) -> str:
        """The last exception the server logged (its type and message), or ``""``."""
        return last_error(self.log()) if "Error" in self.log() else ""

    async def get(self, path: str) -> tuple[int, Any]:
        """One GET from this process (for single requests; load comes from a LoadClient):
        ``(status, JSON body)``. A 5xx raises :class:`ServerError` with what the server
        logged, the way a client's error report and the server's log meet in production."""
        import aiohttp

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session, \
                session.get(self.url + path) as resp:
            if resp.status >= 500:
                await asyncio.sleep(0.05)  # let the server finish writing its traceback
                raise ServerError(f"HTTP {resp.status} from GET {path}; the server logged: "
                                  f"{self.last_error()}")
            json_body = resp.content_type == "application/json"
            return resp.status, await resp.json() if json_body else await resp.text()

    def send(self, sig: int = signal.SIGTERM) -> None:
        """Send a signal to the server's main process (uvicorn forwards it to its workers)."""
        if self.running:
            os.kill(self.process.pid, sig)

    async def wait(self, timeout: float = 15.0) -> int | None:
        """Wait for the server to exit; its exit code, or None if it still runs."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(self.process.wait, timeout)
        self.exit_code = self.process.poll()
        self._finish()
        return self.exit_code

    def kill(self, grace_s: float = 5.0) -> int | None:
        """Stop the server for good (blocking): SIGTERM, then SIGKILL to its whole process group
        (workers included) after ``grace_s``; its log stays readable with :meth:`log`, its
        folder is deleted. Idempotent; returns the exit code."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(grace_s)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)  # workers left behind, if any
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(2)
        self.exit_code = self.process.poll()
        self._finish()
        return self.exit_code

    async def stop(self, grace_s: float = 10.0) -> int | None:
        """:meth:`kill` without blocking the event loop: a graceful SIGTERM first."""
        return await asyncio.to_thread(self.kill, grace_s)

    def cleanup(self) -> None:
        """Stop the server (what ``lesson.close()`` and interpreter exit call)."""
        self.kill(2.0)


def uvicorn_command(app: str, port: int, *, workers: int = 1, loop: str = "uvloop",
                    http: str = "httptools", access_log: bool = False,
                    extra: Sequence[str] = ()) -> list[str]:
    """The command line of the server: no secret on it (those go in the environment)."""
    cmd = [sys.executable, "-c", _SERVE, app,
           "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
           "--loop", loop, "--http", http, "--lifespan", "on", "--log-level", "info",
           "--timeout-graceful-shutdown", "10"]
    if not access_log:
        cmd.append("--no-access-log")
    return [*cmd, *extra]


async def start_server(env: Mapping[str, str], *, app: str = APP, workers: int = 1,
                       loop: str = "uvloop", http: str = "httptools", lesson: Any = None,
                       ready_path: str = "/health/live", timeout: float = START_TIMEOUT_S,
                       extra: Sequence[str] = ()) -> WebServer:
    """Start uvicorn serving ``app`` on a free 127.0.0.1 port; return once ``ready_path``
    answers 200 (every worker has run its lifespan: opened its pool).

    ``env`` is the app's configuration (``DATABASE_URL``, ``DB_POOL_MAX``, ...), added to this
    process's environment for the server only. ``loop``/``http``: uvicorn's ``--loop``
    (``uvloop``, ``asyncio``) and ``--http`` (``httptools``, ``h11``). With ``lesson``, the
    server is stopped by ``await lesson.close()``. If the server exits or does not answer in
    ``timeout`` seconds, it is stopped and :class:`ServerFailed` says why.
    """
    server = _launch(uvicorn_command, env, app=app, workers=workers, loop=loop, http=http,
                     extra=extra)
    if lesson is not None:
        lesson.on_close(server.cleanup, first=True)
    try:
        await _wait_ready(server, ready_path, timeout, workers)
    except BaseException:
        await asyncio.to_thread(server.cleanup)  # the error message already holds the log's gist
        raise
    return server


def _launch(command: Any, env: Mapping[str, str], *, app: str, workers: int, loop: str,
            http: str, extra: Sequence[str]) -> WebServer:
    """Start the server process (in its own process group) with its log in a fresh folder."""
    port = free_port()
    log_path = Path(tempfile.mkdtemp(prefix="pgcourse-web-")) / "server.log"
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1",
                "PGCOURSE_WEB_FOLDER": str(log_path.parent)}
    full_env["PYTHONPATH"] = os.pathsep.join(  # the course's helpers/ first
        p for p in (str(_ROOT), full_env.get("PYTHONPATH", "")) if p)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            cmd := command(app, port, workers=workers, loop=loop, http=http, extra=extra),
            cwd=_ROOT, env=full_env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
    server = WebServer(f"http://127.0.0.1:{port}", port, workers, process, log_path,
                       args=cmd[3:])
    _RUNNING.add(server)
    return server


async def _wait_ready(server: WebServer, path: str, timeout: float, workers: int) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout
    ready_lines = "Application startup complete"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while True:
            code = server.process.poll()
            if code is not None:
                server.exit_code = code
                raise ServerFailed(f"the server stopped before it was ready (exit code {code}): "
                                   f"{last_error(server.log())}")
            # With N workers, wait until all N have opened their pools, not just the first.
            if server.log().count(ready_lines) >= workers:
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    async with session.get(server.url + path) as resp:
                        if resp.status == 200:
                            return
            if time.monotonic() > deadline:
                raise ServerFailed(f"the server did not answer {path} within {timeout:.0f} s: "
                                   f"{last_error(server.log())}")
            await asyncio.sleep(0.05)


@atexit.register
def _stop_all() -> None:
    for server in list(_RUNNING):
        server.cleanup()


#: What the server process runs: uvicorn's own command line, plus a watchdog thread that stops
#: the server's process group (and deletes its log folder) when its parent, the notebook's
#: kernel, is gone: not even a killed kernel leaves a server behind. Kept tiny: it imports
#: neither pandas nor helpers.
_SERVE = """\
import os, shutil, signal, sys, threading, time
parent = os.getppid()
def watchdog():
    while os.getppid() == parent:
        time.sleep(0.5)
    shutil.rmtree(os.environ["PGCOURSE_WEB_FOLDER"], ignore_errors=True)  # its log
    os.killpg(0, signal.SIGTERM)
    time.sleep(10)
    os.killpg(0, signal.SIGKILL)
threading.Thread(target=watchdog, daemon=True).start()
from uvicorn.main import main
main(args=sys.argv[1:], prog_name="uvicorn")
"""


# -- the load generator ---------------------------------------------------------------------------


@dataclass
class HttpResult(LoadResult):
    """One HTTP load run: the per-request DataFrame (see the module docstring) and more."""

    started_at: float = 0.0  # wall clock (time.time()) of start_s = 0
    client_cpu_s: float = 0.0  # CPU seconds the load generator itself used
    warmup_requests: int = 0  # answered during the warm-up, before the recorded run
    probes: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def status_counts(self) -> dict[str, int]:
        """Requests by outcome: ``ok``, ``HTTP 503``, or an exception's type name."""
        return {str(k): int(v) for k, v in self.df["outcome"].value_counts().items()}

    @property
    def client_cpu_share(self) -> float:
        """The load generator's CPU time over the run's wall time (1.0 = one core busy)."""
        return self.client_cpu_s / self.wall_s if self.wall_s else float("nan")


def key(i: int, n: int) -> int:
    """The ``i``-th key of a workload over ids 1..n (a permutation: no repeats within n)."""
    return 1 + (i * 7919) % n


class LoadClient:
    """An HTTP load generator in its own (spawned) process; send it runs, get results."""

    def __init__(self) -> None:
        self._proc: Any = None
        self._pipe: Any = None
        self._lock = asyncio.Lock()

    async def start(self, lesson: Any = None) -> LoadClient:
        """Spawn the process and wait until it has imported aiohttp."""
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=_client_main, args=(child,), daemon=True,
                                 name="http-load")
        self._proc.start()
        child.close()
        self._pipe = parent
        if lesson is not None:
            lesson.on_close(self.stop, first=True)
        await asyncio.wait_for(recv(parent, _client_gone), 60)
        return self

    async def _call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        if self._pipe is None:
            raise RuntimeError("the load client is not running: `await LoadClient().start()`")
        async with self._lock:  # one run at a time: they would compete for the CPU
            self._pipe.send((op, kwargs))
            status, payload = await recv(self._pipe, _client_gone)
        if status != "ok":
            raise RuntimeError(f"the load client failed: {payload}")
        return payload

    async def closed(self, url: str, path: str, *, concurrency: int, duration_s: float,
                     keys: int = 100_000, label: str = "", timeout_s: float = 30.0,
                     warmup_s: float = 0.0, probes: Mapping[str, str] | None = None,
                     probe_every_s: float = 0.05) -> HttpResult:
        """``concurrency`` workers, each sending its next request as soon as the last one
        answered, for ``duration_s`` seconds. ``{key}`` in ``path`` becomes an id in
        1..``keys``. ``warmup_s`` of requests first, not recorded (opens the keep-alive
        connections). ``probes`` (name -> path) are polled every ``probe_every_s`` on the
        same clock; they land in ``result.probes``."""
        raw = await self._call("closed", url=url, path=path, concurrency=concurrency,
                               duration_s=duration_s, keys=keys, timeout_s=timeout_s,
                               warmup_s=warmup_s, probes=dict(probes or {}),
                               probe_every_s=probe_every_s)
        return _result(raw, label or f"{path} c={concurrency}", concurrency)

    async def together(self, targets: Mapping[str, tuple[str, str]], *, concurrency: int,
                       duration_s: float, keys: int = 100_000, timeout_s: float = 30.0,
                       warmup_s: float = 0.0) -> dict[str, HttpResult]:
        """Closed loops against several ``targets`` (label -> ``(url, path)``) *at the same
        time*, ``concurrency`` workers each, same start, same deadline: the fairest comparison
        of two servers on a noisy machine, since whatever slows one slows the other alike."""
        raws = await self._call("together", targets={k: list(v) for k, v in targets.items()},
                                concurrency=concurrency, duration_s=duration_s, keys=keys,
                                timeout_s=timeout_s, warmup_s=warmup_s)
        return {label: _result(raw, label, concurrency) for label, raw in raws.items()}

    async def open(self, url: str, path: str, *, rate: float, duration_s: float,
                   keys: int = 100_000, label: str = "", timeout_s: float = 30.0,
                   max_connections: int = 2000) -> HttpResult:
        """Requests at ``rate`` per second for ``duration_s``, each on schedule whether or not
        the earlier ones have been answered (an open loop). Latency counts from the scheduled
        time, so a client that falls behind does not hide the server's queue."""
        raw = await self._call("open", url=url, path=path, rate=rate, duration_s=duration_s,
                               keys=keys, timeout_s=timeout_s,
                               max_connections=max_connections)
        return _result(raw, label or f"{path} at {rate:.0f}/s", max_connections)

    def stop(self) -> None:
        """End the process (idempotent)."""
        pipe, proc = self._pipe, self._proc
        self._pipe = self._proc = None
        if pipe is not None:
            with contextlib.suppress(OSError, ValueError):
                pipe.send(("exit", {}))
        if proc is not None:
            proc.join(3)
            if proc.is_alive():
                proc.terminate()
                proc.join(2)
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


def _result(raw: dict[str, Any], label: str, concurrency: int) -> HttpResult:
    df = pd.DataFrame({
        "request": range(len(raw["start_s"])),
        "worker": raw["worker"],
        "start_s": raw["start_s"],
        "latency_ms": raw["latency_ms"],
        "status": raw["status"],
        "outcome": raw["outcome"],
        "retry_after": raw["retry_after"],
        "db_ms": raw["db_ms"],
        "closing": raw["closing"],
    })
    df["ok"] = df["outcome"] == "ok"
    probes = pd.DataFrame(raw["probes"], columns=["probe", "start_s", "latency_ms", "status",
                                                  "outcome"]) if raw.get("probes") else None
    return HttpResult(label, concurrency, raw["wall_s"], df, started_at=raw["started_at"],
                      client_cpu_s=raw["cpu_s"], warmup_requests=raw.get("warmup_requests", 0),
                      probes=probes)


def _client_gone() -> RuntimeError:
    return RuntimeError("the load client process exited unexpectedly")


# -- inside the load generator's process ------------------------------------------------------------


def _client_main(pipe: Any) -> None:
    import uvloop

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(_client_serve(pipe))


async def _client_serve(pipe: Any) -> None:
    import aiohttp  # noqa: F401  (imported before "ready", so runs do not pay for it)

    loop = asyncio.get_running_loop()
    pipe.send(("ready", os.getpid()))
    while True:
        try:
            op, kwargs = await loop.run_in_executor(None, pipe.recv)
        except (EOFError, OSError):
            return
        if op == "exit":
            return
        try:
            runner = {"closed": _run_closed, "open": _run_open, "together": _run_together}[op]
            pipe.send(("ok", await runner(**kwargs)))
        except Exception as exc:  # reported to the notebook, which raises
            pipe.send(("error", f"{type(exc).__name__}: {exc}"))


class _Answer(NamedTuple):
    """One GET's result as the client saw it."""

    status: int  # 0 when no response came (refused, reset, timed out)
    outcome: str  # "ok", "HTTP 503", or the exception's type name
    retry_after: float  # the Retry-After header in seconds, or NaN
    db_ms: float  # the ``db`` duration of the Server-Timing header, or NaN
    closing: bool  # the response said "Connection: close"


class _Recorder:
    def __init__(self) -> None:
        self.columns: dict[str, list[Any]] = {k: [] for k in (
            "worker", "start_s", "latency_ms", "status", "outcome", "retry_after", "db_ms",
            "closing")}

    def add(self, worker: int, start: float, end: float, answer: _Answer) -> None:
        c = self.columns
        c["worker"].append(worker)
        c["start_s"].append(start)
        c["latency_ms"].append((end - start) * 1000)
        for name, value in answer._asdict().items():
            c[name].append(value)


_DB_TIMING = re.compile(r"(?:^|,)\s*db;dur=([0-9.]+)")


async def _get(session: Any, url: str) -> _Answer:
    """One GET, never raising: a refused, reset or timed-out request is an answer too."""
    nan = float("nan")
    try:
        async with session.get(url) as resp:
            await resp.read()
            retry = resp.headers.get("Retry-After")
            timing = _DB_TIMING.search(resp.headers.get("Server-Timing", ""))
            outcome = "ok" if 200 <= resp.status < 300 else f"HTTP {resp.status}"
            return _Answer(resp.status, outcome, float(retry) if retry else nan,
                           float(timing.group(1)) if timing else nan,
                           resp.headers.get("Connection", "").lower() == "close")
    except Exception as exc:  # refused, reset, timed out: recorded, not raised
        return _Answer(0, type(exc).__name__, nan, nan, False)


def _session(limit: int, timeout_s: float) -> Any:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=limit, ttl_dns_cache=None)
    return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                 timeout=aiohttp.ClientTimeout(total=timeout_s),
                                 auto_decompress=False)


async def _probe_loop(session: Any, url: str, probes: dict[str, str], every_s: float,
                      begin: float, stop: asyncio.Event, out: list[tuple]) -> None:
    perf = time.perf_counter
    while not stop.is_set():
        t0 = perf()
        results = await asyncio.gather(*(_get(session, url + p) for p in probes.values()))
        t1 = perf()
        for name, answer in zip(probes, results, strict=True):
            out.append((name, t0 - begin, (t1 - t0) * 1000, answer.status, answer.outcome))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, every_s - (t1 - t0)))


async def _run_closed(url: str, path: str, concurrency: int, duration_s: float, keys: int,
                      timeout_s: float, warmup_s: float, probes: dict[str, str],
                      probe_every_s: float) -> dict[str, Any]:
    perf = time.perf_counter
    rec = _Recorder()
    probe_rows: list[tuple] = []
    warmed = 0
    async with _session(concurrency, timeout_s) as session, \
            _session(max(2, len(probes)), 2.0) as probe_session:

        async def worker(w: int, begin: float, deadline: float, record: bool) -> None:
            nonlocal warmed
            i = w
            while (t0 := perf()) < deadline:
                answer = await _get(session, url + path.format(key=key(i, keys)))
                t1 = perf()
                if record:
                    rec.add(w, t0 - begin, t1 - begin, answer)
                else:
                    warmed += 1
                i += concurrency
                if answer.status == 0:
                    await asyncio.sleep(0.005)  # a refused connection must not spin the CPU

        if warmup_s > 0:
            now = perf()
            await asyncio.gather(*(worker(w, now, now + warmup_s, False)
                                   for w in range(concurrency)))
        stop = asyncio.Event()
        started_at, begin, cpu0 = time.time(), perf(), time.process_time()
        prober = (asyncio.ensure_future(_probe_loop(probe_session, url, probes, probe_every_s,
                                                    begin, stop, probe_rows))
                  if probes else None)
        await asyncio.gather(*(worker(w, begin, begin + duration_s, True)
                               for w in range(concurrency)))
        wall, cpu = perf() - begin, time.process_time() - cpu0
        stop.set()
        if prober is not None:
            await prober
    return {**rec.columns, "wall_s": wall, "started_at": started_at, "cpu_s": cpu,
            "probes": probe_rows, "warmup_requests": warmed}


async def _run_together(targets: dict[str, list[str]], concurrency: int, duration_s: float,
                        keys: int, timeout_s: float, warmup_s: float) -> dict[str, Any]:
    perf = time.perf_counter
    recs = {label: _Recorder() for label in targets}
    async with contextlib.AsyncExitStack() as stack:
        sessions = {label: await stack.enter_async_context(_session(concurrency, timeout_s))
                    for label in targets}

        async def worker(label: str, w: int, begin: float, deadline: float,
                         record: bool) -> None:
            url, path = targets[label]
            i = w
            while (t0 := perf()) < deadline:
                answer = await _get(sessions[label], url + path.format(key=key(i, keys)))
                t1 = perf()
                if record:
                    recs[label].add(w, t0 - begin, t1 - begin, answer)
                i += concurrency
                if answer.status == 0:
                    await asyncio.sleep(0.005)

        async def run_all(seconds: float, record: bool) -> tuple[float, float, float]:
            started_at, begin, cpu0 = time.time(), perf(), time.process_time()
            await asyncio.gather(*(worker(label, w, begin, begin + seconds, record)  # A, B, A, ..
                                   for w in range(concurrency) for label in targets))
            return started_at, perf() - begin, time.process_time() - cpu0

        if warmup_s > 0:
            await run_all(warmup_s, False)
        started_at, wall, cpu = await run_all(duration_s, True)
    return {label: {**rec.columns, "wall_s": wall, "started_at": started_at, "cpu_s": cpu,
                    "probes": []} for label, rec in recs.items()}


async def _run_open(url: str, path: str, rate: float, duration_s: float, keys: int,
                    timeout_s: float, max_connections: int) -> dict[str, Any]:
    perf = time.perf_counter
    rec = _Recorder()
    n = max(1, int(rate * duration_s))
    async with _session(max_connections, timeout_s) as session:
        started_at, begin, cpu0 = time.time(), perf(), time.process_time()

        async def one(i: int, scheduled: float) -> None:
            answer = await _get(session, url + path.format(key=key(i, keys)))
            rec.add(0, scheduled - begin, perf() - begin, answer)

        tasks = []
        for i in range(n):
            scheduled = begin + i / rate
            delay = scheduled - perf()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(i, scheduled)))
        await asyncio.gather(*tasks)
        wall, cpu = perf() - begin, time.process_time() - cpu0
    order = sorted(range(len(rec.columns["start_s"])), key=rec.columns["start_s"].__getitem__)
    columns = {k: [v[j] for j in order] for k, v in rec.columns.items()}
    return {**columns, "wall_s": wall, "started_at": started_at, "cpu_s": cpu, "probes": []}


async def start_client(lesson: Any = None) -> LoadClient:
    """Spawn a :class:`LoadClient`; with ``lesson``, ``await lesson.close()`` ends it."""
    return await LoadClient().start(lesson)


# -- the fork pitfall -------------------------------------------------------------------------------


def fork_demo(database_url: str, *, children: int = 2, queries: int = 20,
              timeout: float = 60.0) -> dict[str, list[dict[str, Any]]]:
    """A pre-fork server in miniature, in a throw-away process, twice: a parent creates a pool
    (``"before"``) or not (``"after"``), ``os.fork()``s ``children`` workers, and each runs
    ``queries`` queries in its own event loop, as a forking server's workers do (gunicorn with
    ``--preload``, for example): on the pool inherited from the parent, or on one it creates
    after the fork. Returns, per mode and child, ``ok`` (queries answered right) and ``errors``
    (exception type -> first message)."""
    cmd = [sys.executable, "-c", "from helpers.web_service import _fork_demo_main; "
           f"_fork_demo_main({int(children)}, {int(queries)})"]
    proc = subprocess.run(cmd, cwd=_ROOT, env={**os.environ, "DATABASE_URL": database_url},
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"fork demo failed: {last_error(proc.stderr)}")
    out: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    for line in proc.stdout.splitlines():
        if line.strip():
            row = json.loads(line)
            out[row.pop("mode")].append(row)
    return out


def _fork_demo_main(children: int, queries: int) -> None:
    import asyncpg

    url = os.environ["DATABASE_URL"]

    async def work(pool: Any) -> dict[str, Any]:
        ok, errors = 0, {}
        for i in range(queries):
            try:
                ok += await pool.fetchval("SELECT $1::int", i) == i
            except Exception as exc:  # the point of the demo: what goes wrong, by type
                message = _LOCAL_PATH.sub(".../", str(exc).split("\n")[0])
                errors.setdefault(type(exc).__name__, message[:120])
        return {"pid": os.getpid(), "ok": ok, "errors": errors}

    async def own_pool() -> dict[str, Any]:
        async with asyncpg.create_pool(url, min_size=1, max_size=2) as pool:
            return await work(pool)

    async def parent_pool() -> Any:
        return await asyncpg.create_pool(url, min_size=2, max_size=2)

    for mode in ("before", "after"):
        inherited = None
        if mode == "before":  # the parent creates the pool, as an import-time pool does
            inherited = asyncio.new_event_loop().run_until_complete(parent_pool())
        read, write = os.pipe()
        pids = []
        for _ in range(children):
            pid = os.fork()
            if pid == 0:  # a worker: its own event loop, as every forking server gives it
                os.close(read)
                try:
                    result = asyncio.run(work(inherited) if inherited is not None
                                         else own_pool())
                except BaseException as exc:
                    result = {"pid": os.getpid(), "ok": 0,
                              "errors": {type(exc).__name__: str(exc)}}
                os.write(write, (json.dumps({"mode": mode, **result}) + "\n").encode())
                os._exit(0)
            pids.append(pid)
        os.close(write)
        for pid in pids:
            os.waitpid(pid, 0)
        with os.fdopen(read) as fh:
            sys.stdout.write(fh.read())
        sys.stdout.flush()
        if inherited is not None:
            inherited.terminate()
