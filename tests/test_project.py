"""The project's promises about itself: pins agree, compose file valid, CI runs the README's
test command, notebooks follow STYLE.md and store no stray errors, paths or passwords."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from helpers._infra.check import pins
from helpers._infra.paths import ROOT
from helpers._infra.site import notebooks


def test_environment_yml_pins_match_pyproject() -> None:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    from_env = {}
    for line in pip_section:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==(\S+)", line)
        if match:
            from_env[match.group(1).lower()] = match.group(3)
    assert from_env == pins(include_dev=True)
    assert "python=3.11" in env["dependencies"]


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
    assert re.search(r"^exec make test$", ci, flags=re.M)


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
    assert "asyncio.run(" not in "\n".join(c.source for c in _code(nb)
                                           if "NBVAL_RAISES_EXCEPTION" not in c.source)


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
    code = ("import sys, helpers, helpers.cli, helpers.server, helpers.target, helpers.bootstrap;"
            "bad = [m for m in ('asyncpg', 'pandas', 'IPython', 'nbformat') if m in sys.modules];"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
