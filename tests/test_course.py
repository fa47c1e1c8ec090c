"""The series as a whole: agenda timings agree, links resolve, practice copies are current,
and the rendered site opens in a real headless browser with its plots."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import nbformat
import pytest

from helpers._infra.links import INSTRUCTOR, PRACTICE, series, sync
from helpers._infra.paths import NOTEBOOKS, ROOT
from helpers._infra.site import write_site


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


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


_PROBE = """<script>window.addEventListener('load', () => {
  const plots = [...document.images].filter(i => i.src.startsWith('data:image/png')
                                                 && i.complete && i.naturalWidth > 100);
  document.documentElement.setAttribute('data-probe', JSON.stringify({
    plots: plots.length, nav: document.querySelectorAll('nav.course-nav a').length,
    links: [...document.querySelectorAll('a[href$=".html"]')].map(a => a.getAttribute('href'))
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
    write_site(nbs, site)
    index = _open_in_browser(browser, site / "index.html", tmp_path / "profile")
    assert sorted(index["links"]) == sorted(f"{p.stem}.html" for p in paths)
    with_plots = next(p for p, nb in nbs if "image/png" in json.dumps(nb))
    page = _open_in_browser(browser, site / f"{with_plots.stem}.html", tmp_path / "profile")
    assert page["plots"] >= 1, page
    assert page["nav"] >= 2, "index and previous/next links at the top"
    for link in page["links"]:
        assert (site / link).exists(), f"{with_plots.stem}.html links to missing {link}"
