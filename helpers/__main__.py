"""``python -m helpers <command>``: see ``helpers/_infra/cli.py``."""

from helpers._infra.cli import main

raise SystemExit(main())
