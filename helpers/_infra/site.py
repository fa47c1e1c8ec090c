"""Execute the series headless: ``make run`` (into ``build/``) and ``make refresh`` (in place).

``run`` executes every notebook in a fresh kernel, writes the executed copy, one HTML page per
notebook and an index page to ``build/``, and prints a summary: which notebooks ran, how long
they took, the headline figures they recorded with ``lesson.record(...)`` and the sections
they skipped on this machine (``lesson.skip(...)``).

The pages are nbconvert's: :class:`SiteExporter` is its ``HTMLExporter`` with the template in
``templates/course/`` (the "lab" page plus the series' navigation bar) and a markdown renderer
that points links between notebooks at their pages. The index page is the Jinja2 template
``templates/course/series.html.j2``.

``refresh`` executes the notebooks and stores the outputs in ``notebooks/`` itself, which is how
committed outputs (plots a reader sees on GitHub) are updated: review the diff, then commit.

The kernels get their environment explicitly (``PGCOURSE_FIGURES_DIR``: where lessons write
their figures): nothing here writes ``os.environ``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import jinja2
import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError
from nbconvert import HTMLExporter
from nbconvert.filters.ansi import strip_ansi
from nbconvert.filters.markdown_mistune import IPythonRenderer, MarkdownWithMath
from traitlets import default

from helpers._infra.paths import BUILD, NOTEBOOKS
from helpers._infra.settings import child_env
from helpers.lesson import FIGURES_ENV

CELL_TIMEOUT_S = 600
RAISES_MARK = "NBVAL_RAISES_EXCEPTION"
TEMPLATES = Path(__file__).resolve().parent / "templates"
TITLE = "Async PostgreSQL connection pooling, measured"
#: The key under which a lesson's figures file lists the sections it skipped.
SKIPPED_KEY = "_skipped"


@dataclass
class NotebookRun:
    """The outcome of executing one notebook."""

    name: str
    ok: bool
    seconds: float
    error: str = ""
    figures: dict[str, dict] = field(default_factory=dict)
    #: What the notebook could not do here ("skipped: no PgBouncer on this machine; ...").
    skipped: list[str] = field(default_factory=list)


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


def kernel_env(figures_dir: Path | None = None) -> dict[str, str]:
    """The environment of a notebook's kernel under ``make run`` / ``make refresh``: this
    process's, no progress bars, and where to write the figures."""
    extra = {"PGCOURSE_PROGRESS": "0"}
    if figures_dir is not None:
        extra[FIGURES_ENV] = str(figures_dir)
    return child_env(**extra)


def execute(path: Path, timeout: int = CELL_TIMEOUT_S, env: dict[str, str] | None = None
            ) -> tuple[nbformat.NotebookNode | None, NotebookRun]:
    """Run a notebook top to bottom in a new kernel (working folder: ``notebooks/``).

    ``env`` is the kernel's environment: nbclient passes ``execute()``'s keyword arguments to
    the kernel manager's ``start_kernel``, whose provisioner launches the kernel with it.
    A file that is not a notebook (yet) is a failed run, not a crash of the series.
    """
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as exc:  # a notebook still being written: invalid JSON or schema
        return None, NotebookRun(path.stem, False, 0.0, f"not a readable notebook: {exc}"[:300])
    tagged = mark_expected_errors(nb)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(path.parent)}})
    t0 = time.perf_counter()
    error = ""
    try:
        client.execute(env=env if env is not None else kernel_env())
    except CellExecutionError as exc:
        error = short_error(f"{exc.ename}: {exc.evalue}" if exc.ename else str(exc))
    except CellTimeoutError as exc:
        error = short_error(str(exc))
    for cell in tagged:
        cell.metadata["tags"].remove("raises-exception")
        if not cell.metadata["tags"]:
            del cell.metadata["tags"]
    seconds = time.perf_counter() - t0
    return nb, NotebookRun(path.stem, not error, seconds, error)


def short_error(text: str) -> str:
    """The last line of an error, without the terminal colour codes of an IPython traceback."""
    lines = [ln for ln in strip_ansi(text).strip().splitlines() if ln.strip()]
    return lines[-1].strip()[:300] if lines else "error"


def read_figures(path: Path) -> tuple[dict[str, dict], list[str]]:
    """A lesson's figures file: its recorded figures, and the sections it skipped."""
    if not path.exists():
        return {}, []
    data = json.loads(path.read_text())
    skipped = data.pop(SKIPPED_KEY, [])
    return data, [str(line) for line in skipped]


def run_series(names: list[str] | None = None, out: Path = BUILD) -> list[NotebookRun]:
    """Execute the series into ``out``: executed notebooks, the HTML site, a summary."""
    figures_dir = out / "figures"
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    figures_dir.mkdir(parents=True, exist_ok=True)
    env = kernel_env(figures_dir)
    runs, executed = [], []
    for path in notebooks(names):
        print(f"  running {path.name} ...", flush=True)
        fig_file = figures_dir / f"{path.stem}.json"
        fig_file.unlink(missing_ok=True)
        nb, result = execute(path, env=env)
        result.figures, result.skipped = read_figures(fig_file)
        runs.append(result)
        if nb is not None:
            nbformat.write(nb, out / "notebooks" / path.name)
            executed.append((path, nb))
    write_site(executed, out, runs)
    (out / "summary.json").write_text(json.dumps([r.__dict__ for r in runs], indent=2))
    return runs


# -- the site -----------------------------------------------------------------------------------

def page_href(url: str) -> str:
    """Where a link in a notebook points on the site: another notebook of the series
    (``03-transactions.ipynb``) to its page, the README (the series' index) to ``index.html``;
    anything else as it is (``build/`` sits in the repository, so ``../`` still resolves)."""
    path, sep, fragment = url.partition("#")
    if "://" in path or not path:
        return url
    pure = PurePosixPath(path)
    if pure.suffix == ".ipynb" and pure.parent == PurePosixPath(".") and pure.name[:2].isdigit():
        path = pure.with_suffix(".html").name
    elif path == "../README.md":
        path = "index.html"
    return path + sep + fragment


class SiteRenderer(IPythonRenderer):
    """nbconvert's markdown renderer, with links between notebooks pointing at their pages."""

    def link(self, text: str, url: str, title: str | None = None) -> str:
        return super().link(text, page_href(url), title)


class SiteExporter(HTMLExporter):
    """nbconvert's HTML exporter with the course's template (``templates/course``: the "lab"
    page plus the navigation bar) and :class:`SiteRenderer` for markdown cells."""

    @default("template_name")
    def _template_name_default(self) -> str:
        return "course"

    @default("extra_template_basedirs")
    def _extra_template_basedirs_default(self) -> list[str]:
        return [str(TEMPLATES)]  # nbconvert's default is the current folder

    @jinja2.pass_context  # as the base class's: a Jinja filter that sees the cell
    def markdown2html(self, context: Any, source: str) -> str:
        """As ``HTMLExporter.markdown2html``, with :class:`SiteRenderer`."""
        cell = context.get("cell", {})
        renderer = SiteRenderer(
            escape=False, attachments=cell.get("attachments", {}), embed_images=self.embed_images,
            path=context.get("resources", {}).get("metadata", {}).get("path", ""),
            anchor_link_text=self.anchor_link_text,
            exclude_anchor_links=self.exclude_anchor_links, **self.lexer_options)
        return MarkdownWithMath(renderer=renderer).render(source)


@dataclass(frozen=True)
class Page:
    """One notebook's page on the site, as the index and the navigation bar name it."""

    stem: str
    number: str
    title: str  # the header's title, or the file name for a notebook still being written
    short: str
    summary: str = ""
    minutes: tuple[int, int] | None = None

    @property
    def href(self) -> str:
        return f"{self.stem}.html"


def pages_for(paths: list[Path]) -> list[Page]:
    """The pages of these notebooks, from their headers (see :func:`helpers._infra.links
    .describe`). A notebook whose header is not complete yet still gets its page, named after
    its file, so the site is built whatever state the series is in."""
    from helpers._infra.links import describe

    pages = []
    for path in paths:
        try:
            e = describe(path)
        except (ValueError, OSError, IndexError, nbformat.ValidationError):
            pages.append(Page(path.stem, path.stem[:2], path.stem, path.stem))
            continue
        pages.append(Page(path.stem, e.number, e.title, e.short, e.summary,
                          (e.teaching_min, e.exercise_min)))
    return pages


def nav(pages: list[Page], i: int) -> dict[str, dict[str, str] | None]:
    """The navigation bar of page ``i`` (``resources.course`` in the template)."""
    def link(page: Page) -> dict[str, str]:
        return {"href": page.href, "text": page.short}

    return {"index": {"href": "index.html", "text": "Index"},
            "prev": link(pages[i - 1]) if i > 0 else None,
            "here": link(pages[i]),
            "next": link(pages[i + 1]) if i < len(pages) - 1 else None}


def write_site(nbs: list[tuple[Path, nbformat.NotebookNode]], out: Path,
               runs: list[NotebookRun] | None = None) -> list[Path]:
    """Write one HTML page per notebook plus ``index.html`` into ``out``; returns the pages.

    ``make run`` passes freshly executed notebooks and their runs; tests pass the committed
    notebooks (whose stored outputs are the same kind of page) and no runs.
    """
    out.mkdir(parents=True, exist_ok=True)
    pages = pages_for([p for p, _ in nbs])
    exporter = SiteExporter()
    written = []
    for i, ((_, nb), page) in enumerate(zip(nbs, pages, strict=True)):
        body, _ = exporter.from_notebook_node(
            nb, resources={"metadata": {"name": page.title}, "course": nav(pages, i)})
        target = out / page.href
        target.write_text(body, encoding="utf-8")
        written.append(target)
    (out / "index.html").write_text(index_html(pages, runs), encoding="utf-8")
    return written


def index_html(pages: list[Page], runs: list[NotebookRun] | None = None) -> str:
    """The site's index page: one row per notebook (any number), with the runs' status, time,
    figures and skipped sections when ``runs`` is given (a notebook that could not even be
    read has a run and no page: it gets a row too)."""
    from markupsafe import Markup
    from nbconvert.filters.markdown_mistune import markdown2html_mistune

    by_name = {r.name: r for r in runs or []}
    known = {p.stem for p in pages}
    pages = pages + [Page(r.name, r.name[:2], r.name, r.name) for r in runs or []
                     if r.name not in known]
    pages.sort(key=lambda p: p.stem)
    rows = []
    for page in pages:
        run = by_name.get(page.stem)
        rows.append({
            "number": page.number, "href": page.href if page.stem in known else "",
            "title": page.title,
            "summary_html": Markup(markdown2html_mistune(page.summary)) if page.summary else "",
            "minutes": f"{page.minutes[0]} + {page.minutes[1]} min" if page.minutes else "",
            "run": run, "error": strip_ansi(run.error) if run else "",
            "skipped": [Markup(markdown2html_mistune(line)) for line in run.skipped]
            if run else [],
            "figures": [(f["label"], format_figure(f)) for f in run.figures.values()]
            if run else [],
        })
    teaching = sum(p.minutes[0] for p in pages if p.minutes)
    exercises = sum(p.minutes[1] for p in pages if p.minutes)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES / "course"),
                             autoescape=True, keep_trailing_newline=True)
    return env.get_template("series.html.j2").render(
        title=TITLE, css=Markup((TEMPLATES / "course" / "site.css").read_text()), rows=rows,
        ran=runs is not None, total_minutes=f"{teaching} + {exercises}",
        failed=sum(1 for r in runs or [] if not r.ok),
        total_seconds=sum(r.seconds for r in runs or []))


def format_figure(figure: dict) -> str:
    """A recorded figure with its unit: "27.6x", "0.12 s", "386 of 600"."""
    unit, value = figure["unit"].strip(), figure["value"]
    number = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"  # 1,660, not 1.66e+03
    return f"{number}{'' if unit in ('x', '%', '') else ' '}{unit}"


def summary_lines(runs: list[NotebookRun]) -> list[str]:
    """The short report ``make run`` prints: per notebook its status and time, then its
    figures, the sections it skipped here and its error."""
    lines = [f"{'notebook':34} {'status':7} {'time':>7}"]
    for r in runs:
        lines.append(f"{r.name:34} {'ok' if r.ok else 'FAILED':7} {r.seconds:6.1f}s")
        for f in r.figures.values():
            lines.append(f"    {f['label']}: {format_figure(f)}")
        for line in r.skipped:
            lines.append(f"    {r.name[:2]}: {line}")
        if r.error:
            lines.append(f"    {r.error}")
    return lines


def refresh(names: list[str] | None = None) -> list[NotebookRun]:
    """Execute notebooks and store their outputs in place (review the diff, then commit)."""
    runs = []
    for path in notebooks(names):
        print(f"  refreshing {path.name} ...", flush=True)
        nb, result = execute(path, env=kernel_env())
        if result.ok and nb is not None:
            nb.metadata.pop("widgets", None)
            nbformat.write(nb, path)
        runs.append(result)
    return runs
