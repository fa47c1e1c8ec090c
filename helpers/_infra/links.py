"""The series as a whole: titles, minutes, navigation links, practice copies, the agenda.

Each notebook's header cell is the single source of its title and its minutes
("**Time:** 25 min teaching, 10 min exercises"). From those, ``python -m helpers links``
writes everything derived (and ``--check`` verifies it is current, which a test does):

* the prev / index / next line in every notebook's header,
* the series table in ``README.md`` and the agenda in ``INSTRUCTOR.md`` (between markers),
* the practice copies in ``notebooks/practice/``: nbconvert's ``TagRemovePreprocessor`` drops
  the cells tagged ``solution``, its ``ClearOutputPreprocessor`` clears the outputs.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbconvert.preprocessors import ClearOutputPreprocessor, Preprocessor, TagRemovePreprocessor

from helpers._infra.paths import NOTEBOOKS, ROOT

NAV_PREFIX = "[Index](../README.md)"
PRACTICE = NOTEBOOKS / "practice"
README = ROOT / "README.md"
INSTRUCTOR = ROOT / "INSTRUCTOR.md"
_TIME = re.compile(r"\*\*Time:\*\*\s*(\d+)\s*min teaching,\s*(\d+)\s*min exercises")


@dataclass(frozen=True)
class Entry:
    """One notebook of the series, as its header describes it."""

    path: Path
    number: str
    title: str  # the full title, e.g. "02 · Pooling: what a pool buys"
    short: str  # before the colon, e.g. "02 · Pooling"
    teaching_min: int
    exercise_min: int
    summary: str  # the first objective, as a one-line description

    @property
    def name(self) -> str:
        return self.path.name


def describe(path: Path) -> Entry:
    """One notebook as its header cell describes it; ``ValueError`` when the header lacks the
    title or the minutes line (a notebook still being written)."""
    cells = nbformat.read(path, as_version=4).cells
    header = cells[0].source if cells and cells[0].cell_type == "markdown" else ""
    title = header.splitlines()[0].lstrip("# ").strip() if header.strip() else ""
    match = _TIME.search(header)
    if not title or not match:
        raise ValueError(f"{path.name}: header lacks a title or "
                         "'**Time:** N min teaching, M min exercises'")
    # a bullet and its indented continuation lines, joined into one line
    objectives = [" ".join(b.split()) for b in
                  re.findall(r"^- (.+(?:\n {2,}.+)*)", header, flags=re.M)]
    return Entry(path, path.name[:2], title, title.split(":")[0].strip(),
                 int(match.group(1)), int(match.group(2)),
                 objectives[0].rstrip(";.") if objectives else "")


def series(folder: Path = NOTEBOOKS) -> list[Entry]:
    """The notebooks in order, with what their headers say (``ValueError`` on a header that
    lacks its title or minutes: everything derived needs them)."""
    return [describe(path) for path in sorted(folder.glob("[0-9][0-9]-*.ipynb"))]


def nav_line(entries: list[Entry], i: int) -> str:
    """The header's navigation line for notebook ``i``: index, previous, next."""
    parts = [NAV_PREFIX]
    if i > 0:
        parts.append(f"Previous: [{entries[i - 1].short}]({entries[i - 1].name})")
    if i < len(entries) - 1:
        parts.append(f"Next: [{entries[i + 1].short}]({entries[i + 1].name})")
    return " · ".join(parts)


def _replace_between(text: str, marker: str, body: str) -> str:
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    if start not in text or end not in text:
        raise ValueError(f"markers {start} / {end} not found")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def series_table(entries: list[Entry]) -> str:
    """The README's table of the series."""
    rows = ["| notebook | you will | teaching | exercises |", "|---|---|---|---|"]
    rows += [f"| [{e.title}](notebooks/{e.name}) | {e.summary} | {e.teaching_min} min | "
             f"{e.exercise_min} min |" for e in entries]
    total = sum(e.teaching_min + e.exercise_min for e in entries)
    rows.append(f"| **total** | | {sum(e.teaching_min for e in entries)} min | "
                f"{sum(e.exercise_min for e in entries)} min ({total} min in all) |")
    return "\n".join(rows)


def agenda_table(entries: list[Entry]) -> str:
    """The instructor guide's agenda: a running clock from 0:00, one row per notebook."""
    rows = ["| start | notebook | teaching | exercises |", "|---|---|---|---|"]
    clock = 0
    for e in entries:
        rows.append(f"| {clock // 60}:{clock % 60:02d} | {e.title} | {e.teaching_min} min | "
                    f"{e.exercise_min} min |")
        clock += e.teaching_min + e.exercise_min
    rows.append(f"| {clock // 60}:{clock % 60:02d} | end (plus breaks) | | |")
    return "\n".join(rows)


class RelinkPreprocessor(Preprocessor):
    """Relative links in markdown cells, for a copy one folder deeper (``notebooks/practice/``):
    links out of ``notebooks/`` (``../README.md``) get one more ``../``."""

    def preprocess_cell(self, cell, resources, index):
        if cell.cell_type == "markdown":
            cell.source = cell.source.replace("](../", "](../../")
        return cell, resources


def practice_preprocessors() -> list[Preprocessor]:
    """What makes a practice copy, in order: nbconvert's own preprocessors drop the executed
    solution cells (tagged ``solution``) and clear every output and execution count."""
    return [TagRemovePreprocessor(remove_cell_tags={"solution"}), ClearOutputPreprocessor(),
            RelinkPreprocessor()]


def practice_copy(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A clean copy for learners: outputs cleared, executed solution cells removed (the folded
    ``<details>`` solutions stay in the markdown for when they are stuck)."""
    clean = copy.deepcopy(nb)
    for preprocessor in practice_preprocessors():
        clean, _ = preprocessor.preprocess(clean, {})
    return clean


def sync(check: bool = False) -> list[str]:
    """Write (or, with ``check``, only compare) everything derived from the headers.

    Returns the files that were (or would be) changed.
    """
    entries = series()
    changed: list[str] = []

    def put(path: Path, text: str) -> None:
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            changed.append(str(path.relative_to(ROOT)))
            if not check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text, encoding="utf-8")

    for i, entry in enumerate(entries):
        nb = nbformat.read(entry.path, as_version=4)
        lines = nb.cells[0].source.splitlines()
        nav = [n for n, line in enumerate(lines) if line.startswith(NAV_PREFIX)]
        if not nav:
            raise ValueError(f"{entry.name}: header has no line starting with {NAV_PREFIX}")
        lines[nav[0]] = nav_line(entries, i)
        nb.cells[0].source = "\n".join(lines)
        put(entry.path, nbformat.writes(nb) + "\n")
        put(PRACTICE / entry.name, nbformat.writes(practice_copy(nb)) + "\n")
    stale = {p.name for p in PRACTICE.glob("*.ipynb")} - {e.name for e in entries}
    for name in sorted(stale):
        changed.append(f"notebooks/practice/{name}")
        if not check:
            (PRACTICE / name).unlink()
    put(README, _replace_between(README.read_text(encoding="utf-8"), "series",
                                 series_table(entries)))
    if INSTRUCTOR.exists():
        put(INSTRUCTOR, _replace_between(INSTRUCTOR.read_text(encoding="utf-8"), "agenda",
                                         agenda_table(entries)))
    return changed
