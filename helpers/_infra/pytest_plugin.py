"""The course's pytest plugin (``-p helpers._infra.pytest_plugin`` in pyproject.toml).

A notebook cell that starts with ``%%needs <capability>`` runs only where the capability is
there (see :func:`helpers.lesson.needs_magic`). Under nbval the same cell is reported as a
pytest *skip* with the reason, before it reaches the kernel, so ``pytest -rs`` lists it. Where
the machine must have it (CI sets ``PGCOURSE_REQUIRE_PGBOUNCER=1``), a missing PgBouncer fails
the cell instead: CI can never skip silently what it installs.
"""

from __future__ import annotations

from functools import cache

import pytest

from helpers._infra.settings import settings


@cache
def _pgbouncer_missing() -> str | None:
    from helpers._infra.pgbouncer import PgBouncerMissing, find_pgbouncer

    try:
        find_pgbouncer()
    except PgBouncerMissing:
        from helpers.lesson import missing_reason

        reason, how = missing_reason("pgbouncer")
        return f"{reason}; {how}"
    return None


def needs_of(item: pytest.Item) -> str | None:
    """The capability an nbval cell asks for with ``%%needs``, if any."""
    cell = getattr(item, "cell", None)
    source = "".join(cell.get("source", "")) if cell is not None else ""
    first = source.lstrip().splitlines()[0] if source.strip() else ""
    return first.split(None, 1)[1].strip() if first.startswith("%%needs ") else None


def pytest_runtest_setup(item: pytest.Item) -> None:
    need = needs_of(item)
    if need != "pgbouncer":  # server capabilities: the cell itself runs the fallback
        return
    missing = _pgbouncer_missing()
    if missing is None:
        return
    if settings().require_pgbouncer:
        pytest.fail(f"PGCOURSE_REQUIRE_PGBOUNCER is set but {missing}", pytrace=False)
    pytest.skip(missing)
