"""Load generation and timing: run R requests at concurrency C and record every one.

:func:`run_load` is a closed-loop generator: C workers each take the next request number and
await ``request(i)``, so exactly C requests are in flight until the last ones finish. Each
request's start, latency and outcome (``ok``, or the exception's type name) go into a pandas
DataFrame; :meth:`LoadResult.summary` turns that into requests/s and percentiles.

Its own cost is two ``perf_counter()`` calls and a few list appends per request: measured
against a bare ``asyncio.gather`` loop doing the same queries, it keeps about the same
throughput: ratios of 0.9 to 1.3 on a 2-core machine (``tests/test_load.py`` prints the
ratio; notebook 02 shows it).

:func:`compare` runs several variants *interleaved* (A, B, C, A, B, C, ...) so that a noisy
machine slows them all alike; assert on the ratios it reports, never on absolute times.

:func:`run_open_loop` is the other kind of load (notebook 05): requests *arrive* at a fixed rate,
whether or not the earlier ones have finished, as users of a web service do. A closed loop slows
its arrivals down when the system slows down and so hides a growing queue; an open one shows it.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pandas as pd

from helpers._infra.settings import settings

#: A request: given the request number, do one unit of work (e.g. one query).
Request = Callable[[int], Awaitable[Any]]

_WORKER: contextvars.ContextVar[int] = contextvars.ContextVar("load_worker")


def current_worker() -> int:
    """The number (0..C-1) of the :func:`run_load` / :func:`bare_gather` worker running the
    current request, e.g. to give each worker its own connection: ``conns[current_worker()]``.

    Raises ``LookupError`` outside a load run.
    """
    return _WORKER.get()


def progress_enabled() -> bool:
    """Progress bars show in an interactive session, never under CI, nbval or ``make run``."""
    return settings().progress


@dataclass
class LoadResult:
    """Every request of one run: a DataFrame plus what the run was."""

    label: str
    concurrency: int
    wall_s: float
    df: pd.DataFrame = field(repr=False)

    @property
    def ok(self) -> pd.DataFrame:
        """The successful requests only."""
        return self.df[self.df["ok"]]

    @property
    def errors(self) -> int:
        return int((~self.df["ok"]).sum())

    @property
    def rps(self) -> float:
        """Successful requests per second of wall time."""
        return len(self.ok) / self.wall_s if self.wall_s > 0 else float("nan")

    def percentile(self, q: float) -> float:
        """Latency percentile in milliseconds over successful requests (q in 0..100)."""
        ok = self.ok["latency_ms"]
        return float(ok.quantile(q / 100)) if len(ok) else float("nan")

    def summary(self) -> dict[str, Any]:
        """Plain numbers: requests, concurrency, requests/s, p50/p95/p99 (ms), errors by type."""
        return {
            "label": self.label,
            "concurrency": self.concurrency,
            "requests": len(self.df),
            "wall_s": round(self.wall_s, 4),
            "rps": self.rps,
            "p50_ms": self.percentile(50),
            "p95_ms": self.percentile(95),
            "p99_ms": self.percentile(99),
            "errors": self.errors,
            "error_types": dict(self.df.loc[~self.df["ok"], "outcome"].value_counts()),
        }


async def run_load(
    request: Request,
    *,
    requests: int,
    concurrency: int,
    label: str = "",
    progress: bool | None = None,
) -> LoadResult:
    """Run ``requests`` calls of ``request(i)`` with ``concurrency`` in flight; record each.

    Exceptions do not stop the run: they are recorded as the request's outcome (the exception
    type's name) so error rates can be plotted next to latencies.
    """
    if requests < 1 or concurrency < 1:
        raise ValueError("requests and concurrency must be at least 1")
    concurrency = min(concurrency, requests)
    counter = itertools.count()
    starts = [0.0] * requests
    latencies = [0.0] * requests
    outcomes = ["ok"] * requests
    workers_of = [0] * requests
    bar = _bar(requests, label) if (progress if progress is not None else progress_enabled()) \
        else None
    perf = time.perf_counter

    async def worker(w: int) -> None:
        _WORKER.set(w)  # each worker is its own task, so this stays local to it
        while (i := next(counter)) < requests:
            t0 = perf()
            try:
                await request(i)
            except Exception as exc:  # recorded, not raised: errors are data here
                outcomes[i] = type(exc).__name__
            t1 = perf()
            starts[i] = t0
            latencies[i] = t1 - t0
            workers_of[i] = w
            if bar is not None:
                bar.update()

    begin = perf()
    try:
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    finally:
        if bar is not None:
            bar.close()
    wall = perf() - begin
    df = pd.DataFrame({
        "request": range(requests),
        "worker": workers_of,
        "start_s": [s - begin for s in starts],
        "latency_ms": [x * 1000 for x in latencies],
        "outcome": outcomes,
    })
    df["ok"] = df["outcome"] == "ok"
    return LoadResult(label or f"c={concurrency}", concurrency, wall, df)


async def run_open_loop(
    request: Request,
    *,
    rate: float,
    duration_s: float,
    seed: int = 0,
    poisson: bool = True,
    max_in_flight: int = 5000,
    label: str = "",
) -> LoadResult:
    """Start ``request(i)`` at ``rate`` per second for ``duration_s`` seconds, whether or not the
    earlier requests have finished (an open system: arrivals do not wait for completions).

    Arrivals are a Poisson process (exponential gaps, seeded by ``seed``: the same arrival
    times every run) or, with ``poisson=False``, evenly spaced. ``latency_ms`` counts from the
    *scheduled* arrival, so a request the generator started late is not flattered
    ("coordinated omission"). The DataFrame has the columns of :func:`run_load` (``start_s`` is
    the scheduled arrival, ``worker`` is 0) plus ``in_flight``: requests in progress when this
    one arrived (itself included). A request arriving when ``max_in_flight`` are in progress is
    not started and is recorded as ``"Shed"``, so an overloaded run still ends. The result's
    ``concurrency`` is the largest ``in_flight`` seen; ``df.attrs["offered_rps"]`` is ``rate``.
    """
    if rate <= 0 or duration_s <= 0:
        raise ValueError("rate and duration_s must be positive")
    rng = random.Random(seed)
    arrivals: list[float] = []
    t = 0.0
    while True:
        t += rng.expovariate(rate) if poisson else 1.0 / rate
        if t > duration_s:
            break
        arrivals.append(t)
    n = len(arrivals)
    latencies = [0.0] * n
    outcomes = ["ok"] * n
    in_flight_at = [0] * n
    running: set[asyncio.Task[None]] = set()
    perf = time.perf_counter
    begin = perf()

    async def one(i: int, due: float) -> None:
        try:
            await request(i)
        except Exception as exc:  # recorded, not raised: errors are data here
            outcomes[i] = type(exc).__name__
        latencies[i] = perf() - due

    for i, at in enumerate(arrivals):
        delay = begin + at - perf()
        if delay > 0:
            await asyncio.sleep(delay)
        in_flight_at[i] = len(running) + 1
        if len(running) >= max_in_flight:
            outcomes[i] = "Shed"
            continue
        task = asyncio.create_task(one(i, begin + at))
        running.add(task)
        task.add_done_callback(running.discard)
    if running:
        await asyncio.gather(*running)
    wall = perf() - begin
    df = pd.DataFrame({
        "request": range(n),
        "worker": [0] * n,
        "start_s": arrivals,
        "latency_ms": [x * 1000 for x in latencies],
        "outcome": outcomes,
        "in_flight": in_flight_at,
    })
    df["ok"] = df["outcome"] == "ok"
    df.attrs["offered_rps"] = rate
    return LoadResult(label or f"{rate:g}/s", max(in_flight_at, default=0), wall, df)


def _bar(total: int, label: str):
    from tqdm import tqdm

    # delay: only runs longer than a couple of seconds show a bar at all
    return tqdm(total=total, desc=label or "requests", delay=2.0, file=sys.stderr,
                leave=False, mininterval=0.5)


async def bare_gather(request: Request, *, requests: int, concurrency: int) -> float:
    """The same work as :func:`run_load` with no recording at all; returns requests/s.

    Used once to show that the load generator's own overhead does not distort the figures.
    """
    per_task = [requests // concurrency + (1 if w < requests % concurrency else 0)
                for w in range(concurrency)]
    offsets = list(itertools.accumulate([0, *per_task[:-1]]))

    async def task(w: int, first: int, n: int) -> None:
        _WORKER.set(w)
        for i in range(first, first + n):
            await request(i)

    t0 = time.perf_counter()
    await asyncio.gather(*(task(w, o, n) for w, (o, n)
                           in enumerate(zip(offsets, per_task, strict=True))))
    return requests / (time.perf_counter() - t0)


async def compare(
    variants: Mapping[str, Request],
    *,
    requests: int,
    concurrency: int,
    repeats: int = 3,
    warmup: int = 0,
) -> dict[str, LoadResult]:
    """Run each variant ``repeats`` times, interleaved, and merge each variant's runs.

    The merged result's ``wall_s`` is the sum of its runs' walls, so ``rps`` is the mean rate;
    :func:`median_rps` gives the median of the per-run rates when one slow run should not count.
    ``warmup`` requests per variant run first and are not recorded.
    """
    runs: dict[str, list[LoadResult]] = {name: [] for name in variants}
    if warmup:
        for request in variants.values():
            await run_load(request, requests=warmup, concurrency=concurrency, progress=False)
    for _ in range(repeats):
        for name, request in variants.items():
            runs[name].append(await run_load(request, requests=requests,
                                             concurrency=concurrency, label=name))
    return {name: merge(results, label=name) for name, results in runs.items()}


def merge(results: Iterable[LoadResult], label: str | None = None) -> LoadResult:
    """Concatenate several runs of the same workload into one result (keeps per-run rates)."""
    results = list(results)
    frames = []
    for n, r in enumerate(results):
        frames.append(r.df.assign(run=n))
    merged = LoadResult(label or results[0].label, results[0].concurrency,
                        sum(r.wall_s for r in results), pd.concat(frames, ignore_index=True))
    merged.df.attrs["run_rps"] = [r.rps for r in results]
    return merged


def median_rps(result: LoadResult) -> float:
    """Median requests/s over the runs merged into ``result`` (or its own rate)."""
    rates = result.df.attrs.get("run_rps")
    return statistics.median(rates) if rates else result.rps


async def sweep(
    request: Request,
    concurrencies: Iterable[int],
    *,
    requests: int | Callable[[int], int],
    label: str = "",
) -> tuple[pd.DataFrame, dict[int, LoadResult]]:
    """Run the same workload at several concurrencies; one summary row per level.

    ``requests`` may be a function of the concurrency (e.g. ``lambda c: 40 * c``) so that every
    level runs long enough to be measured.
    """
    results = {}
    for c in concurrencies:
        n = requests(c) if callable(requests) else requests
        results[c] = await run_load(request, requests=n, concurrency=c,
                                    label=label or f"c={c}")
    table = summarize(results.values())
    table["label"] = label or "requests"  # one series, so sweep_plot draws one line
    return table, results


def summarize(results: Iterable[LoadResult]) -> pd.DataFrame:
    """One row per run: label, concurrency, requests, rps, p50/p95/p99 (ms), errors."""
    rows = [r.summary() for r in results]
    return pd.DataFrame(rows).drop(columns=["error_types"])


def ratio(a: LoadResult, b: LoadResult) -> float:
    """How many times more requests/s ``a`` did than ``b``."""
    return a.rps / b.rps


def paired_ratio(a: LoadResult, b: LoadResult) -> float:
    """How many times more requests/s ``a`` did than ``b``, as the median of per-round ratios.

    For two results of one :func:`compare` call: each round ran every variant back to back, so
    a slow moment of a noisy machine hits both sides of a round's ratio alike, and the median
    drops the odd round it hit unevenly. Falls back to :func:`ratio` without per-run rates.
    """
    ra, rb = a.df.attrs.get("run_rps"), b.df.attrs.get("run_rps")
    if not ra or not rb or len(ra) != len(rb):
        return ratio(a, b)
    return statistics.median(x / y for x, y in zip(ra, rb, strict=True))


T = TypeVar("T")


def run_fresh(factory: Callable[[], Awaitable[T]], loop: str = "asyncio") -> T:
    """Run ``factory()`` to completion in a brand-new event loop of the given kind
    (``"asyncio"`` or ``"uvloop"``) in this thread; return its result.

    Everything the coroutine opens (pools, connections) must be created and closed inside it:
    asyncpg objects belong to the loop that made them.
    """
    if loop not in ("asyncio", "uvloop"):
        raise ValueError(f"loop must be 'asyncio' or 'uvloop', not {loop!r}")
    if loop == "uvloop":
        import uvloop

        return uvloop.run(factory())
    return asyncio.run(factory())  # type: ignore[arg-type]


async def run_in_new_loop(factory: Callable[[], Awaitable[T]], *, loop: str = "asyncio") -> T:
    """:func:`run_fresh` in a worker thread, so a running loop (Jupyter's) can compare event
    loops: you cannot swap the loop a notebook runs on."""
    return await asyncio.to_thread(run_fresh, factory, loop)
