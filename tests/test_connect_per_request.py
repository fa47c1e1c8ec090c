"""Connect-cost probes, pooled-request timing and fresh event loops, against the real server
(01-connect-per-request): whatever authentication it uses (trust, md5, SCRAM)."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from helpers.connect_per_request import (
    LABELS,
    PHASES,
    ProbeError,
    _params,
    asyncpg_costs,
    labels,
    over_tcp,
    phase_medians,
    probe_connect,
    profile_connects,
    time_calls,
)
from helpers.db import Target
from helpers.load import run_in_new_loop
from tests.conftest import run


def test_probe_times_every_phase(target) -> None:
    probe = run(probe_connect(target))
    ms = probe.ms
    assert list(ms) == [*PHASES, "next_query"]
    assert all(v >= 0 for v in ms.values())
    for phase in ("tcp_connect", "startup", "first_query", "next_query", "close"):
        assert ms[phase] > 0, phase
    if probe.auth == "trust":  # no password: the session setup is in the startup phase
        assert ms["scram_hashing"] == 0 and ms["auth_session"] == 0
    else:
        assert ms["auth_session"] > 0
        assert (ms["scram_hashing"] > 0) == (probe.auth == "SCRAM-SHA-256")
    if target.source == "embedded":  # SCRAM and an SSLRequest (sslmode=prefer) by default
        assert probe.auth == "SCRAM-SHA-256"
        assert ms["scram_hashing"] > 0 and ms["ssl_request"] > 0


def test_probe_accepts_a_url_too(target) -> None:
    assert run(probe_connect(target.url)).ms["first_query"] > 0


def test_probe_without_ssl_request(target) -> None:
    ms = run(probe_connect(target, ssl_request=False)).ms
    assert ms["ssl_request"] == 0 and ms["startup"] > 0


def test_probe_reports_a_refusal_with_its_sqlstate(target) -> None:
    if run(probe_connect(target)).auth == "trust":
        pytest.skip("this server trusts the connection: it accepts any password")
    with pytest.raises(ProbeError) as caught:
        run(probe_connect(target.replace(password="not-the-password")))
    assert caught.value.sqlstate == "28P01"  # invalid_password


def test_url_parsing() -> None:
    p = _params(Target("postgresql://u:not-a-real%40pw@db.example:6543/shop?sslmode=disable",
                       "test"))
    assert (p.host, p.port, p.user, p.password, p.database, p.ssl_request) == (
        "db.example", 6543, "u", "not-a-real@pw", "shop", False)
    assert _params("postgresql://u:not-a-real-pw@h/d").ssl_request  # prefer, like asyncpg
    assert _params("postgresql://u@h").database == "u"  # libpq: the database is the user's
    socket = "postgresql://u@/d?host=/var/run/postgresql"
    assert over_tcp("postgresql://u@h/d") and not over_tcp(socket)
    with pytest.raises(ValueError, match="Unix socket"):
        _params(socket)


def test_labels_follow_the_authentication() -> None:
    assert labels("SCRAM-SHA-256") == LABELS
    assert labels("trust")["startup"] == "backend start + session setup"
    assert labels("md5")["auth_session"] == "md5 exchange + session setup"
    assert "SCRAM" not in labels("md5")["auth_session"] + labels("trust")["startup"]


def test_profile_connects_and_medians(target) -> None:
    df = run(profile_connects(target, n=5))
    assert len(df) == 5
    assert {*PHASES, "next_query", "connect_total", "auth"} <= set(df.columns)
    assert df["auth"].nunique() == 1
    assert (df["connect_total"] > df["next_query"]).all()
    names = labels(df["auth"].iloc[0])
    medians = phase_medians(df)
    assert list(medians) == [names[p] for p in PHASES if df[p].median() > 0]
    raw = phase_medians(df, labels=False)
    assert list(raw) == [p for p in PHASES if df[p].median() > 0]
    assert list(raw.values()) == list(medians.values())
    if df["auth"].iloc[0] != "SCRAM-SHA-256":  # no SCRAM bar where there is no SCRAM
        assert "scram_hashing" not in raw


def test_time_calls_interleaves_and_times_a_pooled_request(target) -> None:
    async def scenario():
        order: list[str] = []
        async with asyncpg.create_pool(target.url, min_size=1, max_size=1) as pool:
            conn = await asyncpg.connect(target.url)
            try:
                async def pooled():
                    order.append("pooled")
                    return await pool.fetchval("SELECT 1")

                async def alone():
                    order.append("alone")
                    return await conn.fetchval("SELECT 1")

                df = await time_calls({"pooled": pooled, "alone": alone}, n=30, warmup=2)
            finally:
                await conn.close()
        return df, order

    df, order = run(scenario())
    assert list(df.columns) == ["pooled", "alone"] and len(df) == 30
    assert (df > 0).all().all()
    assert order[4:8] == ["pooled", "alone", "pooled", "alone"]  # after 2 warm-up rounds
    assert len(order) == 2 * (30 + 2)


def test_asyncpg_costs(target) -> None:
    df = run(asyncpg_costs(target, n=5))
    assert list(df.columns) == ["connect_prefer", "connect_no_ssl", "first_query",
                                "next_query", "close", "terminate"]
    assert len(df) == 5 and (df >= 0).all().all()
    assert df["terminate"].median() < df["close"].median()  # terminate does not wait


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_run_in_new_loop(target, loop: str) -> None:
    async def job() -> tuple[str, int]:
        conn = await asyncpg.connect(target.url)
        try:
            value = await conn.fetchval("SELECT 41 + 1")
        finally:
            await conn.close()
        return type(asyncio.get_running_loop()).__module__, value

    async def scenario():
        outer = asyncio.get_running_loop()
        ticks = 0

        async def ticker() -> None:  # the calling loop keeps running meanwhile
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        task = outer.create_task(ticker())
        result = await run_in_new_loop(job, loop=loop)
        task.cancel()
        return result, ticks

    (module, value), ticks = run(scenario())
    assert value == 42 and ticks > 0
    assert module.startswith("uvloop") == (loop == "uvloop")


def test_run_in_new_loop_rejects_unknown_loops() -> None:
    async def job() -> None:
        return None

    with pytest.raises(ValueError, match="loop must be"):
        run(run_in_new_loop(job, loop="trio"))
