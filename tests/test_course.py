"""The series as a whole: agenda timings agree, links resolve, practice copies are current,
`make run`'s kernels, summary and index (any number of notebooks, skipped sections, failures
without terminal colour codes), and the rendered site opens in a real headless browser with
its plots, its index fitting a 1280-pixel window."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import nbformat
import pytest

from helpers._infra.links import INSTRUCTOR, PRACTICE, practice_copy, series, sync
from helpers._infra.paths import NOTEBOOKS, ROOT
from helpers._infra.site import (
    NotebookRun,
    execute,
    index_html,
    kernel_env,
    pages_for,
    read_figures,
    short_error,
    summary_lines,
    write_site,
)
from helpers.lesson import FIGURES_ENV

#: What an IPython traceback's last line looks like to nbclient: red terminal colour codes.
ANSI_ERROR = ("\x1b[0;31m---------------------------------------------------------------\x1b[0m\n"
              "\x1b[0;31mTooManyConnectionsError\x1b[0m: sorry, too many clients already "
              "(postgresql://course:***@127.0.0.1:5432/a_database_name_without_any_break_in_it)")


def test_derived_files_are_current() -> None:
    """Navigation lines, README table, agenda and practice copies match the headers."""
    assert sync(check=True) == [], "run `python -m helpers links` and commit the result"


def test_agenda_minutes_agree_with_notebook_headers() -> None:
    agenda = INSTRUCTOR.read_text().split("<!-- agenda:start -->")[1].split("<!-- agenda:end")[0]
    rows = re.findall(r"^\| [\d:]+ \| (\d\d) · .*? \| (\d+) min \| (\d+) min \|$", agenda, re.M)
    from_agenda = {number: (int(t), int(e)) for number, t, e in rows}
    from_headers = {e.number: (e.teaching_min, e.exercise_min) for e in series()}
    assert from_agenda == from_headers


def _links(markdown: str) -> list[str]:
    return [m for m in re.findall(r"\]\(([^)\s]+)\)", markdown)
            if not re.match(r"[a-z]+:", m) and not m.startswith("#")]


def _documents() -> list[tuple[Path, str]]:
    docs = [(p, p.read_text()) for p in (ROOT / "README.md", INSTRUCTOR,
                                         ROOT / "TROUBLESHOOTING.md")]
    for path in [*NOTEBOOKS.glob("[0-9][0-9]-*.ipynb"), *PRACTICE.glob("*.ipynb")]:
        nb = nbformat.read(path, as_version=4)
        docs.append((path, "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")))
    return docs


def test_relative_links_resolve() -> None:
    broken = []
    for path, text in _documents():
        for link in _links(text):
            target = (path.parent / link.split("#")[0]).resolve()
            if not target.exists():
                broken.append(f"{path.relative_to(ROOT)} -> {link}")
    assert not broken, broken


def test_every_notebook_links_prev_and_next() -> None:
    entries = series()
    for i, e in enumerate(entries):
        header = nbformat.read(e.path, as_version=4).cells[0].source
        if i > 0:
            assert f"Previous: [{entries[i - 1].short}]({entries[i - 1].name})" in header
        if i < len(entries) - 1:
            assert f"Next: [{entries[i + 1].short}]({entries[i + 1].name})" in header


def test_practice_copies_have_no_outputs_or_executed_solutions() -> None:
    copies = sorted(PRACTICE.glob("*.ipynb"))
    assert [p.name for p in copies] == [e.name for e in series()]
    for path in copies:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            assert "solution" not in cell.metadata.get("tags", [])
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None


def test_practice_copy_is_made_by_nbconvert_preprocessors() -> None:
    """Executed solutions (tagged ``solution``) go, outputs and counts are cleared, the folded
    solution stays, and links out of notebooks/ get one more ``../``."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("See [the index](../README.md) and [02](02-pooling.ipynb)."),
        nbformat.v4.new_code_cell("1 + 1", execution_count=3, outputs=[
            nbformat.v4.new_output("execute_result", {"text/plain": "2"}, execution_count=3)]),
        nbformat.v4.new_markdown_cell("<details><summary>Solution</summary>\n\n```python\nx\n```"
                                      "\n</details>"),
        nbformat.v4.new_code_cell("x", metadata={"tags": ["solution"]}),
    ]
    copy = practice_copy(nb)
    assert [c.cell_type for c in copy.cells] == ["markdown", "code", "markdown"]
    assert copy.cells[1].outputs == [] and copy.cells[1].execution_count is None
    assert "(../../README.md)" in copy.cells[0].source and "(02-pooling.ipynb)" in copy.cells[0].source
    assert len(nb.cells) == 4 and nb.cells[1].outputs, "the original is left as it was"


def test_kernel_gets_its_environment_explicitly(tmp_path: Path) -> None:
    """`make run` passes the figures folder to the kernel (nbclient -> start_kernel(env=...)),
    never through os.environ; a failing cell's error is one line without colour codes."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import os\nprint(os.environ['PGCOURSE_FIGURES_DIR'])"),
                nbformat.v4.new_code_cell("raise ValueError('the lesson failed here')")]
    path = tmp_path / "97-env.ipynb"
    nbformat.write(nb, path)
    before = os.environ.get(FIGURES_ENV)
    executed, run = execute(path, timeout=60, env=kernel_env(tmp_path / "figures"))
    assert os.environ.get(FIGURES_ENV) == before, "make run must not write os.environ"
    assert executed.cells[0].outputs[0].text.strip() == str(tmp_path / "figures")
    assert not run.ok and run.error == "ValueError: the lesson failed here"


def test_unreadable_notebook_is_a_failed_run(tmp_path: Path) -> None:
    """A notebook still being written (invalid JSON) fails its run; the series goes on."""
    path = tmp_path / "11-draft.ipynb"
    path.write_text("{ not json yet")
    nb, run = execute(path, timeout=10)
    assert nb is None and not run.ok and "not a readable notebook" in run.error


def test_failed_status_has_no_terminal_colour_codes() -> None:
    error = short_error(ANSI_ERROR)
    assert error.startswith("TooManyConnectionsError: sorry") and "\x1b" not in error
    page = index_html(pages_for([]), [NotebookRun("05-x", False, 1.0, ANSI_ERROR)])
    assert "\x1b" not in page and "[0;31m" not in page


def test_summary_and_index_list_skipped_sections(tmp_path: Path) -> None:
    """Lessons write ``"_skipped": [lines]`` next to their figures (Lesson._write_figures)."""
    skipped = "skipped: no PgBouncer on this machine; install it with `apt-get install pgbouncer`"
    fig = tmp_path / "07-scaling-out.json"
    fig.write_text(json.dumps({"ratio": {"value": 2.5, "unit": "x", "label": "ratio"},
                               "_skipped": [skipped]}))
    figures, skipped_lines = read_figures(fig)
    assert list(figures) == ["ratio"] and skipped_lines == [skipped]
    run = NotebookRun("07-scaling-out", True, 3.0, figures=figures, skipped=skipped_lines)
    lines = summary_lines([run])
    assert f"    07: {skipped}" in lines and "    ratio: 2.5x" in lines
    page = index_html(pages_for([]), [run])
    assert "no PgBouncer on this machine" in page and "<code>apt-get install pgbouncer</code>" in page


def _header(number: int) -> str:
    return (f"# {number:02d} · Lesson {number}: a title\n\n**Objectives.**\n\n- learn `x{number}`\n\n"
            f"**Time:** {10 + number} min teaching, 5 min exercises.\n\n[Index](../README.md)")


def test_index_takes_any_number_of_notebooks_even_unfinished_ones(tmp_path: Path) -> None:
    """The series grows (09, 10, 11, ...): every notebook gets a row, one still being written
    (no header yet) is named after its file, one that is not JSON yet still gets its run's row."""
    for n in range(12):
        nb = nbformat.v4.new_notebook()
        nb.cells.append(nbformat.v4.new_markdown_cell(_header(n) if n != 10 else "draft"))
        nbformat.write(nb, tmp_path / f"{n:02d}-lesson-{n}.ipynb")
    pages = pages_for(sorted(tmp_path.glob("*.ipynb")))
    runs = [NotebookRun(p.stem, True, 1.0) for p in pages] + [
        NotebookRun("12-unreadable", False, 0.0, "not a readable notebook: ...")]
    page = index_html(pages, runs)
    assert re.findall(r"href=\"(\d\d-[\w-]+\.html)\"", page) == [f"{p.stem}.html" for p in pages]
    assert "10-lesson-10" in page and "12-unreadable" in page and "13 notebooks" in page
    assert "<code>x11</code>" in page
    assert f"{sum(10 + n for n in range(12) if n != 10)} + {5 * 11} min" in page


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


_PROBE = """<script>window.addEventListener('load', () => {
  const plots = [...document.images].filter(i => i.src.startsWith('data:image/png')
                                                 && i.complete && i.naturalWidth > 100);
  document.documentElement.setAttribute('data-probe', JSON.stringify({
    plots: plots.length, nav: document.querySelectorAll('nav.course-nav a').length,
    links: [...document.querySelectorAll('a[href$=".html"]')].map(a => a.getAttribute('href')),
    width: document.documentElement.scrollWidth, viewport: window.innerWidth,
    ansi: document.body.innerText.includes('\\u001b') || /\\[[0-9;]+m/.test(document.body.innerText)
  }));
});</script>"""


def _open_in_browser(browser: str, page: Path, profile: Path) -> dict:
    """Load a page in headless Chromium and read what the probe script saw after load."""
    probed = page.with_name("probe-" + page.name)
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"),
                      encoding="utf-8")
    out = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-quic", f"--user-data-dir={profile}",
         "--window-size=1280,900", "--hide-scrollbars",
         "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()],
        capture_output=True, text=True, timeout=120)
    match = re.search(r"data-probe=\"([^\"]+)\"", out.stdout)
    assert match, f"the page did not load in Chromium: {out.stderr[-500:]}"
    return json.loads(match.group(1).replace("&quot;", '"'))


def test_site_opens_in_headless_browser_with_plots(tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI") or os.environ.get("PGCOURSE_REQUIRE_BROWSER"):
            pytest.fail("Chromium is required in CI (.ci/run installs Debian's chromium)")
        pytest.skip("no chromium here (apt-get install chromium); CI always runs this test")
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]-*.ipynb"))
    nbs = [(p, nbformat.read(p, as_version=4)) for p in paths]
    site = tmp_path / "site"
    # as `make run` leaves it: one notebook failed (an IPython error line), one skipped a section
    runs = [NotebookRun(p.stem, True, 9.5, figures={"r": {"value": 27.6, "unit": "x",
                                                         "label": "pool / connect per request"}})
            for p in paths]
    runs[0].error, runs[0].ok = short_error(ANSI_ERROR), False
    runs[-1].skipped = ["skipped: no PgBouncer on this machine; install it with "
                        "`apt-get install pgbouncer` or `python -m helpers pgbouncer install`"]
    write_site(nbs, site, runs)
    index = _open_in_browser(browser, site / "index.html", tmp_path / "profile")
    assert sorted(index["links"]) == sorted(f"{p.stem}.html" for p in paths)
    assert index["viewport"] == 1280 and index["width"] <= index["viewport"], (
        f"the index is {index['width']} px wide in a {index['viewport']} px window")
    assert not index["ansi"], "terminal colour codes in the index"
    with_plots = next(p for p, nb in nbs if "image/png" in json.dumps(nb))
    page = _open_in_browser(browser, site / f"{with_plots.stem}.html", tmp_path / "profile")
    assert page["plots"] >= 1, page
    assert page["nav"] >= 2, "index and previous/next links at the top"
    for link in page["links"]:
        assert (site / link).exists(), f"{with_plots.stem}.html links to missing {link}"
