"""The load generator and plots, against the real server."""

from __future__ import annotations

import asyncio
import statistics

import asyncpg
import pytest
from matplotlib.figure import Figure

from helpers import plots
from helpers.load import (
    bare_gather,
    compare,
    current_worker,
    median_rps,
    paired_ratio,
    run_load,
    run_open_loop,
    summarize,
    sweep,
)
from tests.conftest import run

QUERY = "SELECT name FROM shop.users WHERE id = $1"


def test_records_every_request_and_respects_concurrency() -> None:
    in_flight = 0
    peak = 0

    async def request(i: int) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.001)
        in_flight -= 1
        if i % 10 == 0:
            raise ValueError("every tenth request fails")

    result = run(run_load(request, requests=200, concurrency=8))
    assert peak == 8
    assert len(result.df) == 200 and set(result.df["request"]) == set(range(200))
    assert result.errors == 20
    s = result.summary()
    assert s["error_types"] == {"ValueError": 20}
    assert s["p50_ms"] <= s["p95_ms"] <= s["p99_ms"]
    assert 0 < result.rps < 200 / 0.001
    assert result.df["start_s"].min() >= 0


def test_sweep_and_compare(target) -> None:
    async def scenario():
        async with asyncpg.create_pool(target.url, min_size=4, max_size=4) as pool:
            async def request(i: int):
                return await pool.fetchval(QUERY, 1 + i % 1000)

            table, results = await sweep(request, [1, 4], requests=lambda c: 50 * c)
            both = await compare({"a": request, "b": request}, requests=100, concurrency=4,
                                 repeats=2)
            return table, results, both
    table, results, both = run(scenario())
    assert list(table["concurrency"]) == [1, 4]
    assert list(table["requests"]) == [50, 200]
    assert len(both["a"].df) == 200 and both["a"].df["run"].nunique() == 2
    assert median_rps(both["a"]) > 0
    assert len(summarize(both.values())) == 2


def test_overhead_against_bare_gather(target) -> None:
    """The generator's bookkeeping must not distort the figures: compared side by side,
    interleaved, it keeps most of a bare asyncio.gather loop's throughput."""
    async def scenario():
        async with asyncpg.create_pool(target.url, min_size=10, max_size=10) as pool:
            async def request(i: int):
                return await pool.fetchval(QUERY, 1 + i % 1000)

            await bare_gather(request, requests=500, concurrency=10)  # warm up
            gen, bare = [], []
            for _ in range(5):
                gen.append((await run_load(request, requests=2000, concurrency=10)).rps)
                bare.append(await bare_gather(request, requests=2000, concurrency=10))
            return statistics.median(gen), statistics.median(bare)
    gen, bare = run(scenario())
    print(f"\nrun_load {gen:,.0f} req/s vs bare gather {bare:,.0f} req/s: ratio {gen / bare:.2f}")
    assert gen / bare > 0.8


@pytest.mark.parametrize("kind", ["cdf", "box", "bars", "sweep", "stacked", "timeline"])
def test_plots_return_figures(kind) -> None:
    async def noop(i: int):
        await asyncio.sleep(0)
        if i == 3:
            raise TimeoutError

    r = run(run_load(noop, requests=20, concurrency=2, label="noop"))
    table = summarize([r])
    fig = {
        "cdf": lambda: plots.latency_cdf([r], "t"),
        "box": lambda: plots.latency_box({"x": r}, "t"),
        "bars": lambda: plots.throughput_bars({"a": 10.0, "b": r}, "t", baseline="a"),
        "sweep": lambda: plots.sweep_plot(table, "t"),
        "stacked": lambda: plots.stacked_bars({"row": {"tcp": 1.0, "auth": 2.0}}, "t"),
        "timeline": lambda: plots.timeline(r, "t", events=[(0.0, "start")]),
    }[kind]()
    assert isinstance(fig, Figure) and fig.axes
    fig.savefig(__import__("io").BytesIO(), format="png")


def test_current_worker_names_the_worker_of_each_request() -> None:
    seen: dict[int, int] = {}

    async def request(i: int) -> None:
        seen[i] = current_worker()
        await asyncio.sleep(0.001)

    result = run(run_load(request, requests=40, concurrency=4))
    assert set(seen.values()) == {0, 1, 2, 3}
    assert all(seen[i] == w for i, w in zip(result.df["request"], result.df["worker"],
                                            strict=True))
    seen.clear()
    run(bare_gather(request, requests=40, concurrency=4))
    assert set(seen.values()) == {0, 1, 2, 3} and len(seen) == 40
    with pytest.raises(LookupError):
        current_worker()


def test_current_worker_gives_each_worker_its_own_connection(target) -> None:
    """Persistent connections without a pool: one per worker, never shared at once."""
    async def scenario():
        conns = [await asyncpg.connect(target.url) for _ in range(3)]
        try:
            async def request(i: int):
                return await conns[current_worker()].fetchval(QUERY, 1 + i)

            return await run_load(request, requests=60, concurrency=3)
        finally:
            for conn in conns:
                await conn.close()
    result = run(scenario())
    assert result.errors == 0  # InterfaceError if two requests shared a connection at once


def test_sweep_plot_draws_several_percentiles_and_stacked_legend_below() -> None:
    async def noop(i: int):
        await asyncio.sleep(0)

    table = summarize([run(run_load(noop, requests=20, concurrency=c, label="x"))
                       for c in (1, 2)])
    fig = plots.sweep_plot(table, "t", latency=("p50_ms", "p95_ms", "p99_ms"))
    assert len(fig.axes[1].get_lines()) == 3 and fig.axes[1].get_ylabel() == "latency (ms)"
    assert plots.sweep_plot(table, "t").axes[1].get_ylabel() == "p99 latency (ms)"  # default
    parts = {"a": {f"s{k}": 1.0 for k in range(7)}, "b": {"q": 0.1}}
    below = plots.stacked_bars(parts, "t", legend="below")
    assert below.legends and below.axes[0].get_legend() is None
    inside = plots.stacked_bars(parts, "t")
    assert not inside.legends and inside.axes[0].get_legend() is not None
    for fig in (below, inside):
        fig.savefig(__import__("io").BytesIO(), format="png")


def test_paired_ratio_takes_the_median_of_per_round_ratios() -> None:
    async def fast(i: int):
        await asyncio.sleep(0)

    async def slow(i: int):
        await asyncio.sleep(0.002)

    both = run(compare({"fast": fast, "slow": slow}, requests=20, concurrency=2, repeats=3))
    rounds = [f / s for f, s in zip(both["fast"].df.attrs["run_rps"],
                                    both["slow"].df.attrs["run_rps"], strict=True)]
    assert paired_ratio(both["fast"], both["slow"]) == statistics.median(rounds) > 1
    single = run(run_load(fast, requests=10, concurrency=1))
    assert paired_ratio(single, both["slow"]) == single.rps / both["slow"].rps  # no rounds


def test_open_loop_keeps_arriving_and_counts_from_the_due_time() -> None:
    """An open loop starts requests at its rate whether or not earlier ones finished: with one
    "server" slot and service slower than the arrivals, requests pile up and latency (from the
    scheduled arrival) grows; arrivals are the same for the same seed."""
    async def open_run(**kwargs):
        slot = asyncio.Semaphore(1)  # one request at a time, 4 ms each: capacity 250/s

        async def served(i: int) -> None:
            async with slot:
                await asyncio.sleep(0.004)
            if i == 5:
                raise ValueError("recorded, not raised")

        return await run_open_loop(served, **kwargs)

    under = run(open_run(rate=100, duration_s=0.3, seed=7))
    over = run(open_run(rate=500, duration_s=0.3, seed=7))
    again = run(open_run(rate=500, duration_s=0.3, seed=7))
    even = run(open_run(rate=200, duration_s=0.1, poisson=False))
    assert list(over.df["start_s"]) == list(again.df["start_s"])  # seeded arrivals
    assert 100 < len(over.df) < 200 and over.df["start_s"].is_monotonic_increasing
    assert set(over.df.columns) >= {"request", "start_s", "latency_ms", "outcome", "ok",
                                    "in_flight"}
    assert over.df.attrs["offered_rps"] == 500 and over.errors == 1
    assert over.concurrency == over.df["in_flight"].max() > 20  # a queue formed
    assert over.percentile(99) > 5 * under.percentile(50)
    assert under.df["in_flight"].max() < over.df["in_flight"].max()
    assert len(even.df) == 19 or len(even.df) == 20  # every 5 ms for 0.1 s
    assert even.df["start_s"].diff().dropna().round(6).nunique() == 1


def test_open_loop_sheds_past_max_in_flight() -> None:
    async def stuck(i: int) -> None:
        await asyncio.sleep(0.05)

    result = run(run_open_loop(stuck, rate=2000, duration_s=0.05, max_in_flight=10, seed=1))
    assert result.concurrency == 11  # the first shed request saw 10 in progress, plus itself
    assert (result.df["outcome"] == "Shed").sum() == len(result.df) - 10
    with pytest.raises(ValueError):
        run(run_open_loop(stuck, rate=0, duration_s=1))
