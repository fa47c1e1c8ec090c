"""``python -m helpers ...``: the course's command line (see :mod:`helpers.cli`)."""

from .cli import main

raise SystemExit(main())
