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
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError

from .lesson import FIGURES_ENV
from .paths import BUILD, NOTEBOOKS

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
    """Execute the series into ``out``: executed notebooks, HTML pages, index, summary."""
    from nbconvert import HTMLExporter

    figures_dir = out / "figures"
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    figures_dir.mkdir(parents=True, exist_ok=True)
    os.environ[FIGURES_ENV] = str(figures_dir)
    os.environ.setdefault("PGCOURSE_PROGRESS", "0")
    exporter = HTMLExporter(template_name="lab")
    runs = []
    for path in notebooks(names):
        print(f"  running {path.name} ...", flush=True)
        (figures_dir / f"{path.stem}.json").unlink(missing_ok=True)
        nb, result = execute(path)
        nbformat.write(nb, out / "notebooks" / path.name)
        body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": path.stem}})
        (out / f"{path.stem}.html").write_text(body, encoding="utf-8")
        fig_file = figures_dir / f"{path.stem}.json"
        if fig_file.exists():
            result.figures = json.loads(fig_file.read_text())
        runs.append(result)
    write_index(runs, out)
    (out / "summary.json").write_text(json.dumps([r.__dict__ for r in runs], indent=2))
    return runs


def write_index(runs: list[NotebookRun], out: Path) -> None:
    """``build/index.html``: the series with status, time and headline figures."""
    rows = []
    for r in runs:
        figs = "<br>".join(
            f"{html.escape(f['label'])}: {f['value']:.3g}{html.escape(f['unit'])}"
            for f in r.figures.values()
        )
        status = "ok" if r.ok else f"FAILED: {html.escape(r.error)}"
        rows.append(f"<tr><td><a href='{r.name}.html'>{r.name}</a></td><td>{status}</td>"
                    f"<td>{r.seconds:.1f} s</td><td>{figs}</td></tr>")
    (out / "index.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>Async PostgreSQL pooling: the series</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "td,th{padding:.3em .8em;text-align:left;vertical-align:top}</style>"
        "<h1>Async PostgreSQL connection pooling, measured</h1>"
        "<table><tr><th>notebook</th><th>status</th><th>time</th><th>headline figures</th></tr>"
        + "".join(rows) + "</table>",
        encoding="utf-8",
    )


def summary_lines(runs: list[NotebookRun]) -> list[str]:
    """The short report ``make run`` prints."""
    lines = [f"{'notebook':34} {'status':7} {'time':>7}"]
    for r in runs:
        lines.append(f"{r.name:34} {'ok' if r.ok else 'FAILED':7} {r.seconds:6.1f}s")
        for f in r.figures.values():
            lines.append(f"    {f['label']}: {f['value']:.3g}{f['unit']}")
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
