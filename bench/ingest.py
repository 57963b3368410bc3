"""How fast `pyrolabel ingest` registers images, on generated files.

    .venv/bin/python -m bench.ingest                  # 10 000 images of 320x240, YOLO labels
    .venv/bin/python -m bench.ingest --count 2000     # a quicker look

Files are made fast: a few base JPEGs are encoded once, and every file is a copy with its own
JPEG comment segment (a valid JPEG with different bytes, so every content hash differs). Each
image gets a one-box YOLO label. Runs, each into a new SQLite workspace unless said:

    verify         the default: header, a decode at 1/8 scale, SHA-256, bulk insert, labels
    again          the same ingest into the same workspace: everything is already known
    header only    --no-verify: header and hash, no decode
    1 worker       the default with a single reading thread

and prints images per second with the time per step, and what 100 000 images would take at
the first run's rate (the database steps are bulk inserts in chunks, linear in the count).
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from db.ingest import IngestOptions, ingest
from db.workspace import Workspace


def make_files(root: Path, count: int, size: tuple[int, int], bases: int = 8) -> None:
    """`count` JPEGs (distinct bytes) under root/images/<block>/ and YOLO labels beside."""
    rng = np.random.default_rng(0)
    width, height = size
    encoded = []
    for index in range(bases):
        # A smooth gradient with mild noise compresses like a camera frame (~10 kB at 320x240).
        ramp = (
            np.linspace(0, 255, width)[None, :, None] * np.linspace(0.3, 1, height)[:, None, None]
        )
        pixels = ramp + rng.normal(0, 12, (height, width, 3)) + index * 7
        buffer = root / f"base{index}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, quality=85)
        encoded.append(buffer.read_bytes())
        buffer.unlink()
    images, labels = root / "images", root / "labels"
    for index in range(count):
        block = f"{index // 1000:03d}"
        (images / block).mkdir(parents=True, exist_ok=True)
        (labels / block).mkdir(parents=True, exist_ok=True)
        data = encoded[index % bases]
        comment = f"pyrolabel bench {index}".encode()
        # SOI, then a COM segment (length counts its own two bytes), then the rest of the file.
        segment = b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
        (images / block / f"frame_{index:06d}.jpg").write_bytes(data[:2] + segment + data[2:])
        cx, cy = rng.uniform(0.3, 0.7, 2)
        (labels / block / f"frame_{index:06d}.txt").write_text(
            f"{index % 2} {cx:.6f} {cy:.6f} 0.200000 0.250000\n"
        )
    (root / "classes.txt").write_text("fire\nsmoke\n")


def run_once(name: str, workspace: Workspace, root: Path, **overrides) -> dict:
    options = IngestOptions(
        yolo_dir=root / "labels", classes_file=root / "classes.txt", progress=False, **overrides
    )
    started = time.perf_counter()
    report = ingest(workspace, root / "images", options)
    seconds = time.perf_counter() - started
    return {
        "run": name,
        "images": report.found,
        "new": report.new_images,
        "boxes": report.boxes,
        "seconds": seconds,
        "rate": report.found / seconds,
        "steps": report.seconds,
        "problems": len(report.problems),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--size", type=int, nargs=2, default=(320, 240), metavar=("W", "H"))
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="pyrolabel-bench-ingest-"))
    try:
        started = time.perf_counter()
        make_files(tmp, args.count, tuple(args.size))
        print(
            f"generated {args.count} files of {args.size[0]}x{args.size[1]} in "
            f"{time.perf_counter() - started:.1f} s under {tmp}"
        )

        rows = []
        first = Workspace(tmp / "ws-verify")
        first.init(["fire", "smoke"])
        rows.append(run_once("verify", first, tmp))
        rows.append(run_once("again (all known)", first, tmp))
        first.dispose()
        for name, overrides in (
            ("header only", {"verify_pixels": False}),
            ("1 worker", {"workers": 1}),
        ):
            workspace = Workspace(tmp / f"ws-{name.replace(' ', '-')}")
            workspace.init(["fire", "smoke"])
            rows.append(run_once(name, workspace, tmp, **overrides))
            workspace.dispose()

        print(
            f"\ningest of {args.count} generated {args.size[0]}x{args.size[1]} JPEGs with YOLO "
            f"labels; {os.cpu_count()} CPU cores, default workers {IngestOptions().workers}"
        )
        print(
            f"| {'run':<18} | {'images':>6} | {'new':>6} | {'boxes':>6} | {'scan s':>6} | "
            f"{'db s':>6} | {'labels s':>8} | {'total s':>7} | {'images/s':>8} |"
        )
        print(
            f"|{'-' * 20}|{'-' * 8}|{'-' * 8}|{'-' * 8}|{'-' * 8}|{'-' * 8}|{'-' * 10}|"
            f"{'-' * 9}|{'-' * 10}|"
        )
        for row in rows:
            steps = row["steps"]
            print(
                f"| {row['run']:<18} | {row['images']:>6} | {row['new']:>6} | {row['boxes']:>6} "
                f"| {steps['scan']:>6.1f} | {steps['register']:>6.1f} | {steps['labels']:>8.1f} "
                f"| {row['seconds']:>7.1f} | {row['rate']:>8.0f} |"
            )
        rate = rows[0]["rate"]
        print(f"\n100 000 images at {rate:.0f} images/s: about {100_000 / rate / 60:.1f} minutes")
        if any(row["problems"] for row in rows):
            print("warning: some runs reported problems; the numbers may not be comparable")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
