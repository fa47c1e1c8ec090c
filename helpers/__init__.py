"""Helpers for the async PostgreSQL pooling course.

Notebooks import what they need from here, e.g. ``from helpers import start_lesson``. The
names are loaded lazily, so ``python -m helpers`` works with the standard library alone (it
creates the virtual environment before anything else is imported).

Modules, one concern each:

* :mod:`helpers.server`       - the embedded PostgreSQL (start, reuse, restart, stop)
* :mod:`helpers.target`       - which database: DATABASE_URL, PG* variables or embedded
* :mod:`helpers.connect`      - connections that fail fast with a clear message
* :mod:`helpers.lesson`       - a lesson's schema, the shared pool, private servers, cleanup
* :mod:`helpers.seed`         - the seed data in ``data/``
* :mod:`helpers.load`         - load generation and timing (per-request DataFrames)
* :mod:`helpers.plots`        - plots with one look for the whole series
* :mod:`helpers.connect_cost` - where a connect's time goes (01)
* :mod:`helpers.transactions` - two-session schedules that produce real anomalies (03)
* :mod:`helpers.retry`        - retries with backoff (03, 06)
* :mod:`helpers.bulk`         - bulk insert methods and memory measurement (04, bench)
* :mod:`helpers.monitor`      - pool sampler, instrumented acquire, Prometheus (05)
* :mod:`helpers.resilience`   - leak detector, fault proxy, restarts (06)
* :mod:`helpers.pgbouncer`    - a PgBouncer for the course (07)
* :mod:`helpers.multiproc`    - app processes, each with its own pool (07)
* :mod:`helpers.drivers`      - the same workloads for asyncpg and psycopg 3 (08, bench)
* :mod:`helpers.bench`        - ``make bench``: the series measured against its ceilings
* :mod:`helpers.check`        - is this machine ready?
* :mod:`helpers.course`       - navigation, practice copies, agenda (``links``)
* :mod:`helpers.build`        - executing the series and the site (``make run``)
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import CourseError, DatabaseUnavailable, install_notebook_handler

_LAZY = {
    "start_lesson": "lesson",
    "current_lesson": "lesson",
    "close_pool": "lesson",
    "Lesson": "lesson",
    "resolve": "target",
    "Target": "target",
    "connect": "connect",
    "execute_ddl": "connect",
    "EmbeddedServer": "server",
    "check_packages": "check",
    "check_database": "check",
}

__all__ = ["CourseError", "DatabaseUnavailable", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'helpers' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


install_notebook_handler()
