"""The retry helper, against a real serialization failure and real lost connections: which
errors are worth a retry, budgets and deadlines."""

from __future__ import annotations

import asyncio
import random

import asyncpg
import pytest

from helpers.lesson import start_lesson
from helpers.retry import (
    CONNECTION_LOST,
    RetriesExhausted,
    RetryBudget,
    backoff_delays,
    is_connection_lost,
    retry,
)
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


def test_what_counts_as_a_lost_connection() -> None:
    lost = [asyncpg.ConnectionDoesNotExistError("closed in the middle of operation"),
            asyncpg.CannotConnectNowError("the database system is shutting down"),
            asyncpg.AdminShutdownError("terminating connection"), ConnectionRefusedError(),
            ConnectionResetError(), ConnectionError("unexpected connection_lost() call"),
            asyncpg.InternalClientError(
                "cannot switch to state 15; another operation (2) is in progress")]
    not_lost = [TimeoutError(), OSError("bad address"),
                asyncpg.InterfaceError("pool is closing"),
                asyncpg.InterfaceError("cannot perform operation: another operation is in "
                                       "progress"),
                asyncpg.InternalClientError("cannot switch to state 12; another operation (11) "
                                            "is in progress"),
                asyncpg.InternalClientError("PoolConnectionHolder.release() called on a free "
                                            "connection holder"),
                asyncpg.ProtocolViolationError("bind message supplies 2 parameters"),
                asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
                asyncpg.SerializationError("could not serialize access")]
    assert all(is_connection_lost(e) for e in lost)
    assert not any(is_connection_lost(e) for e in not_lost)
    assert TimeoutError not in CONNECTION_LOST and not issubclass(TimeoutError, CONNECTION_LOST)
    assert issubclass(TimeoutError, OSError)  # why OSError must never be in the list


def test_a_real_kill_raises_only_lost_connection_errors(target) -> None:
    """Kill a pooled connection's backend and use the pool at once: what asyncpg raises is
    recognised, including the InternalClientError of a goodbye read on an idle connection (if
    an asyncpg upgrade changes that message, this test says so)."""
    async def scenario():
        seen: dict[str, str] = {}
        admin = await asyncpg.connect(target.url)
        async with asyncpg.create_pool(target.url, min_size=1, max_size=1) as pool:
            try:
                for _ in range(200):
                    pid = await pool.fetchval("SELECT pg_backend_pid()")
                    await admin.execute("SELECT pg_terminate_backend($1)", pid)
                    try:
                        await pool.fetchval("SELECT 1")
                    except Exception as exc:  # classified below
                        seen.setdefault(type(exc).__name__, str(exc))
                        assert is_connection_lost(exc), repr(exc)
                    if "InternalClientError" in seen and "ConnectionDoesNotExistError" in seen:
                        break
                    await asyncio.sleep(0.005)
            finally:
                await admin.close()
        return seen

    seen = run(scenario())
    assert "InternalClientError" in seen, f"the race never showed asyncpg's message: {seen}"
    assert seen["InternalClientError"].endswith("another operation (2) is in progress")


def test_retry_if_decides_and_other_errors_propagate() -> None:
    calls = []

    async def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "done"

    outcome = run(retry(flaky, retry_if=is_connection_lost, base_delay=0.001))
    assert outcome.value == "done" and outcome.attempts == 3
    assert outcome.errors == ["ConnectionResetError"] * 2

    async def timing_out():
        calls.append(1)
        raise TimeoutError

    calls.clear()
    with pytest.raises(TimeoutError):
        run(retry(timing_out, retry_if=is_connection_lost))
    assert len(calls) == 1, "a timeout is not retried"


def test_deadline_and_budget_stop_retries() -> None:
    async def down():
        raise ConnectionRefusedError

    with pytest.raises(RetriesExhausted) as info:
        run(retry(down, retry_if=is_connection_lost, attempts=100, base_delay=0.02,
                  max_delay=0.02, deadline_s=0.05, rng=random.Random(3)))
    assert info.value.reason == "deadline" and info.value.attempts < 100

    budget = RetryBudget(ratio=0.5, reserve=2, cap=3)
    assert budget.balance == 2
    tries = []

    async def down_counted():
        tries.append(1)
        raise ConnectionRefusedError

    for _ in range(4):
        with pytest.raises(RetriesExhausted):
            run(retry(down_counted, retry_if=is_connection_lost, attempts=5, base_delay=0.0,
                      budget=budget))
    assert len(tries) == 4 + 2 and budget.spent == 2 and budget.refused == 4

    async def ok():
        return 1

    for _ in range(10):
        run(retry(ok, budget=budget))
    assert budget.balance == 3  # deposits of 0.5 per success, capped
    assert budget.withdraw() and budget.balance == 2
    with pytest.raises(ValueError):
        RetryBudget(ratio=-1)
