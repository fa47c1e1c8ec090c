"""Helpers for the async PostgreSQL pooling course.

Notebooks import what they need from here, e.g. ``from helpers import start_lesson``. Importing
the package does nothing else: ``start_lesson()`` installs the notebook conveniences. The names
are loaded lazily, so ``python -m helpers`` works with the standard library alone (it creates
the virtual environment before anything else is imported).

What the notebooks use, one module per concern or lesson:

* :mod:`helpers.lesson`              - a lesson's schema, app role, pools, private servers, cleanup
* :mod:`helpers.db`                  - the database target (URLs), connections, ``execute_ddl``
* :mod:`helpers.capabilities`        - what this server and machine can do (00-setup)
* :mod:`helpers.load`                - load generation and timing (per-request DataFrames)
* :mod:`helpers.plots`               - plots with one look for the whole series
* :mod:`helpers.retry`               - retries with backoff (03, 06)
* :mod:`helpers.connect_per_request` - where a connect's time goes (01)
* :mod:`helpers.transactions`        - two-session schedules that produce real anomalies (03)
* :mod:`helpers.batch_inserts`       - bulk insert methods and memory measurement (04, 08)
* :mod:`helpers.monitoring`          - pool sampler, instrumented acquire, Prometheus (05)
* :mod:`helpers.failures`            - leak detector, fault proxy, restarts (06)
* :mod:`helpers.scaling_out`         - app processes with their own pools, PgBouncer (07)
* :mod:`helpers.drivers`             - the same workloads for asyncpg and psycopg 3 (08)
* :mod:`helpers.production_pitfalls` - event loops, cancellation, failover, TLS (09)
* :mod:`helpers.sqlalchemy_engine`   - SQLAlchemy's async engine over asyncpg (10)
* :mod:`helpers.shop_api`, :mod:`helpers.web_service` - the capstone web service (11)

The machinery no notebook touches is in :mod:`helpers._infra`: the embedded server, settings
(every environment variable, read once), the command line behind ``make``, the site build,
checks and the PgBouncer process. The maintainers' scripts (benchmark harness, PgBouncer source
build, test servers) are in ``.ci/``.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "start_lesson": "lesson",
    "current_lesson": "lesson",
    "close_pool": "lesson",
    "Lesson": "lesson",
    "resolve": "db",
    "Target": "db",
    "connect": "db",
    "execute_ddl": "db",
    "CourseError": "_infra.errors",
    "DatabaseUnavailable": "_infra.errors",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'helpers' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
