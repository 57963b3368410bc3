"""`pyrolabel evaluate [--split NAME] [--run ID] [--json FILE]`: score a proposal run.

Against the reference labels (`ingest --tags-only`; see db/evaluation.py for what counts as
truth):
- masks: per-class IoU and mIoU (background included, PASCAL VOC style: pixels pooled over
  every image that has a reference mask);
- boxes: COCO AP and AP50 per class (pycocotools), and the precision-recall curve at IoU 0.5
  in the JSON (for charts). A class is scored on the images where it
  is known: present with reference boxes of it, or absent. An image known to have fire only
  from a tag has no fire box to match, so it is left out of fire's AP instead of turning every
  correct fire box into a false positive;
- false alarms: the share of images without a class that got a box of it, and over images
  with no class at all ("any").
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from core.metrics import IoUAccumulator, coco_box_report, false_alarm_rate
from db.evaluation import (
    EvaluationImage,
    class_names,
    evaluation_images,
    find_proposal_run,
    reference_counts,
)
from db.workspace import Workspace

log = logging.getLogger(__name__)

# `propose` writes foreground probability * 255; the mask is the part at or above this
# probability unless the run's params record another (keys tried in order).
DEFAULT_MASK_THRESHOLD = 0.5
_THRESHOLD_KEYS = ("mask_threshold", "threshold")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate", help="score a proposal run's masks and boxes against reference labels"
    )
    parser.add_argument("--split", help="only images of this split (default: every image)")
    parser.add_argument(
        "--run", type=int, metavar="ID", help="proposal run to score (default: the latest)"
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the scores here")
    parser.add_argument(
        "--min-score",
        type=float,
        default=0.0,
        help="boxes scoring below this do not count as false alarms (default: 0, every box)",
    )
    parser.add_argument(
        "--mask-threshold",
        type=float,
        help="foreground probability that makes a mask pixel (default: the run's, else 0.5)",
    )
    return parser


def run(args: argparse.Namespace, workspace: Workspace) -> int:
    with workspace.session() as session:
        proposal_run = find_proposal_run(session, run_id=args.run, split=args.split)
        propose = f"pyrolabel propose{' --split ' + args.split if args.split else ''}"
        if proposal_run is None:
            if args.run is not None:
                what = f"no proposal run {args.run}"
            else:
                what = "no proposal run" + (f" over split {args.split}" if args.split else "")
            print(f"error: {what}; run `{propose}` first", file=sys.stderr)
            return 1
        names = class_names(session)
        images = evaluation_images(session, run_id=proposal_run.id, split=args.split)
        counts = reference_counts(session, split=args.split)
        params = dict(proposal_run.params or {})
    scope = f"split {args.split}" if args.split else "all splits"
    if not images:
        print(
            f"error: proposal run {proposal_run.id} holds no image of {scope}; run "
            f"`{propose}` first",
            file=sys.stderr,
        )
        return 1
    if not any(counts.values()) and not any(i.present or i.absent for i in images):
        print(
            "error: nothing to score against; ingest reference labels first, e.g. "
            "`pyrolabel ingest DIR --yolo LABELS --classes FILE --tags-only`",
            file=sys.stderr,
        )
        return 1

    mask_threshold = args.mask_threshold
    if mask_threshold is None:
        recorded = [params[k] for k in _THRESHOLD_KEYS if isinstance(params.get(k), int | float)]
        mask_threshold = float(recorded[0]) if recorded else DEFAULT_MASK_THRESHOLD
    report = evaluate_images(
        images, names, workspace, mask_threshold=mask_threshold, min_score=args.min_score
    )
    report.update({"run_id": proposal_run.id, "split": args.split, "images": len(images)})

    print(format_table(report, names))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_json_safe(report), indent=2))
    print(summary_line(report, scope))
    return 0


# ---------------------------------------------------------------------------------------------
# Scoring


def evaluate_images(
    images: list[EvaluationImage],
    names: list[str],
    workspace: Workspace,
    *,
    mask_threshold: float = DEFAULT_MASK_THRESHOLD,
    min_score: float = 0.0,
) -> dict[str, Any]:
    """Mask, box and false-alarm scores of one run's images. See the module docstring."""
    return {
        "masks": _score_masks(images, names, workspace, mask_threshold),
        "boxes": _score_boxes(images, names),
        "false_alarms": _score_false_alarms(images, names, min_score),
        "mask_threshold": mask_threshold,
        "min_score": min_score,
    }


def _read_mask(
    workspace: Workspace, stored: str, size: tuple[int, int], *, binary: bool
) -> np.ndarray | None:
    """A mask PNG as (H, W) uint8 at `size` = (width, height), or None if unreadable."""
    path = workspace.absolute(stored)
    plane = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if plane is None:
        log.warning("cannot read mask %s; scored as empty", path)
        return None
    if plane.shape[::-1] != size:
        # Nearest keeps a reference mask binary; a probability map may be smoothed.
        interpolation = cv2.INTER_NEAREST if binary else cv2.INTER_LINEAR
        plane = cv2.resize(plane, size, interpolation=interpolation)
    return plane


def _predicted_mask_path(image: EvaluationImage, names: list[str], class_index: int) -> str | None:
    if class_index in image.predicted_masks:
        return image.predicted_masks[class_index]
    if image.mask_dir:
        return str(Path(image.mask_dir) / f"{image.image_id}_{names[class_index]}.png")
    return None


def _score_masks(
    images: list[EvaluationImage], names: list[str], workspace: Workspace, threshold: float
) -> dict[str, Any]:
    accumulator = IoUAccumulator(len(names) + 1, ["background", *names])
    scored = 0
    level = threshold * 255.0
    for image in images:
        if not image.reference_masks:
            continue
        size = (image.width, image.height)
        # Only classes with a reference mask on this image are scored there: another class's
        # prediction has nothing to be right or wrong against.
        classes = sorted(image.reference_masks)
        reference = np.zeros((image.height, image.width), dtype=np.int64)
        for c in classes:
            plane = _read_mask(workspace, image.reference_masks[c], size, binary=True)
            if plane is not None:
                reference[plane >= 128] = c + 1
        probs = np.zeros((len(classes), image.height, image.width), dtype=np.float32)
        for k, c in enumerate(classes):
            stored = _predicted_mask_path(image, names, c)
            plane = None
            if stored is not None and workspace.absolute(stored).exists():
                plane = _read_mask(workspace, stored, size, binary=False)
            if plane is not None:
                probs[k] = plane
        best = probs.argmax(axis=0)
        predicted = np.where(probs.max(axis=0) >= level, np.asarray(classes)[best] + 1, 0)
        accumulator.update(predicted, reference)
        scored += 1
    result = accumulator.result()
    return {"images": scored, "iou": result["iou"], "mIoU": result["mIoU"] if scored else math.nan}


def _score_boxes(images: list[EvaluationImage], names: list[str]) -> dict[str, Any]:
    per_class: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(names):
        gt, predictions = [], []
        for image in images:
            located = any(b[4] == c for b in image.reference_boxes)
            if not (located or c in image.absent):
                continue  # unknown, or present without a box to match
            gt.append(
                {
                    "image_id": image.image_id,
                    "width": image.width,
                    "height": image.height,
                    "boxes": [b[:4] for b in image.reference_boxes if b[4] == c],
                    "labels": [0 for b in image.reference_boxes if b[4] == c],
                }
            )
            mine = [b for b in image.predicted_boxes if b[4] == c]
            if mine:
                predictions.append(
                    {
                        "image_id": image.image_id,
                        "boxes": [b[:4] for b in mine],
                        "labels": [0] * len(mine),
                        "scores": [b[5] for b in mine],
                    }
                )
        gt_boxes = sum(len(g["boxes"]) for g in gt)
        scores, curve = {}, {}
        if gt:
            ap, curves = coco_box_report(gt, predictions, [name])
            scores, curve = ap["per_class"][name], curves.get(name, {})
        per_class[name] = {
            "AP": scores.get("AP", math.nan),
            "AP50": scores.get("AP50", math.nan),
            "images": len(gt),
            "gt_boxes": gt_boxes,
            # precision and the score reaching each recall 0, 0.01, ..., 1, at IoU 0.5
            "pr_curve": {k: [round(float(v), 6) for v in curve[k]] for k in curve},
        }
    valid = [v for v in per_class.values() if v["gt_boxes"] > 0]
    return {
        "per_class": per_class,
        "AP": float(np.mean([v["AP"] for v in valid])) if valid else math.nan,
        "AP50": float(np.mean([v["AP50"] for v in valid])) if valid else math.nan,
    }


def _score_false_alarms(
    images: list[EvaluationImage], names: list[str], min_score: float
) -> dict[str, Any]:
    truth, predicted = {}, {}
    for image in images:
        present = {names[c] for c in image.present}
        known = image.present | image.absent
        predicted[image.image_id] = {
            names[b[4]] for b in image.predicted_boxes if b[5] >= min_score
        }
        # false_alarm_rate wants every class decided; score each class on the images where
        # it is known, and "any" on images known to hold no class at all.
        truth[image.image_id] = (present, known)
    result = {}
    for c, name in enumerate(names):
        known_images = {i: t[0] for i, t in truth.items() if c in t[1]}
        result[name] = false_alarm_rate(known_images, predicted, [name])[name]
    all_known = {i: t[0] for i, t in truth.items() if len(t[1]) == len(names)}
    result["any"] = false_alarm_rate(all_known, predicted, names)["any"]
    return result


# ---------------------------------------------------------------------------------------------
# Output


def _pct(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def format_table(report: dict[str, Any], names: list[str]) -> str:
    masks, boxes, alarms = report["masks"], report["boxes"], report["false_alarms"]
    lines = [f"{'class':<14}{'IoU':>7}{'AP':>7}{'AP50':>7}  false alarms"]
    for name in ["background", *names, "any"]:
        iou = masks["iou"].get(name, math.nan) if masks["images"] else math.nan
        box = boxes["per_class"].get(name, {})
        alarm = alarms.get(name)
        alarm_text = "-"
        if alarm and alarm["images"]:
            alarm_text = f"{_pct(alarm['rate'])}% ({alarm['false_alarms']}/{alarm['images']})"
        lines.append(
            f"{name:<14}{_pct(iou):>7}{_pct(box.get('AP', math.nan)):>7}"
            f"{_pct(box.get('AP50', math.nan)):>7}  {alarm_text}"
        )
    lines.append(
        f"{'mean':<14}{_pct(masks['mIoU']):>7}{_pct(boxes['AP']):>7}{_pct(boxes['AP50']):>7}"
    )
    box_images = max((v["images"] for v in boxes["per_class"].values()), default=0)
    lines.append(
        f"masks: {masks['images']} images with reference masks (threshold "
        f"{report['mask_threshold']:.2f}); boxes: up to {box_images} images per class"
    )
    return "\n".join(lines)


def summary_line(report: dict[str, Any], scope: str) -> str:
    any_alarm = report["false_alarms"]["any"]
    alarm = (
        f"false alarms {_pct(any_alarm['rate'])}% of {any_alarm['images']} images with no class"
        if any_alarm["images"]
        else "no image known to be free of every class"
    )
    return (
        f"evaluated proposal run {report['run_id']} on {scope} ({report['images']} images): "
        f"mIoU {_pct(report['masks']['mIoU'])}, box AP {_pct(report['boxes']['AP'])}, "
        f"AP50 {_pct(report['boxes']['AP50'])}, {alarm}"
    )


def _json_safe(value: Any) -> Any:
    """nan -> None so the file is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
