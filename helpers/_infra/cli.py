"""The command line behind ``make``: ``python -m helpers <command>``.

    python -m helpers run                 # execute the series into build/ (make run)
    python -m helpers test                # ruff, the helpers' tests, every notebook under nbval
    python -m helpers lab                 # JupyterLab with the database ready (make lab)
    python -m helpers check               # is this machine ready? (packages, database)
    python -m helpers db start|stop|status|url
    python -m helpers refresh [NN ...]    # re-execute notebooks, storing outputs in place
    python -m helpers bench               # benchmarks into build/bench.json (make bench)
    python -m helpers links [--check]     # navigation, README series table, agenda, practice

Every command first makes sure ``.venv`` exists with the pinned packages and re-runs itself
there (``PGCOURSE_NO_VENV=1`` skips that). Problems are reported as one short message, no
traceback, with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from helpers._infra.errors import CourseError
from helpers._infra.paths import BUILD, NOTEBOOKS, ROOT
from helpers._infra.settings import child_env, settings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m helpers", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("venv", help="create .venv with the pinned dependencies")
    db = sub.add_parser("db", help="the embedded PostgreSQL")
    db.add_argument("action", choices=["start", "stop", "status", "url"])
    db.add_argument("--show-password", action="store_true", help="with url: print it unmasked")
    sub.add_parser("check", help="check packages and the database")
    run = sub.add_parser("run", help="execute the series into build/")
    run.add_argument("notebooks", nargs="*", help="name prefixes, e.g. 01 02 (default: all)")
    test = sub.add_parser("test", help="ruff, tests and notebooks under nbval")
    test.add_argument("pytest_args", nargs=argparse.REMAINDER, help="extra pytest arguments")
    sub.add_parser("lab", help="JupyterLab on notebooks/ with the database ready")
    refresh = sub.add_parser("refresh", help="re-execute notebooks, keeping outputs in place")
    refresh.add_argument("notebooks", nargs="*")
    links = sub.add_parser("links", help="regenerate navigation, practice copies, agenda")
    links.add_argument("--check", action="store_true", help="only report what is out of date")
    for name, (_module, text) in EXTENSIONS.items():
        ext = sub.add_parser(name, help=text, add_help=False)
        ext.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXTENSIONS:  # their own options, e.g. `bench --quick`
        args = argparse.Namespace(command=argv[0], rest=argv[1:])
    else:
        args = _parser().parse_args(argv)
    try:
        if not settings().no_venv:
            from helpers._infra.bootstrap import in_project_venv, reexec_in_venv

            if not in_project_venv():
                reexec_in_venv(argv)  # does not return
        return COMMANDS[args.command](args)
    except CourseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def cmd_venv(args: argparse.Namespace) -> int:
    from helpers._infra.bootstrap import ensure_venv

    print(f"ready: {ensure_venv()}")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    from helpers._infra.server import EmbeddedServer
    from helpers.db import configured_target, mask_url

    configured = configured_target()
    if configured is not None and args.action != "status":
        raise CourseError(
            f"{configured.source} is set ({configured.masked()}): the course uses that server, "
            "not the embedded one.",
            "Unset DATABASE_URL / PGHOST to manage the embedded server.",
        )
    server = EmbeddedServer()
    if args.action == "start":
        result = server.start()
        verb = "created and started" if result.created else "started" if result.started else \
            "already running"
        print(f"embedded PostgreSQL {verb} on 127.0.0.1:{result.port} "
              f"({result.seconds:.2f} s); data in {server.home}")
    elif args.action == "stop":
        print("stopped" if server.stop() else "not running")
    elif args.action == "status":
        if configured is not None:
            print(f"using {configured.describe()} (the embedded server is not used)")
        st = server.status()
        state = f"running on 127.0.0.1:{st.port} (pid {st.pid})" if st.running else "stopped"
        print(f"embedded PostgreSQL: {state}; data in {st.home}"
              + ("" if st.initialized else " (not created yet)"))
        return 0 if st.running or configured is not None else 3
    elif args.action == "url":
        url = server.url()
        print(url if args.show_password else mask_url(url))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    import asyncio

    from helpers._infra.check import check_database, report

    ok, lines = report(include_dev=True)
    print("\n".join(lines))
    for line in asyncio.run(asyncio.wait_for(check_database(), 9)):
        print(line)
    if not ok:
        print("Some packages differ from the pins: run `python -m helpers venv`.")
    return 0 if ok else 1


class CommandDatabase:
    """Context manager for a command: start the embedded server if no DATABASE_URL is set,
    and stop it afterwards if this command started it (used by run, test, lab and bench)."""

    def __enter__(self) -> CommandDatabase:
        from helpers._infra.server import EmbeddedServer
        from helpers.db import configured_target

        self.server = None
        target = configured_target()
        if target is None:
            self.server = EmbeddedServer()
            result = self.server.start()
            self.started = result.started
            print(f"database: embedded PostgreSQL on 127.0.0.1:{result.port}"
                  + (f" (started in {result.seconds:.2f} s)" if result.started else ""))
        else:
            print(f"database: {target.describe()}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.server is not None and self.started:
            self.server.stop()


def cmd_run(args: argparse.Namespace) -> int:
    from helpers._infra.site import run_series, summary_lines

    t0 = time.perf_counter()
    with CommandDatabase():
        runs = run_series(args.notebooks or None)
    print("\n".join(summary_lines(runs)))
    failed = [r.name for r in runs if not r.ok]
    print(f"{len(runs)} notebooks in {time.perf_counter() - t0:.0f} s; HTML in build/index.html"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed or not runs else 0


def cmd_test(args: argparse.Namespace) -> int:
    py = sys.executable
    print("ruff check helpers tests notebooks data .ci", flush=True)
    lint = subprocess.run([py, "-m", "ruff", "check", "helpers", "tests", "notebooks", "data",
                           ".ci"], cwd=ROOT)
    if lint.returncode != 0:
        return lint.returncode
    with CommandDatabase():
        BUILD.mkdir(exist_ok=True)
        cmd = [py, "-m", "pytest", "tests", "notebooks", "--nbval-lax",
               "--nbval-cell-timeout=600", "-rs",
               f"--junitxml={BUILD / 'junit.xml'}", *args.pytest_args]  # bench reads its times
        print(" ".join(["pytest", *cmd[3:]]), flush=True)
        env = child_env(PGCOURSE_PROGRESS="0")
        return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def cmd_lab(args: argparse.Namespace) -> int:
    with CommandDatabase():
        cmd = [sys.executable, "-m", "jupyter", "lab", f"--notebook-dir={NOTEBOOKS}"]
        if os.geteuid() == 0:
            cmd.append("--allow-root")
        return subprocess.run(cmd, cwd=ROOT).returncode


def cmd_refresh(args: argparse.Namespace) -> int:
    from helpers._infra.site import refresh, summary_lines

    with CommandDatabase():
        runs = refresh(args.notebooks or None)
    print("\n".join(summary_lines(runs)))
    return 0 if all(r.ok for r in runs) else 1


def cmd_links(args: argparse.Namespace) -> int:
    from helpers._infra.links import sync

    changed = sync(check=args.check)
    if args.check and changed:
        print("out of date (run `python -m helpers links`): " + ", ".join(changed))
        return 1
    print(("updated: " + ", ".join(changed)) if changed else "everything is up to date")
    return 0


def _extension(name: str):
    """Commands implemented by their own module's ``cli(argv) -> int``."""

    def command(args: argparse.Namespace) -> int:
        import importlib

        where = EXTENSIONS[name][0]
        if where.startswith(".ci/"):
            from helpers._infra.tools import load_tool

            module = load_tool(where.removeprefix(".ci/"))
        else:
            module = importlib.import_module(where)
        return int(module.cli(list(args.rest)))

    return command


#: command name -> (module with ``cli(argv) -> int``, help text)
EXTENSIONS = {
    "bench": (".ci/bench", "benchmarks against the ceilings, into build/bench.json"),
    "pgbouncer": ("helpers._infra.pgbouncer", "a PgBouncer for the course (see notebook 07)"),
}

COMMANDS = {"venv": cmd_venv, "db": cmd_db, "check": cmd_check, "run": cmd_run,
            "test": cmd_test, "lab": cmd_lab, "refresh": cmd_refresh, "links": cmd_links,
            **{name: _extension(name) for name in EXTENSIONS}}
