"""The `pyrolabel` command line: global options, then one subcommand per module.

Each subcommand lives in `app/commands/<module>.py`, which defines
`add_parser(subparsers) -> argparse.ArgumentParser` and `run(args, workspace) -> int`, and may set
`NEEDS_READY_WORKSPACE = False` (only `init` does). Every command prints a one-line summary last
and exits 0 on success, non-zero with a message naming the fix on failure.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from db.workspace import Workspace, WorkspaceError

# Module names under app.commands, in the order `pyrolabel --help` lists them.
COMMAND_MODULES = (
    "init",
    "ingest",
    "train",
    "propose",
    "serve",
    "retrain",
    "evaluate",
    "export",
    "export_model",
    "worker",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyrolabel",
        description="Turn weak labels into a working fire and smoke detector.",
    )
    parser.add_argument(
        "--workspace",
        metavar="DIR",
        help="workspace folder (default: $PYROLABEL_WORKSPACE, else ./workspace)",
    )
    parser.add_argument(
        "--db-url",
        metavar="URL",
        help="database URL instead of the workspace's SQLite file "
        "(default: $PYROLABEL_DB_URL), e.g. postgresql://user@host/pyrolabel",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"app.commands.{name}")
        sub = module.add_parser(subparsers)
        sub.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # Third-party chatter would bury the one-line summaries.
    for noisy in ("alembic", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    workspace = Workspace.resolve(args.workspace, args.db_url)
    module = args._module
    try:
        if getattr(module, "NEEDS_READY_WORKSPACE", True):
            workspace.check_ready()
        return int(module.run(args, workspace) or 0)
    except WorkspaceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        workspace.dispose()


if __name__ == "__main__":
    sys.exit(main())
