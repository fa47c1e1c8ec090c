"""The seed data (``data/``): loaded once per database, idempotently, with COPY.

The ``shop`` schema is shared and read-only by convention: lessons read it and write in their
own schemas. :func:`ensure_seed` loads it when it is missing, under an advisory lock so that
two notebooks starting at once load it once.
"""

from __future__ import annotations

import gzip
import json
import time
from dataclasses import dataclass
from typing import Any

import asyncpg

from helpers._infra.paths import DATA
from helpers.db import execute_ddl

#: pg_advisory_xact_lock key for loading the seed (any constant that no lesson uses).
SEED_LOCK = 7_240_001
TABLES = ("users", "products", "orders")


@dataclass(frozen=True)
class SeedInfo:
    """What is loaded: the seed version and row counts per table, and whether we loaded it now."""

    version: str
    rows: dict[str, int]
    loaded_now: bool
    seconds: float


def manifest() -> dict[str, Any]:
    """``data/manifest.json``: the seed's version and expected row count per table."""
    return json.loads((DATA / "manifest.json").read_text())


async def loaded_version(conn: asyncpg.Connection) -> str | None:
    """The seed version present in this database, or None when there is none."""
    if not await conn.fetchval("SELECT to_regclass('shop.seed_info') IS NOT NULL"):
        return None
    return await conn.fetchval("SELECT version FROM shop.seed_info ORDER BY loaded_at DESC LIMIT 1")


async def ensure_seed(conn: asyncpg.Connection) -> SeedInfo:
    """Load ``data/`` into schema ``shop`` unless this seed version is there already.

    An older or half-loaded ``shop`` schema is renamed (``shop_replaced_<time>``), never
    dropped: whatever a learner put there is kept.
    """
    t0 = time.perf_counter()
    want = manifest()
    loaded_now = False
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", SEED_LOCK)
        if await loaded_version(conn) != want["version"]:
            if await conn.fetchval("SELECT to_regnamespace('shop') IS NOT NULL"):
                aside = f"shop_replaced_{int(time.time())}"
                await execute_ddl(conn, "ALTER SCHEMA shop RENAME TO %I", aside)
            schema_sql = (DATA / "01-schema.sql").read_text()
            if not await _can_create_extensions(conn):
                schema_sql = schema_sql.replace(
                    "CREATE EXTENSION IF NOT EXISTS pg_stat_statements;", ""
                )
            await conn.execute(schema_sql)
            for table in TABLES:
                with gzip.open(DATA / f"{table}.csv.gz", "rb") as fh:
                    await conn.copy_to_table(
                        table, schema_name="shop", source=fh, format="csv", header=True
                    )
            await conn.execute("INSERT INTO shop.seed_info (version) VALUES ($1)", want["version"])
            loaded_now = True
    if loaded_now:
        await conn.execute("ANALYZE shop.users, shop.products, shop.orders")
    rows = {t: await conn.fetchval(f"SELECT count(*) FROM shop.{t}") for t in TABLES}
    return SeedInfo(want["version"], rows, loaded_now, time.perf_counter() - t0)


async def _can_create_extensions(conn: asyncpg.Connection) -> bool:
    """pg_stat_statements needs superuser (or a trusted install); skip it where we may not."""
    return bool(await conn.fetchval(
        "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
    ) or await conn.fetchval(
        "SELECT count(*) > 0 FROM pg_extension WHERE extname = 'pg_stat_statements'"
    ))
