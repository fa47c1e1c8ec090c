"""The project's promises about itself: pins, lock file and environment.yml agree, compose file
valid, CI runs the README's test command, notebooks follow the team's style guide (header,
sections, folded and executed solutions: the checks below are its rules) and store no stray
errors, paths or passwords."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from helpers._infra.bootstrap import (
    LOCK,
    environment_yml,
    install_commands,
    normalize,
    read_lock,
    wanted_stamp,
)
from helpers._infra.check import pins
from helpers._infra.paths import ROOT
from helpers._infra.site import notebooks


def test_lock_pins_every_direct_pin_with_hashes() -> None:
    """requirements.lock pins pyproject.toml's direct pins at the same versions, and every
    package it lists (direct or transitive) is an exact pin with hashes."""
    locked = read_lock()
    assert locked, "requirements.lock is empty"
    versions: dict[str, set[str]] = {}
    for entry in locked:
        assert entry.hashes, f"{entry.name} has no --hash in requirements.lock"
        versions.setdefault(entry.name, set()).add(entry.version)
    for name, version in pins(include_dev=True).items():
        assert versions.get(normalize(name)) == {version}, (
            f"pyproject.toml pins {name}=={version}, requirements.lock has "
            f"{versions.get(normalize(name))}: run `python3 -m helpers._infra.bootstrap lock`")
    # psycopg[binary] pulls in psycopg-binary: the extra's packages are locked too
    assert versions.get("psycopg-binary") == {pins()["psycopg"]}
    # a name locked twice must be for exclusive platforms or Pythons (markers on both)
    for name, found in versions.items():
        if len(found) > 1:
            assert all(e.marker for e in locked if e.name == name), name


def test_environment_yml_installs_the_lock() -> None:
    """Binder / conda: environment.yml's pip section is exactly the lock's pins (markers kept)
    and the course's package, as generated from the lock."""
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pip_section == [e.requirement() for e in read_lock()] + ["-e ."]
    assert "python=3.11" in env["dependencies"]
    assert (ROOT / "environment.yml").read_text() == environment_yml(read_lock())


def test_bootstrap_installs_the_lock_and_reinstalls_when_it_changes(tmp_path: Path) -> None:
    """The bootstrap (which CI runs: `make test` creates .venv) installs the lock with hash
    checking and the course's package without resolving; its stamp hashes the lock file."""
    lock_cmd, package_cmd = install_commands(Path("/venv/bin/python"))
    assert lock_cmd[-3:] == ["--require-hashes", "-r", str(LOCK)]
    assert "--no-deps" in package_cmd and package_cmd[-2:] == ["-e", str(ROOT)]
    copy = tmp_path / "requirements.lock"
    copy.write_bytes(LOCK.read_bytes())
    assert wanted_stamp(copy) == wanted_stamp()
    copy.write_text(LOCK.read_text() + "# one more line\n")
    assert wanted_stamp(copy) != wanted_stamp()
    assert "setuptools" in {e.name for e in read_lock()}, "--no-build-isolation needs it"


def test_docker_compose_is_valid() -> None:
    import compose

    binary = Path(compose.__file__).parent / "docker-compose"  # the console script exits 0
    ok = subprocess.run([str(binary), "--env-file", ".env.example", "config", "--quiet"],
                        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    config = yaml.safe_load(subprocess.run(
        [str(binary), "--env-file", ".env.example", "config"], cwd=ROOT, capture_output=True,
        text=True, timeout=60, check=True).stdout)
    pg = config["services"]["postgres"]
    assert pg["image"].startswith("postgres:18")
    assert all(p.get("host_ip") == "127.0.0.1" for p in pg["ports"]), "loopback only"
    assert "healthcheck" in pg
    assert any(v["source"].endswith("/data") for v in pg["volumes"] if v["type"] == "bind")
    # Without a password the file refuses to start, rather than using a default secret.
    bad = subprocess.run([str(binary), "config", "--quiet"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert bad.returncode != 0 and "POSTGRES_PASSWORD" in bad.stderr


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^(make \w+)$", quickstart, flags=re.M)
    assert commands[:2] == ["make run", "make test"], commands
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^(?:exec )?make test$", ci, flags=re.M), "CI runs the README command"


def test_no_secrets_committed() -> None:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True, check=True)
    files = listed.stdout.split()  # what is or would be committed
    assert ".env" not in files and not any(f.startswith(".pgcourse") for f in files)
    # A URL with a literal password; placeholders (***, <...>, ${...}, {var}) are fine.
    pattern = re.compile(r"postgres(?:ql)?://[^:/\s]+:(?!\*\*\*|<|\$|\{|password@|change-me|not-a-real|secret@)"
                         r"[^@\s]+@")
    for name in files:
        path = ROOT / name
        if path.suffix in {".gz", ".png"} or not path.is_file():
            continue
        text = path.read_text(errors="ignore")
        assert not pattern.search(text), f"{name} contains a URL with a password"


NOTEBOOKS = notebooks()


def _code(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_follows_style(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    header = nb.cells[0].source
    assert header.startswith("# "), "title first"
    for needle in ("Objectives", "Prerequisites", "Time:", "min teaching", "min exercises",
                   "[Index](../README.md)"):
        assert needle in header, f"header lacks {needle!r}"
    text = "\n".join(c.source for c in nb.cells)
    assert "start_lesson(" in text and "await lesson.close()" in _code(nb)[-1].source
    for section in ("## Pitfalls from the wild", "## Exercises", "## Key points", "## Cleanup"):
        assert section in text, f"missing section {section!r}"
    calls = [c.source for c in _code(nb)
             if "NBVAL_RAISES_EXCEPTION" not in c.source
             and not c.source.startswith("%%writefile")  # a file's text, run by a subprocess
             and "asyncio.run(" in _without_strings(c.source)]
    assert not calls, "the kernel must never call asyncio.run() (a script it writes may)"


def _without_strings(source: str) -> str:
    """A cell's code without its string literals and comments: the source of a small app that
    a cell writes to a file for a subprocess (notebook 09, 11) is text, not a call."""
    import io
    import tokenize

    kept = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type not in (tokenize.STRING, tokenize.COMMENT):
                kept.append(tok.string)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return source
    return "".join(kept)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_exercise_solutions_are_folded_and_executed(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    solutions = 0
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown" or "<details>" not in cell.source:
            continue
        folded = re.search(r"<details>.*?```python\n(.*?)```", cell.source, flags=re.S)
        assert folded, f"cell {i}: <details> without a python solution"
        executed = nb.cells[i + 1]
        assert executed.cell_type == "code" and "solution" in executed.metadata.get("tags", [])
        assert executed.source.strip() == folded.group(1).strip(), (
            f"cell {i}: the folded solution and the executed one differ")
        assert executed.metadata.get("jupyter", {}).get("source_hidden") is True
        solutions += 1
    assert solutions >= 1


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_outputs_are_clean(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(_code(nb)):
        raises = "NBVAL_RAISES_EXCEPTION" in cell.source
        for out in cell.get("outputs", []):
            assert out.output_type != "error" or raises, f"code cell {i} stores an error"
            blob = json.dumps(out)
            for leak in (str(ROOT), "/root/", "/home/"):
                assert leak not in blob, f"code cell {i} output shows a local path ({leak})"
            assert not re.search(r"postgres(?:ql)?://[^:\s]+:(?!\*\*\*)[^@\s]+@", blob.replace(
                "not-a-real-password", "***")), f"code cell {i} output shows a password"
    assert any(c.get("outputs") for c in _code(nb)), "outputs are committed"


def test_notebook_setup_error_is_one_short_message(tmp_path: Path) -> None:
    """An unreachable DATABASE_URL in a setup cell: one red line and a hint, no traceback."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell(
        "import os\nos.environ['DATABASE_URL'] = 'postgresql://u:secret@127.0.0.1:1/x'\n"
        "from helpers import start_lesson\nlesson = await start_lesson('98-error')"))
    client = NotebookClient(nb, timeout=60, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    with pytest.raises(CellExecutionError):
        client.execute()
    error = nb.cells[0].outputs[-1]
    assert error.output_type == "error" and error.ename == "DatabaseUnavailable"
    assert len(error.traceback) == 1, error.traceback
    assert "127.0.0.1:1" in error.traceback[0] and "secret" not in error.traceback[0]


def test_helpers_import_without_third_party_packages() -> None:
    """`python3 -m helpers` must bootstrap from a bare Python: no third-party imports at startup."""
    code = ("import sys, helpers, helpers._infra.cli, helpers._infra.server, helpers.db, "
            "helpers._infra.bootstrap, helpers._infra.settings;"
            "bad = [m for m in ('asyncpg', 'pandas', 'IPython', 'nbformat') if m in sys.modules];"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


#: A measured figure in prose: a speed-up factor, a rate, a percentage.
_FIGURE = re.compile(
    r"(?<![\w.`$])\d+(?:\.\d+)?\s*(?:x|×)(?!\w|\s*\d)"  # "38x", not "2 × 6" (a product)
    r"|(?<![\w.`])\d[\d,.]*\s*k?\s*(?:requests|rows|transactions|queries|req)/s\b"
    r"|\b\d+(?:\.\d+)?\s*%")
#: Sentences where a number is a threshold, a computation or a stated range, not a reading.
_NOT_A_READING = re.compile(r"assert|claim|theor|=|goal|target|range|between|at most|headroom|"
                            r"default",
                            re.IGNORECASE)


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.stem)
def test_no_measured_figure_typed_in_prose(path: Path) -> None:
    """Prose never types a figure a cell measures (the learner's machine prints another one):
    it says "printed above", or formats the sentence from the recorded value. A number that is
    an assertion's threshold, a computation or a documented range is allowed."""
    nb = nbformat.read(path, as_version=4)
    found = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown":
            continue
        text = re.sub(r"```.*?```", "", cell.source, flags=re.S)
        text = re.sub(r"`[^`]*`", "", text)
        for sentence in re.split(r"(?<=[.!?])\s+|\n\s*\n|\n- ", text):
            for match in _FIGURE.finditer(sentence):
                if not _NOT_A_READING.search(sentence):
                    found.append(f"cell {i}: {match.group(0)!r} in {sentence.strip()[:120]!r}")
    assert not found, "measured figures typed into prose:\n" + "\n".join(found)
