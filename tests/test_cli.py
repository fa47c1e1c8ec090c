"""``python -m helpers``: bad input gives one short message within seconds, never a hang."""

from __future__ import annotations

import socket
import time

import pytest

from tests.conftest import helpers_cli


def _assert_clear(out, *needles: str) -> None:
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "Traceback" not in text, text
    assert "secret" not in text, "the password must be masked"
    for needle in needles:
        assert needle in text, text
    error_lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(error_lines) <= 3, out.stderr


def test_check_nothing_listening() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        t0 = time.perf_counter()
        out = helpers_cli("check", env={"DATABASE_URL": f"postgresql://u:secret@127.0.0.1:{port}/x"})
    assert time.perf_counter() - t0 < 10
    _assert_clear(out, f"127.0.0.1:{port}", "connection refused", "DATABASE_URL")


def test_check_server_that_never_answers() -> None:
    """A host that accepts TCP but never speaks (a wrong port, a firewall): a bounded wait."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        t0 = time.perf_counter()
        out = helpers_cli("check", env={"DATABASE_URL": f"postgresql://u:secret@127.0.0.1:{port}/x"})
    elapsed = time.perf_counter() - t0
    assert elapsed < 10, f"took {elapsed:.1f} s"
    _assert_clear(out, f"127.0.0.1:{port}", "No answer")


def test_check_unknown_host() -> None:
    out = helpers_cli("check", env={"DATABASE_URL": "postgresql://u:secret@db.invalid:5432/x"})
    _assert_clear(out, "db.invalid")


def test_check_wrong_password_and_missing_database(target) -> None:
    if target.embedded is None:
        pytest.skip("needs the embedded server, whose credentials the test knows")
    good = target.url
    wrong_pw = good.replace(target.embedded.password(), "secret")
    _assert_clear(helpers_cli("check", env={"DATABASE_URL": wrong_pw}), "rejected the password")
    missing_db = good.rsplit("/", 1)[0] + "/no_such_db"
    out = helpers_cli("check", env={"DATABASE_URL": missing_db})
    assert "no database 'no_such_db'" in out.stderr and out.returncode == 1


def test_check_ok_on_the_course_database(target) -> None:
    out = helpers_cli("check", env={"DATABASE_URL": target.url})
    assert out.returncode == 0, out.stderr
    assert "[FAIL]" not in out.stdout
    assert "PostgreSQL 1" in out.stdout


def test_db_url_is_masked_and_status_reports(target) -> None:
    if target.embedded is None:
        pytest.skip("`db url` and `db status` manage the embedded server; DATABASE_URL is set")
    out = helpers_cli("db", "url", env={"DATABASE_URL": ""})
    assert out.returncode == 0 and "***" in out.stdout
    assert target.embedded.password() not in out.stdout
    status = helpers_cli("db", "status", env={"DATABASE_URL": ""})
    assert "running on 127.0.0.1:" in status.stdout


def test_bad_scheme_is_explained() -> None:
    out = helpers_cli("check", env={"DATABASE_URL": "mysql://u:secret@h/x"})
    _assert_clear(out, "postgresql://")
