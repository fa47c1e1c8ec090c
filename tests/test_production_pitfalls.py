"""Notebook 09's plumbing against the real server: certificates, the TLS front (verification,
stripping, recording, cancel requests through it), multi-host URLs, a hot standby and the
scratch folder."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from pathlib import Path

import asyncpg
import pytest

from helpers.db import mask_url
from helpers.lesson import start_lesson
from helpers.production_pitfalls import (
    TlsFront,
    make_certificates,
    multi_host_url,
    scratch_folder,
    start_standby,
)
from tests.conftest import run


def test_certificates_name_one_host_and_are_private(tmp_path: Path) -> None:
    files = make_certificates(tmp_path / "tls", hostname="localhost")
    assert sorted(p.name for p in files.folder.iterdir()) == ["ca.crt", "server.crt",
                                                              "server.key"]
    assert all((p.stat().st_mode & 0o777) == 0o600 for p in files.folder.iterdir())
    text = subprocess.run(["openssl", "x509", "-in", str(files.server_cert), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    assert "DNS:localhost" in text and "IP Address" not in text
    # The chain verifies with the CA (what a client with create_default_context(cafile=) does).
    check = subprocess.run(["openssl", "verify", "-CAfile", str(files.ca_cert),
                            str(files.server_cert)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_tls_front_verifies_like_a_server_with_ssl_on(target, tmp_path: Path) -> None:
    files = make_certificates(tmp_path / "tls")
    context = ssl.create_default_context(cafile=files.ca_cert)

    async def scenario():
        async with TlsFront(target, files) as front:
            by_name = front.target.replace(host="localhost")
            conn = await asyncpg.connect(by_name.url, ssl=context)
            try:
                answer = await conn.fetchval("SELECT 1")
                # A cancel request travels through the front too: the query stops at once.
                with pytest.raises(TimeoutError):
                    await conn.fetchval("SELECT pg_sleep(5)", timeout=0.2)
                after_cancel = await asyncio.wait_for(conn.fetchval("SELECT 2"), 10)
            finally:
                await conn.close()
            with pytest.raises(ssl.SSLCertVerificationError) as wrong_host:
                await asyncpg.connect(front.target.url, ssl=context)  # 127.0.0.1
            plain = await asyncpg.connect(front.target.replace(sslmode="disable").url)
            await plain.close()
            return answer, after_cancel, wrong_host.value, list(front.handshakes)

    answer, after_cancel, wrong_host, handshakes = run(scenario())
    assert (answer, after_cancel) == (1, 2)
    assert "IP address mismatch" in wrong_host.verify_message
    assert handshakes and all(v.startswith("TLS") for v in handshakes)


def test_tls_front_can_strip_tls_and_record(target) -> None:
    async def scenario():
        async with TlsFront(target, None, record=True) as stripper:
            conn = await asyncpg.connect(stripper.target.url)  # sslmode prefer: falls back
            try:
                await conn.fetchval("SELECT $1::text", "a secret 12345")
            finally:
                await conn.close()
            with pytest.raises(ConnectionError, match="rejected SSL upgrade"):
                await asyncpg.connect(stripper.target.replace(sslmode="require").url)
            return stripper.seen(), stripper.handshakes

    seen, handshakes = run(scenario())
    assert b"a secret 12345" in seen and handshakes == []


def test_multi_host_url_keeps_order_credentials_and_query() -> None:
    from helpers.db import Target

    a = Target("postgresql://app:not-a-real%40pw%3A@127.0.0.1:5001/shop db", "test")
    b = Target("postgresql://other:not-a-real-2@127.0.0.1:5002/ignored", "test")
    url = multi_host_url(a, b, target_session_attrs="read-write")
    assert url == ("postgresql://app:not-a-real%40pw%3A@127.0.0.1:5001,127.0.0.1:5002/shop%20db"
                   "?target_session_attrs=read-write")
    assert "not-a-real" not in mask_url(url) and "***" in mask_url(url)
    with pytest.raises(ValueError):
        multi_host_url()


def test_hot_standby_replicates_and_is_stopped_at_close(target) -> None:
    async def scenario():
        lesson = await start_lesson("97-pitfalls", pool=False)
        try:
            primary = await lesson.private_server()
            standby = await start_standby(lesson, primary)
            writer = await asyncpg.connect(primary.url)
            reader = await asyncpg.connect(standby.url)
            try:
                await writer.execute("CREATE TABLE t (n int); INSERT INTO t VALUES (7)")
                lsn = await writer.fetchval("SELECT pg_current_wal_insert_lsn()")
                for _ in range(500):
                    if await reader.fetchval("SELECT pg_last_wal_replay_lsn() >= $1", lsn):
                        break
                    await asyncio.sleep(0.01)
                state = (await reader.fetchval("SELECT pg_is_in_recovery()"),
                         reader.get_settings().in_hot_standby,
                         await reader.fetchval("SELECT n FROM t"))
                url = multi_host_url(standby, primary, target_session_attrs="read-write")
                chosen = await asyncpg.connect(url)
                port = await chosen.fetchval("SELECT inet_server_port()")
                await chosen.close()
            finally:
                await writer.close()
                await reader.close()
        finally:
            await lesson.close()
        return state, port, primary.port, standby.embedded

    (in_recovery, hot_standby, value), port, primary_port, server = run(scenario())
    assert in_recovery is True and hot_standby == "on" and value == 7
    assert port == primary_port, "read-write skips the standby listed first"
    assert not server.status().running and not server.home.exists()


def test_scratch_folder_is_relative_and_removed_at_close(target) -> None:
    async def made_then_closed() -> tuple[Path, bool]:
        lesson = await start_lesson("97-pitfalls", pool=False)
        try:
            folder = scratch_folder(lesson)
            return folder, folder.is_dir()
        finally:
            await lesson.close()

    folder, existed = run(made_then_closed())
    assert not folder.is_absolute() and existed and not folder.exists()
