"""Bench figures for notebook 11: the pool inside a real web service, under real HTTP load.

:func:`measure` starts the shop API of ``helpers/shop_api.py`` under uvicorn (one worker,
uvloop and httptools, a pool of ``concurrency`` connections) as real subprocesses on free
127.0.0.1 ports, drives them from an aiohttp load generator in another process
(:mod:`helpers.web_service`: ``concurrency`` connections, a closed loop), and, in its own event
loop, runs a unit of work through an asyncpg pool and through persistent connections. Every
round runs every variant once, interleaved (A, B, C, ..., A, B, C, ...), so that a noisy
machine slows them all alike; figures are medians over the rounds:

* ``http_pool_vs_connect_per_request``: requests/s of ``GET /users/{id}`` (a point read through
  the lifespan pool, default reset) over ``GET /connect-per-request/users/{id}`` (a new
  connection per request);
* ``http_pool_vs_no_db``: the same pooled endpoint over ``GET /ping`` of the same server, which
  touches no database (the ceiling of the client and the HTTP stack); the ratios of each
  round are paired (same round, same server) and their median is reported.
  ``http_pool_no_reset_vs_no_db`` is the same with ``DB_POOL_RESET=none`` (not safe in general:
  session state leaks between requests), ``http_pool_vs_no_db_asyncio_h11`` on the standard
  library's event loop and the pure-Python h11 parser (``--loop asyncio --http h11``),
  ``http_unit_of_work_vs_no_db`` for ``GET /users/{id}/summary`` (three queries in a read-only
  transaction);
* ``pool_vs_direct_unit_of_work``: in one process, no HTTP, requests/s of the default asyncpg
  pool over one persistent connection per load worker, when each request is a transaction of
  three queries (the summary's); ``pool_vs_direct_one_statement`` for the point read alone.
  The same with uvloop: ``..._uvloop``. ``pool_vs_direct_unit_of_work_reset_in_commit_*``:
  the same pool with the reset sent in the ``COMMIT``'s message (:class:`ResetInCommit`), which
  saves the reset's round trip without skipping the reset.

    python .ci/bench_web.py            # against DATABASE_URL or the embedded server
    python .ci/bench_web.py --quick    # tiny sizes: checks the machinery in seconds

Pinned: fastapi 0.165.0, uvicorn 0.54.0, httptools 0.9.0, aiohttp 3.14.5, uvloop 0.23.0,
asyncpg 0.32.0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import statistics
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg

from helpers import web_service as ws
from helpers.load import Request, current_worker, run_fresh, run_load

#: The point read and the unit of work of helpers/shop_api.py.
USER_SQL = "SELECT id, name FROM shop.users WHERE id = $1"
ORDERS_SQL = "SELECT count(*) FROM shop.orders WHERE user_id = $1"
LAST_SQL = "SELECT max(ordered_at) FROM shop.orders WHERE user_id = $1"
USERS = 100_000
#: HTTP variants: name -> (server, path). Servers differ only in the settings below.
HTTP = {
    "no_db": ("api", "/ping"),
    "pool": ("api", "/users/{key}"),
    "unit_of_work": ("api", "/users/{key}/summary"),
    "connect_per_request": ("api", "/connect-per-request/users/{key}"),
    "pool_no_reset": ("no_reset", "/users/{key}"),
    "no_db_asyncio_h11": ("h11", "/ping"),
    "pool_asyncio_h11": ("h11", "/users/{key}"),
}
SERVERS = {  # name -> (extra environment, uvicorn --loop, --http)
    "api": ({}, "uvloop", "httptools"),
    "no_reset": ({"DB_POOL_RESET": "none"}, "uvloop", "httptools"),
    "h11": ({}, "asyncio", "h11"),
}
#: In-process variants (one event loop, no HTTP): name -> what each request does.
IN_PROCESS = ("direct_one_statement", "pool_one_statement", "direct_unit_of_work",
              "pool_unit_of_work", "pool_unit_of_work_reset_in_commit")


def key(i: int) -> int:
    """The ``i``-th user id: 1..USERS, spread over the table (7919 is prime)."""
    return 1 + (i * 7919) % USERS


async def _check_seed(target_url: str) -> None:
    conn = await asyncpg.connect(target_url)
    try:
        if await conn.fetchval("SELECT to_regclass('shop.orders')") is None:
            raise RuntimeError("no shop.users/shop.orders on this database: run any notebook "
                               "(or the tests) once to load the course's seed")
    finally:
        await conn.close()


async def unit_of_work(conn: Any, user_id: int) -> None:
    """Three queries that must agree, in one read-only transaction (the summary endpoint)."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        await conn.fetchrow(USER_SQL, user_id)
        await conn.fetchval(ORDERS_SQL, user_id)
        await conn.fetchval(LAST_SQL, user_id)


class ResetInCommit:
    """The pool's reset sent in the same message as the unit of work's ``COMMIT``: one round
    trip instead of two, and nothing skipped.

    :meth:`run` does ``BEGIN``, the work, then ``COMMIT; <the pool's reset query>`` as one
    message, and marks the connection (by its server pid); :meth:`reset`, the pool's ``reset=``,
    skips its own round trip only for a connection so marked, once, and resets every other
    release as asyncpg's default does. A failed unit of work is not marked, so its connection
    gets the full reset (after the pool's own rollback).
    """

    def __init__(self) -> None:
        self._reset_already: set[int] = set()

    async def reset(self, conn: Any) -> None:
        pid = conn.get_server_pid()
        if pid in self._reset_already:
            self._reset_already.discard(pid)
            return
        await conn.execute(conn.get_reset_query())

    async def run(self, conn: Any, user_id: int) -> None:
        await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        await conn.fetchrow(USER_SQL, user_id)
        await conn.fetchval(ORDERS_SQL, user_id)
        await conn.fetchval(LAST_SQL, user_id)
        await conn.execute("COMMIT; " + conn.get_reset_query())
        self._reset_already.add(conn.get_server_pid())


@contextlib.asynccontextmanager
async def in_process(name: str, target_url: str, size: int) -> AsyncIterator[Request]:
    """Open what an in-process variant needs, yield its request, close it afterwards."""
    settings = {"application_name": f"bench/web/{name}"}
    work = unit_of_work if name.endswith("unit_of_work") else \
        (lambda conn, k: conn.fetchrow(USER_SQL, k))
    if name.startswith("direct"):
        conns = [await asyncpg.connect(target_url, server_settings=settings)
                 for _ in range(size)]
        try:
            async def direct(i: int) -> Any:
                return await work(conns[current_worker()], key(i))

            yield direct
        finally:
            for conn in conns:
                await conn.close()
    else:
        folded = ResetInCommit() if name.endswith("reset_in_commit") else None
        if folded is not None:
            work = folded.run
        pool = await asyncpg.create_pool(target_url, min_size=size, max_size=size,
                                         server_settings=settings,
                                         reset=folded.reset if folded is not None else None)
        try:
            async def pooled(i: int) -> Any:
                async with pool.acquire() as conn:
                    return await work(conn, key(i))

            yield pooled
        finally:
            await pool.close()


async def in_process_round(target_url: str, size: int, requests: int,
                           warmup: int) -> dict[str, float]:
    """Every in-process variant once: opened, warmed up, timed, closed. Requests/s each."""
    out = {}
    for name in IN_PROCESS:
        async with in_process(name, target_url, size) as request:
            if warmup:
                await run_load(request, requests=warmup, concurrency=size, progress=False)
            result = await run_load(request, requests=requests, concurrency=size,
                                    progress=False)
        if result.errors:
            raise RuntimeError(f"{name}: {result.summary()['error_types']}")
        out[name] = result.rps
    return out


async def measure(target_url: str, *, concurrency: int = 10, duration_s: float = 1.0,
                  connect_duration_s: float = 1.0, warmup_s: float = 0.2, repeats: int = 5,
                  requests: int = 3000, warmup: int = 200,
                  loops: Sequence[str] = ("asyncio", "uvloop")) -> dict[str, float]:
    """The web-service figures (see the module docstring), ratios first.

    ``target_url`` is a ``postgresql://`` URL of a database with the course's seed; the servers
    get it in their environment (never on their command line). Each HTTP variant runs
    ``duration_s`` (``connect_duration_s`` for connect-per-request) after ``warmup_s``; each
    in-process variant ``requests`` after ``warmup``, under each event loop of ``loops``.
    """
    await _check_seed(target_url)
    run = secrets.token_hex(3)
    servers: dict[str, ws.WebServer] = {}
    client: ws.LoadClient | None = None
    rps: dict[str, list[float]] = {}
    p99: dict[str, list[float]] = {}
    try:
        started = await asyncio.gather(
            ws.start_client(),
            *(ws.start_server({"DATABASE_URL": target_url, "DB_POOL_MIN": str(concurrency),
                               "DB_POOL_MAX": str(concurrency),
                               "DB_APPLICATION_NAME": f"bench/web/{run}/{name}", **extra},
                              loop=loop, http=http)
              for name, (extra, loop, http) in SERVERS.items()))
        client, servers = started[0], dict(zip(SERVERS, started[1:], strict=True))
        for _ in range(repeats):
            for name, (server, path) in HTTP.items():
                seconds = connect_duration_s if name == "connect_per_request" else duration_s
                result = await client.closed(servers[server].url, path,
                                             concurrency=concurrency, duration_s=seconds,
                                             warmup_s=warmup_s, label=name)
                if result.errors:
                    raise RuntimeError(f"{name}: {result.status_counts}")
                rps.setdefault(name, []).append(result.rps)
                p99.setdefault(name, []).append(result.percentile(99))
            for loop in loops:
                rates = await asyncio.to_thread(run_fresh, lambda: in_process_round(
                    target_url, concurrency, requests, warmup), loop)
                for name, value in rates.items():
                    rps.setdefault(f"{name}_{loop}", []).append(value)
    finally:
        if client is not None:
            client.stop()
        for server in servers.values():
            await server.stop()
            server.cleanup()

    def med(name: str) -> float:
        return statistics.median(rps[name])

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(rps[a], rps[b], strict=True))

    out = {
        "http_pool_vs_connect_per_request": paired("pool", "connect_per_request"),
        "http_pool_vs_no_db": paired("pool", "no_db"),
        "pool_vs_direct_unit_of_work": paired(f"pool_unit_of_work_{loops[0]}",
                                              f"direct_unit_of_work_{loops[0]}"),
        "http_pool_no_reset_vs_no_db": paired("pool_no_reset", "no_db"),
        "http_pool_vs_no_db_asyncio_h11": paired("pool_asyncio_h11", "no_db_asyncio_h11"),
        "http_unit_of_work_vs_no_db": paired("unit_of_work", "no_db"),
        "http_no_db_uvloop_httptools_vs_asyncio_h11": paired("no_db", "no_db_asyncio_h11"),
    }
    for loop in loops:
        out[f"pool_vs_direct_unit_of_work_{loop}"] = paired(f"pool_unit_of_work_{loop}",
                                                            f"direct_unit_of_work_{loop}")
        out[f"pool_vs_direct_one_statement_{loop}"] = paired(f"pool_one_statement_{loop}",
                                                             f"direct_one_statement_{loop}")
        out[f"pool_vs_direct_unit_of_work_reset_in_commit_{loop}"] = paired(
            f"pool_unit_of_work_reset_in_commit_{loop}", f"direct_unit_of_work_{loop}")
    for name in rps:
        out[f"web_rps_{name}"] = med(name)
    for name in p99:
        out[f"web_p99_ms_{name}"] = statistics.median(p99[name])
    out["web_concurrency"] = float(concurrency)
    out["web_repeats"] = float(repeats)
    return out


def _resolve_url() -> str:
    from helpers.db import resolve

    return resolve().url


def main(argv: list[str] | None = None) -> int:
    """``python .ci/bench_web.py [--quick] [--concurrency N] [--repeats N]``: print the
    figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks it works")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--repeats", type=int)
    args = parser.parse_args(argv)
    sizes: dict[str, Any] = {"duration_s": 0.3, "connect_duration_s": 0.3, "warmup_s": 0.05,
                             "repeats": 1, "requests": 300, "warmup": 20} if args.quick else {}
    if args.repeats:
        sizes["repeats"] = args.repeats
    figures = asyncio.run(measure(_resolve_url(), concurrency=args.concurrency, **sizes))
    print(json.dumps({k: round(v, 4) for k, v in figures.items()}, indent=2))
    return 0


if __name__ == "__main__":  # the load generator is a spawned process: keep this guard
    raise SystemExit(main())
