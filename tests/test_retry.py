"""The retry helper, against a real serialization failure."""

from __future__ import annotations

import asyncio
import random

import asyncpg
import pytest

from helpers.lesson import start_lesson
from helpers.retry import RetriesExhausted, backoff_delays, retry
from tests.conftest import run


def test_backoff_grows_and_is_capped() -> None:
    delays = backoff_delays(8, base=0.01, cap=0.1, rng=random.Random(1))
    assert len(delays) == 7
    assert all(0 <= d <= min(0.1, 0.01 * 2**n) for n, d in enumerate(delays))


def test_gives_up_with_every_error_listed() -> None:
    async def always_fails():
        raise asyncpg.SerializationError("could not serialize access")

    with pytest.raises(RetriesExhausted) as info:
        run(retry(always_fails, attempts=3, base_delay=0.001))
    assert info.value.errors == ["SerializationError"] * 3


def test_other_errors_are_not_retried() -> None:
    calls = 0

    async def wrong():
        nonlocal calls
        calls += 1
        raise ValueError("a bug, not a race")

    with pytest.raises(ValueError):
        run(retry(wrong))
    assert calls == 1


def test_real_serialization_failure_is_retried(target) -> None:
    """Two SERIALIZABLE transactions that read then write the same row: one fails with 40001,
    and running it again succeeds."""
    async def scenario():
        lesson = await start_lesson("90-retry", min_size=2, max_size=2)
        try:
            await lesson.pool.execute("CREATE TABLE counter (n int); INSERT INTO counter VALUES (0)")
            both_read = asyncio.Barrier(2)
            tries = [0, 0]

            def increment(task: int):
                async def work():
                    tries[task] += 1
                    async with lesson.pool.acquire() as conn:
                        async with conn.transaction(isolation="serializable"):
                            n = await conn.fetchval("SELECT n FROM counter")
                            if tries[task] == 1:  # only the first attempts collide
                                await both_read.wait()
                            await conn.execute("UPDATE counter SET n = $1", n + 1)
                    return n + 1
                return work

            outcomes = await asyncio.wait_for(
                asyncio.gather(retry(increment(0)), retry(increment(1))), 30)
            total = await lesson.pool.fetchval("SELECT n FROM counter")
            return outcomes, total
        finally:
            await lesson.close()

    outcomes, total = run(scenario())
    assert total == 2, "no lost update"
    assert sorted(o.attempts for o in outcomes)[-1] >= 2, "one of them had to retry"
    assert "SerializationError" in sum((o.errors for o in outcomes), [])
