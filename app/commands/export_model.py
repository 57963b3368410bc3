"""`pyrolabel export-model ID --onnx FILE`: a registered detector (usually the edge student) as
ONNX, checked against PyTorch with onnxruntime.

The graph takes (N, 3, S, S) RGB in [0, 1] and returns decoded boxes (x1y1x2y2, input pixels)
and per-class scores at every pyramid position; thresholding and NMS are left to the device
(see core/export_onnx.py for the exact contract).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from db.workspace import Workspace

# onnxruntime and PyTorch order float sums differently; logits of a healthy model agree far
# better than this, a broken export (wrong normalisation, wrong grid) differs by whole units.
MAX_ABS_DIFF = 1e-3


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export-model", help="export a detector model version to ONNX for edge devices"
    )
    parser.add_argument("model_id", type=int, metavar="ID", help="model version id (Models page)")
    parser.add_argument("--onnx", type=Path, required=True, metavar="FILE", help="file to write")
    parser.add_argument(
        "--image-size",
        type=int,
        help="square input size, a multiple of 32 (default: the size it was trained at)",
    )
    parser.add_argument(
        "--no-check", action="store_true", help="skip comparing onnxruntime's output with PyTorch"
    )
    return parser


def run(args: argparse.Namespace, workspace: Workspace) -> int:
    from db.models import ModelVersion

    with workspace.session() as session:
        version = session.get(ModelVersion, args.model_id)
    if version is None:
        print(
            f"error: no model version {args.model_id}; the Models page lists them", file=sys.stderr
        )
        return 1
    if version.kind not in ("teacher", "student"):
        print(
            f"error: model {version.id} is a {version.kind}; only detectors (teacher, student) "
            "export to ONNX",
            file=sys.stderr,
        )
        return 1
    checkpoint = workspace.absolute(version.path)
    if not checkpoint.is_file():
        print(f"error: checkpoint {checkpoint} of model {version.id} is missing", file=sys.stderr)
        return 1

    from core.export_onnx import export_detector_onnx
    from core.train_detector import load_detector

    model, _ = load_detector(checkpoint, "cpu")
    try:
        path = export_detector_onnx(model, args.onnx, args.image_size)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    check = ""
    if not args.no_check:
        difference = onnx_difference(model, path, args.image_size)
        if difference > MAX_ABS_DIFF:
            print(
                f"error: onnxruntime's outputs differ from PyTorch's by {difference:.2g} "
                f"(more than {MAX_ABS_DIFF}); {path} is not usable",
                file=sys.stderr,
            )
            return 1
        check = f"; onnxruntime matches PyTorch (max difference {difference:.1e})"
    size = path.stat().st_size / 1e6
    print(f"exported {version.kind} {version.id} ({version.arch}) to {path}, {size:.1f} MB{check}")
    return 0


def onnx_difference(model, path: Path, image_size: int | None = None, seed: int = 0) -> float:
    """Largest absolute difference between onnxruntime and PyTorch over every output, on two
    random images."""
    import numpy as np
    import onnxruntime
    import torch

    from core.detectors import image_size_of
    from core.export_onnx import RawFCOS

    size = image_size or image_size_of(model)
    raw = RawFCOS(model, size).eval()
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = [t.numpy() for t in raw(images)]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    produced = session.run(None, {"images": images.numpy()})
    return max(float(np.abs(a - b).max()) for a, b in zip(expected, produced, strict=True))
