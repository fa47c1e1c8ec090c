"""The capability probe and 00-setup's table, against the real server (and on plain values of
:class:`Capabilities` for the kinds of server this machine may not have)."""

from __future__ import annotations

import dataclasses

import pytest

from helpers.capabilities import (
    ALWAYS_PRIVATE,
    AUTH_METHODS,
    NEEDS,
    WITHOUT,
    Capabilities,
    auth_method,
    probe,
    table,
)
from helpers.connect_per_request import probe_connect
from helpers.db import connect
from tests.conftest import run

#: A workshop's server as INSTRUCTOR.md sets it up, without pg_stat_statements or PgBouncer.
WORKSHOP = Capabilities(
    server_version="15.18", server_version_num=150018, auth="trust", user="p01",
    superuser=False, createrole=False, signal_backends=False, pg_stat_statements=False,
    restart=False, max_connections=200, pgbouncer=None,
)
#: The course's embedded server on a machine with PgBouncer.
EMBEDDED = dataclasses.replace(
    WORKSHOP, server_version="18.6", server_version_num=180006, auth="SCRAM-SHA-256",
    user="postgres", superuser=True, createrole=True, signal_backends=True,
    pg_stat_statements=True, restart=True, pgbouncer="PgBouncer 1.24.1 (course build)",
)


def _notes(caps: Capabilities) -> dict[str, str]:
    df = table(caps)
    return dict(zip(df["capability"], df["what the notebooks do"], strict=True))


def test_every_capability_named_in_the_table_is_known() -> None:
    assert {need for items in WITHOUT.values() for need, _ in items} <= set(NEEDS)
    assert set(WITHOUT) | set(ALWAYS_PRIVATE) <= {f"{n:02d}" for n in range(12)}


def test_table_says_what_runs_where_on_a_workshop_server() -> None:
    notes = _notes(WORKSHOP)
    assert list(notes) == ["server", "authentication", "role", "superuser",
                           "pg_stat_statements", "PgBouncer", "private embedded servers"]
    assert notes["server"] == "supported (15 to 18)"
    assert "no SCRAM bar" in notes["authentication"]
    assert notes["pg_stat_statements"].count("private embedded server") == 2  # 05 and 08
    assert notes["pg_stat_statements"].startswith("05: ") and "08: " in notes["pg_stat_statements"]
    assert "07: " in notes["PgBouncer"] and "skipped" in notes["PgBouncer"]
    assert "08: " in notes["superuser"]
    assert "used as is" not in " ".join(notes.values())
    for nb in ("01", "02", "06", "09", "11"):
        assert f"{nb}: " in notes["private embedded servers"]


def test_table_on_a_server_that_has_everything() -> None:
    notes = _notes(EMBEDDED)
    assert notes["pg_stat_statements"] == "used as is by 05, 08"
    assert notes["PgBouncer"] == "used as is by 07, 10"
    assert "SCRAM" in notes["authentication"]
    df = table(EMBEDDED)
    assert df.set_index("capability").loc["PgBouncer", "this server / machine"] == (
        "PgBouncer 1.24.1 (course build)")


@pytest.mark.parametrize(("num", "note"), [(140011, "too old"), (190000, "newer"),
                                           (150000, "supported"), (180006, "supported")])
def test_table_judges_the_version(num: int, note: str) -> None:
    caps = dataclasses.replace(WORKSHOP, server_version_num=num)
    assert _notes(caps)["server"].startswith(note)


def test_probe_of_the_real_server(target) -> None:
    async def scenario():
        conn = await connect(target)
        try:
            return await probe(conn, target), await auth_method(target)
        finally:
            await conn.close()

    caps, auth = run(scenario())
    assert caps.major >= 15 and caps.max_connections > 0
    assert caps.auth == auth and auth in AUTH_METHODS.values()
    assert caps.auth == run(probe_connect(target)).auth  # the 01 probe sees the same method
    assert caps.createrole == caps.superuser  # a CREATEROLE role could not clean up
    if target.source == "embedded":
        assert caps.superuser and caps.restart and caps.auth == "SCRAM-SHA-256"
    assert len(table(caps)) == 7
