"""Scores for masks and boxes: IoU and mIoU, COCO AP and AP50, false-alarm rate, PR curves.

Boxes are (x1, y1, x2, y2) in pixels of the original image. Images are referred to by any
hashable id; ground truth lists every evaluated image, including those with no boxes, since
a box on a fire-free image is a false positive and must count as one.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, TypedDict

import numpy as np

log = logging.getLogger(__name__)


class GroundTruthImage(TypedDict):
    """One evaluated image. boxes: (x1, y1, x2, y2) pixels; labels: class index per box."""

    image_id: Hashable
    width: int
    height: int
    boxes: Sequence[Sequence[float]]
    labels: Sequence[int]


class PredictionImage(TypedDict):
    """Predicted boxes of one image, in the same format, with a score per box."""

    image_id: Hashable
    boxes: Sequence[Sequence[float]]
    labels: Sequence[int]
    scores: Sequence[float]


# ---------------------------------------------------------------------------------------------
# Masks


def mask_iou(pred: np.ndarray, ref: np.ndarray) -> float:
    """Intersection over union of two (H, W) bool masks.

    Two empty masks score 1.0: nothing was there and nothing was found, which is the right
    answer. For a dataset score do not average this per image (small objects would weigh as
    much as large ones, and empty images would inflate it); use `IoUAccumulator`.
    """
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"mask shapes differ: pred {pred.shape}, ref {ref.shape}")
    union = np.logical_or(pred, ref).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(pred, ref).sum() / union)


class IoUAccumulator:
    """Per-class IoU and mIoU over a dataset, the PASCAL VOC way.

    A confusion matrix is summed over all images, and IoU_c = TP_c / (TP_c + FP_c + FN_c) is
    taken from the totals at the end, so each pixel counts once whatever image it is in.
    Label maps hold 0 for background and 1..C for the classes; `ignore_index` in the
    reference (an unlabelled border) is skipped.
    """

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        ignore_index: int = 255,
    ):
        """num_classes counts the background: 2 for background + fire."""
        if num_classes < 2:
            raise ValueError(f"num_classes counts background too and must be >= 2: {num_classes}")
        if class_names is None:
            class_names = ["background"] + [f"class_{i}" for i in range(1, num_classes)]
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.class_names = list(class_names)
        self.ignore_index = ignore_index
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)  # [ref, pred]

    def update(self, pred_label_map: np.ndarray, ref_label_map: np.ndarray) -> None:
        """Add one image. Both (H, W) integer maps in the same frame."""
        pred = np.asarray(pred_label_map).astype(np.int64, copy=False).ravel()
        ref = np.asarray(ref_label_map).astype(np.int64, copy=False).ravel()
        if pred.shape != ref.shape:
            raise ValueError(
                f"label maps differ in shape: {np.shape(pred_label_map)} vs "
                f"{np.shape(ref_label_map)}"
            )
        keep = ref != self.ignore_index
        pred, ref = pred[keep], ref[keep]
        if pred.size and (pred.min() < 0 or pred.max() >= self.num_classes):
            raise ValueError(f"predicted labels outside 0..{self.num_classes - 1}")
        if ref.size and (ref.min() < 0 or ref.max() >= self.num_classes):
            raise ValueError(f"reference labels outside 0..{self.num_classes - 1}")
        self.confusion += np.bincount(
            ref * self.num_classes + pred, minlength=self.num_classes**2
        ).reshape(self.num_classes, self.num_classes)

    def result(self) -> dict[str, Any]:
        """{"iou": {class name: IoU}, "mIoU": mean over classes, "pixels": total counted}.

        A class absent from both prediction and reference in every image has no IoU (nan) and
        is left out of the mean.
        """
        true_pos = np.diag(self.confusion).astype(np.float64)
        union = self.confusion.sum(0) + self.confusion.sum(1) - true_pos
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, true_pos / union, np.nan)
        valid = ~np.isnan(iou)
        return {
            "iou": {name: float(v) for name, v in zip(self.class_names, iou, strict=True)},
            "mIoU": float(iou[valid].mean()) if valid.any() else math.nan,
            "pixels": int(self.confusion.sum()),
        }


# ---------------------------------------------------------------------------------------------
# Boxes


def _xyxy_to_xywh(box: Sequence[float]) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    return [x1, y1, x2 - x1, y2 - y1]


def _run_cocoeval(
    gt: Sequence[GroundTruthImage],
    predictions: Sequence[PredictionImage],
    class_names: Sequence[str],
) -> tuple[dict[str, np.ndarray] | None, np.ndarray, np.ndarray]:
    """COCOeval over all images: (its `eval` dict or None, IoU thresholds, has_gt per class).

    `eval["precision"]` is (T IoU thresholds, 101 recall points, K classes, 4 area ranges,
    3 max-dets), -1 where a class has no ground truth.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    # pycocotools wants integer image ids; map whatever the caller uses onto 1..N.
    image_index = {}
    images = []
    for number, image in enumerate(gt, start=1):
        if image["image_id"] in image_index:
            raise ValueError(f"image {image['image_id']!r} appears twice in the ground truth")
        image_index[image["image_id"]] = number
        images.append({"id": number, "width": int(image["width"]), "height": int(image["height"])})

    annotations = []
    has_gt = np.zeros(len(class_names), dtype=bool)
    for image in gt:
        if len(image["boxes"]) != len(image["labels"]):
            raise ValueError(f"image {image['image_id']!r}: boxes and labels differ in length")
        for box, label in zip(image["boxes"], image["labels"], strict=True):
            xywh = _xyxy_to_xywh(box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_index[image["image_id"]],
                    "category_id": int(label) + 1,
                    "bbox": xywh,
                    "area": xywh[2] * xywh[3],
                    "iscrowd": 0,
                }
            )
            has_gt[int(label)] = True

    detections = []
    for pred in predictions:
        if pred["image_id"] not in image_index:
            raise ValueError(f"prediction for image {pred['image_id']!r}, absent from ground truth")
        for box, label, score in zip(pred["boxes"], pred["labels"], pred["scores"], strict=True):
            detections.append(
                {
                    "image_id": image_index[pred["image_id"]],
                    "category_id": int(label) + 1,
                    "bbox": _xyxy_to_xywh(box),
                    "score": float(score),
                }
            )

    iou_thresholds = np.linspace(0.5, 0.95, 10)
    if not detections:
        return None, iou_thresholds, has_gt

    coco_gt = COCO()
    coco_gt.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": name} for k, name in enumerate(class_names)],
    }
    # pycocotools prints progress to stdout on every call; the CLI's output is a contract.
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.catIds = list(range(1, len(class_names) + 1))
        evaluator.params.imgIds = list(range(1, len(images) + 1))
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator.eval, evaluator.params.iouThrs, has_gt


def _ap_from_eval(
    coco_eval: dict[str, np.ndarray] | None,
    iou_thresholds: np.ndarray,
    has_gt: np.ndarray,
    class_names: Sequence[str],
) -> dict[str, Any]:
    per_class = {}
    at_50 = int(np.argmin(np.abs(iou_thresholds - 0.5)))
    for k, name in enumerate(class_names):
        if not has_gt[k]:
            per_class[name] = {"AP": math.nan, "AP50": math.nan}
        elif coco_eval is None:
            per_class[name] = {"AP": 0.0, "AP50": 0.0}
        else:
            # area range "all" (index 0), the largest max-dets setting (100, index -1)
            precision = coco_eval["precision"][:, :, k, 0, -1]
            per_class[name] = {
                "AP": float(precision.mean()),
                "AP50": float(precision[at_50].mean()),
            }
    valid = [per_class[name] for k, name in enumerate(class_names) if has_gt[k]]
    return {
        "AP": float(np.mean([v["AP"] for v in valid])) if valid else math.nan,
        "AP50": float(np.mean([v["AP50"] for v in valid])) if valid else math.nan,
        "per_class": per_class,
    }


def _curves_from_eval(
    coco_eval: dict[str, np.ndarray] | None,
    iou_thresholds: np.ndarray,
    has_gt: np.ndarray,
    class_names: Sequence[str],
    iou_threshold: float,
) -> dict[str, dict[str, np.ndarray]]:
    at = int(np.argmin(np.abs(iou_thresholds - iou_threshold)))
    if abs(iou_thresholds[at] - iou_threshold) > 1e-6:
        raise ValueError(f"iou_threshold must be one of COCO's {iou_thresholds.round(2)}")
    recall = np.linspace(0.0, 1.0, 101)
    curves = {}
    for k, name in enumerate(class_names):
        if not has_gt[k]:
            continue
        if coco_eval is None:
            precision = np.zeros(101)
            score = np.zeros(101)
        else:
            precision = np.clip(coco_eval["precision"][at, :, k, 0, -1], 0.0, None)
            score = np.clip(coco_eval["scores"][at, :, k, 0, -1], 0.0, None)
        curves[name] = {"recall": recall, "precision": precision, "score": score}
    return curves


def coco_box_ap(
    gt: Sequence[GroundTruthImage],
    predictions: Sequence[PredictionImage],
    class_names: Sequence[str],
) -> dict[str, Any]:
    """COCO box AP (IoU 0.50:0.95) and AP50, overall and per class, with pycocotools.

    Args:
        gt: every evaluated image, with its reference boxes (none for a negative image).
        predictions: boxes per image; images without predictions may be left out.
        class_names: name of each class index.

    Returns:
        {"AP": float, "AP50": float, "per_class": {name: {"AP": float, "AP50": float}}}.
        A class with no ground-truth box in `gt` has no defined AP: nan, and it is left out of
        the overall means (COCO's convention). With no prediction at all, classes with ground
        truth score 0.
    """
    return _ap_from_eval(*_run_cocoeval(gt, predictions, class_names), class_names)


def pr_curve(
    gt: Sequence[GroundTruthImage],
    predictions: Sequence[PredictionImage],
    class_names: Sequence[str],
    *,
    iou_threshold: float = 0.5,
) -> dict[str, dict[str, np.ndarray]]:
    """Precision-recall curve per class at one IoU threshold (a COCO threshold, 0.50..0.95).

    Returns:
        {name: {"recall": (101,), "precision": (101,), "score": (101,)}}: COCO's interpolated
        precision at recall 0, 0.01, ..., 1, and the lowest detection score needed to reach
        that recall (for choosing an operating point). Where a recall is never reached,
        precision and score are 0. Classes with no ground truth are left out.
    """
    return _curves_from_eval(
        *_run_cocoeval(gt, predictions, class_names), class_names, iou_threshold
    )


def coco_box_report(
    gt: Sequence[GroundTruthImage],
    predictions: Sequence[PredictionImage],
    class_names: Sequence[str],
    *,
    iou_threshold: float = 0.5,
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """`coco_box_ap` and `pr_curve` from one COCOeval pass (it is the slow part)."""
    evaluated = _run_cocoeval(gt, predictions, class_names)
    return (
        _ap_from_eval(*evaluated, class_names),
        _curves_from_eval(*evaluated, class_names, iou_threshold),
    )


# ---------------------------------------------------------------------------------------------
# False alarms


def classes_with_boxes(
    predictions: Iterable[PredictionImage],
    class_names: Sequence[str],
    *,
    score_threshold: float = 0.0,
) -> dict[Hashable, set[str]]:
    """image_id -> names of the classes with at least one box scoring >= score_threshold."""
    found: dict[Hashable, set[str]] = {}
    for pred in predictions:
        names = found.setdefault(pred["image_id"], set())
        for label, score in zip(pred["labels"], pred["scores"], strict=True):
            if score >= score_threshold:
                names.add(class_names[int(label)])
    return found


def false_alarm_rate(
    gt_classes_per_image: Mapping[Hashable, set[str]],
    predicted_classes_per_image: Mapping[Hashable, set[str]],
    class_names: Sequence[str],
) -> dict[str, dict[str, float | int]]:
    """Share of images without a class that still got a box of it.

    Args:
        gt_classes_per_image: every evaluated image -> the classes present in it (reference).
        predicted_classes_per_image: image -> classes with >= 1 predicted box; missing images
            had none.

    Returns:
        {name: {"rate": float, "false_alarms": int, "images": int}} per class, and "any": over
        images with no class at all (fire-free scenes), the share that got a box of any class.
        The rate is nan when no evaluated image lacks the class.
    """
    result: dict[str, dict[str, float | int]] = {}
    for name in [*class_names, "any"]:
        if name == "any":
            negatives = [i for i, present in gt_classes_per_image.items() if not present]
            alarms = sum(1 for i in negatives if predicted_classes_per_image.get(i))
        else:
            negatives = [i for i, present in gt_classes_per_image.items() if name not in present]
            alarms = sum(1 for i in negatives if name in predicted_classes_per_image.get(i, ()))
        result[name] = {
            "rate": alarms / len(negatives) if negatives else math.nan,
            "false_alarms": alarms,
            "images": len(negatives),
        }
    return result
