"""``make bench``'s machinery with tiny sizes (the full run takes minutes; this takes seconds)."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

from helpers._infra.tools import load_tool
from helpers.db import Target

bench = load_tool("bench")

#: The figures issue 9 asks for (series_seconds comes from the series, skipped here).
KEYS = ("pool_vs_connect_per_request", "pool_vs_direct", "pool_vs_pgbench", "copy_vs_psql_copy",
        "copy_vs_row_loop", "asyncpg_vs_psycopg_pool", "embedded_cold_start_seconds")


def _scratch() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("pgcourse-bench-*"))


def test_quick_run_writes_every_figure(tmp_path: Path, capsys) -> None:
    before = _scratch()
    assert bench.cli(["--", "--quick", "--series", "skip", "--out", str(tmp_path)]) == 0
    assert _scratch() <= before, "the cold-start server and the CSV folder are removed"
    figures = json.loads((tmp_path / "bench.json").read_text())
    for key in KEYS:
        assert isinstance(figures[key], float) and figures[key] > 0, key
    assert figures["pool_vs_connect_per_request"] > 1  # even at tiny sizes
    assert figures["pool_no_reset_vs_direct_uvloop"] > 0  # both event loops ran
    assert all(isinstance(v, (int, float)) or v is None for v in figures.values())  # flat
    md = (tmp_path / "bench.md").read_text()
    assert "| `pool_vs_pgbench` |" in md and "Machine: " in md and "PostgreSQL " in md
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "| `copy_vs_row_loop` |" in printed and "bench.json" in printed


def test_tools_get_the_password_from_the_environment() -> None:
    target = Target("postgresql://alice:not-a-real-pw%21@127.0.0.1:5999/course?sslmode=disable",
                    "DATABASE_URL")
    env = bench.tool_env(target, "bench_x")
    assert env["PGPASSWORD"] == "not-a-real-pw!" and env["PGOPTIONS"] == "-c search_path=bench_x"
    assert (env["PGHOST"], env["PGPORT"], env["PGUSER"], env["PGDATABASE"], env["PGSSLMODE"]) \
        == ("127.0.0.1", "5999", "alice", "course", "disable")


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="notebooks.00-setup.ipynb" name="Cell 0" time="1.5" />
<testcase classname="notebooks.00-setup.ipynb" name="Cell 1" time="0.5" />
<testcase classname="notebooks.08-choosing-a-driver.ipynb" name="Cell 0" time="3.0">
<failure message="boom" /></testcase>
<testcase classname="tests.test_load" name="test_sweep" time="9.0" />
</testsuite></testsuites>"""


def test_series_time_from_a_junit_report(tmp_path: Path) -> None:
    report = tmp_path / "junit.xml"
    report.write_text(JUNIT)
    series = bench.series_from_junit(report)
    assert series["notebooks"] == {"00-setup": 2.0, "08-choosing-a-driver": 3.0}
    assert series["seconds"] == 5.0 and series["failures"] == 1
    notebooks = [tmp_path / "00-setup.ipynb", tmp_path / "08-choosing-a-driver.ipynb",
                 tmp_path / "09-x.ipynb"]
    for nb in notebooks:
        nb.write_text("{}")
    later = time.time() + 60
    os.utime(report, (later, later))
    assert bench.fresh_junit(notebooks[:2], [report]) == report
    assert bench.fresh_junit(notebooks, [report]) is None  # 09 is not in the report
    os.utime(report, (0, 0))  # older than the notebooks: stale
    assert bench.fresh_junit(notebooks[:2], [report]) is None


def test_tables_from_a_synthetic_result() -> None:
    s = bench.Settings.quick()
    machine = {"cores": 2, "cpu": "CPU", "memory_gb": 4.0, "os": "Linux x86_64",
               "python": "3.11", "asyncpg": "0.32.0", "psycopg": "3.3.9",
               "psycopg_pool": "3.3.3", "uvloop": "0.23.0", "date": "today",
               "load_before": 0.5, "postgres": "18.6", "database": "embedded"}
    r = bench.BenchResult(s, machine)
    rates = {"direct": 30_000, "pool": 10_000, "pool_no_reset": 19_500, "psycopg_pool": 6_000,
             "psycopg_pool_autocommit": 11_000, "connect_per_request": 250}
    for variant, rps in rates.items():
        r.rps[variant] = {"asyncio": [rps * 0.9, rps, rps * 1.1]}
        if variant != "connect_per_request":
            r.rps[variant]["uvloop"] = [rps * 1.2]
    r.pgbench_tps = [70_000]
    r.bulk = {"copy": [2.5e6], "psql_copy": [2.2e6], "executemany": [3.5e5], "row_loop": [8e3]}
    r.cold_start_s = 2.0
    f = bench.figures(r)
    assert math.isclose(f["pool_vs_direct"], 1 / 3)
    assert math.isclose(f["pool_vs_connect_per_request"], 40)
    assert math.isclose(f["pool_no_reset_vs_direct_uvloop"], 0.65)
    assert "series_seconds" not in f
    goals = "\n".join(bench.goal_lines(f))
    assert "no-op reset, uvloop: 0.65x (reaches 0.6)" in goals
    assert "default reset, asyncio loop: 0.33x (misses 0.6)" in goals
    md = bench.markdown(r, f)
    assert "| `pool_vs_direct` | 0.33x |" in md and "Machine: 2 cores (CPU)" in md
