"""Plots with one consistent look for the whole series.

Every function returns a matplotlib ``Figure`` made without pyplot, so a notebook cell that ends
with the figure shows it exactly once (``start_lesson`` registers the PNG display) (and nothing is left open between cells). The caller
passes a ``title`` that states the finding ("Pooling: 38x more requests per second"), computed
from the measurement, never typed in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from helpers.load import LoadResult

#: One colour per role, reused across notebooks so "pool" always looks the same.
PALETTE = ["#2a6f97", "#e07a1f", "#3a8f5c", "#b23a48", "#7b5ea7", "#8a8a8a", "#c9a227",
           "#17becf"]
TITLE = {"fontsize": 12, "fontweight": "bold"}
STYLE = {
    "font.size": 10,
    "axes.titlesize": 12,
    "axes.titleweight": "bold",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.frameon": False,
}


def figure(ncols: int = 1, width: float = 8.0, height: float = 4.2) -> tuple[Figure, list[Axes]]:
    """A figure in the course's style with ``ncols`` side-by-side axes."""
    import matplotlib

    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
        axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    for ax in axes:
        ax.set_axisbelow(True)
        ax.grid(True, alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    return fig, axes


def _results(results: Mapping[str, LoadResult] | Iterable[LoadResult]) -> dict[str, LoadResult]:
    if isinstance(results, Mapping):
        return dict(results)
    return {r.label: r for r in results}


def latency_cdf(results: Mapping[str, LoadResult] | Iterable[LoadResult], title: str,
                log: bool = True) -> Figure:
    """Latency distribution (CDF) per run: the further left, the faster; p50/p99 marked."""
    fig, (ax,) = figure()
    for n, (label, r) in enumerate(_results(results).items()):
        lat = np.sort(r.ok["latency_ms"].to_numpy())
        if len(lat) == 0:
            continue
        y = np.arange(1, len(lat) + 1) / len(lat)
        ax.plot(lat, y, color=PALETTE[n % len(PALETTE)],
                label=f"{label}  (p50 {r.percentile(50):.2f} ms, p99 {r.percentile(99):.2f} ms)")
    if log:
        ax.set_xscale("log")
    ax.set_xlabel("latency per request (ms" + (", log scale)" if log else ")"))
    ax.set_ylabel("fraction of requests")
    ax.axhline(0.99, color="grey", lw=0.8, ls=":")
    ax.set_ylim(0, 1.01)
    ax.legend(loc="lower right", fontsize=9)
    ax.set_title(title, **TITLE)
    return fig


def latency_box(results: Mapping[str, LoadResult] | Iterable[LoadResult], title: str,
                log: bool = True) -> Figure:
    """Latency box plot per run (whiskers at p1/p99)."""
    fig, (ax,) = figure()
    data = _results(results)
    ax.boxplot([r.ok["latency_ms"].to_numpy() for r in data.values()], whis=(1, 99),
               showfliers=False, tick_labels=list(data))
    if log:
        ax.set_yscale("log")
    ax.set_ylabel("latency per request (ms)")
    ax.set_title(title, **TITLE)
    return fig


def throughput_bars(values: Mapping[str, float] | Mapping[str, LoadResult], title: str,
                    log: bool = False, unit: str = "requests/s",
                    baseline: str | None = None) -> Figure:
    """Bars of throughput per variant; with ``baseline``, each bar is labelled "N.Nx" of it."""
    rates = {k: (v.rps if isinstance(v, LoadResult) else float(v)) for k, v in values.items()}
    fig, (ax,) = figure(height=max(2.5, 0.55 * len(rates) + 1.2))
    labels = list(rates)
    y = np.arange(len(labels))
    ax.barh(y, [rates[k] for k in labels], color=[PALETTE[i % len(PALETTE)]
                                                   for i in range(len(labels))])
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(unit + (" (log scale)" if log else ""))
    for i, k in enumerate(labels):
        text = f"{rates[k]:,.0f}"
        if baseline and rates.get(baseline):
            x = rates[k] / rates[baseline]
            text += f"  ({x:,.0f}x)" if x >= 10 else f"  ({x:.2g}x)"
        ax.annotate(text, (rates[k], i), xytext=(4, 0), textcoords="offset points",
                    va="center", fontsize=9)
    ax.margins(x=0.25)
    ax.grid(axis="y", visible=False)
    ax.set_title(title, **TITLE)
    return fig


def sweep_plot(table: pd.DataFrame, title: str, x: str = "concurrency",
               series: str = "label", log_y: bool = False,
               latency: Sequence[str] = ("p99_ms",)) -> Figure:
    """Throughput (left) and latency (right) against ``x``, one line per ``series``.

    ``latency`` names the percentile columns drawn on the right (default p99 only), e.g.
    ``("p50_ms", "p95_ms", "p99_ms")``: one line style per percentile.
    """
    fig, (left, right) = figure(ncols=2, width=10)
    groups = table.groupby(series, sort=False) if series in table else [("", table)]
    styles = ["-", "--", ":", "-."]
    for n, (name, g) in enumerate(groups):
        g = g.sort_values(x)
        color = PALETTE[n % len(PALETTE)]
        left.plot(g[x], g["rps"], marker="o", color=color, label=str(name))
        for k, col in enumerate(latency):
            label = str(name) if len(latency) == 1 else \
                f"{name} {col.removesuffix('_ms')}".strip()
            right.plot(g[x], g[col], marker="o", color=color, ls=styles[k % len(styles)],
                       label=label)
    left.set_ylabel("requests/s")
    right.set_ylabel(f"{latency[0].removesuffix('_ms')} latency (ms)" if len(latency) == 1
                     else "latency (ms)")
    for ax in (left, right):
        ax.set_xlabel(x)
        if log_y:
            ax.set_yscale("log")
        ax.set_ylim(bottom=0 if not log_y else None)
    if series in table and table[series].nunique() > 1:
        left.legend(fontsize=9)
    if len(latency) > 1:
        right.legend(fontsize=9)
    fig.suptitle(title, **TITLE)
    return fig


def stacked_bars(parts: Mapping[str, Mapping[str, float]], title: str,
                 unit: str = "ms", legend: str = "lower right") -> Figure:
    """Horizontal stacked bars: for each row, where its time goes (e.g. TCP, auth, query).

    ``legend`` is a matplotlib location inside the axes, or ``"below"`` to put the legend
    under the plot, clear of the bars (for many segments).
    """
    rows = list(parts)
    segments: list[str] = []
    for row in parts.values():
        segments += [s for s in row if s not in segments]
    ncols = min(4, len(segments))
    height = max(2.5, 0.7 * len(parts) + 1.3)
    if legend == "below":
        height += 0.3 * -(-len(segments) // max(1, ncols))
    fig, (ax,) = figure(height=height)
    left = np.zeros(len(rows))
    for n, seg in enumerate(segments):
        widths = np.array([parts[r].get(seg, 0.0) for r in rows])
        ax.barh(rows, widths, left=left, color=PALETTE[n % len(PALETTE)], label=seg)
        left += widths
    for i, total in enumerate(left):
        ax.annotate(f"{total:.2f} {unit}", (total, i), xytext=(4, 0),
                    textcoords="offset points", va="center", fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    ax.margins(x=0.15)
    if legend == "below":
        fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", fontsize=9,
                   ncols=ncols)
    else:
        ax.legend(loc=legend, fontsize=9, ncols=ncols)
    ax.grid(axis="y", visible=False)
    ax.set_title(title, **TITLE)
    return fig


def timeline(result: LoadResult, title: str, bin_s: float = 0.1,
             events: Sequence[tuple[float, str]] = ()) -> Figure:
    """Successes and errors per time bin over a run, with optional marked events."""
    fig, (ax,) = figure(height=3.6)
    df = result.df
    edges = np.arange(0, max(df["start_s"].max(), bin_s) + bin_s, bin_s)
    ok, _ = np.histogram(df.loc[df["ok"], "start_s"], bins=edges)
    bad, _ = np.histogram(df.loc[~df["ok"], "start_s"], bins=edges)
    ax.bar(edges[:-1], ok / bin_s, width=bin_s, align="edge", color=PALETTE[0], label="ok")
    ax.bar(edges[:-1], bad / bin_s, width=bin_s, align="edge", bottom=ok / bin_s,
           color=PALETTE[3], label="errors")
    for at, text in events:
        ax.axvline(at, color="black", lw=1, ls="--")
        ax.annotate(text, (at, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", fontsize=9)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("requests/s")
    ax.legend(fontsize=9)
    ax.set_title(title, **TITLE)
    return fig
