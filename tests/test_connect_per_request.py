"""Connect-cost probes and fresh event loops, against the real server."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from helpers.connect_per_request import (
    LABELS,
    PHASES,
    ProbeError,
    _params,
    asyncpg_costs,
    phase_medians,
    probe_connect,
    profile_connects,
)
from helpers.load import run_in_new_loop
from tests.conftest import run


def test_probe_times_every_phase(target) -> None:
    ms = run(probe_connect(target.url))
    assert list(ms) == [*PHASES, "next_query"]
    assert all(v >= 0 for v in ms.values())
    for phase in ("tcp_connect", "startup", "auth_session", "first_query", "next_query", "close"):
        assert ms[phase] > 0, phase
    if target.source == "embedded":  # SCRAM and an SSLRequest (sslmode=prefer) by default
        assert ms["scram_hashing"] > 0 and ms["ssl_request"] > 0


def test_probe_without_ssl_request(target) -> None:
    ms = run(probe_connect(target.url, ssl_request=False))
    assert ms["ssl_request"] == 0 and ms["startup"] > 0


def test_probe_reports_a_refusal_with_its_sqlstate(target) -> None:
    parts = urlsplit(target.url)
    host = parts.netloc.rsplit("@", 1)[-1]
    wrong = urlunsplit(parts._replace(netloc=f"{parts.username}:not-the-password@{host}"))
    with pytest.raises(ProbeError) as caught:
        run(probe_connect(wrong))
    assert caught.value.sqlstate == "28P01"  # invalid_password


def test_url_parsing() -> None:
    p = _params("postgresql://u:not-a-real%40pw@db.example:6543/shop?sslmode=disable")
    assert (p.host, p.port, p.user, p.password, p.database, p.ssl_request) == (
        "db.example", 6543, "u", "not-a-real@pw", "shop", False)
    assert _params("postgresql://u:not-a-real-pw@h/d").ssl_request  # prefer, like asyncpg
    with pytest.raises(ValueError, match="Unix socket"):
        _params("postgresql://u@/d?host=/var/run/postgresql")


def test_profile_connects_and_medians(target) -> None:
    df = run(profile_connects(target.url, n=5))
    assert len(df) == 5
    assert {*PHASES, "next_query", "connect_total"} <= set(df.columns)
    assert (df["connect_total"] > df["next_query"]).all()
    medians = phase_medians(df)
    assert list(medians) == [LABELS[p] for p in PHASES if df[p].median() > 0]
    raw = phase_medians(df, labels=False)
    assert set(raw) <= set(PHASES)


def test_asyncpg_costs(target) -> None:
    df = run(asyncpg_costs(target.url, n=5))
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
