"""PgBouncer and the application processes of notebook 07, against real servers: finding the
binary, starting and stopping it, transaction pooling, the prepared-statement behaviour of old and
new versions, the admin console, cleanup of left-overs, and the multiprocess app fleet."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import time
from pathlib import Path

import asyncpg
import pandas as pd
import pytest

from helpers._infra.errors import CourseError
from helpers._infra.pgbouncer import (
    HOW_TO_GET,
    Binary,
    PgBouncer,
    PgBouncerMissing,
    binary_version,
    build_dir,
    find_pgbouncer,
    reap_stale,
    start_pgbouncer,
)
from helpers._infra.server import EmbeddedServer, accepts
from helpers._infra.settings import settings
from helpers._infra.tools import load_tool
from helpers.db import Target
from helpers.load import LoadResult
from helpers.scaling_out import (
    AppFleet,
    FleetError,
    FleetRun,
    pgbouncer_for,
    start_fleet,
)
from tests.conftest import helpers_cli, run


@pytest.fixture(scope="module")
def binary() -> Binary:
    """The pgbouncer the course uses; CI always has one (.ci/run installs it)."""
    try:
        return find_pgbouncer()
    except PgBouncerMissing:
        if os.environ.get("CI"):
            raise
        pytest.skip("no pgbouncer here; `python -m helpers pgbouncer install` builds one")


def all_binaries(found: Binary) -> list[Binary]:
    """The course's binary plus the system's when it is another version (Debian 12: 1.18)."""
    found_list = [found]
    system = Path("/usr/sbin/pgbouncer")
    if system.exists() and binary_version(system) != found.version:
        found_list.append(Binary(system, "PATH", binary_version(system)))
    return found_list


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """A throw-away PostgreSQL (so the shared server's slots are never at stake)."""
    srv = EmbeddedServer(tmp_path_factory.mktemp("pg") / "pg", settings={"max_connections": "40"})
    srv.start()
    yield srv
    srv.stop()


async def _count(url: str, role: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
                                   role)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def app_url(server: EmbeddedServer) -> str:
    """A non-superuser role on the throw-away server, as an application would log in."""

    async def create() -> None:
        conn = await asyncpg.connect(server.url())
        try:
            await conn.execute("DROP ROLE IF EXISTS app_test")
            await conn.execute("CREATE ROLE app_test LOGIN PASSWORD 'not-a-real-password-1'")
        finally:
            await conn.close()

    run(create())
    return Target(server.url(), "test").replace(user="app_test", password="not-a-real-password-1").url


def test_binary_is_found_and_described(binary: Binary) -> None:
    assert binary.version >= (1, 0, 0)
    assert binary.describe().startswith(f"PgBouncer {binary.version_text} (")
    assert "/" not in binary.describe(), "no local paths in what notebooks print"
    assert binary.tracks_prepared_statements == (binary.version >= (1, 21, 0))


def test_missing_binary_says_how_to_get_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGBOUNCER_BIN", "/nonexistent/pgbouncer")
    with pytest.raises(PgBouncerMissing, match="PGBOUNCER_BIN"):
        find_pgbouncer()
    for way in ("apt-get install pgbouncer", "python -m helpers pgbouncer install",
                "brew install pgbouncer", "PGBOUNCER_BIN"):
        assert way in HOW_TO_GET


def test_anything_but_a_working_pgbouncer_is_missing_not_an_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """PGBOUNCER_BIN set but useless: the notebook path (pgbouncer_for, the capability probe)
    sees "no PgBouncer", so 07's %%needs cells skip instead of failing."""
    not_executable = tmp_path / "plain-file"
    not_executable.write_text("not a program\n")
    silent = tmp_path / "silent"
    silent.write_text("#!/bin/sh\necho hello\n")
    silent.chmod(0o755)
    slow = tmp_path / "slow"
    slow.write_text("#!/bin/sh\nsleep 5\n")
    slow.chmod(0o755)
    for path in ("/nonexistent", not_executable, silent):
        monkeypatch.setenv("PGBOUNCER_BIN", str(path))
        settings.cache_clear()
        with pytest.raises(PgBouncerMissing):
            find_pgbouncer()
        assert pgbouncer_for() is None
        out = capsys.readouterr().out
        assert "none usable here" in out and "apt-get install pgbouncer" in out
    with pytest.raises(PgBouncerMissing, match="did not answer"):
        binary_version(slow, timeout=0.5)


def test_fleet_percentile_is_the_courses_definition() -> None:
    """One percentile for the course: pandas' interpolated quantile, as in LoadResult."""
    latencies = [float(x) for x in (7, 1, 3, 10, 2, 8, 4, 9, 5, 6, 100)]
    run = FleetRun("x", 1, 1, 1, [{"ok": 11, "errors": {}, "messages": {}, "window_s": 1.0,
                                   "latencies_ms": latencies}])
    load = LoadResult("x", 1, 1.0, pd.DataFrame({"latency_ms": latencies, "ok": True}))
    for q in (0, 50, 90, 99, 100):
        assert run.percentile(q) == pytest.approx(load.percentile(q))
    assert run.percentile(99) == pytest.approx(91.0)  # interpolated, not a nearest rank
    assert math.isnan(FleetRun("x", 1, 1, 0, []).percentile(50))


def test_cli_check(binary: Binary) -> None:
    out = helpers_cli("pgbouncer", "check")
    assert out.returncode == 0, out.stderr
    assert f"PgBouncer {binary.version_text}" in out.stdout
    bad = helpers_cli("pgbouncer", "check", env={"PGBOUNCER_BIN": "/nonexistent/pgbouncer"})
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "PGBOUNCER_BIN" in bad.stderr


def test_install_reuses_an_existing_build() -> None:
    if not (build_dir() / "bin" / "pgbouncer").exists():
        pytest.skip("no course build here (`python -m helpers pgbouncer install` makes one)")
    said: list[str] = []
    t0 = time.perf_counter()
    built = load_tool("build_pgbouncer").install(say=said.append)
    assert time.perf_counter() - t0 < 5 and "already built" in said[0]
    assert built.origin == "course build" and built.tracks_prepared_statements


def test_transaction_pooling_start_stop(binary: Binary, app_url: str,
                                        server: EmbeddedServer) -> None:
    async def scenario() -> None:
        bouncer = await start_pgbouncer(app_url, default_pool_size=2, binary=binary)
        try:
            assert accepts(bouncer.port)
            assert (bouncer.home / "users.txt").stat().st_mode & 0o077 == 0, "auth file private"
            clients = [await asyncpg.connect(bouncer.url, statement_cache_size=0)
                       for _ in range(10)]
            values = await asyncio.gather(*(c.fetchval("SELECT $1::int FROM pg_sleep(0.01)", i)
                                            for i, c in enumerate(clients)))
            assert values == list(range(10))
            assert 1 <= await _count(server.url(), "app_test") <= 2
            pools = await bouncer.show("POOLS")
            assert len(pools) == 1 and pools.loc[0, "cl_active"] == 10
            assert pools.loc[0, "pool_mode"] == "transaction"
            stats = await bouncer.show("STATS")
            assert stats.loc[0, "total_xact_count"] >= 10
            for c in clients:
                await c.close()
        finally:
            await asyncio.to_thread(bouncer.stop)
        assert not bouncer.running and not bouncer.home.exists() and not accepts(bouncer.port)
        bouncer.stop()  # idempotent

    run(scenario())


def test_prepared_statements_old_and_new(binary: Binary, app_url: str) -> None:
    """asyncpg's statement cache breaks without tracking and works with it (1.21+)."""

    async def two_clients(bouncer: PgBouncer) -> None:
        first = await asyncpg.connect(bouncer.url)
        second = await asyncpg.connect(bouncer.url)
        try:
            await first.fetchval("SELECT $1::int", 1)
            async with second.transaction():
                await second.fetchval("SELECT 1")
                await first.fetchval("SELECT $1::int", 2)  # on another server connection
        finally:
            await first.close()
            await second.close()

    for candidate in all_binaries(binary):
        old = PgBouncer(app_url, default_pool_size=4, max_prepared_statements=0,
                        binary=candidate).start()
        try:
            with pytest.raises(asyncpg.InvalidSQLStatementNameError):
                run(two_clients(old))
        finally:
            old.stop()
        if candidate.tracks_prepared_statements:
            with PgBouncerRunning(app_url, candidate, max_prepared_statements=100) as new:
                run(two_clients(new))  # no error
        else:
            with pytest.raises(CourseError, match="max_prepared_statements"):
                PgBouncer(app_url, max_prepared_statements=100, binary=candidate)


def test_max_prepared_statements_is_what_pgbouncer_reports(binary: Binary, app_url: str) -> None:
    """The effective setting the notebooks print (``describe()``) is PgBouncer's own, read back
    with ``SHOW CONFIG``: the course's default (200 on every 1.21+, whose own default is 0 before
    1.24) and explicit values."""

    async def reported(bouncer: PgBouncer) -> int:
        config = await bouncer.show("CONFIG")
        row = config.loc[config["key"] == "max_prepared_statements"]
        return int(row["value"].iloc[0]) if len(row) else 0  # no such setting before 1.21

    for candidate in all_binaries(binary):
        explicit = [None, 0, 100] if candidate.tracks_prepared_statements else [None]
        for setting in explicit:
            with PgBouncerRunning(app_url, candidate, max_prepared_statements=setting) as bouncer:
                assert run(reported(bouncer)) == bouncer.max_prepared_statements, (
                    candidate.describe(), setting)


class PgBouncerRunning:
    """``with PgBouncerRunning(url, binary, **settings) as bouncer:`` for synchronous tests."""

    def __init__(self, url: str, binary: Binary, **options) -> None:
        self.bouncer = PgBouncer(url, binary=binary, **options)

    def __enter__(self) -> PgBouncer:
        return self.bouncer.start()

    def __exit__(self, *exc: object) -> None:
        self.bouncer.stop()


def test_admin_console_needs_the_simple_protocol(binary: Binary, app_url: str) -> None:
    async def scenario(bouncer: PgBouncer) -> None:
        conn = await asyncpg.connect(bouncer.admin_url, statement_cache_size=0)
        try:
            with pytest.raises(asyncpg.ProtocolViolationError, match="extended query protocol"):
                await conn.fetch("SHOW POOLS")
        finally:
            conn.terminate()
        async with bouncer.console() as console:
            version = await console.admin("SHOW VERSION")
            assert binary.version_text in str(version[0])
            assert (await console.admin("RELOAD")) == []

    with PgBouncerRunning(app_url, binary) as bouncer:
        run(scenario(bouncer))


def test_startup_parameters_pgbouncer_does_not_track(binary: Binary, app_url: str) -> None:
    async def scenario(bouncer: PgBouncer) -> None:
        with pytest.raises(asyncpg.ProtocolViolationError, match="unsupported startup parameter"):
            await asyncpg.connect(bouncer.url, server_settings={"search_path": "public"})
        conn = await asyncpg.connect(bouncer.url, server_settings={"application_name": "x"})
        assert await conn.fetchval("SHOW application_name") == "x"
        await conn.close()

    with PgBouncerRunning(app_url, binary) as bouncer:
        run(scenario(bouncer))


def test_left_over_pgbouncer_is_reaped(binary: Binary, app_url: str) -> None:
    bouncer = PgBouncer(app_url, binary=binary).start()
    pid = bouncer._proc.pid
    dead = subprocess.Popen(["true"])
    dead.wait()
    state = bouncer.home / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "owner": dead.pid}))
    try:
        assert reap_stale() >= 1
        bouncer._proc.wait(5)
        assert not bouncer.home.exists() and not Path(f"/proc/{pid}").exists()
    finally:
        bouncer.stop()


def test_bad_settings_fail_with_the_log_line(binary: Binary, app_url: str) -> None:
    with pytest.raises(CourseError, match="did not start"):
        PgBouncer(app_url, binary=binary, pool_mode="nonsense").start()


def test_fleet_of_processes(app_url: str, server: EmbeddedServer) -> None:
    async def scenario() -> None:
        fleet = await AppFleet(2).start()
        try:
            assert len(set(fleet.pids)) == 2 and os.getpid() not in fleet.pids
            infos = await fleet.open_pools(app_url, min_size=3, max_size=3)
            assert [i["size"] for i in infos] == [3, 3]
            result = await fleet.run("SELECT $1::int", concurrency=4, duration_s=0.3, arg_max=10,
                                     watch=lambda: _count(server.url(), "app_test"))
            assert result.ok > 0 and result.errors == {} and result.client_connections == 6
            assert result.server_peak == 6 and result.rps > 0
            assert result.summary()["processes"] == 2
            await fleet.close_pools()
            assert await _count(server.url(), "app_test") == 0
            wrong = Target(app_url, "test").replace(password="wrong-password").url
            with pytest.raises(FleetError, match="InvalidPasswordError") as failure:
                await fleet.open_pools(wrong, min_size=1, max_size=1)
            assert "wrong-password" not in str(failure.value)
        finally:
            await fleet.aclose()
        assert fleet.alive == 0

    run(scenario())


def test_noop_reset_halves_the_transactions_behind_pgbouncer(binary: Binary,
                                                                app_url: str) -> None:
    """asyncpg's reset on release is a second transaction per request in transaction mode;
    reset="noop" in the processes' pools removes it (measured from SHOW STATS)."""
    extra = {} if binary.tracks_prepared_statements else {"statement_cache_size": 0}

    async def scenario(bouncer: PgBouncer) -> dict[str, float]:
        fleet = await AppFleet(1).start()
        try:
            with pytest.raises(ValueError, match="reset"):
                await fleet.open_pools(bouncer.url, reset="none")
            per_request = {}
            for reset in (None, "noop"):
                await fleet.open_pools(bouncer.url, min_size=2, max_size=2, reset=reset, **extra)
                before = (await bouncer.show("STATS")).iloc[0]
                result = await fleet.run("SELECT $1::int", concurrency=2, duration_s=0.3,
                                         arg_max=10)
                after = (await bouncer.show("STATS")).iloc[0]
                assert result.errors == {} and result.ok > 20
                per_request[str(reset)] = (after["total_xact_count"]
                                           - before["total_xact_count"]) / result.ok
            return per_request
        finally:
            await fleet.aclose()

    with PgBouncerRunning(app_url, binary, default_pool_size=2) as bouncer:
        per_request = run(scenario(bouncer))
    assert per_request["None"] == pytest.approx(2.0, abs=0.1)
    assert per_request["noop"] == pytest.approx(1.0, abs=0.1)


def test_lesson_close_stops_pgbouncer_and_processes(binary: Binary, target) -> None:
    if target.embedded is None:
        pytest.skip("needs a server URL with a password (the embedded one)")

    async def scenario() -> None:
        from helpers.lesson import start_lesson

        lesson = await start_lesson("97-pgbouncer-test", pool=False)
        fleet = await start_fleet(1, lesson=lesson)
        bouncer = await start_pgbouncer(lesson.dsn, lesson=lesson, binary=binary)
        await fleet.open_pools(bouncer.url, min_size=1, max_size=2, statement_cache_size=0)
        await lesson.close()
        assert not bouncer.running and not bouncer.home.exists() and fleet.alive == 0

    run(scenario())
