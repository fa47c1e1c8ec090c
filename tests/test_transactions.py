"""The step-by-step schedule runner and the loop-message collector, against the real server."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pandas as pd

from helpers.lesson import Lesson, start_lesson
from helpers.transactions import (
    COMMIT,
    ROLLBACK,
    format_schedule,
    loop_exception_messages,
    run_schedule,
    step_results,
)
from tests.conftest import run

READ = "SELECT balance FROM accounts WHERE id = $1"
SET_BALANCE = "UPDATE accounts SET balance = $2 WHERE id = $1"
DEBIT = "UPDATE accounts SET balance = balance - $2 WHERE id = $1"

LOST_UPDATE = [
    ("A", READ, 1),
    ("B", READ, 1),
    ("A", SET_BALANCE, 1, 110),
    ("B", SET_BALANCE, 1, 120),
    ("A", COMMIT),
    ("B", COMMIT),
]


def in_lesson(scenario: Callable[[Lesson], Awaitable[Any]]) -> Any:
    """Run ``scenario(lesson)`` with two accounts of 100 in a fresh lesson schema."""
    async def main() -> Any:
        lesson = await start_lesson("91-transactions", min_size=3, max_size=5)
        try:
            await lesson.pool.execute(
                "CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL "
                "CHECK (balance >= 0)); INSERT INTO accounts VALUES (1, 100), (2, 100)")
            return await scenario(lesson)
        finally:
            await lesson.close()
    return run(main())


def test_read_committed_sees_a_commit_that_repeatable_read_does_not() -> None:
    steps = [("A", READ, 1), ("B", DEBIT, 1, 30), ("B", COMMIT), ("A", READ, 1), ("A", COMMIT)]

    async def scenario(lesson: Lesson) -> dict[str, dict[int, Any]]:
        out = {}
        for level in ("read_committed", "repeatable_read"):
            await lesson.pool.execute("UPDATE accounts SET balance = 100")
            out[level] = step_results(await run_schedule(lesson.pool, steps, isolation=level))
        return out

    out = in_lesson(scenario)
    assert out["read_committed"] == {1: 100, 2: "UPDATE 1", 3: COMMIT, 4: 70, 5: COMMIT}
    assert out["repeatable_read"][4] == 100


def test_a_step_that_waits_for_a_lock_is_noted_and_resumes() -> None:
    async def scenario(lesson: Lesson) -> tuple[pd.DataFrame, int]:
        trace = await run_schedule(lesson.pool, LOST_UPDATE, isolation="read_committed")
        return trace, await lesson.pool.fetchval(READ, 1)

    trace, final = in_lesson(scenario)
    blocked = trace.set_index("step").loc[4]
    assert (blocked["waited_for"], blocked["resumed_after"], blocked["result"]) == \
        ("A", 5, "UPDATE 1")
    assert final == 120, "the lost update happened"
    assert list(trace.columns) == ["step", "session", "statement", "args", "result", "error",
                                   "waited_for", "resumed_after"]


def test_an_error_rolls_the_session_back_and_skips_its_later_steps() -> None:
    async def scenario(lesson: Lesson) -> tuple[pd.DataFrame, int, list[str], int, int]:
        with loop_exception_messages() as messages:
            trace = await run_schedule(lesson.pool, LOST_UPDATE, isolation="repeatable_read")
        final = await lesson.pool.fetchval(READ, 1)
        in_tx = 0
        for _ in range(lesson.pool.get_size()):
            async with lesson.pool.acquire() as conn:
                in_tx += conn.is_in_transaction()
        return trace, final, messages, lesson.pool.get_idle_size(), in_tx

    trace, final, messages, idle, in_tx = in_lesson(scenario)
    results = step_results(trace)
    assert results[4] == "SerializationError" and results[6] == "skipped"
    assert "could not serialize" in trace.set_index("step").loc[4, "error"]
    assert final == 110
    assert messages == [], "every session ended its transaction before release"
    assert in_tx == 0 and idle >= 3


def test_per_session_isolation_readonly_and_rollback() -> None:
    steps = [("A", "SHOW transaction_isolation"), ("A", "SHOW transaction_read_only"),
             ("B", "SHOW transaction_isolation"), ("B", DEBIT, 2, 100), ("B", ROLLBACK),
             ("A", DEBIT, 2, 1), ("A", COMMIT)]

    async def scenario(lesson: Lesson) -> tuple[dict[int, Any], int]:
        trace = await run_schedule(lesson.pool, steps,
                                   isolation={"A": "serializable", "B": None}, readonly={"A"})
        return step_results(trace), await lesson.pool.fetchval(READ, 2)

    results, balance = in_lesson(scenario)
    assert results[1] == "serializable" and results[2] == "on"
    assert results[3] == "read committed" and results[5] == ROLLBACK
    assert results[6] == "ReadOnlySQLTransactionError" and results[7] == "skipped"
    assert balance == 100


def test_format_schedule_is_deterministic_text() -> None:
    async def scenario(lesson: Lesson) -> pd.DataFrame:
        return await run_schedule(lesson.pool, LOST_UPDATE, isolation="read_committed")

    text = format_schedule(in_lesson(scenario))
    lines = text.splitlines()
    assert len(lines) == 7  # six steps, one continuation line for the wait
    assert lines[0].startswith(" 1  A  SELECT balance") and lines[0].endswith("-> 100")
    assert "($1=1, $2=120)" in lines[3] and lines[3].endswith("-> waits for A")
    assert lines[4].strip() == "... after step 5: UPDATE 1"
    assert "0x" not in text and "pid" not in text


def test_loop_exception_messages_collects_a_release_mid_transaction() -> None:
    async def scenario(lesson: Lesson) -> tuple[list[str], int]:
        with loop_exception_messages() as messages:
            async with lesson.pool.acquire() as conn:
                await conn.execute("BEGIN")
                await conn.execute(DEBIT, 1, 50)
        return messages, await lesson.pool.fetchval(READ, 1)

    messages, balance = in_lesson(scenario)
    assert messages == ["Resetting connection with an active transaction "
                        "<asyncpg.connection.Connection object>"]
    assert balance == 100, "released mid-transaction: rolled back, never committed"


def test_lock_timeout_nowait_and_skip_locked_in_a_schedule() -> None:
    lock_one = "SELECT id FROM accounts WHERE id = 1 FOR UPDATE"
    steps = [("A", lock_one),
             ("B", "SET LOCAL lock_timeout = '100ms'"), ("B", DEBIT, 1, 10), ("B", COMMIT),
             ("C", lock_one + " NOWAIT"),
             ("D", "SELECT id FROM accounts ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED"),
             ("A", COMMIT), ("D", COMMIT)]

    async def scenario(lesson: Lesson) -> tuple[pd.DataFrame, int]:
        trace = await run_schedule(lesson.pool, steps, step_timeout=5.0)
        return trace, await lesson.pool.fetchval(READ, 1)

    trace, balance = in_lesson(scenario)
    rows = trace.set_index("step")
    assert (rows.loc[3, "waited_for"], rows.loc[3, "resumed_after"]) == ("A", 3)
    assert rows.loc[3, "result"] == "LockNotAvailableError"
    assert "lock timeout" in rows.loc[3, "error"]
    assert rows.loc[4, "result"] == "skipped"
    assert rows.loc[5, "result"] == "LockNotAvailableError"
    assert "could not obtain lock" in rows.loc[5, "error"] and rows.loc[5, "waited_for"] == ""
    assert rows.loc[6, "result"] == 2 and balance == 100, "B's debit never happened"
