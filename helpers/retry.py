"""Retrying work that failed for a reason worth retrying, with exponential backoff and jitter.

Two lessons need it: serialization failures under ``SERIALIZABLE`` (notebook 03: the whole
transaction must run again) and dropped connections (notebook 06: only *idempotent* work may
be retried blindly; a retried ``INSERT`` whose first attempt did commit inserts twice).

The unit of retry is a zero-argument coroutine function that does the *whole* unit of work,
including acquiring a connection and opening the transaction: retrying a single statement
inside a failed transaction is never right.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import asyncpg

T = TypeVar("T")

#: SQLSTATE 40001 / 40P01: the transaction lost a race; running it again is the documented fix.
SERIALIZATION_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
)
#: The connection went away (server restart, pg_terminate_backend, network): safe to retry
#: only if the work is idempotent.
#: ``InternalClientError`` ("cannot switch to state ...") is what a pooled connection whose
#: server already said goodbye raises when it is used before asyncpg read the goodbye.
#: ``OSError`` includes the built-in ``TimeoutError``: for writes, a timeout is as ambiguous as
#: a dropped connection (did the commit happen?), so the same rule applies.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.InternalClientError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    ConnectionError,
    OSError,
)


@dataclass
class RetryOutcome(Generic[T]):
    """What :func:`retry` did: the value, how many attempts it took, the errors on the way."""

    value: T
    attempts: int
    errors: list[str] = field(default_factory=list)

    @property
    def retries(self) -> int:
        return self.attempts - 1


class RetriesExhausted(Exception):
    """Every attempt failed; ``errors`` lists each attempt's exception type."""

    def __init__(self, attempts: int, errors: list[str], last: BaseException) -> None:
        super().__init__(f"gave up after {attempts} attempts: {', '.join(errors)}")
        self.attempts = attempts
        self.errors = errors
        self.last = last


def backoff_delays(attempts: int, base: float = 0.005, cap: float = 0.5,
                   rng: random.Random | None = None) -> list[float]:
    """The sleeps between attempts: "full jitter" exponential backoff (uniform in
    ``[0, min(cap, base * 2**n)]``), which spreads retries of colliding clients apart."""
    rng = rng or random.Random()
    return [rng.uniform(0, min(cap, base * 2**n)) for n in range(attempts - 1)]


async def retry(
    work: Callable[[], Awaitable[T]],
    *,
    retry_on: tuple[type[BaseException], ...] = SERIALIZATION_ERRORS,
    attempts: int = 5,
    base_delay: float = 0.005,
    max_delay: float = 0.5,
    rng: random.Random | None = None,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
) -> RetryOutcome[T]:
    """Await ``work()``; on an exception in ``retry_on``, sleep (backoff with jitter) and run it
    again, up to ``attempts`` times in total. Other exceptions propagate at once.

    ``on_retry(attempt, exc, delay)`` is called before each sleep (to log or count retries).
    Raises :class:`RetriesExhausted` (with every attempt's error) when all attempts fail.
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    delays = backoff_delays(attempts, base_delay, max_delay, rng)
    errors: list[str] = []
    for attempt in range(attempts):
        try:
            value = await work()
        except retry_on as exc:
            errors.append(type(exc).__name__)
            if attempt == attempts - 1:
                raise RetriesExhausted(attempts, errors, exc) from exc
            if on_retry is not None:
                on_retry(attempt + 1, exc, delays[attempt])
            await asyncio.sleep(delays[attempt])
        else:
            return RetryOutcome(value, attempt + 1, errors)
    raise AssertionError("unreachable")
