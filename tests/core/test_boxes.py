from collections import deque

import cv2
import numpy as np
import pytest
import torch

from core.boxes import PseudoBox, boxes_to_mask, mask_to_boxes, point_to_box, scale_boxes


def _reference_components(mask: np.ndarray) -> list[tuple[list[int], list[int]]]:
    """Slow 8-connected labelling by breadth-first flood fill: (rows, cols) per component."""
    height, width = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    components = []
    for start_r in range(height):
        for start_c in range(width):
            if not mask[start_r, start_c] or seen[start_r, start_c]:
                continue
            rows, cols = [], []
            queue = deque([(start_r, start_c)])
            seen[start_r, start_c] = True
            while queue:
                r, c = queue.popleft()
                rows.append(r)
                cols.append(c)
                for dr in (-1, 0, 1):
                    for dc in (-1, 0, 1):
                        nr, nc = r + dr, c + dc
                        if 0 <= nr < height and 0 <= nc < width:
                            if mask[nr, nc] and not seen[nr, nc]:
                                seen[nr, nc] = True
                                queue.append((nr, nc))
            components.append((rows, cols))
    return components


def _reference_boxes(fg_prob, threshold, class_score, min_area_frac):
    height, width = fg_prob.shape
    boxes = []
    for rows, cols in _reference_components(fg_prob >= threshold):
        if len(rows) < min_area_frac * height * width:
            continue
        score = (
            float(np.mean([fg_prob[r, c] for r, c in zip(rows, cols, strict=True)])) * class_score
        )
        boxes.append((min(cols), min(rows), max(cols) + 1, max(rows) + 1, score, len(rows)))
    return sorted(boxes, key=lambda b: (-b[4], b[0], b[1]))


def _two_blob_map() -> np.ndarray:
    fg_prob = np.zeros((40, 60), dtype=np.float32)
    fg_prob[5:15, 10:20] = 0.9  # blob A: rows 5..14, cols 10..19
    fg_prob[20:35, 30:55] = 0.7  # blob B: rows 20..34, cols 30..54
    return fg_prob


def test_two_blobs_give_two_exact_boxes():
    boxes = mask_to_boxes(_two_blob_map(), threshold=0.5, class_score=0.5)
    assert len(boxes) == 2
    first, second = boxes
    assert first.xyxy == (10.0, 5.0, 20.0, 15.0)
    assert first.area == 100
    assert first.score == pytest.approx(0.45)
    assert second.xyxy == (30.0, 20.0, 55.0, 35.0)
    assert second.area == 15 * 25
    assert second.score == pytest.approx(0.35)


def test_diagonal_pixels_are_one_component():
    fg_prob = np.zeros((10, 10), dtype=np.float32)
    fg_prob[2, 2] = fg_prob[3, 3] = fg_prob[4, 4] = 1.0
    boxes = mask_to_boxes(fg_prob, min_area_frac=0.0)
    assert [b.xyxy for b in boxes] == [(2.0, 2.0, 5.0, 5.0)]


def test_fragment_below_min_area_is_dropped():
    fg_prob = _two_blob_map()
    fg_prob[38:40, 0:2] = 1.0  # 4 pixels of 2400: below 0.002 * 2400 = 4.8
    boxes = mask_to_boxes(fg_prob, min_area_frac=0.002)
    assert len(boxes) == 2
    assert all(box.area >= 100 for box in boxes)
    boxes = mask_to_boxes(fg_prob, min_area_frac=0.0)
    assert len(boxes) == 3
    assert boxes[0].xyxy == (0.0, 38.0, 2.0, 40.0)


def test_empty_map_gives_no_boxes():
    assert mask_to_boxes(np.zeros((8, 8))) == []


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="shape"):
        mask_to_boxes(np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="NaN"):
        mask_to_boxes(np.full((4, 4), np.nan))


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_mask_to_boxes_matches_slow_reference(seed):
    rng = np.random.default_rng(seed)
    # Smooth noise gives blobs of many shapes and sizes, touching the borders now and then.
    noise = rng.random((6, 8)).astype(np.float32)
    fg_prob = cv2.resize(noise, (37, 29), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    fg_prob = fg_prob * (rng.random(fg_prob.shape) > 0.1)  # holes split some blobs
    class_score = float(rng.uniform(0.2, 1.0))
    got = mask_to_boxes(fg_prob, threshold=0.6, class_score=class_score, min_area_frac=0.004)
    want = _reference_boxes(fg_prob.astype(np.float32), 0.6, class_score, 0.004)
    assert len(got) == len(want) > 0
    got_sorted = sorted(got, key=lambda b: (-b.score, b.x1, b.y1))
    torch.testing.assert_close(
        torch.tensor([[b.x1, b.y1, b.x2, b.y2, b.score, b.area] for b in got_sorted]),
        torch.tensor(want, dtype=torch.float32),
    )
    scores = [b.score for b in got]
    assert scores == sorted(scores, reverse=True)


def test_point_inside_a_blob_gives_that_blobs_box():
    fg_prob = _two_blob_map()
    box = point_to_box(fg_prob, 40.5, 25.2)
    assert box is not None
    assert box.xyxy == (30.0, 20.0, 55.0, 35.0)
    assert box.area == 375
    assert box.score == pytest.approx(0.7)
    box = point_to_box(fg_prob, 12.0, 6.0, class_score=0.5)
    assert box.xyxy == (10.0, 5.0, 20.0, 15.0)
    assert box.score == pytest.approx(0.45)


def test_point_on_a_faint_region_grows_at_the_lower_threshold():
    fg_prob = _two_blob_map()
    fg_prob[0:4, 40:50] = 0.3  # too faint for 0.5, enough for the grow threshold
    box = point_to_box(fg_prob, 45, 2, threshold=0.5, grow_threshold=0.25)
    assert box.xyxy == (40.0, 0.0, 50.0, 4.0)
    assert box.score == pytest.approx(0.3)


def test_point_outside_the_mask_grows_a_colour_region():
    # A dark image with an orange patch the model missed, and a red patch touching it that the
    # fill must not swallow (more than the tolerance away in colour).
    image = np.full((40, 60, 3), 20, dtype=np.uint8)
    image[10:30, 5:25] = (250, 140, 20)
    image[10:30, 25:35] = (250, 20, 20)
    fg_prob = np.zeros((40, 60), dtype=np.float32)
    box = point_to_box(fg_prob, 12, 20, image_rgb=image, grow_tolerance=30)
    assert box is not None
    # The 5x5 blur softens the patch edges by up to two pixels; the box stays within them.
    assert 4 <= box.x1 <= 7 and 23 <= box.x2 <= 26
    assert 9 <= box.y1 <= 12 and 28 <= box.y2 <= 31
    assert box.score == 0.0


def test_colour_region_at_half_resolution_image_is_resized():
    image = np.full((80, 120, 3), 20, dtype=np.uint8)
    image[20:60, 10:50] = (250, 140, 20)
    fg_prob = np.zeros((40, 60), dtype=np.float32)
    box = point_to_box(fg_prob, 15, 20, image_rgb=image)
    assert 4 <= box.x1 <= 6 and 24 <= box.x2 <= 26


def test_point_on_uniform_background_is_refused():
    image = np.full((40, 60, 3), 20, dtype=np.uint8)
    fg_prob = np.zeros((40, 60), dtype=np.float32)
    assert point_to_box(fg_prob, 10, 10, image_rgb=image, max_area_frac=0.5) is None
    assert point_to_box(fg_prob, 10, 10) is None
    assert point_to_box(fg_prob, 100, 10, image_rgb=image) is None


def test_faint_region_larger_than_cap_falls_through():
    fg_prob = np.full((20, 20), 0.3, dtype=np.float32)
    assert point_to_box(fg_prob, 5, 5, max_area_frac=0.5) is None
    # ...but a component at the main threshold is returned whatever its size.
    box = point_to_box(fg_prob, 5, 5, threshold=0.2)
    assert box.xyxy == (0.0, 0.0, 20.0, 20.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scale_round_trip(seed):
    rng = np.random.default_rng(seed)
    boxes = []
    for _ in range(10):
        x1, y1 = rng.uniform(0, 100, size=2)
        boxes.append(PseudoBox(x1, y1, x1 + rng.uniform(1, 60), y1 + rng.uniform(1, 60), 0.5, 100))
    up = scale_boxes(boxes, (160, 160), (608, 400))
    back = scale_boxes(up, (608, 400), (160, 160))
    torch.testing.assert_close(
        torch.tensor([b.xyxy for b in back], dtype=torch.float64),
        torch.tensor([b.xyxy for b in boxes], dtype=torch.float64),
    )
    assert up[0].x1 == pytest.approx(boxes[0].x1 * 3.8)
    assert up[0].y2 == pytest.approx(boxes[0].y2 * 2.5)
    assert up[0].area == 950


def test_scale_clips_to_frame():
    (box,) = scale_boxes([PseudoBox(-2, 0, 12, 10, 1.0, 1)], (10, 10), (20, 20))
    assert box.xyxy == (0.0, 0.0, 20.0, 20.0)


def test_boxes_to_mask_inverts_mask_to_boxes_for_rectangles():
    fg_prob = _two_blob_map()
    boxes = mask_to_boxes(fg_prob)
    mask = boxes_to_mask(boxes, (60, 40))
    np.testing.assert_array_equal(mask, fg_prob >= 0.5)
    mask = boxes_to_mask([(0.5, 0.5, 1.5, 1.2)], (4, 4))
    assert mask.sum() == 4 and mask[:2, :2].all()
