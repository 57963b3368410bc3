"""`pyrolabel export {coco,yolo,voc,masks} DIR`: write accepted and human-made annotations."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from db.workspace import Workspace

FORMATS = ("coco", "yolo", "voc", "masks")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export",
        help="write annotations as COCO, YOLO, Pascal VOC or mask PNGs",
        description="Write the boxes given with the data, made by reviewers or accepted by them "
        "(masks: DIR/<class>/<image stem>.png). Images are not copied.",
    )
    parser.add_argument("format", choices=FORMATS)
    parser.add_argument("dir", type=Path, metavar="DIR", help="output folder")
    parser.add_argument("--split", default=None, help="only this split (default: every split)")
    parser.add_argument(
        "--include-reference",
        action="store_true",
        help="also reference labels (from ingest --tags-only)",
    )
    parser.add_argument(
        "--include-pending",
        action="store_true",
        help="also proposals no reviewer has decided yet, with their scores",
    )
    return parser


def run(args: argparse.Namespace, workspace: Workspace) -> int:
    from db.export import export_annotations

    report = export_annotations(
        workspace,
        args.format,
        args.dir,
        split=args.split,
        include_reference=args.include_reference,
        include_pending=args.include_pending,
    )
    for line in report.problems:
        print(line)
    if report.images == 0:
        where = f"split {args.split!r}" if args.split else "the workspace"
        print(
            f"error: nothing to export in {where}: no accepted, human or given annotations and "
            "no negative images (try --include-pending or --include-reference)",
            file=sys.stderr,
        )
        print(report.summary())
        return 1
    print(report.summary())
    return 0
