"""The seed data: deterministic, matching its manifest, loaded once and idempotently."""

from __future__ import annotations

import gzip
import hashlib
import subprocess
import sys

from helpers._infra.paths import DATA, ROOT
from helpers._infra.seed import TABLES, ensure_seed, manifest
from helpers.db import connect
from tests.conftest import run


def test_files_match_manifest() -> None:
    m = manifest()
    for table in TABLES:
        raw = gzip.decompress((DATA / f"{table}.csv.gz").read_bytes())
        assert hashlib.sha256(raw).hexdigest() == m["tables"][table]["sha256"]
        assert raw.count(b"\n") - 1 == m["tables"][table]["rows"]
    size = sum((DATA / f"{t}.csv.gz").stat().st_size for t in TABLES)
    assert size < 4_000_000, f"seed is {size / 1e6:.1f} MB: a few MB at most"


def test_generator_is_deterministic(tmp_path) -> None:
    copy = tmp_path / "generate.py"
    copy.write_text((DATA / "generate.py").read_text())
    subprocess.run([sys.executable, str(copy)], check=True, capture_output=True, cwd=ROOT)
    for table in TABLES:
        assert (tmp_path / f"{table}.csv.gz").read_bytes() == (DATA / f"{table}.csv.gz").read_bytes()


def test_ensure_seed_is_idempotent(target) -> None:
    async def scenario():
        conn = await connect(target)
        try:
            first = await ensure_seed(conn)
            again = await ensure_seed(conn)
        finally:
            await conn.close()
        return first, again
    first, again = run(scenario())
    assert again.loaded_now is False
    assert again.rows == {t: manifest()["tables"][t]["rows"] for t in TABLES}
    assert first.version == manifest()["version"]


def test_docker_init_script_reads_the_same_version() -> None:
    script = (DATA / "02-load.sh").read_text()
    assert "manifest.json" in script and "seed_info" in script
    assert (DATA / "02-load.sh").stat().st_mode & 0o111, "init script must be executable"
