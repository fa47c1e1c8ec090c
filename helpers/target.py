"""Which PostgreSQL the course uses, and how to describe it without leaking a password.

In order: ``DATABASE_URL`` (used as given: password auth, odd ports, sslmode...), then the
standard libpq variables (``PGHOST``, ``PGPORT``, ``PGUSER``, ``PGPASSWORD``, ``PGDATABASE``)
when ``PGHOST`` is set, and otherwise the embedded server of :mod:`helpers.server`, started
on demand.

Standard library only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

from .errors import CourseError
from .server import EmbeddedServer


@dataclass(frozen=True)
class Target:
    """A database to connect to: its URL, where the URL came from, and the server if ours."""

    url: str
    source: str  # "DATABASE_URL", "PG* variables" or "embedded"
    embedded: EmbeddedServer | None = None

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or os.environ.get("PGHOST", "localhost")

    @property
    def port(self) -> int:
        try:
            port = urlsplit(self.url).port
        except ValueError:
            port = None
        return port or int(os.environ.get("PGPORT", "5432"))

    @property
    def user(self) -> str:
        return urlsplit(self.url).username or os.environ.get("PGUSER", "") or "(default)"

    @property
    def database(self) -> str:
        path = urlsplit(self.url).path.lstrip("/")
        return path or os.environ.get("PGDATABASE", "") or "(default)"

    @property
    def restartable(self) -> bool:
        """True when the course controls the server process (it may restart it in a lesson)."""
        return self.embedded is not None

    def masked(self) -> str:
        """The URL with its password replaced by ``***``: safe to print and to store."""
        return mask_url(self.url)

    def describe(self) -> str:
        """One line for a setup cell: where the database comes from (no password)."""
        return f"{self.source}: {self.masked()}"


def mask_url(url: str) -> str:
    """Replace the password in a postgres URL with ``***`` (handles odd URLs gracefully)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)[1]
        userinfo = f"{parts.username}:***" if parts.username else ":***"
        return urlunsplit(parts._replace(netloc=f"{userinfo}@{netloc}"))
    except ValueError:
        return "<unparseable URL>"


def _url_from_pg_env() -> str:
    env = os.environ
    user = quote(env.get("PGUSER", ""), safe="")
    password = env.get("PGPASSWORD")
    auth = f"{user}:{quote(password, safe='')}@" if password else (f"{user}@" if user else "")
    host = env.get("PGHOST", "localhost")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    port = env.get("PGPORT", "5432")
    database = quote(env.get("PGDATABASE", ""), safe="")
    return f"postgresql://{auth}{host}:{port}/{database}"


def configured_target() -> Target | None:
    """The target named by the environment, or None when the embedded server should be used."""
    url = os.environ.get("DATABASE_URL", "").strip()
    if url:
        if not url.startswith(("postgres://", "postgresql://")):
            raise CourseError(
                f"DATABASE_URL must start with postgresql:// (got {mask_url(url)[:40]!r}).",
                "Example: postgresql://user:password@localhost:5432/course",
            )
        return Target(url, "DATABASE_URL")
    if os.environ.get("PGHOST"):
        return Target(_url_from_pg_env(), "PG* variables")
    return None


def resolve(start: bool = True) -> Target:
    """The database to use; starts the embedded server if needed and ``start`` is True."""
    target = configured_target()
    if target is not None:
        return target
    server = EmbeddedServer()
    port = server.start().port if start else None
    return Target(server.url(port), "embedded", server)
