import math

import numpy as np
import pytest
import torch

from core.metrics import (
    IoUAccumulator,
    classes_with_boxes,
    coco_box_ap,
    coco_box_report,
    false_alarm_rate,
    mask_iou,
    pr_curve,
)

# ---------------------------------------------------------------------------------------------
# Slow references


def _box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _reference_interpolated_precision(gt_boxes, detections, iou_threshold=0.5):
    """101-point interpolated precision of one class, the COCO recipe written out plainly.

    gt_boxes: image -> list of boxes; detections: list of (image, box, score).
    """
    n_gt = sum(len(boxes) for boxes in gt_boxes.values())
    matched_flags = []  # (score, is_true_positive)
    for image, boxes in gt_boxes.items():
        image_dets = sorted((d for d in detections if d[0] == image), key=lambda d: -d[2])[:100]
        taken = [False] * len(boxes)
        for _, box, score in image_dets:
            best, best_iou = None, iou_threshold
            for g, gt_box in enumerate(boxes):
                iou = _box_iou(box, gt_box)
                if not taken[g] and iou >= best_iou:
                    best, best_iou = g, iou
            if best is not None:
                taken[best] = True
            matched_flags.append((score, best is not None))
    matched_flags.sort(key=lambda f: -f[0])
    true_pos = false_pos = 0
    recall, precision = [], []
    for _, is_tp in matched_flags:
        true_pos += is_tp
        false_pos += not is_tp
        recall.append(true_pos / n_gt)
        precision.append(true_pos / (true_pos + false_pos))
    for i in range(len(precision) - 1, 0, -1):
        precision[i - 1] = max(precision[i - 1], precision[i])
    sampled = []
    for r in np.linspace(0, 1, 101):
        reached = [i for i, rec in enumerate(recall) if rec >= r]
        sampled.append(precision[reached[0]] if reached else 0.0)
    return np.array(sampled)


def _random_case(rng, n_images, n_classes):
    """Ground truth with jittered, partly missed, partly invented predictions."""
    gt, predictions = [], []
    for image_id in range(n_images):
        n_boxes = int(rng.integers(0, 4))
        boxes, labels = [], []
        for _ in range(n_boxes):
            x1, y1 = rng.uniform(0, 80, size=2)
            boxes.append((x1, y1, x1 + rng.uniform(5, 40), y1 + rng.uniform(5, 40)))
            labels.append(int(rng.integers(0, n_classes)))
        gt.append(
            {
                "image_id": f"img{image_id}",
                "width": 128,
                "height": 128,
                "boxes": boxes,
                "labels": labels,
            }
        )
        pred_boxes, pred_labels = [], []
        for box, label in zip(boxes, labels, strict=True):
            if rng.random() < 0.8:
                jitter = rng.normal(0, 4, size=4)
                x1, y1 = box[0] + jitter[0], box[1] + jitter[1]
                pred_boxes.append(
                    (x1, y1, max(box[2] + jitter[2], x1 + 1), max(box[3] + jitter[3], y1 + 1))
                )
                pred_labels.append(label)
        for _ in range(int(rng.integers(0, 3))):
            x1, y1 = rng.uniform(0, 100, size=2)
            pred_boxes.append((x1, y1, x1 + rng.uniform(5, 30), y1 + rng.uniform(5, 30)))
            pred_labels.append(int(rng.integers(0, n_classes)))
        if pred_boxes:
            predictions.append(
                {
                    "image_id": f"img{image_id}",
                    "boxes": pred_boxes,
                    "labels": pred_labels,
                    "scores": list(rng.uniform(0.01, 1.0, size=len(pred_boxes))),
                }
            )
    return gt, predictions


def _per_class(gt, predictions, k):
    gt_boxes = {
        g["image_id"]: [b for b, lab in zip(g["boxes"], g["labels"], strict=True) if lab == k]
        for g in gt
    }
    detections = [
        (p["image_id"], b, s)
        for p in predictions
        for b, lab, s in zip(p["boxes"], p["labels"], p["scores"], strict=True)
        if lab == k
    ]
    return gt_boxes, detections


# ---------------------------------------------------------------------------------------------
# Masks


def test_mask_iou_hand_made():
    pred = np.zeros((4, 4), bool)
    ref = np.zeros((4, 4), bool)
    pred[0:2, 0:2] = True  # 4 px
    ref[0:2, 1:3] = True  # 4 px, 2 shared
    assert mask_iou(pred, ref) == pytest.approx(2 / 6)
    assert mask_iou(ref, ref) == 1.0
    assert mask_iou(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 1.0
    assert mask_iou(pred, np.zeros((4, 4), bool)) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        mask_iou(pred, np.zeros((3, 3), bool))


def test_iou_accumulator_sums_pixels_over_images():
    acc = IoUAccumulator(2, ["background", "fire"])
    # Image 1: a large object found exactly. Image 2: a small object missed.
    ref1 = np.zeros((10, 10), int)
    ref1[:5] = 1
    acc.update(ref1.copy(), ref1)
    ref2 = np.zeros((10, 10), int)
    ref2[0, 0:2] = 1
    acc.update(np.zeros((10, 10), int), ref2)
    result = acc.result()
    # fire: TP 50, FN 2 -> 50/52, not the per-image mean (1 + 0) / 2.
    assert result["iou"]["fire"] == pytest.approx(50 / 52)
    assert result["iou"]["background"] == pytest.approx(148 / 150)
    assert result["mIoU"] == pytest.approx((50 / 52 + 148 / 150) / 2)
    assert result["pixels"] == 200


def test_iou_accumulator_ignores_and_skips_absent_classes():
    acc = IoUAccumulator(3)
    ref = np.array([[0, 1], [255, 1]])
    pred = np.array([[0, 1], [2, 0]])
    acc.update(pred, ref)
    result = acc.result()
    assert result["iou"]["class_1"] == pytest.approx(0.5)
    assert result["iou"]["background"] == pytest.approx(0.5)
    assert result["iou"]["class_2"] != result["iou"]["class_2"]  # never seen (ignored): nan
    assert result["mIoU"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="outside"):
        acc.update(np.array([[3]]), np.array([[0]]))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_iou_accumulator_matches_per_class_masks(seed):
    rng = np.random.default_rng(seed)
    acc = IoUAccumulator(4)
    inter, union = np.zeros(4), np.zeros(4)
    for _ in range(3):
        pred = rng.integers(0, 4, size=(7, 9))
        ref = rng.integers(0, 4, size=(7, 9))
        acc.update(pred, ref)
        for c in range(4):
            inter[c] += np.logical_and(pred == c, ref == c).sum()
            union[c] += np.logical_or(pred == c, ref == c).sum()
    result = acc.result()
    torch.testing.assert_close(
        torch.tensor(list(result["iou"].values()), dtype=torch.float64),
        torch.tensor(inter / union),
    )


# ---------------------------------------------------------------------------------------------
# Boxes


def _simple_gt():
    return [
        {"image_id": "a", "width": 100, "height": 100, "boxes": [(10, 10, 50, 50)], "labels": [0]},
        {
            "image_id": "b",
            "width": 100,
            "height": 100,
            "boxes": [(0, 0, 30, 60), (60, 60, 90, 95)],
            "labels": [1, 0],
        },
        {"image_id": "neg", "width": 100, "height": 100, "boxes": [], "labels": []},
    ]


def test_perfect_predictions_score_one():
    gt = _simple_gt()
    predictions = [
        {
            "image_id": g["image_id"],
            "boxes": g["boxes"],
            "labels": g["labels"],
            "scores": [0.9] * len(g["boxes"]),
        }
        for g in gt
    ]
    result = coco_box_ap(gt, predictions, ["fire", "smoke"])
    assert result["AP"] == pytest.approx(1.0)
    assert result["AP50"] == pytest.approx(1.0)
    assert result["per_class"]["smoke"] == pytest.approx({"AP": 1.0, "AP50": 1.0})


def test_false_positive_on_a_negative_image_above_the_true_positive_halves_ap50():
    gt = [
        {
            "image_id": "pos",
            "width": 100,
            "height": 100,
            "boxes": [(10, 10, 50, 50)],
            "labels": [0],
        },
        {"image_id": "neg", "width": 100, "height": 100, "boxes": [], "labels": []},
    ]
    predictions = [
        {"image_id": "neg", "boxes": [(0, 0, 20, 20)], "labels": [0], "scores": [0.9]},
        {"image_id": "pos", "boxes": [(10, 10, 50, 50)], "labels": [0], "scores": [0.8]},
    ]
    result = coco_box_ap(gt, predictions, ["fire"])
    assert result["AP50"] == pytest.approx(0.5)
    # The same false positive scored below the true positive costs nothing.
    predictions[0]["scores"] = [0.1]
    assert coco_box_ap(gt, predictions, ["fire"])["AP50"] == pytest.approx(1.0)


def test_loose_box_counts_at_50_but_not_at_higher_thresholds():
    gt = [{"image_id": 1, "width": 100, "height": 100, "boxes": [(0, 0, 40, 40)], "labels": [0]}]
    # IoU = 1600 / 2400 = 0.667: a hit for IoU 0.50..0.65 (4 of 10 thresholds).
    predictions = [{"image_id": 1, "boxes": [(0, 0, 40, 60)], "labels": [0], "scores": [1.0]}]
    result = coco_box_ap(gt, predictions, ["fire"])
    assert result["AP50"] == pytest.approx(1.0)
    assert result["AP"] == pytest.approx(0.4)


def test_class_without_ground_truth_is_nan_and_left_out():
    gt = [{"image_id": 1, "width": 100, "height": 100, "boxes": [(0, 0, 40, 40)], "labels": [0]}]
    predictions = [
        {
            "image_id": 1,
            "boxes": [(0, 0, 40, 40), (50, 50, 60, 60)],
            "labels": [0, 1],
            "scores": [0.9, 0.8],
        }
    ]
    result = coco_box_ap(gt, predictions, ["fire", "smoke"])
    assert math.isnan(result["per_class"]["smoke"]["AP50"])
    assert result["AP50"] == pytest.approx(1.0)


def test_no_predictions_scores_zero():
    result = coco_box_ap(_simple_gt(), [], ["fire", "smoke"])
    assert result["AP50"] == 0.0 and result["per_class"]["smoke"]["AP"] == 0.0


def test_unknown_image_in_predictions_is_refused():
    predictions = [{"image_id": "zzz", "boxes": [(0, 0, 1, 1)], "labels": [0], "scores": [1]}]
    with pytest.raises(ValueError, match="zzz"):
        coco_box_ap(_simple_gt(), predictions, ["fire", "smoke"])


def test_pycocotools_prints_nothing(capsys):
    coco_box_ap(
        _simple_gt(),
        [{"image_id": "a", "boxes": [(10, 10, 50, 50)], "labels": [0], "scores": [0.5]}],
        ["fire", "smoke"],
    )
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_ap50_matches_slow_reference(seed):
    rng = np.random.default_rng(seed)
    class_names = ["fire", "smoke"]
    gt, predictions = _random_case(rng, n_images=12, n_classes=2)
    result = coco_box_ap(gt, predictions, class_names)
    curves = pr_curve(gt, predictions, class_names)
    for k, name in enumerate(class_names):
        gt_boxes, detections = _per_class(gt, predictions, k)
        if not any(gt_boxes.values()):
            assert math.isnan(result["per_class"][name]["AP50"])
            continue
        want = _reference_interpolated_precision(gt_boxes, detections)
        torch.testing.assert_close(
            torch.tensor(curves[name]["precision"]), torch.tensor(want), atol=1e-9, rtol=1e-6
        )
        assert result["per_class"][name]["AP50"] == pytest.approx(want.mean())
        want_75 = _reference_interpolated_precision(gt_boxes, detections, iou_threshold=0.75)
        curve_75 = pr_curve(gt, predictions, class_names, iou_threshold=0.75)[name]
        torch.testing.assert_close(
            torch.tensor(curve_75["precision"]), torch.tensor(want_75), atol=1e-9, rtol=1e-6
        )


@pytest.mark.parametrize("seed", [0, 1])
def test_report_equals_separate_calls(seed):
    gt, predictions = _random_case(np.random.default_rng(seed), n_images=10, n_classes=2)
    ap, curves = coco_box_report(gt, predictions, ["fire", "smoke"], iou_threshold=0.75)
    assert ap == coco_box_ap(gt, predictions, ["fire", "smoke"])
    separate = pr_curve(gt, predictions, ["fire", "smoke"], iou_threshold=0.75)
    assert curves.keys() == separate.keys()
    for name in curves:
        np.testing.assert_array_equal(curves[name]["precision"], separate[name]["precision"])


def test_pr_curve_scores_fall_as_recall_grows():
    rng = np.random.default_rng(7)
    gt, predictions = _random_case(rng, n_images=20, n_classes=1)
    curve = pr_curve(gt, predictions, ["fire"])["fire"]
    assert curve["recall"].shape == curve["precision"].shape == curve["score"].shape == (101,)
    reached = curve["score"] > 0
    assert reached.any()
    assert (np.diff(curve["score"][reached]) <= 0).all()
    with pytest.raises(ValueError, match="iou_threshold"):
        pr_curve(gt, predictions, ["fire"], iou_threshold=0.52)


# ---------------------------------------------------------------------------------------------
# False alarms


def test_false_alarm_rate_hand_made():
    gt = {"a": {"fire"}, "b": {"smoke"}, "c": set(), "d": set(), "e": {"fire", "smoke"}}
    predicted = {"a": {"fire", "smoke"}, "b": {"fire"}, "c": {"smoke"}, "e": {"fire"}}
    rates = false_alarm_rate(gt, predicted, ["fire", "smoke"])
    # fire absent in b, c, d: alarm on b -> 1/3. smoke absent in a, c, d: alarms a, c -> 2/3.
    assert rates["fire"] == {"rate": pytest.approx(1 / 3), "false_alarms": 1, "images": 3}
    assert rates["smoke"]["rate"] == pytest.approx(2 / 3)
    # no class at all: c, d; c got a box -> 1/2.
    assert rates["any"]["rate"] == pytest.approx(0.5)
    assert math.isnan(false_alarm_rate({"a": {"fire"}}, {}, ["fire"])["fire"]["rate"])


def test_classes_with_boxes_respects_threshold():
    predictions = [
        {"image_id": 1, "boxes": [(0, 0, 1, 1)] * 2, "labels": [0, 1], "scores": [0.9, 0.2]},
        {"image_id": 2, "boxes": [], "labels": [], "scores": []},
    ]
    found = classes_with_boxes(predictions, ["fire", "smoke"], score_threshold=0.5)
    assert found == {1: {"fire"}, 2: set()}
