"""Bulk inserts, one small function per method, measured side by side (notebooks 04 and 08).

Notebook 04, notebook 08 and the benchmarks (``copy_vs_row_loop``, ``copy_vs_psql_copy``) share
this one implementation. Every method loads rows of the seed's ``users`` shape, ``(id, name,
age, email)`` = ``(int, text, int, text)``, into a table made by :func:`create_users_table`:

* :func:`insert_row_loop`: one ``execute()`` per row. asyncpg prepares the statement once (its
  statement cache) and then waits for the server's answer after every row: a round trip per
  row, and a commit per row unless you are inside a transaction;
  :func:`insert_row_loop_transaction`: the same loop in one transaction;
* :func:`insert_executemany`: ``executemany()``, the same statement, prepared once too, executed
  once per row; the difference from the loop is the waiting: the executions are pipelined;
* :func:`insert_unnest`: one ``INSERT ... SELECT FROM unnest($1::int[], ...)``, a column per
  array parameter;
* :func:`insert_values`: multi-row ``VALUES ($1, $2, $3, $4), (...)``, chunked below asyncpg's
  limit of 32,767 bound parameters per statement. A chunk's text is far longer than asyncpg's
  ``max_cacheable_statement_size`` (15 KiB), so it is never cached: every chunk is parsed and
  planned again;
* :func:`insert_copy`: ``copy_records_to_table()``, binary COPY;
* :class:`PsqlCopy`: ``psql \\copy`` from a CSV file, the reference every driver is held to.

Table names are quoted by the server, the course's one rule (:func:`helpers.db.format_sql`,
``format('%I')``): :func:`quote_table` asks once and returns a :class:`QuotedTable`, which the
methods accept in place of a name, so that :func:`compare_inserts` quotes every table before it
starts timing. ``copy_records_to_table`` is given the name and schema and quotes them itself.

:func:`compare_inserts` runs the methods interleaved (each into its own fresh table, truncated
between repeats, row counts verified) and returns every timing as a DataFrame.

For big files: :func:`generate_users_csv` writes a CSV of any size, :func:`copy_csv_file`
streams it through COPY, :func:`copy_csv_records` streams parsed records, and
:func:`copy_csv_in_memory` reads everything first; :func:`peak_memory` says what each costs.
:func:`fsync_ms` says whether a folder's disk really waits for a flush (a durable commit does).
"""

from __future__ import annotations

import asyncio
import csv
import gc
import gzip
import os
import re
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import asyncpg
import pandas as pd

from helpers._infra.paths import DATA
from helpers._infra.server import find_bin_dir
from helpers._infra.settings import child_env
from helpers.db import Target, connect, execute_ddl, format_sql

#: The seed's 100,000 users: ``id,name,age,email`` with a header line.
USERS_CSV = DATA / "users.csv.gz"
#: Column names of every table this module loads, in order.
COLUMNS: tuple[str, ...] = ("id", "name", "age", "email")
#: Bound parameters per statement that asyncpg accepts: its own limit, checked when it binds
#: the values (``protocol/prepared_stmt.pyx``), after the statement was sent to be parsed. The
#: protocol's Bind message counts parameters in 16 bits (at most 65,535).
MAX_QUERY_ARGS = 32767
#: Rows of four columns that fit in one multi-row VALUES statement (8,191).
VALUES_ROWS = MAX_QUERY_ARGS // len(COLUMNS)
#: asyncpg's default ``max_cacheable_statement_size``: longer statement texts are not cached.
MAX_CACHEABLE_STATEMENT_SIZE = 15 * 1024

#: One row: (id, name, age, email).
Row = tuple[int, str, int, str]
T = TypeVar("T")


class InsertMethod(Protocol):
    """``await method(conn, table, rows, schema=None)``: load ``rows`` into ``table``.

    ``table`` is a name, or a :class:`QuotedTable` (a name that knows its quoted form).
    Returns None, or the seconds the method measured itself (``psql`` reports its own time,
    without its process start-up and login).
    """

    def __call__(self, conn: asyncpg.Connection, table: str, rows: Sequence[Row], *,
                 schema: str | None = None) -> Awaitable[float | None]: ...


# -- rows and tables -------------------------------------------------------------------------

def iter_csv_records(path: Path | str) -> Iterator[Row]:
    """Parse a users CSV (plain or ``.gz``, with a header line) one row at a time."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        next(reader, None)  # header
        for id_, name, age, email in reader:
            yield (int(id_), name, int(age), email)


def read_users(limit: int | None = None, path: Path | str = USERS_CSV) -> list[Row]:
    """The seed's users (``data/users.csv.gz``) as a list of tuples, the first ``limit`` only
    if given. Deterministic: the same 100,000 rows on every machine."""
    rows = iter_csv_records(path)
    if limit is None:
        return list(rows)
    return [row for _, row in zip(range(limit), rows, strict=False)]


def write_csv(path: Path | str, rows: Iterable[Row]) -> int:
    """Write rows as a CSV with a header line (the format ``psql \\copy`` reads); returns bytes."""
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    return path.stat().st_size


_FIRST = ("Wei", "Lena", "Omar", "Ana", "Yuki", "Sam", "Priya", "Jonas", "Fatima", "Luca",
          "Mia", "Kofi", "Sofia", "Ivan", "Amara", "Noah")
_LAST = ("Baker", "Silva", "Khan", "Novak", "Sato", "Berg", "Rossi", "Okafor", "Meyer",
         "Diaz", "Kowalski", "Haddad", "Nguyen", "Larsen", "Costa", "Ito")


def synthetic_users(n: int, start_id: int = 1) -> Iterator[Row]:
    """``n`` made-up users with ids from ``start_id`` (deterministic, no randomness)."""
    for i in range(start_id, start_id + n):
        first, last = _FIRST[i % 16], _LAST[(i // 16) % 16]
        yield (i, f"{first} {last}", 18 + i % 80, f"{first.lower()}.{last.lower()}.{i}@example.com")


def generate_users_csv(path: Path | str, n: int, start_id: int = 1) -> int:
    """Write a CSV of ``n`` synthetic users to ``path``; returns its size in bytes. Memory
    stays flat: rows are written in blocks of 50,000."""
    path = Path(path)
    block = 50_000
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(",".join(COLUMNS) + "\n")
        for first in range(start_id, start_id + n, block):
            count = min(block, start_id + n - first)
            fh.write("".join(f"{i},{name},{age},{email}\n"
                             for i, name, age, email in synthetic_users(count, first)))
    return path.stat().st_size


class QuotedTable(str):
    """A table's name that also carries its quoted form for SQL (made by :func:`quote_table`).

    The string itself is the plain name, what ``copy_records_to_table(table_name=...)`` and
    psycopg's ``sql.Identifier`` want; ``.sql`` is the server's quoting, ``"schema"."table"``
    (or just ``"table"``, found through the search_path); ``.schema`` is the schema it was
    quoted for.
    """

    sql: str
    schema: str | None

    def __new__(cls, name: str, sql: str, schema: str | None = None) -> QuotedTable:
        obj = super().__new__(cls, name)
        obj.sql = sql
        obj.schema = schema
        return obj


async def quote_table(conn: asyncpg.Connection, table: str,
                      schema: str | None = None) -> QuotedTable:
    """``table`` (in ``schema``, or found through the search_path) quoted by the server with
    ``format('%I')`` (:func:`helpers.db.format_sql`): one round trip, which a
    :class:`QuotedTable` quoted for the same schema saves (it is returned as it is)."""
    if isinstance(table, QuotedTable) and table.schema == schema:
        return table
    names = (schema, table) if schema else (table,)
    sql = await format_sql(conn, "%I.%I" if schema else "%I", *names)
    return QuotedTable(str(table), sql, schema)


async def create_users_table(conn: asyncpg.Connection, table: str, *, schema: str | None = None,
                             primary_key: bool = True, unlogged: bool = False,
                             replace: bool = True) -> None:
    """Create ``table`` shaped like ``shop.users``: ``id integer`` (the primary key unless
    ``primary_key=False``), ``name text``, ``age integer`` (0-150), ``email text``.

    Without ``schema`` the table goes to the first schema of the search_path (a lesson's own
    schema). ``replace`` drops an existing table of that name first; ``unlogged`` skips the
    write-ahead log (faster, emptied after a crash: for staging data only).
    """
    where = "%I.%I" if schema else "%I"
    names = (schema, str(table)) if schema else (str(table),)
    if replace:
        await execute_ddl(conn, f"DROP TABLE IF EXISTS {where}", *names)
    key = " PRIMARY KEY" if primary_key else ""
    kind = "UNLOGGED TABLE" if unlogged else "TABLE"
    await execute_ddl(
        conn,
        f"CREATE {kind} {where} (id integer NOT NULL{key}, name text NOT NULL, "
        "age integer NOT NULL CHECK (age BETWEEN 0 AND 150), email text NOT NULL)",
        *names,
    )


async def count_rows(conn: asyncpg.Connection, table: str, schema: str | None = None) -> int:
    """``SELECT count(*)`` of a table."""
    name = await quote_table(conn, table, schema)
    return int(await conn.fetchval(f"SELECT count(*) FROM {name.sql}"))


# -- the methods -----------------------------------------------------------------------------

async def insert_sql(conn: asyncpg.Connection, table: str, schema: str | None = None) -> str:
    """``INSERT INTO <table> (id, name, age, email) VALUES ($1, $2, $3, $4)``, the table's name
    quoted by the server (:func:`quote_table`)."""
    name = await quote_table(conn, table, schema)
    return (f"INSERT INTO {name.sql} ({', '.join(COLUMNS)}) "
            f"VALUES ({', '.join(f'${i + 1}' for i in range(len(COLUMNS)))})")


async def insert_row_loop(conn: asyncpg.Connection, table: str, rows: Sequence[Row], *,
                          schema: str | None = None) -> None:
    """One ``execute()`` per row. asyncpg prepares the statement once (its statement cache)
    and reuses it, so each row costs a round trip, not a parse: the client waits for every
    row's answer and, outside a transaction, for a commit per row. The slowest way, and the
    most common one in tutorials."""
    sql = await insert_sql(conn, table, schema)
    for row in rows:
        await conn.execute(sql, *row)


async def insert_row_loop_transaction(conn: asyncpg.Connection, table: str,
                                      rows: Sequence[Row], *, schema: str | None = None) -> None:
    """The same loop inside one transaction: one commit, still a round trip per row."""
    async with conn.transaction():
        await insert_row_loop(conn, table, rows, schema=schema)


async def insert_executemany(conn: asyncpg.Connection, table: str, rows: Sequence[Row], *,
                             schema: str | None = None) -> None:
    """``executemany()``: the statement is prepared once, like the loop's, and executed once
    per row, but the executions are pipelined: the client does not wait for each row's answer.
    Atomic since asyncpg 0.22: all rows or none."""
    await conn.executemany(await insert_sql(conn, table, schema), rows)


async def insert_unnest(conn: asyncpg.Connection, table: str, rows: Sequence[Row], *,
                        schema: str | None = None) -> None:
    """One statement, one array parameter per column: ``INSERT ... SELECT * FROM
    unnest($1::int[], $2::text[], $3::int[], $4::text[])``. Four parameters, however many rows."""
    name = await quote_table(conn, table, schema)
    columns = [list(col) for col in zip(*rows, strict=True)] if rows else [[]] * len(COLUMNS)
    await conn.execute(
        f"INSERT INTO {name.sql} ({', '.join(COLUMNS)}) "
        "SELECT * FROM unnest($1::integer[], $2::text[], $3::integer[], $4::text[])",
        *columns,
    )


async def values_sql(conn: asyncpg.Connection, table: str, nrows: int,
                     schema: str | None = None) -> str:
    """``INSERT INTO t (...) VALUES ($1, $2, $3, $4), ($5, ...)`` for ``nrows`` rows: only
    placeholders, the values travel as bound parameters."""
    name = await quote_table(conn, table, schema)
    width = len(COLUMNS)
    groups = ", ".join(
        "(" + ", ".join(f"${r * width + c + 1}" for c in range(width)) + ")" for r in range(nrows)
    )
    return f"INSERT INTO {name.sql} ({', '.join(COLUMNS)}) VALUES {groups}"


async def insert_values(conn: asyncpg.Connection, table: str, rows: Sequence[Row], *,
                        schema: str | None = None, rows_per_statement: int = VALUES_ROWS,
                        atomic: bool = True) -> None:
    """Multi-row ``VALUES`` with bound parameters, ``rows_per_statement`` rows per statement
    (at most 8,191 for four columns: 32,767 parameters). A full chunk's text is longer than
    ``max_cacheable_statement_size``, so asyncpg does not cache it: the server parses and plans
    every chunk anew. ``atomic`` wraps the chunks in one transaction; without it every chunk
    commits on its own."""
    table = await quote_table(conn, table, schema)  # once, not per chunk

    async def chunks() -> None:
        for start in range(0, len(rows), rows_per_statement):
            chunk = rows[start:start + rows_per_statement]
            args = [value for row in chunk for value in row]
            await conn.execute(await values_sql(conn, table, len(chunk), schema), *args)

    if atomic and not conn.is_in_transaction():
        async with conn.transaction():
            await chunks()
    else:
        await chunks()


async def insert_copy(conn: asyncpg.Connection, table: str, rows: Iterable[Row], *,
                      schema: str | None = None) -> None:
    """``copy_records_to_table()``: binary COPY, rows streamed in large buffers, one
    statement. Also takes a generator or an async iterable (nothing is held in memory).
    asyncpg quotes the table and schema names itself."""
    await conn.copy_records_to_table(table, records=rows, columns=list(COLUMNS),
                                     schema_name=schema)


#: The methods of notebook 04, slowest first.
METHODS: dict[str, InsertMethod] = {
    "execute loop, autocommit": insert_row_loop,
    "execute loop, one transaction": insert_row_loop_transaction,
    "executemany": insert_executemany,
    "multi-row VALUES": insert_values,
    "unnest arrays": insert_unnest,
    "copy_records_to_table": insert_copy,
}


# -- psql \copy ------------------------------------------------------------------------------

@dataclass(frozen=True)
class PsqlResult:
    """What one ``psql \\copy`` did: rows copied, psql's own timing, and the process's wall
    time (start-up and login included)."""

    rows: int
    seconds: float
    wall_seconds: float


def psql_binary() -> Path:
    """The ``psql`` that ships with the server binaries (:func:`helpers.server.find_bin_dir`)."""
    path = find_bin_dir() / "psql"
    if not path.exists():
        raise FileNotFoundError(f"no psql next to the server binaries in {path.parent}")
    return path


def _as_target(dsn: str | Target) -> Target:
    return dsn if isinstance(dsn, Target) else Target(dsn, "psql")


async def psql_copy(dsn: str | Target, table: str, csv_path: Path | str, *, schema: str,
                    columns: Sequence[str] = COLUMNS, header: bool = True,
                    timeout: float = 300, conn: asyncpg.Connection | None = None) -> PsqlResult:
    """Load a CSV file with ``psql \\copy ... FROM STDIN`` (the file is psql's standard input).

    psql gets the connection from libpq's ``PG*`` variables in its environment
    (:meth:`helpers.db.Target.libpq_env`): nothing on its command line, the password least of
    all (every user of the machine can read a command line in ``ps``). ``schema`` is required:
    psql's session does not have your search_path. The names are quoted by the server
    (``format('%I')``) on ``conn``, or on a short connection of this function's own.
    """
    target = _as_target(dsn)
    template = "%I.%I (" + ", ".join("%I" for _ in columns) + ")"
    if conn is None:
        quoting = await connect(target)
        try:
            names = await format_sql(quoting, template, schema, str(table), *columns)
        finally:
            await quoting.close()
    else:
        names = await format_sql(conn, template, schema, str(table), *columns)
    command = f"\\copy {names} FROM STDIN WITH (FORMAT csv, HEADER {str(header).lower()})"
    t0 = time.perf_counter()
    source = await asyncio.to_thread(open, csv_path, "rb")
    try:
        proc = await asyncio.create_subprocess_exec(
            str(psql_binary()), "-X", "-v", "ON_ERROR_STOP=1",
            "-c", "\\timing on", "-c", command,
            stdin=source, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=child_env(**target.libpq_env()),
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
    finally:
        source.close()
    wall = time.perf_counter() - t0
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"psql \\copy failed (exit {proc.returncode}): "
                           f"{err.decode(errors='replace').strip()[:500]}")
    copied = re.search(r"^COPY (\d+)", text, flags=re.M)
    timing = re.search(r"^Time: ([\d.]+) ms", text, flags=re.M)
    if not copied:
        raise RuntimeError(f"unexpected psql output: {text[:300]!r}")
    return PsqlResult(int(copied.group(1)),
                      float(timing.group(1)) / 1000 if timing else wall, wall)


class PsqlCopy:
    """``psql \\copy`` of one CSV file as an :data:`InsertMethod` (for :func:`compare_inserts`).

    ``dsn`` is a URL or a :class:`helpers.db.Target`. The rows passed in are ignored (they are
    the file's contents; the caller wrote them with :func:`write_csv`); the table's schema is
    the connection's current schema unless given. Returns psql's own timing of the COPY.
    """

    def __init__(self, dsn: str | Target, csv_path: Path | str) -> None:
        self.target = _as_target(dsn)
        self.csv_path = Path(csv_path)

    async def __call__(self, conn: asyncpg.Connection, table: str, rows: Sequence[Row], *,
                       schema: str | None = None) -> float:
        schema = schema or str(await conn.fetchval("SELECT current_schema()"))
        result = await psql_copy(self.target, table, self.csv_path, schema=schema, conn=conn)
        return result.seconds


# -- measuring -------------------------------------------------------------------------------

def table_name(method: str, prefix: str = "bulk_") -> str:
    """A table name made from a method's label: ``"multi-row VALUES"`` -> ``bulk_multi_row_values``."""
    return (prefix + re.sub(r"[^a-z0-9]+", "_", method.lower()).strip("_"))[:63]


async def compare_inserts(conn: asyncpg.Connection,
                          methods: Mapping[str, tuple[InsertMethod, Sequence[Row]]], *,
                          repeats: int = 3, schema: str | None = None,
                          primary_key: bool = True) -> pd.DataFrame:
    """Time each method loading its rows, interleaved (A, B, C, A, B, C, ...).

    Each method gets its own fresh table (:func:`table_name`), truncated before every run, and
    is passed its :class:`QuotedTable` (quoted once, before any timing); after every run the
    row count is checked. Returns one row per run: ``method``, ``repeat``,
    ``rows``, ``seconds``, ``rows_per_s``. :func:`median_rates` summarizes it.
    """
    tables = {}
    for name in methods:  # created and quoted before the clock starts
        await create_users_table(conn, table_name(name), schema=schema, primary_key=primary_key)
        tables[name] = await quote_table(conn, table_name(name), schema)
    records: list[dict[str, Any]] = []
    for repeat in range(repeats):
        for name, (method, rows) in methods.items():
            await conn.execute(f"TRUNCATE {tables[name].sql}")
            t0 = time.perf_counter()
            reported = await method(conn, tables[name], rows, schema=schema)
            seconds = time.perf_counter() - t0 if reported is None else reported
            loaded = await count_rows(conn, tables[name], schema)
            if loaded != len(rows):
                raise AssertionError(f"{name}: {loaded} rows in the table, {len(rows)} expected")
            records.append({"method": name, "repeat": repeat, "rows": len(rows),
                            "seconds": seconds, "rows_per_s": len(rows) / seconds})
    return pd.DataFrame(records)


def median_rates(timings: pd.DataFrame) -> dict[str, float]:
    """Median rows/s per method of a :func:`compare_inserts` table, in the order measured."""
    return {name: float(statistics.median(group["rows_per_s"]))
            for name, group in timings.groupby("method", sort=False)}


# -- big files and memory --------------------------------------------------------------------

async def copy_csv_file(conn: asyncpg.Connection, table: str, path: Path | str, *,
                        schema: str | None = None) -> int:
    """Stream a CSV file through ``copy_to_table(source=path)``: asyncpg reads it in 512 KiB
    blocks (in a thread) and the server parses it, so memory stays flat whatever the size. Returns rows."""
    status = await conn.copy_to_table(table, source=Path(path), schema_name=schema,
                                      format="csv", header=True, columns=list(COLUMNS))
    return int(status.split()[-1])


async def copy_csv_records(conn: asyncpg.Connection, table: str, path: Path | str, *,
                           schema: str | None = None) -> int:
    """Parse the CSV in Python one row at a time and stream the rows (a generator) through
    ``copy_records_to_table``: flat memory, and room to transform each row. Returns rows."""
    status = await conn.copy_records_to_table(table, records=iter_csv_records(path),
                                              columns=list(COLUMNS), schema_name=schema)
    return int(status.split()[-1])


async def copy_csv_in_memory(conn: asyncpg.Connection, table: str, path: Path | str, *,
                             schema: str | None = None) -> int:
    """Read every row into a list first, then ``copy_records_to_table``: memory grows with
    the file (a few hundred bytes per row as Python objects). Returns rows."""
    rows = list(iter_csv_records(path))
    status = await conn.copy_records_to_table(table, records=rows, columns=list(COLUMNS),
                                              schema_name=schema)
    return int(status.split()[-1])


@dataclass(frozen=True)
class MemoryPeak:
    """Peak memory of one call above what the process held before it."""

    peak_bytes: int
    seconds: float
    how: str  # "RSS high-water mark", "sampled RSS" or "tracemalloc"
    result: Any = None

    @property
    def peak_mb(self) -> float:
        """The peak in megabytes (10^6 bytes)."""
        return self.peak_bytes / 1e6


def _proc_status_kb(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, flags=re.M)
    return int(match.group(1)) if match else None


def _reset_rss_peak() -> bool:
    """Linux: writing 5 to /proc/self/clear_refs resets the RSS high-water mark (VmHWM)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return _proc_status_kb("VmHWM") is not None


async def peak_memory(func: Callable[[], Awaitable[T]], *,
                      how: str = "auto") -> MemoryPeak:
    """Run ``await func()`` and measure how much memory it needed at its peak.

    ``how`` picks the measurement; ``"auto"`` takes the first that works here:

    * ``"hwm"`` (Linux): the process's resident memory (RSS) high-water mark, reset just before
      the call, minus the RSS before it. Everything counts (Python objects, driver buffers) and
      the call runs at full speed.
    * ``"sampled"`` (macOS and others, needs ``psutil``, which Jupyter installs): RSS read by a
      background thread every millisecond; a peak shorter than that can be missed.
    * ``"tracemalloc"``: Python allocations only, and several times slower.
    """
    gc.collect()
    if how in ("auto", "hwm") and _reset_rss_peak():
        before = _proc_status_kb("VmRSS") or 0
        t0 = time.perf_counter()
        result = await func()
        seconds = time.perf_counter() - t0
        peak = (_proc_status_kb("VmHWM") or before) - before
        return MemoryPeak(max(peak, 0) * 1024, seconds, "RSS high-water mark", result)
    if how == "hwm":
        raise RuntimeError("the RSS high-water mark cannot be reset here (Linux only)")
    if how in ("auto", "sampled"):
        try:
            import psutil
        except ImportError:
            if how == "sampled":
                raise
        else:
            return await _sampled_peak(func, psutil.Process())
    if how not in ("auto", "tracemalloc"):
        raise ValueError(f"how={how!r}: use 'auto', 'hwm', 'sampled' or 'tracemalloc'")
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        t0 = time.perf_counter()
        result = await func()
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        if started:
            tracemalloc.stop()
    return MemoryPeak(max(peak, 0), seconds, "tracemalloc", result)


async def _sampled_peak(func: Callable[[], Awaitable[T]], process: Any) -> MemoryPeak:
    """RSS sampled every millisecond by a thread while ``func`` runs (see :func:`peak_memory`)."""
    before = int(process.memory_info().rss)
    highest = before
    done = threading.Event()

    def sample() -> None:
        nonlocal highest
        while not done.wait(0.001):
            highest = max(highest, int(process.memory_info().rss))

    sampler = threading.Thread(target=sample, name="peak-memory", daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        result = await func()
    finally:
        seconds = time.perf_counter() - t0
        done.set()
        sampler.join()
    highest = max(highest, int(process.memory_info().rss))
    return MemoryPeak(max(highest - before, 0), seconds, "sampled RSS", result)


def fsync_ms(folder: Path | str, flushes: int = 20) -> float:
    """Median milliseconds that writing 8 KiB to a file in ``folder`` and ``os.fsync`` take:
    what a durable commit waits for. A few microseconds mean the disk does not really flush
    (tmpfs, or a disk or VM that acknowledges writes from a cache): commits cost little there
    whatever the settings say."""
    times = []
    fd, name = tempfile.mkstemp(dir=folder, prefix="fsync-probe-")
    try:
        for _ in range(flushes):
            os.write(fd, b"\0" * 8192)
            t0 = time.perf_counter()
            os.fsync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        os.unlink(name)
    return statistics.median(times) * 1000


def file_size_mb(path: Path | str) -> float:
    """A file's size in megabytes (10^6 bytes)."""
    return Path(path).stat().st_size / 1e6


__all__ = [
    "COLUMNS", "MAX_CACHEABLE_STATEMENT_SIZE", "MAX_QUERY_ARGS", "METHODS", "USERS_CSV",
    "VALUES_ROWS", "InsertMethod", "MemoryPeak", "PsqlCopy", "PsqlResult", "QuotedTable", "Row",
    "compare_inserts", "copy_csv_file", "copy_csv_in_memory", "copy_csv_records", "count_rows",
    "create_users_table", "file_size_mb", "fsync_ms", "generate_users_csv", "insert_copy",
    "insert_executemany", "insert_row_loop", "insert_row_loop_transaction", "insert_sql",
    "insert_unnest", "insert_values", "iter_csv_records", "median_rates", "peak_memory",
    "psql_binary", "psql_copy", "quote_table", "read_users", "synthetic_users", "table_name",
    "values_sql", "write_csv",
]
