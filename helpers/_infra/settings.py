"""The course's configuration: every environment variable it reads, read in one place, once.

=============================  ===================================================================
variable                       meaning
=============================  ===================================================================
``DATABASE_URL``, ``PG*``      the learner's server (``helpers/db.py``); otherwise the embedded one
``PGCOURSE_HOME``              the state folder (default ``<repo>/.pgcourse``)
``PGCOURSE_NO_VENV``           use the current Python environment instead of ``.venv``
``PGCOURSE_PROGRESS``          ``0`` hides progress bars (also off when ``CI`` is set)
``PGCOURSE_FIGURES_DIR``       where lessons write their headline figures (set by ``make run``)
``PG_BIN``                     a folder with PostgreSQL server binaries for the embedded server
``PGCOURSE_NO_UNSHARE``        as root: skip the user namespace, run as an unprivileged account
``PGCOURSE_RUN_AS``            as root: the account that runs the embedded server
``PGBOUNCER_BIN``              the pgbouncer binary for notebook 07
``PGCOURSE_REQUIRE_PGBOUNCER`` a missing PgBouncer fails the tests instead of skipping (CI)
``PGCOURSE_REQUIRE_BROWSER``   a missing Chromium fails the site test instead of skipping (CI)
=============================  ===================================================================

:func:`settings` reads them the first time it is called and keeps the result; a test that
changes the environment calls ``settings.cache_clear()``. Nothing in the course writes
``os.environ``: child processes get their variables passed explicitly.

Standard library only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from helpers._infra.paths import ROOT


def _flag(env: dict[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _path(env: dict[str, str], name: str) -> Path | None:
    value = env.get(name, "").strip()
    return Path(value).expanduser() if value else None


@dataclass(frozen=True)
class Settings:
    """What the environment said when the course first asked (see the module docstring)."""

    home: Path
    no_venv: bool
    progress: bool
    figures_dir: Path | None
    pg_bin: Path | None
    no_unshare: bool
    run_as: str | None
    pgbouncer_bin: Path | None
    require_pgbouncer: bool
    require_browser: bool
    ci: bool
    #: The connection variables (``DATABASE_URL``, ``PGHOST``, ``PGPORT``, ``PGUSER``,
    #: ``PGPASSWORD``, ``PGDATABASE``, ``PGSSLMODE``) that were set.
    env: dict[str, str] = field(default_factory=dict)


_CONNECTION_VARS = ("DATABASE_URL", "PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE",
                    "PGSSLMODE")


@cache
def settings() -> Settings:
    """The course's settings, read from the environment once."""
    env = dict(os.environ)
    home = _path(env, "PGCOURSE_HOME")
    ci = _flag(env, "CI")
    return Settings(
        home=home.resolve() if home else ROOT / ".pgcourse",
        no_venv=_flag(env, "PGCOURSE_NO_VENV"),
        progress=env.get("PGCOURSE_PROGRESS", "1") != "0" and not ci,
        figures_dir=_path(env, "PGCOURSE_FIGURES_DIR"),
        pg_bin=_path(env, "PG_BIN"),
        no_unshare=_flag(env, "PGCOURSE_NO_UNSHARE"),
        run_as=env.get("PGCOURSE_RUN_AS") or None,
        pgbouncer_bin=_path(env, "PGBOUNCER_BIN"),
        require_pgbouncer=_flag(env, "PGCOURSE_REQUIRE_PGBOUNCER"),
        require_browser=_flag(env, "PGCOURSE_REQUIRE_BROWSER"),
        ci=ci,
        env={k: env[k] for k in _CONNECTION_VARS if env.get(k)},
    )


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child process (a kernel, pytest, a tool): this process's
    environment plus ``extra``, without touching ``os.environ``."""
    return {**os.environ, **extra}
