"""Execute the series headless: ``make run`` (into ``build/``) and ``make refresh`` (in place).

``run`` executes every notebook in a fresh kernel, writes the executed copy, one HTML page per
notebook and an index page to ``build/``, and prints a summary: which notebooks ran, how long
they took, and the headline figures they recorded with ``lesson.record(...)``.

``refresh`` executes the notebooks and stores the outputs in ``notebooks/`` itself, which is how
committed outputs (plots a reader sees on GitHub) are updated: review the diff, then commit.
"""

from __future__ import annotations

import html
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError

from helpers._infra.paths import BUILD, NOTEBOOKS
from helpers.lesson import FIGURES_ENV

CELL_TIMEOUT_S = 600
RAISES_MARK = "NBVAL_RAISES_EXCEPTION"


@dataclass
class NotebookRun:
    """The outcome of executing one notebook."""

    name: str
    ok: bool
    seconds: float
    error: str = ""
    figures: dict[str, dict] = field(default_factory=dict)


def notebooks(names: list[str] | None = None) -> list[Path]:
    """The series in order (``NN-slug.ipynb``), or the ones whose names start with ``names``."""
    found = sorted(NOTEBOOKS.glob("[0-9][0-9]-*.ipynb"))
    if names:
        found = [p for p in found if any(p.name.startswith(n) for n in names)]
    return found


def mark_expected_errors(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    """Tag cells marked ``# NBVAL_RAISES_EXCEPTION`` so nbclient lets them raise, as nbval does.

    Returns the cells it tagged, so the tag can be removed again before saving (the comment
    is the single marker; nbval warns when both are present).
    """
    tagged = []
    for cell in nb.cells:
        if cell.cell_type == "code" and RAISES_MARK in cell.source:
            tags = cell.metadata.setdefault("tags", [])
            if "raises-exception" not in tags:
                tags.append("raises-exception")
                tagged.append(cell)
    return tagged


def execute(path: Path, timeout: int = CELL_TIMEOUT_S) -> tuple[nbformat.NotebookNode, NotebookRun]:
    """Run a notebook top to bottom in a new kernel (working folder: ``notebooks/``)."""
    nb = nbformat.read(path, as_version=4)
    tagged = mark_expected_errors(nb)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(path.parent)}})
    t0 = time.perf_counter()
    error = ""
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError) as exc:
        error = _short_error(str(exc))
    for cell in tagged:
        cell.metadata["tags"].remove("raises-exception")
        if not cell.metadata["tags"]:
            del cell.metadata["tags"]
    seconds = time.perf_counter() - t0
    return nb, NotebookRun(path.stem, not error, seconds, error)


def _short_error(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "error"


def run_series(names: list[str] | None = None, out: Path = BUILD) -> list[NotebookRun]:
    """Execute the series into ``out``: executed notebooks, the HTML site, a summary."""
    figures_dir = out / "figures"
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    figures_dir.mkdir(parents=True, exist_ok=True)
    os.environ[FIGURES_ENV] = str(figures_dir)
    os.environ.setdefault("PGCOURSE_PROGRESS", "0")
    runs, executed = [], []
    for path in notebooks(names):
        print(f"  running {path.name} ...", flush=True)
        (figures_dir / f"{path.stem}.json").unlink(missing_ok=True)
        nb, result = execute(path)
        nbformat.write(nb, out / "notebooks" / path.name)
        fig_file = figures_dir / f"{path.stem}.json"
        if fig_file.exists():
            result.figures = json.loads(fig_file.read_text())
        runs.append(result)
        executed.append((path, nb))
    write_site(executed, out, runs)
    (out / "summary.json").write_text(json.dumps([r.__dict__ for r in runs], indent=2))
    return runs


_SITE_CSS = """
.course-nav{position:sticky;top:0;z-index:10;background:#f4f6f8;border-bottom:1px solid #d0d7de;
 padding:.5em 1.5em;font:14px/1.4 system-ui,sans-serif;display:flex;gap:1.5em}
.course-nav a{color:#2a6f97;text-decoration:none}.course-nav .here{font-weight:600}
"""


def _nav(pages: list[tuple[str, str]], i: int) -> str:
    links = ["<a href='index.html'>Index</a>"]
    if i > 0:
        links.append(f"<a rel='prev' href='{pages[i - 1][0]}.html'>&larr; "
                     f"{html.escape(pages[i - 1][1])}</a>")
    links.append(f"<span class='here'>{html.escape(pages[i][1])}</span>")
    if i < len(pages) - 1:
        links.append(f"<a rel='next' href='{pages[i + 1][0]}.html'>"
                     f"{html.escape(pages[i + 1][1])} &rarr;</a>")
    return "<nav class='course-nav'>" + "".join(links) + "</nav>"


def site_html(body: str, pages: list[tuple[str, str]], i: int) -> str:
    """Make an nbconvert page part of the site: a navigation bar, and links between notebooks
    pointing at the HTML pages instead of the ``.ipynb`` files."""
    body = re.sub(r'href="(\d\d-[\w-]+)\.ipynb"', r'href="\1.html"', body)
    body = body.replace('href="../README.md"', 'href="index.html"')
    body = body.replace("</head>", f"<style>{_SITE_CSS}</style></head>", 1)
    return re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + _nav(pages, i), body, count=1)


def write_site(nbs: list[tuple[Path, nbformat.NotebookNode]], out: Path,
               runs: list[NotebookRun] | None = None) -> list[Path]:
    """Write one HTML page per notebook plus ``index.html`` into ``out``; returns the pages.

    ``make run`` passes freshly executed notebooks; tests pass the committed ones, whose
    stored outputs are the same kind of page.
    """
    from nbconvert import HTMLExporter

    from helpers._infra.links import series

    out.mkdir(parents=True, exist_ok=True)
    entries = {e.path.stem: e for e in series()}
    pages = [(p.stem, entries[p.stem].short if p.stem in entries else p.stem) for p, _ in nbs]
    exporter = HTMLExporter(template_name="lab")
    written = []
    for i, (path, nb) in enumerate(nbs):
        body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": path.stem}})
        page = out / f"{path.stem}.html"
        page.write_text(site_html(body, pages, i), encoding="utf-8")
        written.append(page)
    by_name = {r.name: r for r in runs or []}
    rows = []
    for stem, _ in pages:
        entry, run = entries.get(stem), by_name.get(stem)
        cells = [f"<a href='{stem}.html'>{html.escape(entry.title if entry else stem)}</a>",
                 re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(entry.summary))
                 if entry else "",
                 f"{entry.teaching_min} + {entry.exercise_min} min" if entry else ""]
        if runs is not None:
            figs = "<br>".join(f"{html.escape(f['label'])}: {html.escape(_figure(f))}"
                               for f in (run.figures if run else {}).values())
            status = ("ok" if run.ok else f"FAILED: {html.escape(run.error)}") if run else ""
            cells += [status, f"{run.seconds:.1f} s" if run else "", figs]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    heads = ["notebook", "you will", "minutes"] + (["status", "time", "measured here"]
                                                     if runs is not None else [])
    (out / "index.html").write_text(
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<title>Async PostgreSQL connection pooling, measured</title>"
        "<style>body{font:15px/1.5 system-ui,sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
        "td,th{padding:.35em .8em;text-align:left;vertical-align:top;border-bottom:1px solid #e5e5e5}"
        "a{color:#2a6f97}</style></head><body>"
        "<h1>Async PostgreSQL connection pooling, measured</h1>"
        "<p>A hands-on series: every claim is measured on the machine that ran it. "
        "Start with the first notebook and follow the links at the top of each page.</p>"
        "<table><tr>" + "".join(f"<th>{h}</th>" for h in heads) + "</tr>"
        + "".join(rows) + "</table></body></html>",
        encoding="utf-8",
    )
    return written


def _figure(figure: dict) -> str:
    """A recorded figure with its unit: "27.6x", "0.12 s", "386 of 600"."""
    unit = figure["unit"]
    return f"{figure['value']:.3g}{'' if unit in ('x', '%', '') else ' '}{unit}"


def summary_lines(runs: list[NotebookRun]) -> list[str]:
    """The short report ``make run`` prints."""
    lines = [f"{'notebook':34} {'status':7} {'time':>7}"]
    for r in runs:
        lines.append(f"{r.name:34} {'ok' if r.ok else 'FAILED':7} {r.seconds:6.1f}s")
        for f in r.figures.values():
            lines.append(f"    {f['label']}: {_figure(f)}")
        if r.error:
            lines.append(f"    {r.error}")
    return lines


def refresh(names: list[str] | None = None) -> list[NotebookRun]:
    """Execute notebooks and store their outputs in place (review the diff, then commit)."""
    os.environ.setdefault("PGCOURSE_PROGRESS", "0")
    runs = []
    for path in notebooks(names):
        print(f"  refreshing {path.name} ...", flush=True)
        nb, result = execute(path)
        if result.ok:
            nb.metadata.pop("widgets", None)
            nbformat.write(nb, path)
        runs.append(result)
    return runs
