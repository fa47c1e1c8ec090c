"""Bench figures for notebook 10: SQLAlchemy's async engine against the raw asyncpg pool.

:func:`measure` runs the same point read by primary key on ``shop.users`` (the course's seed)
at one concurrency (10 by default) through five variants, interleaved (A, B, C, D, E, A, B,
...) so that a noisy machine slows them all alike, each opened, warmed up, timed and closed
in every round, as ``make bench`` measures its other variants:

* ``asyncpg_pool``: ``asyncpg.create_pool(min_size=c, max_size=c)`` and ``pool.fetchval()``;
* ``core``: ``create_async_engine(pool_size=c, max_overflow=0)``, ``async with
  engine.connect()`` and ``conn.execute(text(...))``: the dialect sends ``BEGIN`` before the
  query and ``ROLLBACK`` when the connection goes back;
* ``orm``: the same engine, ``async with async_sessionmaker(engine)() as session`` and
  ``session.get(User, id)``;
* ``core_read`` and ``orm_read``: the read-path engine notebook 10 recommends,
  ``isolation_level="AUTOCOMMIT"`` (no ``BEGIN``/``ROLLBACK``: one round trip per request) and
  ``pool_reset_on_return=None``.

It returns flat keys -> numbers: ``sqlalchemy_core_vs_asyncpg_pool`` and
``sqlalchemy_orm_vs_asyncpg_pool`` (ratios of the median requests/s), the same for the
read-path engine (``sqlalchemy_core_read_vs_asyncpg_pool``, ``sqlalchemy_orm_read_vs_asyncpg_pool``),
and ``sqlalchemy_rps_<variant>`` / ``sqlalchemy_p99_ms_<variant>`` (medians over the rounds).

    python .ci/bench_sqlalchemy.py            # against DATABASE_URL or the embedded server
    python .ci/bench_sqlalchemy.py --quick    # tiny sizes: checks the machinery in seconds

Pinned: sqlalchemy 2.1.9, greenlet 3.5.6, asyncpg 0.32.0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from helpers.load import Request, run_load
from helpers.sqlalchemy_engine import async_url

#: The variants in the order they run in each round (and are reported).
VARIANTS = ("asyncpg_pool", "core", "orm", "core_read", "orm_read")
#: The read-path engine options of notebook 10.
READ_PATH = {"isolation_level": "AUTOCOMMIT", "pool_reset_on_return": None}
RAW_QUERY = "SELECT name FROM shop.users WHERE id = $1"
CORE_QUERY = text("SELECT name FROM shop.users WHERE id = :id")
USERS = 100_000


class Base(DeclarativeBase):
    pass


class User(Base):
    """``shop.users`` of the course's seed, as the ORM sees it."""

    __tablename__ = "users"
    __table_args__ = {"schema": "shop"}

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    age: Mapped[int]
    email: Mapped[str]


def key(i: int) -> int:
    """The ``i``-th user id: 1..USERS, spread over the table (7919 is prime)."""
    return 1 + (i * 7919) % USERS


@contextlib.asynccontextmanager
async def variant(name: str, target_url: str, size: int) -> AsyncIterator[Request]:
    """Open what a variant needs, yield its request, close everything afterwards."""
    settings = {"application_name": f"bench/sqlalchemy/{name}"}
    if name == "asyncpg_pool":
        pool = await asyncpg.create_pool(target_url, min_size=size, max_size=size,
                                         server_settings=settings)
        try:
            async def raw(i: int) -> Any:
                return await pool.fetchval(RAW_QUERY, key(i))

            yield raw
        finally:
            await pool.close()
        return
    options = READ_PATH if name.endswith("_read") else {}
    engine = create_async_engine(async_url(target_url), pool_size=size, max_overflow=0,
                                 connect_args={"server_settings": settings}, **options)
    try:
        if name.startswith("core"):
            async def core(i: int) -> Any:
                async with engine.connect() as conn:
                    return (await conn.execute(CORE_QUERY, {"id": key(i)})).scalar_one()

            yield core
        else:
            sessions = async_sessionmaker(engine, expire_on_commit=False)

            async def orm(i: int) -> Any:
                async with sessions() as session:
                    return (await session.get(User, key(i))).name

            yield orm
    finally:
        await engine.dispose()


async def measure(target_url: str, *, concurrency: int = 10, requests: int = 3000,
                  repeats: int = 5, warmup: int = 200,
                  variants: Sequence[str] = VARIANTS) -> dict[str, float]:
    """Requests/s and p99 of the raw asyncpg pool, SQLAlchemy Core and the ORM, side by side
    (see the module docstring); returns the flat figures, ratios first.

    ``target_url`` is a ``postgresql://`` URL of a database with the course's seed
    (``shop.users``); each variant's pool has ``concurrency`` connections.
    """
    unknown = set(variants) - set(VARIANTS)
    if unknown or "asyncpg_pool" not in variants:
        raise ValueError(f"variants must include asyncpg_pool, from {VARIANTS}; got {variants}")
    rps: dict[str, list[float]] = {v: [] for v in variants}
    p99: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(repeats):
        for name in variants:
            async with variant(name, target_url, concurrency) as request:
                if warmup:
                    await run_load(request, requests=warmup, concurrency=concurrency,
                                   progress=False)
                result = await run_load(request, requests=requests, concurrency=concurrency,
                                        label=name, progress=False)
            if result.errors:
                raise RuntimeError(f"variant {name} had errors: "
                                   f"{result.summary()['error_types']}")
            rps[name].append(result.rps)
            p99[name].append(result.percentile(99))
    med = {v: statistics.median(r) for v, r in rps.items()}
    out: dict[str, float] = {}
    for name in variants:
        if name != "asyncpg_pool":
            out[f"sqlalchemy_{name}_vs_asyncpg_pool"] = med[name] / med["asyncpg_pool"]
    for name in variants:
        out[f"sqlalchemy_rps_{name}"] = med[name]
        out[f"sqlalchemy_p99_ms_{name}"] = statistics.median(p99[name])
    out["sqlalchemy_concurrency"] = float(concurrency)
    out["sqlalchemy_repeats"] = float(repeats)
    return out


def _resolve_url() -> str:
    try:
        from helpers.db import resolve
    except ImportError:  # before the restructure of helpers/ (issue 13)
        from helpers.target import resolve
    return resolve().url


def main(argv: list[str] | None = None) -> int:
    """``python .ci/bench_sqlalchemy.py [--quick] [--concurrency N] [--repeats N]``:
    print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks it works")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--repeats", type=int)
    args = parser.parse_args(argv)
    sizes = {"requests": 200, "repeats": 1, "warmup": 20} if args.quick else {}
    if args.repeats:
        sizes["repeats"] = args.repeats
    figures = asyncio.run(measure(_resolve_url(), concurrency=args.concurrency, **sizes))
    print(json.dumps({k: round(v, 4) for k, v in figures.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
