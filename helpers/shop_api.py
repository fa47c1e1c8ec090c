"""The course's shop API (notebook 11): a FastAPI app with one asyncpg pool per process.

Run it as production does, with the configuration in the environment (a password on a
command line is visible to every user in ``ps``)::

    export DATABASE_URL=postgresql://user:password@host:5432/course
    uvicorn helpers.shop_api:app --workers 2

Settings, read once per process at startup by :meth:`Settings.from_env`:

``DATABASE_URL``         where the database is (required)
``DB_POOL_MIN``          connections kept open (default 2)
``DB_POOL_MAX``          at most this many connections per process (default 10)
``DB_ACQUIRE_TIMEOUT``   seconds a request waits for a free connection before it gets a
                         ``503`` with ``Retry-After`` (default 0.5; ``none`` waits forever);
                         asyncpg applies it to that connection's release (the reset) too
``DB_POOL_RESET``        ``default`` (asyncpg's reset on release) or ``none`` (skips it: only
                         safe when no request ever changes session state; notebook 02)
``DB_APPLICATION_NAME``  ``application_name`` of the connections (default ``shop-api``)
``RETRY_AFTER``          seconds to tell a client in ``Retry-After`` (default 1)

Endpoints: ``/ping`` (no database: the ceiling of the HTTP stack), ``/users/{id}`` (a pooled
point read), ``/users/{id}/summary`` (a unit of work: three queries in one transaction),
``/reports/slow`` (holds a connection for a while, standing in for a slow query),
``/connect-per-request/users/{id}`` (a new connection per request, for comparison),
``/health/live`` and ``/health/ready``. The point read answers with a
``Server-Timing: db;dur=`` header: the milliseconds from acquire to the end of release (the
reset included). The ``/wrong/...`` endpoints at the end are the pitfalls notebook 11 runs for
real; they exist only with ``SHOP_PITFALLS=1``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from fastapi import APIRouter, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse

logger = logging.getLogger("uvicorn.error")  # uvicorn's log: one stream for the whole server

USER_SQL = "SELECT id, name FROM shop.users WHERE id = $1"

#: The database went away (restart, failover, network): answer 503 at once, never hang.
#: ``OSError`` covers refused and reset connections (and the built-in ``TimeoutError``);
#: ``InternalClientError`` is a pooled connection whose server said goodbye (notebook 06).
DATABASE_DOWN: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.InternalClientError,
)


@dataclass(frozen=True)
class Settings:
    """The app's configuration, read from the environment once per process."""

    database_url: str = field(repr=False)  # holds the password: never print it
    pool_min: int = 2
    pool_max: int = 10
    acquire_timeout: float | None = 0.5
    pool_reset: str = "default"
    application_name: str = "shop-api"
    retry_after: int = 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        timeout = env.get("DB_ACQUIRE_TIMEOUT", "0.5").strip().lower()
        reset = env.get("DB_POOL_RESET", "default")
        if reset not in ("default", "none"):
            raise ValueError(f"DB_POOL_RESET must be 'default' or 'none', not {reset!r}")
        return cls(
            database_url=env["DATABASE_URL"],
            pool_min=int(env.get("DB_POOL_MIN", "2")),
            pool_max=int(env.get("DB_POOL_MAX", "10")),
            acquire_timeout=None if timeout == "none" else float(timeout),
            pool_reset=reset,
            application_name=env.get("DB_APPLICATION_NAME", "shop-api"),
            retry_after=int(env.get("RETRY_AFTER", "1")),
        )


async def _skip_reset(conn: asyncpg.Connection) -> None:
    """``reset=`` that sends nothing (asyncpg still rolls back an open transaction)."""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """One pool per process: created when the server's event loop starts, closed at shutdown
    (uvicorn runs this once the requests in flight have finished, or once
    ``--timeout-graceful-shutdown`` ran out and it cancelled them)."""
    settings = Settings.from_env()
    pool = await asyncpg.create_pool(
        settings.database_url,
        min_size=settings.pool_min,
        max_size=settings.pool_max,
        reset=_skip_reset if settings.pool_reset == "none" else None,
        server_settings={"application_name": settings.application_name},
        timeout=5,  # connect timeout: fail fast when the server is down
    )
    app.state.settings, app.state.pool = settings, pool
    logger.info("pool open: %d connections (pid %d)", pool.get_size(), os.getpid())
    try:
        yield
    finally:
        try:
            await asyncio.wait_for(pool.close(), 10)  # waits for every release
        except TimeoutError:  # close() already terminated the pool when wait_for cancelled it
            pool.terminate()  # (asyncpg 0.32); said again, in case a version does not
        logger.info("pool closed (pid %d)", os.getpid())


app = FastAPI(title="shop", lifespan=lifespan)


def unavailable(request: Request, detail: str) -> JSONResponse:
    """A fast 503 that tells the client when to come back."""
    return JSONResponse({"detail": detail}, status_code=503,
                        headers={"Retry-After": str(request.app.state.settings.retry_after)})


@app.exception_handler(TimeoutError)
@app.exception_handler(asyncpg.TooManyConnectionsError)
async def database_busy(request: Request, exc: Exception) -> JSONResponse:
    # No free connection within DB_ACQUIRE_TIMEOUT, a query timed out, or the pool could not
    # grow (DB_POOL_MIN < DB_POOL_MAX) because the server has no connection slot left: shed load.
    return unavailable(request, "database busy")


async def database_down(request: Request, exc: Exception) -> JSONResponse:
    return unavailable(request, "database unavailable")


for _exc in DATABASE_DOWN:  # handlers are found along the exception's class hierarchy, so
    app.add_exception_handler(_exc, database_down)  # TimeoutError (an OSError) stays "busy"


def acquire(request: Request) -> Any:
    """This request's one connection: ``async with acquire(request) as conn``. Waits at
    most ``DB_ACQUIRE_TIMEOUT`` for a free one, then raises ``TimeoutError`` (a 503)."""
    state = request.app.state
    return state.pool.acquire(timeout=state.settings.acquire_timeout)


@app.get("/ping")
async def ping() -> dict[str, bool]:
    """No database at all: what the HTTP stack alone can serve."""
    return {"pong": True}


@app.get("/users/{user_id}")
async def get_user(user_id: int, request: Request, response: Response) -> dict[str, Any]:
    started = time.perf_counter()
    async with acquire(request) as conn:  # released (and reset) when the block ends
        row = await conn.fetchrow(USER_SQL, user_id)
    # How long this request spent on the pool: acquire, query, and release with its reset. In
    # the standard header that browsers' developer tools and load generators read.
    response.headers["Server-Timing"] = f"db;dur={(time.perf_counter() - started) * 1000:.3f}"
    if row is None:
        raise HTTPException(404, "no such user")
    return dict(row)


@app.get("/users/{user_id}/summary")
async def user_summary(user_id: int, request: Request) -> dict[str, Any]:
    """A realistic unit of work: three queries that must agree, in one transaction."""
    async with acquire(request) as conn, \
            conn.transaction(isolation="repeatable_read", readonly=True):
        user = await conn.fetchrow(USER_SQL, user_id)
        if user is None:
            raise HTTPException(404, "no such user")
        orders = await conn.fetchval(
            "SELECT count(*) FROM shop.orders WHERE user_id = $1", user_id)
        last = await conn.fetchval(
            "SELECT max(ordered_at) FROM shop.orders WHERE user_id = $1", user_id)
    return {**dict(user), "orders": orders, "last_order": last}


@app.get("/reports/slow")
async def slow_report(request: Request, seconds: float = 0.05) -> dict[str, float]:
    """Holds its connection for ``seconds`` (at most 2): stands in for a slow query."""
    async with acquire(request) as conn:
        await conn.execute("SELECT pg_sleep($1)", min(max(seconds, 0.0), 2.0))
    return {"slept_s": seconds}


@app.get("/connect-per-request/users/{user_id}")
async def get_user_new_connection(user_id: int, request: Request) -> dict[str, Any]:
    """The same read on a connection opened for this request alone (notebook 01)."""
    settings: Settings = request.app.state.settings
    conn = await asyncpg.connect(
        settings.database_url, timeout=5,
        server_settings={"application_name": settings.application_name})
    try:
        row = await conn.fetchrow(USER_SQL, user_id)
    finally:
        await conn.close()
    if row is None:
        raise HTTPException(404, "no such user")
    return dict(row)


@app.get("/health/live")
async def live() -> dict[str, str]:
    """Liveness: the process answers. Never touches the database: restarting the app would
    not bring a database back."""
    return {"status": "alive"}


@app.get("/health/ready")
async def ready(request: Request) -> Any:
    """Readiness: a connection, then ``SELECT 1``, each within 0.5 s, or 503 (send no traffic
    here)."""
    try:
        async with request.app.state.pool.acquire(timeout=0.5) as conn:
            await conn.fetchval("SELECT 1", timeout=0.5)
    except (TimeoutError, *DATABASE_DOWN):
        return unavailable(request, "database unavailable")
    return {"status": "ready"}


# -- Pitfalls, run for real by notebook 11. Never copy these. ----------------------------------
# They exist only with SHOP_PITFALLS=1, so that the app above stays the model.

if os.environ.get("SHOP_PITFALLS") == "1":
    wrong = APIRouter(prefix="/wrong")

    # WRONG: a pool created while the module is imported. uvicorn imports the app before it
    # starts its event loop, so this pool belongs to another loop, one that never runs again.
    import_time_pool = asyncio.get_event_loop().run_until_complete(
        asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=1, max_size=2))

    @wrong.get("/import-time-pool/users/{user_id}")
    async def wrong_import_time_pool(user_id: int) -> dict[str, Any]:
        return dict(await import_time_pool.fetchrow(USER_SQL, user_id) or {})

    # WRONG: one connection for every request, opened by the first one that needs it.
    shared: dict[str, asyncpg.Connection] = {}

    @wrong.get("/shared-connection/users/{user_id}")
    async def wrong_shared_connection(user_id: int, request: Request) -> dict[str, Any]:
        if "conn" not in shared:
            shared["conn"] = await asyncpg.connect(request.app.state.settings.database_url)
        return dict(await shared["conn"].fetchrow(USER_SQL, user_id) or {})

    # WRONG: a pool per request: min_size connections opened and closed for one query.
    @wrong.get("/pool-per-request/users/{user_id}")
    async def wrong_pool_per_request(user_id: int, request: Request) -> dict[str, Any]:
        async with asyncpg.create_pool(request.app.state.settings.database_url) as pool:
            return dict(await pool.fetchrow(USER_SQL, user_id) or {})

    app.include_router(wrong)
