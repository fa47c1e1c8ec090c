"""Retrying work that failed for a reason worth retrying, with exponential backoff and jitter.

Two lessons need it: serialization failures under ``SERIALIZABLE`` (notebook 03: the whole
transaction must run again) and lost connections (notebook 06: only *idempotent* work may be
retried blindly; a retried ``INSERT`` whose first attempt did commit inserts twice).

The unit of retry is a zero-argument coroutine function that does the *whole* unit of work,
including acquiring a connection and opening the transaction: retrying a single statement
inside a failed transaction is never right.

What is *not* worth retrying matters as much. A ``TimeoutError`` (an acquire timeout, a
``command_timeout``) says the pool or the server is overloaded, or the network is gone: a retry
adds load where there is none to spare, and for a write it repeats work that may have
committed (asyncpg spends the acquire timeout on the release's reset too, so the error can come
*after* the work succeeded). An ``InterfaceError`` is a bug or a shutdown ("another operation is
in progress", "pool is closing"). Neither is a lost connection: :func:`is_connection_lost` says
which errors are. Every retry also spends from a budget: ``attempts`` and ``deadline_s`` per call,
and a :class:`RetryBudget` shared by all calls, so a server that is down does not get N times the
load from its clients.
"""

from __future__ import annotations

import asyncio
import random
import time
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

#: Exception classes that mean "this connection is gone, or could not be made" in asyncpg 0.32
#: (measured in notebook 06: killed backends, fast restarts). Not ``TimeoutError`` (an
#: ``OSError``, hence not ``OSError``), not ``InterfaceError``, not the
#: ``PostgresConnectionError`` base (``ProtocolViolationError`` is one of its subclasses).
CONNECTION_LOST: tuple[type[BaseException], ...] = (
    asyncpg.ConnectionDoesNotExistError,  # 08003: closed in the middle of an operation
    asyncpg.ConnectionFailureError,       # 08006
    asyncpg.AdminShutdownError,           # 57P01: terminated (seen at the handshake)
    asyncpg.CrashShutdownError,           # 57P02
    asyncpg.CannotConnectNowError,        # 57P03: the server is starting up or shutting down
    ConnectionError,  # refused, reset, aborted, broken pipe, "unexpected connection_lost() call"
)

#: The end of asyncpg's message when a pooled connection is used after the server's goodbye
#: ("terminating connection ...") was read but before the socket's end was: the goodbye put the
#: protocol in its error-consume state, 2 (asyncpg/protocol/coreproto.pyx, ``_set_state``).
_GOODBYE_READ = "another operation (2) is in progress"


def is_connection_lost(exc: BaseException) -> bool:
    """True when ``exc`` means the connection went away (or could not be made): worth a retry
    for idempotent work. False for timeouts, interface errors and everything the server
    rejected (a ``PostgresError`` other than the ones in :data:`CONNECTION_LOST`).

    A connection object used again after asyncpg noticed its loss raises
    ``InterfaceError('connection is closed')``: no retry brings that object back, so it is not
    in the list; retry a unit of work that acquires a connection anew (as a pool does)."""
    if isinstance(exc, CONNECTION_LOST):
        return True
    return type(exc) is asyncpg.InternalClientError and str(exc).endswith(_GOODBYE_READ)


class RetryBudget:
    """Retries as a fraction of the work, shared by every call that uses it (like Finagle's
    ``RetryBudget`` or Envoy's ``retry_budget``).

    Every call that succeeds deposits ``ratio`` of a retry (at most ``cap`` are kept); every
    retry spends one. ``reserve`` retries are there from the start, so a client that has done
    little work yet may still retry a few times. When the budget is empty, :func:`retry` gives
    up at once instead of retrying: while a server is down, its clients add at most
    ``ratio`` x their requests (plus the reserve) in retries, instead of ``attempts`` x.
    """

    def __init__(self, ratio: float = 0.1, reserve: float = 10.0, cap: float | None = None) -> None:
        if ratio < 0 or reserve < 0:
            raise ValueError("ratio and reserve must not be negative")
        self.ratio = ratio
        self.cap = cap if cap is not None else max(reserve, 1.0)
        self.balance = float(reserve)
        self.spent = 0  # retries granted
        self.refused = 0  # retries refused for lack of budget

    def deposit(self) -> None:
        """A call succeeded."""
        self.balance = min(self.cap, self.balance + self.ratio)

    def withdraw(self) -> bool:
        """Ask for one retry: True (and spend it) if the budget has one."""
        if self.balance >= 1.0:
            self.balance -= 1.0
            self.spent += 1
            return True
        self.refused += 1
        return False

    def __repr__(self) -> str:
        return (f"<RetryBudget ratio={self.ratio} balance={self.balance:.1f} "
                f"spent={self.spent} refused={self.refused}>")


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
    """Every attempt allowed failed; ``errors`` lists each attempt's exception type, ``reason``
    says what ran out (``"attempts"``, ``"deadline"`` or ``"budget"``), ``last`` is the last
    exception (also the ``__cause__``)."""

    def __init__(self, attempts: int, errors: list[str], last: BaseException,
                 reason: str = "attempts") -> None:
        super().__init__(f"gave up after {attempts} attempts ({reason}): {', '.join(errors)}")
        self.attempts = attempts
        self.errors = errors
        self.last = last
        self.reason = reason


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
    retry_if: Callable[[BaseException], bool] | None = None,
    attempts: int = 5,
    base_delay: float = 0.005,
    max_delay: float = 0.5,
    deadline_s: float | None = None,
    budget: RetryBudget | None = None,
    rng: random.Random | None = None,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
) -> RetryOutcome[T]:
    """Await ``work()``; when it raises an exception worth retrying, sleep (backoff with jitter)
    and run it again, up to ``attempts`` times in total. Other exceptions propagate at once.

    Worth retrying: an instance of ``retry_on`` or, when ``retry_if`` is given (e.g.
    :func:`is_connection_lost`), an exception for which it returns True (``retry_on`` is then
    ignored). ``deadline_s`` bounds the whole call: no retry starts whose backoff would end
    past it. ``budget`` (a :class:`RetryBudget` shared by many calls) must grant every retry.
    ``on_retry(attempt, exc, delay)`` is called before each sleep (to log or count retries).
    Raises :class:`RetriesExhausted` (with every attempt's error, and what ran out) when no
    further attempt is allowed.
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    delays = backoff_delays(attempts, base_delay, max_delay, rng)
    errors: list[str] = []
    started = time.monotonic()
    for attempt in range(attempts):
        try:
            value = await work()
        except Exception as exc:
            worth = retry_if(exc) if retry_if is not None else isinstance(exc, retry_on)
            if not worth:
                raise
            errors.append(type(exc).__name__)
            reason = None
            if attempt == attempts - 1:
                reason = "attempts"
            elif deadline_s is not None and \
                    time.monotonic() - started + delays[attempt] > deadline_s:
                reason = "deadline"
            elif budget is not None and not budget.withdraw():
                reason = "budget"
            if reason is not None:
                raise RetriesExhausted(attempt + 1, errors, exc, reason) from exc
            if on_retry is not None:
                on_retry(attempt + 1, exc, delays[attempt])
            await asyncio.sleep(delays[attempt])
        else:
            if budget is not None:
                budget.deposit()
            return RetryOutcome(value, attempt + 1, errors)
    raise AssertionError("unreachable")
