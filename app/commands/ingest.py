"""`pyrolabel ingest DIR [...]`: register images and their annotations in the workspace."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from db.workspace import Workspace

MAX_PROBLEM_LINES = 200


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "ingest",
        help="register an image folder and its tags, boxes or masks",
        description="Register the images under DIR (recursive: jpg, png, bmp, webp) with any of "
        "the annotation sources below. Images stay where they are and are known by content, so "
        "ingesting again adds nothing new and a moved file gets its new path. Box coordinates "
        "are read in the orientation a viewer shows (EXIF applied), as annotation tools show it.",
    )
    parser.add_argument("dir", type=Path, metavar="DIR", help="folder of images")
    parser.add_argument(
        "--tags", type=Path, metavar="CSV", help="image,fire,smoke (1/0) or image,labels (a;b)"
    )
    parser.add_argument("--yolo", type=Path, metavar="DIR", help="YOLO txt labels, one per image")
    parser.add_argument(
        "--classes",
        type=Path,
        metavar="FILE",
        help="YOLO class names in id order (default: classes.txt in or beside the --yolo folder)",
    )
    parser.add_argument("--coco", type=Path, metavar="JSON", help="COCO detection JSON")
    parser.add_argument("--voc", type=Path, metavar="DIR", help="Pascal VOC XML files")
    parser.add_argument(
        "--masks", type=Path, metavar="DIR", help="binary mask PNGs named like the images"
    )
    parser.add_argument(
        "--mask-class", metavar="NAME", help="class of the masks (default: the first class)"
    )
    parser.add_argument("--split", default="train", help="split of new images (default: train)")
    parser.add_argument(
        "--tags-only",
        action="store_true",
        help="train on image tags only; keep boxes and masks as reference labels for evaluate",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        metavar="N",
        help="refuse images above N pixels as likely decompression bombs (default: 100000000)",
    )
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="read headers only; do not decode each image once to catch truncated files",
    )
    parser.add_argument("--workers", type=int, default=None, help="threads that read images")
    return parser


def run(args: argparse.Namespace, workspace: Workspace) -> int:
    from db.ingest import IngestOptions, ingest

    options = IngestOptions(
        tags_csv=args.tags,
        yolo_dir=args.yolo,
        classes_file=args.classes,
        coco_json=args.coco,
        voc_dir=args.voc,
        masks_dir=args.masks,
        mask_class=args.mask_class,
        split=args.split,
        tags_only=args.tags_only,
        verify_pixels=not args.no_verify,
        progress=sys.stderr.isatty(),
    )
    if args.max_pixels is not None:
        options.max_pixels = args.max_pixels
    if args.workers is not None:
        options.workers = args.workers
    for name, path in (("--tags", args.tags), ("--coco", args.coco)):
        if path is not None and not path.is_file():
            print(f"error: {name} {path} is not a file", file=sys.stderr)
            return 2
    for name, path in (("--yolo", args.yolo), ("--voc", args.voc), ("--masks", args.masks)):
        if path is not None and not path.is_dir():
            print(f"error: {name} {path} is not a folder", file=sys.stderr)
            return 2

    report = ingest(workspace, args.dir, options)

    for line in report.problems[:MAX_PROBLEM_LINES]:
        print(line)
    if len(report.problems) > MAX_PROBLEM_LINES:
        print(f"... {len(report.problems) - MAX_PROBLEM_LINES} more in {report.log_path}")
    if not report.usable:
        print(
            f"error: no usable image in {args.dir} ({report.found} image files found; "
            "jpg, png, bmp and webp are read, recursively)",
            file=sys.stderr,
        )
        print(report.summary())
        return 1
    print(report.summary())
    return 0
