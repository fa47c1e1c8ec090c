"""Bulk insert methods, psql \\copy, big CSVs and peak memory, against the real server."""

from __future__ import annotations

import asyncio
import inspect
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import asyncpg
import pytest

from helpers import batch_inserts as bulk
from helpers.db import Target, connect, execute_ddl
from tests.conftest import run

T = TypeVar("T")


def in_schema(target: Target, scenario: Callable[[asyncpg.Connection, str], Awaitable[T]]) -> T:
    """Run ``scenario(conn, schema)`` in a throw-away schema (on the search_path), dropped after."""
    async def main() -> T:
        schema = f"test_bulk_{secrets.token_hex(3)}"
        conn = await connect(target, server_settings={"search_path": f"{schema}, public"})
        try:
            await execute_ddl(conn, "CREATE SCHEMA %I", schema)
            return await scenario(conn, schema)
        finally:
            await execute_ddl(conn, "DROP SCHEMA IF EXISTS %I CASCADE", schema)
            await conn.close()
    return run(main())


def test_read_users_is_the_seed() -> None:
    rows = bulk.read_users()
    assert len(rows) == 100_000
    assert rows[0] == (1, "Wei Baker", 58, "wei.baker.1@example.com")
    assert all(isinstance(v, t) for v, t in zip(rows[-1], (int, str, int, str), strict=True))
    assert bulk.read_users(3) == rows[:3]


def test_the_server_quotes_table_names(target: Target) -> None:
    assert bulk.table_name("multi-row VALUES") == "bulk_multi_row_values"
    odd = 'Odd "name"; DROP'
    rows = bulk.read_users(30)

    async def scenario(conn: asyncpg.Connection, schema: str):
        plain = await bulk.quote_table(conn, "users")
        qualified = await bulk.quote_table(conn, odd, schema)
        assert (plain, plain.sql, plain.schema) == ("users", "users", None)
        assert qualified == odd and qualified.sql == f'{schema}."Odd ""name""; DROP"'
        assert await bulk.quote_table(conn, qualified, schema) is qualified  # no second ask
        assert (await bulk.quote_table(conn, qualified)).sql == '"Odd ""name""; DROP"'
        await bulk.create_users_table(conn, odd, schema=schema)
        counts = []
        for name, method in bulk.METHODS.items():
            await conn.execute(f"TRUNCATE {qualified.sql}")
            await method(conn, odd, rows[:10] if "loop" in name else rows, schema=schema)
            counts.append(await bulk.count_rows(conn, odd, schema))
        return counts

    assert in_schema(target, scenario) == [10, 10, 30, 30, 30, 30]


def test_values_sql_stays_below_the_parameter_limit(target: Target) -> None:
    assert bulk.VALUES_ROWS == 8191
    assert bulk.VALUES_ROWS * len(bulk.COLUMNS) <= bulk.MAX_QUERY_ARGS

    async def scenario(conn: asyncpg.Connection, schema: str):
        return await bulk.values_sql(conn, "t", 2), await bulk.values_sql(conn, "t", 2, schema)

    short, qualified = in_schema(target, scenario)
    assert short == "INSERT INTO t (id, name, age, email) VALUES ($1, $2, $3, $4), ($5, $6, $7, $8)"
    assert qualified.startswith("INSERT INTO test_bulk_") and ".t (id," in qualified


def test_the_cost_model_statement_cache(target: Target) -> None:
    """The loop's INSERT is prepared once and reused (asyncpg's statement cache); a full
    VALUES chunk is too long to be cached, so it is parsed again every time."""
    default = inspect.signature(asyncpg.connect).parameters["max_cacheable_statement_size"]
    assert default.default == bulk.MAX_CACHEABLE_STATEMENT_SIZE
    rows = bulk.read_users(bulk.VALUES_ROWS * 2)
    prepared = "SELECT count(*) FROM pg_prepared_statements WHERE statement = $1"

    async def scenario(conn: asyncpg.Connection, schema: str):
        await bulk.create_users_table(conn, "t")
        await bulk.insert_row_loop(conn, "t", rows[:200])
        loop_sql = await bulk.insert_sql(conn, "t")
        chunk_sql = await bulk.values_sql(conn, "t", bulk.VALUES_ROWS)
        await conn.execute("TRUNCATE t")
        await bulk.insert_values(conn, "t", rows)  # two full chunks
        return (await conn.fetchval(prepared, loop_sql), await conn.fetchval(prepared, chunk_sql),
                len(chunk_sql), await bulk.count_rows(conn, "t"))

    loop_statements, chunk_statements, chunk_length, loaded = in_schema(target, scenario)
    assert loop_statements == 1, "200 executions, one prepared statement"
    assert chunk_statements == 0 and chunk_length > bulk.MAX_CACHEABLE_STATEMENT_SIZE
    assert loaded == len(rows)


@pytest.mark.parametrize("name", list(bulk.METHODS))
def test_every_method_loads_exactly_the_rows(target: Target, name: str) -> None:
    rows = bulk.read_users(700)
    rows[5] = (rows[5][0], "O'Brien \"quoted\", with comma", rows[5][2], rows[5][3])

    async def scenario(conn: asyncpg.Connection, schema: str):
        await bulk.create_users_table(conn, "t", schema=schema)
        method = bulk.METHODS[name]
        if method is bulk.insert_values:
            await bulk.insert_values(conn, "t", rows, schema=schema, rows_per_statement=300)
        else:
            await method(conn, "t", rows, schema=schema)
        return [tuple(r) for r in await conn.fetch(f"SELECT * FROM {schema}.t ORDER BY id")]

    assert in_schema(target, scenario) == rows


def test_methods_find_the_table_through_search_path(target: Target) -> None:
    rows = bulk.read_users(50)

    async def scenario(conn: asyncpg.Connection, schema: str):
        await bulk.create_users_table(conn, "plain", primary_key=False, unlogged=True)
        await bulk.insert_unnest(conn, "plain", rows)
        await bulk.insert_unnest(conn, "plain", [])  # empty arrays insert nothing
        await bulk.insert_copy(conn, "plain", iter(rows))  # a generator streams too
        return await bulk.count_rows(conn, "plain"), await bulk.count_rows(conn, "plain", schema)

    assert in_schema(target, scenario) == (100, 100)


def test_too_many_parameters_fail_at_bind(target: Target) -> None:
    rows = bulk.read_users(bulk.VALUES_ROWS + 1)

    async def scenario(conn: asyncpg.Connection, schema: str):
        await bulk.create_users_table(conn, "t")
        with pytest.raises(asyncpg.InterfaceError, match="cannot exceed 32767"):
            await bulk.insert_values(conn, "t", rows, rows_per_statement=len(rows))
        await bulk.insert_values(conn, "t", rows)  # chunked: 8191 + 1 rows
        return await bulk.count_rows(conn, "t")

    assert in_schema(target, scenario) == len(rows)


def test_atomic_and_chunked_loads(target: Target) -> None:
    rows = bulk.read_users(1000)
    bad = [*rows[:600], rows[0], *rows[600:]]  # a duplicate key in the 7th chunk of 100

    async def scenario(conn: asyncpg.Connection, schema: str):
        await bulk.create_users_table(conn, "t")
        counts = []
        for atomic in (True, False):
            await conn.execute("TRUNCATE t")
            with pytest.raises(asyncpg.UniqueViolationError):
                await bulk.insert_values(conn, "t", bad, rows_per_statement=100, atomic=atomic)
            counts.append(await bulk.count_rows(conn, "t"))
        await conn.execute("TRUNCATE t")
        with pytest.raises(asyncpg.UniqueViolationError):
            await bulk.insert_executemany(conn, "t", bad)  # atomic since asyncpg 0.22
        counts.append(await bulk.count_rows(conn, "t"))
        return counts

    assert in_schema(target, scenario) == [0, 600, 0]


def test_psql_copy_keeps_the_password_off_the_command_line(
        target: Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert bulk.psql_binary().name == "psql"
    spawned: list[tuple[tuple[str, ...], dict[str, str]]] = []
    real_exec = asyncio.create_subprocess_exec

    async def recording_exec(*args, **kwargs):  # the real psql runs; only its arguments are kept
        spawned.append((tuple(map(str, args)), dict(kwargs.get("env") or {})))
        return await real_exec(*args, **kwargs)

    monkeypatch.setattr(asyncio, "create_subprocess_exec", recording_exec)
    rows = bulk.read_users(2000)
    csv_path = tmp_path / "users.csv"
    assert bulk.write_csv(csv_path, rows) > 0
    assert bulk.read_users(path=csv_path) == rows

    async def scenario(conn: asyncpg.Connection, schema: str):
        await bulk.create_users_table(conn, "t")
        result = await bulk.psql_copy(target.url, "t", csv_path, schema=schema)
        await bulk.create_users_table(conn, "other")
        # without a schema, PsqlCopy uses the connection's current schema
        seconds = await bulk.PsqlCopy(target, csv_path)(conn, "other", rows)
        with pytest.raises(RuntimeError, match="psql"):
            await bulk.psql_copy(target.url, "missing", csv_path, schema=schema)
        return result, seconds, await bulk.count_rows(conn, "t"), await bulk.count_rows(conn, "other")

    result, seconds, loaded, other = in_schema(target, scenario)
    assert result.rows == loaded == other == 2000
    assert 0 < result.seconds <= result.wall_seconds
    assert seconds > 0
    assert len(spawned) == 3
    for args, env in spawned:
        assert not any(target.url in a or "postgresql://" in a or "-d" == a for a in args), args
        if target.password:
            assert not any(target.password in a for a in args)
            assert env["PGPASSWORD"] == target.password
        assert (env["PGHOST"], env["PGPORT"]) == (target.host, str(target.port))


def test_compare_inserts_times_every_method_and_checks_counts(target: Target,
                                                               tmp_path: Path) -> None:
    rows = bulk.read_users(3000)
    csv_path = tmp_path / "users.csv"
    bulk.write_csv(csv_path, rows)

    async def scenario(conn: asyncpg.Connection, schema: str):
        methods = {"loop": (bulk.insert_row_loop_transaction, rows[:200]),
                   "copy": (bulk.insert_copy, rows),
                   "psql \\copy": (bulk.PsqlCopy(target.url, csv_path), rows)}
        return await bulk.compare_inserts(conn, methods, repeats=2)

    timings = in_schema(target, scenario)
    assert list(timings.columns) == ["method", "repeat", "rows", "seconds", "rows_per_s"]
    assert len(timings) == 6
    rates = bulk.median_rates(timings)
    assert list(rates) == ["loop", "copy", "psql \\copy"]
    assert rates["copy"] > rates["loop"]  # many times faster; any margin holds


def test_compare_inserts_quotes_before_the_clock_starts(target: Target) -> None:
    rows = bulk.read_users(100)
    seen: list[tuple[str, list[str]]] = []

    async def watched(conn: asyncpg.Connection, table: str, rows, *, schema=None) -> None:
        sent: list[str] = []

        def log(query: asyncpg.connection.LoggedQuery) -> None:
            sent.append(query.query)

        conn.add_query_logger(log)
        try:
            await bulk.insert_executemany(conn, table, rows, schema=schema)
            await bulk.insert_unnest(conn, table, [], schema=schema)
            await asyncio.sleep(0.01)  # loggers are called soon after the query
        finally:
            conn.remove_query_logger(log)
        seen.append((type(table).__name__, sent))

    async def scenario(conn: asyncpg.Connection, schema: str):
        return await bulk.compare_inserts(conn, {"watched": (watched, rows)}, repeats=2,
                                          schema=schema)

    timings = in_schema(target, scenario)
    assert len(timings) == 2 and len(seen) == 2
    for kind, sent in seen:
        assert kind == "QuotedTable"
        assert not any("format(" in q for q in sent), sent  # no quoting round trip while timed
        assert sum(q.startswith("INSERT INTO") for q in sent) == 2  # (and type introspection)


def test_compare_inserts_notices_a_method_that_loses_rows(target: Target) -> None:
    rows = bulk.read_users(10)

    async def half(conn: asyncpg.Connection, table: str, rows, *, schema=None) -> None:
        await bulk.insert_copy(conn, table, rows[:5], schema=schema)

    with pytest.raises(AssertionError, match="5 rows in the table, 10 expected"):
        in_schema(target, lambda conn, _s: bulk.compare_inserts(conn, {"half": (half, rows)},
                                                                repeats=1))


def test_generated_csv_streams_with_flat_memory(target: Target, tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    size = bulk.generate_users_csv(path, 100_000)
    assert size == path.stat().st_size and bulk.file_size_mb(path) > 4
    first = next(bulk.iter_csv_records(path))
    assert first == next(bulk.synthetic_users(1)) and first[0] == 1
    assert sum(1 for _ in bulk.iter_csv_records(path)) == 100_000

    async def scenario(conn: asyncpg.Connection, schema: str):
        await bulk.create_users_table(conn, "big", primary_key=False, unlogged=True)
        peaks = {}
        for loader in (bulk.copy_csv_file, bulk.copy_csv_records, bulk.copy_csv_in_memory):
            await conn.execute("TRUNCATE big")
            peaks[loader.__name__] = await bulk.peak_memory(
                lambda loader=loader: loader(conn, "big", path))
            assert await bulk.count_rows(conn, "big") == 100_000
        return peaks

    peaks = in_schema(target, scenario)
    assert all(p.result == 100_000 and p.seconds > 0 for p in peaks.values())
    streamed = max(peaks["copy_csv_file"].peak_bytes, peaks["copy_csv_records"].peak_bytes)
    # 100k rows held as tuples need about 26 MB; streaming stays within a few MB.
    assert peaks["copy_csv_in_memory"].peak_bytes > 3 * max(streamed, 2_000_000)


def test_fsync_ms_measures_a_flush(tmp_path: Path) -> None:
    ms = bulk.fsync_ms(tmp_path, flushes=5)
    assert 0 < ms < 1000
    assert list(tmp_path.iterdir()) == [], "the probe file is removed"


def test_peak_memory_sees_an_allocation() -> None:
    async def allocate() -> int:
        block = [str(i) for i in range(300_000)]  # about 20 MB of small objects
        await asyncio.sleep(0)
        return len(block)

    peak = run(bulk.peak_memory(allocate))
    assert peak.result == 300_000
    assert peak.peak_mb > 10, peak
    assert peak.how in ("RSS high-water mark", "sampled RSS", "tracemalloc")


@pytest.mark.parametrize("how", ["hwm", "sampled", "tracemalloc"])
def test_every_way_of_measuring_memory_sees_a_big_list_and_not_a_small_one(how: str) -> None:
    if how == "hwm" and not bulk._reset_rss_peak():
        pytest.skip("the RSS high-water mark can be reset on Linux only")
    if how == "sampled":
        pytest.importorskip("psutil")

    async def allocate(n: int) -> int:
        block = [str(i) * 3 for i in range(n)]
        await asyncio.sleep(0.01)  # long enough for the sampler to see it
        return len(block)

    big = run(bulk.peak_memory(lambda: allocate(250_000), how=how))
    small = run(bulk.peak_memory(lambda: allocate(1_000), how=how))
    assert big.peak_mb > 10 and big.peak_mb > 5 * small.peak_mb, (big, small)
    with pytest.raises(ValueError):
        run(bulk.peak_memory(lambda: allocate(1), how="guess"))
