"""`pyrolabel init [--classes fire,smoke]`: create or upgrade the workspace."""

from __future__ import annotations

import argparse

from db.workspace import Workspace

NEEDS_READY_WORKSPACE = False


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("init", help="create or upgrade the workspace")
    parser.add_argument(
        "--classes",
        help="comma-separated class names, in model order (default: fire,smoke; "
        "an existing workspace may only append)",
    )
    return parser


def run(args: argparse.Namespace, workspace: Workspace) -> int:
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    names = workspace.init(classes)
    print(f"workspace {workspace.root} ready; classes: {', '.join(names)}")
    return 0
