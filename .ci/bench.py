"""Benchmarks against the ceilings: ``make bench`` (``python -m helpers bench``).

The series measures things; this module measures the series. In one process run, with the
variants interleaved (A, B, C, A, B, C, ...) so that a noisy machine slows them all alike, it
measures at one concurrency (10 by default):

* requests/s of a primary-key lookup (``SELECT abalance FROM pgbench_accounts WHERE aid = $1``,
  the query of ``pgbench -S``) through: persistent connections without a pool (one per load
  worker), the asyncpg pool (default reset, and a no-op reset), psycopg 3's
  ``AsyncConnectionPool`` (default connections, and autocommit), each under the default
  asyncio event loop and under uvloop, and a new connection per request (asyncio only);
* ``pgbench -S -M prepared`` at the same client count: the server's own ceiling;
* bulk inserts of the same rows: ``copy_records_to_table``, ``psql \\copy`` from CSV,
  ``executemany`` and a row-by-row loop;
* a cold start of a fresh embedded server (initdb + start + createdb) in a temporary folder;
* the wall time of the whole series under nbval: read from a JUnit report of the last
  ``make test`` in ``build/`` when one is newer than every notebook and helper, otherwise by
  running ``pytest --nbval-lax`` now, stopped at what is left of the 5-minute budget (then
  ``series_complete`` is 0 and the figure is a lower bound).

It writes ``build/bench.json`` (flat keys -> numbers; the ratios are what count),
``build/bench.md`` (the tables, with the machine they ran on) and ``build/bench.png``, and
prints the tables. Everything it creates on the database (a ``bench_<random>`` schema with the
pgbench tables) is dropped at the end.

    python -m helpers bench                     # the full run (under 5 minutes on 2 cores)
    python -m helpers bench -- --quick          # tiny sizes: checks the machinery in seconds
    python -m helpers bench -- --series skip    # without timing the series

(The ``--`` keeps ``python -m helpers`` from reading the options as its own.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from helpers._infra.errors import CourseError
from helpers._infra.paths import BUILD, ROOT
from helpers._infra.server import EmbeddedServer, find_bin_dir
from helpers._infra.settings import child_env
from helpers._infra.tools import load_tool
from helpers.db import Target
from helpers.load import run_fresh

#: The lookup every request variant runs: the query of ``pgbench -S``.
PGBENCH_QUERY = "SELECT abalance FROM pgbench_accounts WHERE aid = $1"
#: ``pgbench -i -s 1`` creates this many accounts.
PGBENCH_ACCOUNTS = 100_000
#: ``make bench`` must finish within this on 2 cores; the series gets what is left.
BUDGET_S = 285.0
#: The goal for pool / persistent connections (the README's benchmark section).
POOL_VS_DIRECT_GOAL = 0.6

LOOPS = ("asyncio", "uvloop")
#: Request variants in the order they run (and are plotted); see :func:`_variant`.
VARIANTS = ("direct", "pool", "pool_no_reset", "psycopg_pool", "psycopg_pool_autocommit",
            "connect_per_request")
LABELS = {
    "pgbench": "pgbench -S (C client)",
    "direct": "persistent connections, no pool",
    "pool": "asyncpg pool (default reset)",
    "pool_no_reset": "asyncpg pool, no-op reset",
    "psycopg_pool": "psycopg pool (default: BEGIN/COMMIT)",
    "psycopg_pool_autocommit": "psycopg pool, autocommit",
    "connect_per_request": "new connection per request",
    "copy": "asyncpg copy_records_to_table",
    "psql_copy": "psql \\copy from CSV",
    "executemany": "asyncpg executemany",
    "row_loop": "execute() loop, one transaction",
}


@dataclass(frozen=True)
class Settings:
    """Sizes of one bench run (``--quick`` shrinks them to check the machinery)."""

    concurrency: int = 10
    repeats: int = 5
    requests: int = 4000
    connect_requests: int = 300
    warmup: int = 200
    pgbench_seconds: int = 2
    copy_rows: int = 100_000
    executemany_rows: int = 100_000
    loop_rows: int = 5_000
    bulk_repeats: int = 3
    loops: tuple[str, ...] = LOOPS

    @classmethod
    def quick(cls) -> Settings:
        """Tiny sizes: every step runs once, in seconds."""
        return cls(repeats=1, requests=200, connect_requests=20, warmup=20, pgbench_seconds=1,
                   copy_rows=2000, executemany_rows=2000, loop_rows=200, bulk_repeats=1)


@dataclass
class BenchResult:
    """What a run measured: rates per variant and loop, bulk rates, timings, the machine."""

    settings: Settings
    machine: dict[str, Any]
    rps: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # variant -> loop -> runs
    pgbench_tps: list[float] = field(default_factory=list)
    bulk: dict[str, list[float]] = field(default_factory=dict)  # method -> rows/s per run
    cold_start_s: float = float("nan")
    series: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: The stack apps run (notebooks 10 and 11): flat figures from .ci/bench_sqlalchemy.py
    #: and .ci/bench_web.py, ratios first.
    stack: dict[str, float] = field(default_factory=dict)

    def median(self, variant: str, loop: str = "asyncio") -> float:
        """Median requests/s of a request variant under an event loop (NaN if not run)."""
        runs = self.rps.get(variant, {}).get(loop, [])
        return statistics.median(runs) if runs else float("nan")

    def bulk_median(self, method: str) -> float:
        """Median rows/s of a bulk method."""
        runs = self.bulk.get(method, [])
        return statistics.median(runs) if runs else float("nan")

    @property
    def pgbench(self) -> float:
        """Median TPS of ``pgbench -S``."""
        return statistics.median(self.pgbench_tps) if self.pgbench_tps else float("nan")


# -- the machine -------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``, macOS ``sysctl``), or the architecture."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    if sys.platform == "darwin":
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                  capture_output=True, text=True, timeout=5).stdout.strip()
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Cores, CPU, memory, OS, Python and driver versions, date, load: the bench's context."""
    import asyncpg
    import psycopg
    import psycopg_pool
    import uvloop

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory_gb = float("nan")
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = next(ln for ln in Path("/proc/meminfo").read_text().splitlines()
                  if ln.startswith("MemTotal")).split()[1]
        memory_gb = int(kb) / 1024 ** 2
    return {
        "cores": cores,
        "cpu": cpu_model(),
        "memory_gb": memory_gb,
        "os": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "asyncpg": asyncpg.__version__,
        "psycopg": psycopg.__version__,
        "psycopg_pool": psycopg_pool.__version__,
        "uvloop": uvloop.__version__,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_before": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
    }


def machine_line(m: dict[str, Any]) -> str:
    """One line for the README: where the figures come from."""
    pg = m.get("postgres", "?")
    mem = f", {m['memory_gb']:.0f} GB RAM" if m.get("memory_gb") == m.get("memory_gb") else ""
    return (f"Machine: {m['cores']} cores ({m['cpu']}){mem}, {m['os']}; Python {m['python']}; "
            f"PostgreSQL {pg} ({m.get('database', '?')}); asyncpg {m['asyncpg']}, "
            f"psycopg {m['psycopg']}, psycopg-pool {m['psycopg_pool']}, uvloop {m['uvloop']}; "
            f"{m['date']}; load average {m['load_before']:.1f} before the run.")


# -- command-line tools: pgbench and psql --------------------------------------------------------


def tool_env(target: Target, search_path: str | None = None) -> dict[str, str]:
    """The environment for pgbench: the connection in libpq's ``PG*`` variables
    (:meth:`Target.libpq_env`), so that nothing, the password least of all, goes on a command
    line (``ps`` shows those to every user)."""
    extra = {"PGOPTIONS": f"-c search_path={search_path}"} if search_path else {}
    return child_env(**target.libpq_env(**extra))


def _tool(name: str) -> str:
    path = find_bin_dir() / name
    if not path.exists():
        raise CourseError(f"{name} not found next to the server binaries ({path.parent}).")
    return str(path)


def pgbench_init(target: Target, schema: str, scale: int = 1) -> float:
    """``pgbench -i -s scale`` into ``schema`` (which must exist); returns seconds."""
    env = tool_env(target, schema)
    t0 = time.perf_counter()
    proc = subprocess.run([_tool("pgbench"), "-i", "-s", str(scale), "-q"],
                          capture_output=True, text=True, env=env, timeout=120)
    if proc.returncode != 0:
        raise CourseError(f"pgbench -i failed: {proc.stderr.strip()[-300:]}")
    return time.perf_counter() - t0


def pgbench_select(target: Target, schema: str, clients: int, seconds: int) -> float:
    """``pgbench -S -M prepared`` with ``clients`` for ``seconds``: transactions/s."""
    env = tool_env(target, schema)
    jobs = max(1, min(clients, os.cpu_count() or 1))
    proc = subprocess.run(
        [_tool("pgbench"), "-S", "-n", "-M", "prepared", "-c", str(clients), "-j", str(jobs),
         "-T", str(seconds)],
        capture_output=True, text=True, env=env, timeout=seconds + 60)
    match = re.search(r"tps = ([\d.]+)", proc.stdout)
    if proc.returncode != 0 or not match:
        raise CourseError(f"pgbench -S failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
    return float(match.group(1))


# -- the embedded server's cold start ------------------------------------------------------------


def cold_start_seconds() -> float:
    """initdb + start + createdb of a fresh embedded server in a temporary folder; then it is
    stopped and deleted. Returns the seconds ``start()`` took."""
    home = Path(tempfile.mkdtemp(prefix="pgcourse-bench-"))
    server = EmbeddedServer(home / "pg")
    try:
        result = server.start()
        if not result.created:
            raise CourseError("the cold-start server was not created fresh")
        return result.seconds
    finally:
        with contextlib.suppress(Exception):
            server.stop()
        shutil.rmtree(home, ignore_errors=True)


# -- the series under nbval ----------------------------------------------------------------------

#: Where ``make test`` could leave per-test timings for us (pytest ``--junitxml``).
JUNIT_FILES = (BUILD / "junit.xml", BUILD / "test-report.xml")


def series_from_junit(path: Path) -> dict[str, Any]:
    """Per-notebook seconds from a pytest JUnit XML report (nbval cells are test cases).

    Returns ``{"seconds": total, "notebooks": {name: seconds}, "failures": n}`` counting only
    test cases from ``notebooks/*.ipynb``.
    """
    root = ET.parse(path).getroot()
    per: dict[str, float] = {}
    failures = 0
    for case in root.iter("testcase"):
        where = case.get("file") or case.get("classname") or ""
        match = re.search(r"(\d\d-[\w-]+)\.ipynb", where)  # "notebooks.00-setup.ipynb"
        if not match:
            continue
        per[match.group(1)] = per.get(match.group(1), 0.0) + float(case.get("time") or 0)
        failures += sum(1 for c in case if c.tag in ("failure", "error"))
    return {"seconds": sum(per.values()), "notebooks": per, "failures": failures}


def fresh_junit(notebooks: Sequence[Path],
                candidates: Sequence[Path] = JUNIT_FILES) -> Path | None:
    """The first JUnit report (of ``candidates``) newer than every notebook and helper module
    that times every one of ``notebooks``, or None."""
    sources = [*notebooks, *Path(__file__).parent.glob("*.py")]
    newest = max((p.stat().st_mtime for p in sources), default=0.0)
    wanted = {p.stem for p in notebooks}
    for path in candidates:
        if path.exists() and path.stat().st_mtime > newest:
            with contextlib.suppress(ET.ParseError):
                if wanted <= set(series_from_junit(path)["notebooks"]):
                    return path
    return None


def time_series(notebooks: Sequence[Path], timeout: float) -> dict[str, Any]:
    """Run ``pytest --nbval-lax`` on ``notebooks`` in a subprocess; wall time and per-notebook
    times. Stopped after ``timeout`` seconds (then ``complete`` is False)."""
    BUILD.mkdir(parents=True, exist_ok=True)
    report = BUILD / "bench-series.xml"
    report.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "--nbval-lax", "-p", "no:cacheprovider", "-q",
           "--nbval-cell-timeout=600", f"--junitxml={report}",
           *[str(p.relative_to(ROOT)) for p in notebooks]]
    env = child_env(PGCOURSE_PROGRESS="0")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    complete = True
    try:
        out, _ = proc.communicate(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        complete = False
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    per = series_from_junit(report) if report.exists() else {"notebooks": {}, "failures": 0}
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    return {"seconds": wall, "notebooks": per["notebooks"], "failures": per["failures"],
            "complete": complete and proc.returncode in (0, 1), "passed": proc.returncode == 0,
            "source": f"pytest --nbval-lax on {len(notebooks)} notebook(s), timed by the bench",
            "subset": False,
            "summary": summary}


def measure_series(mode: str, prefixes: Sequence[str] | None, budget_s: float) -> dict[str, Any]:
    """``series_seconds`` from a fresh ``make test`` report (``auto``/``file``), or by running
    nbval now (``auto``/``run``)."""
    from helpers._infra.site import notebooks as series_notebooks

    chosen = series_notebooks(list(prefixes) if prefixes else None)
    if not chosen:
        return {"seconds": 0.0, "notebooks": {}, "complete": True, "source": "no notebooks"}
    if mode in ("auto", "file"):
        found = fresh_junit(chosen) if not prefixes else None
        if found is not None:
            report = series_from_junit(found)
            return {**report, "complete": True, "passed": report["failures"] == 0,
                    "source": f"{found.relative_to(ROOT)} (from the last `make test`: the sum "
                              "of its nbval cell times)"}
        if mode == "file":
            raise CourseError("no JUnit report newer than the notebooks in build/",
                              "Run `make test` first, or `make bench` with `--series run`.")
    timed = time_series(chosen, budget_s)
    if prefixes:
        timed["subset"] = True
        timed["source"] += " (only those chosen with --notebooks, not the whole series)"
    return timed


# -- request variants ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _variant(name: str, url: str, settings: dict[str, str], size: int):
    """Open what a request variant needs, yield its request, close everything afterwards."""
    import asyncpg

    from helpers import drivers

    if name == "direct":
        conns = [await asyncpg.connect(url, server_settings=settings) for _ in range(size)]
        try:
            yield drivers.per_worker_lookup(conns, PGBENCH_QUERY, PGBENCH_ACCOUNTS)
        finally:
            for conn in conns:
                await conn.close()
    elif name in ("pool", "pool_no_reset"):
        reset = drivers.noop_reset if name == "pool_no_reset" else None
        pool = await asyncpg.create_pool(url, min_size=size, max_size=size, reset=reset,
                                         server_settings=settings)
        try:
            yield drivers.asyncpg_lookup(pool, PGBENCH_QUERY, PGBENCH_ACCOUNTS)
        finally:
            await pool.close()
    elif name in ("psycopg_pool", "psycopg_pool_autocommit"):
        ppool = await drivers.open_psycopg_pool(
            url, min_size=size, max_size=size, server_settings=settings,
            autocommit=name.endswith("autocommit"))
        try:
            yield drivers.psycopg_lookup(ppool, PGBENCH_QUERY, PGBENCH_ACCOUNTS)
        finally:
            await ppool.close()
    elif name == "connect_per_request":
        yield drivers.connect_per_request_lookup(url, PGBENCH_QUERY, PGBENCH_ACCOUNTS,
                                                 server_settings=settings)
    else:
        raise ValueError(f"unknown variant {name!r}")


async def request_round(url: str, schema: str, s: Settings, loop: str,
                        variants: Sequence[str] = VARIANTS) -> dict[str, float]:
    """One round: every variant once (opened, warmed up, timed, closed): requests/s each."""
    from helpers.load import run_load

    settings = {"search_path": f"{schema}, public", "application_name": f"bench/{loop}"}
    out = {}
    for name in variants:
        n = s.connect_requests if name == "connect_per_request" else s.requests
        async with _variant(name, url, settings, s.concurrency) as request:
            if s.warmup and name != "connect_per_request":
                await run_load(request, requests=s.warmup, concurrency=s.concurrency,
                               progress=False)
            result = await run_load(request, requests=n, concurrency=s.concurrency,
                                    label=name, progress=False)
        if result.errors:
            errors = result.summary()["error_types"]
            raise CourseError(f"bench variant {name} had errors: {errors}")
        out[name] = result.rps
    return out


# -- bulk inserts --------------------------------------------------------------------------------


#: The insert methods timed by the bench (from :mod:`helpers.bulk`, notebook 04's code).
BULK_METHODS = ("copy", "psql_copy", "executemany", "row_loop")


async def bulk_rounds(url: str, schema: str, s: Settings, workdir: Path) -> dict[str, list[float]]:
    """COPY, psql \\copy, executemany and a row loop (one transaction) loading the seed's
    users, interleaved, with :func:`helpers.bulk.compare_inserts`: rows/s per run."""
    import asyncpg

    from helpers import batch_inserts as bulk

    rows = await asyncio.to_thread(bulk.read_users, max(s.copy_rows, s.executemany_rows))
    csv_path = workdir / "users.csv"
    await asyncio.to_thread(bulk.write_csv, csv_path, rows[: s.copy_rows])
    methods = {
        "copy": (bulk.insert_copy, rows[: s.copy_rows]),
        "psql_copy": (bulk.PsqlCopy(url, csv_path), rows[: s.copy_rows]),
        "executemany": (bulk.insert_executemany, rows[: s.executemany_rows]),
        "row_loop": (bulk.insert_row_loop_transaction, rows[: s.loop_rows]),
    }
    conn = await asyncpg.connect(url)
    try:
        table = await bulk.compare_inserts(conn, methods, repeats=s.bulk_repeats, schema=schema,
                                           primary_key=False)  # as notebook 04 loads
    finally:
        await conn.close()
    return {name: [float(x) for x in g["rows_per_s"]]
            for name, g in table.groupby("method", sort=False)}


# -- the whole run ---------------------------------------------------------------------------------


async def _server_version(url: str) -> str:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return str(await conn.fetchval("SHOW server_version")).split()[0]
    finally:
        await conn.close()


async def _schema(url: str, schema: str, create: bool) -> None:
    import asyncpg

    from helpers.db import execute_ddl

    conn = await asyncpg.connect(url)
    try:
        if create:
            await execute_ddl(conn, "CREATE SCHEMA %I", schema)
            note = json.dumps({"bench": True, "created": time.time()})
            await execute_ddl(conn, "COMMENT ON SCHEMA %I IS %L", schema, note)
        else:
            await execute_ddl(conn, "DROP SCHEMA IF EXISTS %I CASCADE", schema)
    finally:
        await conn.close()


def _say(text: str) -> None:
    print(text, flush=True)


def run_bench(target: Target, s: Settings, *, cold_start: bool = True,
              series_mode: str = "auto", series_prefixes: Sequence[str] | None = None,
              started: float | None = None) -> BenchResult:
    """Run every measurement (see the module docstring) and return what it measured."""
    started = time.perf_counter() if started is None else started
    result = BenchResult(s, machine_info())
    url = target.url
    result.machine["postgres"] = asyncio.run(_server_version(url))
    result.machine["database"] = ("embedded, 127.0.0.1" if target.source == "embedded"
                                  else f"{target.source}, {target.host}")
    if cold_start:
        _say("cold start of a fresh embedded server ...")
        result.cold_start_s = cold_start_seconds()
    schema = f"bench_{secrets.token_hex(3)}"
    asyncio.run(_schema(url, schema, create=True))
    try:
        _say(f"pgbench -i -s 1 into schema {schema} ...")
        pgbench_init(target, schema)
        for r in range(s.repeats):
            _say(f"requests at concurrency {s.concurrency}: repeat {r + 1}/{s.repeats} ...")
            for loop in s.loops:
                variants = VARIANTS if loop == "asyncio" else tuple(
                    v for v in VARIANTS if v != "connect_per_request")
                rates = run_fresh(lambda lp=loop, vs=variants: request_round(
                    url, schema, s, lp, vs), loop)
                for name, rps in rates.items():
                    result.rps.setdefault(name, {}).setdefault(loop, []).append(rps)
            result.pgbench_tps.append(pgbench_select(target, schema, s.concurrency,
                                                     s.pgbench_seconds))
        _say("bulk inserts ...")
        with tempfile.TemporaryDirectory(prefix="pgcourse-bench-") as tmp:
            result.bulk = asyncio.run(bulk_rounds(url, schema, s, Path(tmp)))
    finally:
        asyncio.run(_schema(url, schema, create=False))
    _say("SQLAlchemy's async engine vs the raw pool (notebook 10) ...")
    quick = s.requests < 1000
    sizes = {"repeats": s.repeats, "concurrency": s.concurrency}
    result.stack.update(asyncio.run(load_tool("bench_sqlalchemy").measure(
        url, requests=s.requests // 2 if not quick else s.requests, warmup=s.warmup, **sizes)))
    _say("the pool inside a web service, under HTTP load (notebook 11) ...")
    result.stack.update(asyncio.run(load_tool("bench_web").measure(
        url, duration_s=0.3 if quick else 1.0, connect_duration_s=0.3 if quick else 1.0,
        requests=s.requests // 2 if not quick else s.requests, warmup=s.warmup,
        loops=s.loops, **sizes)))
    result.notes.append("Insert methods from `helpers.batch_inserts` (notebook 04), into a table "
                        "shaped like `shop.users` without indexes (as notebook 04 loads); psql \\copy timed by "
                        "psql's `\\timing` (without starting psql and logging in).")
    if series_mode != "skip":
        left = BUDGET_S - (time.perf_counter() - started)
        _say("the series under nbval ...")
        result.series = measure_series(series_mode, series_prefixes, left)
    return result


# -- figures, tables, plot -------------------------------------------------------------------------


def _ratio(a: float, b: float) -> float:
    return a / b if b and b == b and a == a else float("nan")


def figures(r: BenchResult) -> dict[str, float]:
    """The flat ``bench.json``: the issue's keys (ratios), then the rates they come from."""
    m = r.median
    out: dict[str, float] = {
        "pool_vs_connect_per_request": _ratio(m("pool"), m("connect_per_request")),
        "pool_vs_direct": _ratio(m("pool"), m("direct")),
        "pool_vs_pgbench": _ratio(m("pool"), r.pgbench),
        "copy_vs_psql_copy": _ratio(r.bulk_median("copy"), r.bulk_median("psql_copy")),
        "copy_vs_row_loop": _ratio(r.bulk_median("copy"), r.bulk_median("row_loop")),
        "asyncpg_vs_psycopg_pool": _ratio(m("pool"), m("psycopg_pool")),
        **r.stack,
    }
    if r.series:
        out["series_seconds"] = float(r.series["seconds"])
        out["series_notebooks"] = float(len(r.series.get("notebooks", {})))
        out["series_complete"] = float(bool(r.series.get("complete")))
        out["series_failed_cells"] = float(r.series.get("failures", 0))
    out["embedded_cold_start_seconds"] = r.cold_start_s
    for loop in r.settings.loops:
        out[f"pool_vs_direct_{loop}"] = _ratio(m("pool", loop), m("direct", loop))
        out[f"pool_no_reset_vs_direct_{loop}"] = _ratio(m("pool_no_reset", loop),
                                                       m("direct", loop))
    out.update({
        "direct_vs_pgbench": _ratio(m("direct"), r.pgbench),
        "asyncpg_vs_psycopg_pool_autocommit": _ratio(m("pool"), m("psycopg_pool_autocommit")),
        "asyncpg_no_reset_vs_psycopg_pool_autocommit": _ratio(m("pool_no_reset"),
                                                              m("psycopg_pool_autocommit")),
        "uvloop_gain_pool": _ratio(m("pool", "uvloop"), m("pool")),
        "uvloop_gain_direct": _ratio(m("direct", "uvloop"), m("direct")),
        "executemany_vs_psql_copy": _ratio(r.bulk_median("executemany"),
                                           r.bulk_median("psql_copy")),
        "pgbench_tps": r.pgbench,
    })
    for variant in r.rps:
        for loop in r.rps[variant]:
            out[f"rps_{variant}_{loop}"] = m(variant, loop)
    for method in r.bulk:
        out[f"rows_per_s_{method}"] = r.bulk_median(method)
    out["concurrency"] = float(r.settings.concurrency)
    out["repeats"] = float(r.settings.repeats)
    out["cores"] = float(r.machine["cores"])
    return out


def _x(value: float) -> str:
    if value != value:
        return "n/a"
    return f"{value:.0f}x" if value >= 10 else f"{value:.2g}x" if value < 1 else f"{value:.1f}x"


def _n(value: float) -> str:
    return "n/a" if value != value else f"{value:,.0f}"


#: The stack apps run (notebooks 10 and 11): what each figure divides.
STACK_ROWS = {
    "sqlalchemy_core_vs_asyncpg_pool": "SQLAlchemy Core (engine defaults) / raw asyncpg pool, "
                                       "a point read, requests/s",
    "sqlalchemy_orm_vs_asyncpg_pool": "SQLAlchemy ORM `session.get` (defaults) / raw asyncpg "
                                      "pool, requests/s",
    "http_pool_vs_connect_per_request": "FastAPI endpoint with a lifespan pool / the same "
                                        "endpoint connecting per request, requests/s over HTTP",
    "http_pool_vs_no_db": "pooled endpoint / the same app's endpoint without a database, "
                          "same HTTP client (the setup notebook 11 recommends)",
    "pool_vs_direct_unit_of_work": "recommended pool / persistent connections, each acquire "
                                   "a transaction of three queries",
}


def headline_table(r: BenchResult, f: dict[str, float]) -> str:
    """The README's table: each figure, its value and what it divides."""
    m = r.median
    c = r.settings.concurrency
    rows = [
        ("pool_vs_connect_per_request", _x(f["pool_vs_connect_per_request"]),
         f"asyncpg pool {_n(m('pool'))} / new connection per request "
         f"{_n(m('connect_per_request'))} requests/s, {c} tasks"),
        ("pool_vs_direct", _x(f["pool_vs_direct"]),
         f"asyncpg pool (default reset) {_n(m('pool'))} / persistent connections "
         f"{_n(m('direct'))} requests/s; no-op reset: "
         f"{_x(f['pool_no_reset_vs_direct_asyncio'])}"
         + (f", no-op reset + uvloop: {_x(f['pool_no_reset_vs_direct_uvloop'])}"
            if "pool_no_reset_vs_direct_uvloop" in f else "")),
        ("pool_vs_pgbench", _x(f["pool_vs_pgbench"]),
         f"asyncpg pool {_n(m('pool'))} requests/s / `pgbench -S -M prepared` "
         f"{_n(r.pgbench)} TPS, {c} clients"),
        ("copy_vs_psql_copy", _x(f["copy_vs_psql_copy"]),
         f"`copy_records_to_table` {_n(r.bulk_median('copy'))} / `psql \\copy` "
         f"{_n(r.bulk_median('psql_copy'))} rows/s, {r.settings.copy_rows:,} rows"),
        ("copy_vs_row_loop", _x(f["copy_vs_row_loop"]),
         f"COPY / `execute()` loop {_n(r.bulk_median('row_loop'))} rows/s"),
        ("asyncpg_vs_psycopg_pool", _x(f["asyncpg_vs_psycopg_pool"]),
         f"asyncpg pool / psycopg `AsyncConnectionPool` {_n(m('psycopg_pool'))} requests/s "
         f"(defaults); psycopg with autocommit: {_x(f['asyncpg_vs_psycopg_pool_autocommit'])}"),
    ]
    for key, text in STACK_ROWS.items():
        if key in f:
            rows.append((key, _x(f[key]), text))
    if "series_seconds" in f:
        s = r.series
        n = len(s.get("notebooks", {}))
        rows.append(("series_seconds", f"{f['series_seconds']:.0f} s",
                     f"{n} notebook(s) under nbval"
                     + (" (a subset, chosen with --notebooks)" if s.get("subset") else "")
                     + ("" if s.get("complete") else
                        " (stopped at the time budget, so at least this; run `make test` "
                        "first and the bench reads its report)")
                     + ("" if s.get("passed", True) or not s.get("complete") else
                        " (some failed)")))
    rows.append(("embedded_cold_start_seconds", f"{f['embedded_cold_start_seconds']:.1f} s",
                 "initdb + start + createdb of a fresh embedded server"))
    lines = ["| figure | value | measured as |", "|---|---|---|"]
    lines += [f"| `{k}` | {v} | {text} |" for k, v, text in rows]
    return "\n".join(lines)


def requests_table(r: BenchResult) -> str:
    """Requests/s of every variant under each event loop, with pgbench for scale."""
    loops = r.settings.loops
    lines = ["| variant | " + " | ".join(f"{lp} (requests/s)" for lp in loops)
             + " | vs persistent connections |",
             "|---|" + "---|" * len(loops) + "---|"]
    lines.append(f"| {LABELS['pgbench']} | {_n(r.pgbench)} TPS" + " |" * (len(loops) - 1)
                 + f" | {_x(_ratio(r.pgbench, r.median('direct')))} |")
    for v in VARIANTS:
        cells = [_n(r.median(v, lp)) for lp in loops]
        lines.append(f"| {LABELS[v]} | " + " | ".join(cells)
                     + f" | {_x(_ratio(r.median(v), r.median('direct')))} |")
    return "\n".join(lines)


def bulk_table(r: BenchResult) -> str:
    """Rows/s of every insert method, relative to psql \\copy."""
    s = r.settings
    size = {"copy": s.copy_rows, "psql_copy": s.copy_rows, "executemany": s.executemany_rows,
            "row_loop": s.loop_rows}
    lines = ["| method | rows | rows/s | vs psql \\copy |", "|---|---|---|---|"]
    for method in ("psql_copy", "copy", "executemany", "row_loop"):
        rate = r.bulk_median(method)
        lines.append(f"| {LABELS[method]} | {size[method]:,} | {_n(rate)} | "
                     f"{_x(_ratio(rate, r.bulk_median('psql_copy')))} |")
    return "\n".join(lines)


def goal_lines(f: dict[str, float]) -> list[str]:
    """Which settings reach pool / persistent connections >= the goal, and what they cost."""
    options = [
        ("asyncpg pool, default reset, asyncio loop", f.get("pool_vs_direct_asyncio")),
        ("asyncpg pool, default reset, uvloop", f.get("pool_vs_direct_uvloop")),
        ("asyncpg pool, no-op reset, asyncio loop", f.get("pool_no_reset_vs_direct_asyncio")),
        ("asyncpg pool, no-op reset, uvloop", f.get("pool_no_reset_vs_direct_uvloop")),
    ]
    lines = []
    for text, value in options:
        if value is None:
            continue
        mark = "reaches" if value >= POOL_VS_DIRECT_GOAL else "misses"
        lines.append(f"- {text}: {_x(value)} ({mark} {POOL_VS_DIRECT_GOAL})")
    for key, goal, text in STACK_GOALS:
        value = f.get(key)
        if value is not None and value == value:
            mark = "reaches" if value >= goal else "misses"
            lines.append(f"- {text} (`{key}`): {_x(value)} ({mark} {goal})")
    return lines


#: The goals of issues 17 and 18 for the stack apps run.
STACK_GOALS = [
    ("sqlalchemy_core_read_vs_asyncpg_pool", 0.6,
     "SQLAlchemy Core, the read-path setup notebook 10 recommends, vs the raw pool"),
    ("http_pool_vs_no_db", 0.5, "the recommended pooled endpoint vs the no-database endpoint"),
    ("pool_vs_direct_unit_of_work", 0.85,
     "the recommended pool vs persistent connections, a unit of work per acquire"),
]


def markdown(r: BenchResult, f: dict[str, float]) -> str:
    """``build/bench.md``: machine, headline table, details, what the settings cost."""
    s = r.settings
    series = r.series
    parts = [
        "# Benchmarks against the ceilings (`make bench`)",
        "",
        machine_line(r.machine),
        "",
        f"Method: one process, concurrency {s.concurrency}, medians of {s.repeats} interleaved "
        f"repeats ({s.requests:,} requests per variant per repeat, "
        f"{s.connect_requests:,} for connect-per-request); client and server share the cores, "
        "so absolute numbers drift by about 30% between runs: compare the ratios. Query: "
        f"`{PGBENCH_QUERY}` (what `pgbench -S` runs), pool size = concurrency.",
        "",
        headline_table(r, f),
        "",
        f"## Requests/s at concurrency {s.concurrency}",
        "",
        requests_table(r),
        "",
        f"## Bulk insert ({s.bulk_repeats} interleaved repeats)",
        "",
        bulk_table(r),
        "",
        f"## pool / persistent connections: the goal is {POOL_VS_DIRECT_GOAL}",
        "",
        *goal_lines(f),
        "",
        "The course recommends the default reset: on release the pool sends `SELECT "
        "pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;`, one extra round trip "
        "per acquire, a large part of the gap on a one-query request. A no-op "
        "`reset=` removes it, but whatever a request changed in its session (`SET "
        "statement_timeout`, `SET application_name`, advisory locks, `LISTEN`, cursors `WITH "
        "HOLD`) then leaks to the next request that gets the connection; open transactions are "
        "still rolled back. Take it only where every query is a plain statement (settings per "
        "transaction with `SET LOCAL`, per pool with `server_settings`). uvloop costs one line "
        "where you own the process (`uvloop.run(main())`); what it gains here is in the uvloop "
        "column above (it moves with the machine's load).",
        "",
        "psycopg's pool does no reset at all: with autocommit it sends only the query (and "
        "leaks session state like a no-op reset); with its default connections it sends BEGIN, "
        "the query and COMMIT. That, not the driver, decides `asyncpg_vs_psycopg_pool` "
        f"(defaults: {_x(f['asyncpg_vs_psycopg_pool'])}; against psycopg with autocommit: "
        f"{_x(f['asyncpg_vs_psycopg_pool_autocommit'])}; at equal round trips, asyncpg with a "
        f"no-op reset vs psycopg with autocommit: "
        f"{_x(f['asyncpg_no_reset_vs_psycopg_pool_autocommit'])}).",
        "",
    ]
    if series:
        per = ", ".join(f"{k} {v:.0f} s" for k, v in series.get("notebooks", {}).items())
        parts += ["## The series", "",
                  f"{series['seconds']:.0f} s: {series.get('source', '')}"
                  + (f"; {per}" if per else "") + ".", ""]
    parts += ["## Notes", "", *[f"- {n}" for n in r.notes], ""]
    return "\n".join(parts)


def plot(r: BenchResult, f: dict[str, float]):
    """``build/bench.png``: requests/s per variant (both loops) and rows/s per insert method."""
    import numpy as np
    from matplotlib.ticker import NullFormatter

    from helpers.plots import PALETTE, TITLE, figure

    fig, (left, right) = figure(ncols=2, width=13, height=4.8)
    names = ["pgbench", *VARIANTS]
    y = np.arange(len(names))
    height = 0.8 / len(r.settings.loops)
    for n, loop in enumerate(r.settings.loops):
        values = [r.pgbench if v == "pgbench" and n == 0 else r.median(v, loop)
                  for v in names]
        values = [0 if v != v else v for v in values]
        left.barh(y + n * height, values, height=height, color=PALETTE[n], label=loop)
        for i, v in enumerate(values):
            if v:
                left.annotate(f"{v:,.0f}", (v, y[i] + n * height), xytext=(3, 0),
                              textcoords="offset points", va="center", fontsize=7)
    left.set_yticks(y + height * (len(r.settings.loops) - 1) / 2,
                    [LABELS[v] for v in names], fontsize=8)
    left.invert_yaxis()
    left.set_xscale("log")
    left.set_xlabel(f"requests/s at concurrency {r.settings.concurrency} (log scale)")
    left.legend(fontsize=8, loc="lower right")
    left.margins(x=0.15)
    left.grid(axis="y", visible=False)
    methods = ["psql_copy", "copy", "executemany", "row_loop"]
    rates = [r.bulk_median(mm) for mm in methods]
    right.barh(np.arange(len(methods)), [0 if v != v else v for v in rates],
               color=[PALETTE[(i + 2) % len(PALETTE)] for i in range(len(methods))])
    right.set_yticks(np.arange(len(methods)), [LABELS[mm] for mm in methods], fontsize=8)
    right.invert_yaxis()
    right.set_xscale("log")
    right.set_xlabel("rows/s (log scale)")
    right.grid(axis="y", visible=False)
    right.margins(x=0.2)
    for ax in (left, right):
        ax.xaxis.set_minor_formatter(NullFormatter())
    for i, v in enumerate(rates):
        if v == v:
            right.annotate(f"{v:,.0f}", (v, i), xytext=(3, 0), textcoords="offset points",
                           va="center", fontsize=8)
    fig.suptitle(f"Pool: {_x(f['pool_vs_connect_per_request'])} connect-per-request, "
                 f"{_x(f['pool_vs_direct'])} persistent connections, "
                 f"{_x(f['pool_vs_pgbench'])} pgbench; COPY {_x(f['copy_vs_row_loop'])} "
                 "a row loop", **TITLE)
    return fig


def write_outputs(r: BenchResult, out: Path = BUILD) -> dict[str, float]:
    """Write bench.json, bench.md and bench.png into ``out``; return the figures."""
    f = figures(r)
    out.mkdir(parents=True, exist_ok=True)
    clean = {k: (None if v != v else round(v, 4)) for k, v in f.items()}
    (out / "bench.json").write_text(json.dumps(clean, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(r, f))
    fig = plot(r, f)
    fig.savefig(out / "bench.png", dpi=110)
    return f


# -- command line ----------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m helpers bench",
                                description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds): checks it works")
    p.add_argument("--repeats", type=int, help="interleaved repeats of the request variants")
    p.add_argument("--concurrency", type=int, help="tasks (and pool size, pgbench clients)")
    p.add_argument("--series", choices=["auto", "run", "file", "skip"], default="auto",
                   help="series_seconds: from a fresh `make test` JUnit report in build/ "
                        "(file), by running nbval now (run), either (auto), or not at all")
    p.add_argument("--notebooks", nargs="*", metavar="NN",
                   help="time only these notebooks (name prefixes) instead of the series")
    p.add_argument("--no-cold-start", action="store_true", help="skip the cold-start timing")
    p.add_argument("--no-uvloop", action="store_true", help="only the default event loop")
    p.add_argument("--out", type=Path, default=BUILD, help="output folder (default: build/)")
    return p


def cli(argv: list[str]) -> int:
    """``python -m helpers bench [options]``: run, write build/bench.*, print the tables."""
    from helpers._infra.cli import CommandDatabase
    from helpers.db import resolve

    if argv[:1] == ["--"]:  # `python -m helpers bench -- --quick` (see the module docstring)
        argv = argv[1:]
    args = _parser().parse_args(argv)
    s = Settings.quick() if args.quick else Settings()
    if args.repeats:
        s = replace(s, repeats=args.repeats)
    if args.concurrency:
        s = replace(s, concurrency=args.concurrency)
    if args.no_uvloop:
        s = replace(s, loops=("asyncio",))
    t0 = time.perf_counter()
    with CommandDatabase():
        target = resolve()
        result = run_bench(target, s, cold_start=not args.no_cold_start,
                           series_mode=args.series, series_prefixes=args.notebooks,
                           started=t0)
    f = write_outputs(result, args.out)
    print()
    print(machine_line(result.machine))
    print()
    print(headline_table(result, f))
    print()
    print(requests_table(result))
    print()
    print(bulk_table(result))
    shown = args.out.resolve()
    with contextlib.suppress(ValueError):
        shown = shown.relative_to(ROOT)
    print(f"\nwrote {shown}/bench.json, bench.md, bench.png in "
          f"{time.perf_counter() - t0:.0f} s")
    return 0
