"""From masks and reviewer points to pseudo boxes.

Every box here is `(x1, y1, x2, y2)` in pixels of the frame it was computed in, with x2 and y2
the exclusive edge: a component covering columns 3..7 gives x1=3, x2=8, and
0 <= x1 < x2 <= W. Masks are computed at a working resolution; `scale_boxes` maps boxes to
pixels of the original image before they are stored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

log = logging.getLogger(__name__)

# Colour flood fill runs on a lightly blurred image: JPEG block noise and sensor grain would
# otherwise stop the fill a few pixels from the seed on a flame that looks uniform to a person.
_FLOOD_BLUR_KERNEL = 5


@dataclass(frozen=True)
class PseudoBox:
    """One box from a mask component.

    x1, y1, x2, y2: pixels of the mask's frame (or the image's, after `scale_boxes`), x2/y2 the
        exclusive edge, 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H.
    score: in [0, 1]; mean foreground probability inside the component times the class score.
    area: foreground pixels of the component (not the box area), in the same frame.
    """

    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    area: int

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)


def _check_prob_map(fg_prob: np.ndarray) -> np.ndarray:
    fg_prob = np.asarray(fg_prob)
    if fg_prob.ndim != 2:
        raise ValueError(f"fg_prob must be a (H, W) map, got shape {fg_prob.shape}")
    if fg_prob.size == 0:
        raise ValueError("fg_prob is empty")
    fg_prob = fg_prob.astype(np.float32, copy=False)
    if not np.isfinite(fg_prob).all():
        raise ValueError("fg_prob holds NaN or infinite values")
    return fg_prob


def _label_components(mask: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """8-connected components of a bool (H, W) mask: (count incl. background, labels, stats)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        mask.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S
    )
    return count, labels, stats


def _box_of_component(stats_row: np.ndarray, score: float) -> PseudoBox:
    x, y, w, h, area = (int(v) for v in stats_row[:5])
    return PseudoBox(
        x1=float(x), y1=float(y), x2=float(x + w), y2=float(y + h), score=score, area=area
    )


def mask_to_boxes(
    fg_prob: np.ndarray,
    *,
    threshold: float = 0.5,
    class_score: float = 1.0,
    min_area_frac: float = 0.001,
) -> list[PseudoBox]:
    """One box per 8-connected component of `fg_prob >= threshold`.

    Args:
        fg_prob: (H, W) float in [0, 1], the foreground probability of one class.
        threshold: pixels at or above it are foreground.
        class_score: the classifier's probability that the class is in the image, in [0, 1].
        min_area_frac: components with fewer than `min_area_frac * H * W` pixels are dropped
            (speckle from CAM noise, not objects).

    Returns:
        Boxes in pixels of fg_prob's frame, highest score first.
    """
    fg_prob = _check_prob_map(fg_prob)
    height, width = fg_prob.shape
    count, labels, stats = _label_components(fg_prob >= threshold)
    if count <= 1:
        return []

    # Score = mean foreground probability inside the component times the class probability.
    # The mean (not the max) keeps one hot pixel from vouching for a large lukewarm blob, and
    # the class factor ranks boxes from images the classifier doubts below confident ones, as a
    # detector's score would; both lie in [0, 1], so the product does too.
    prob_sums = np.bincount(labels.ravel(), weights=fg_prob.ravel(), minlength=count)
    min_area = min_area_frac * height * width
    boxes = []
    for label in range(1, count):
        area = int(stats[label, cv2.CC_STAT_AREA])
        if area < min_area:
            continue
        score = float(prob_sums[label] / area) * float(class_score)
        boxes.append(_box_of_component(stats[label], score))
    boxes.sort(key=lambda box: box.score, reverse=True)
    return boxes


def point_to_box(
    fg_prob: np.ndarray,
    x: float,
    y: float,
    *,
    threshold: float = 0.5,
    image_rgb: np.ndarray | None = None,
    grow_threshold: float = 0.25,
    grow_tolerance: float = 24.0,
    max_area_frac: float = 0.5,
    class_score: float = 1.0,
) -> PseudoBox | None:
    """The box of the object a reviewer clicked at (x, y).

    In order:
    1. the point lies in `fg_prob >= threshold`: the component that holds it (whatever its size,
       since the model and the reviewer agree there is an object there);
    2. the point lies in `fg_prob >= grow_threshold`: the component of that looser mask holding
       it, the object the model saw too faintly;
    3. `image_rgb` is given: the region of similar colour around the point (flood fill, each
       channel within `grow_tolerance` of the clicked pixel's colour);
    Regions of cases 2 and 3 larger than `max_area_frac * H * W` are refused (the fill leaked
    into the background) and the next case is tried.

    Args:
        fg_prob: (H, W) float in [0, 1], foreground probability of the clicked class.
        x, y: the point in pixels of fg_prob's frame (x along the width).
        image_rgb: (h, w, 3) uint8 RGB; resized to (H, W) when its size differs.
        grow_tolerance: per-channel colour difference (0-255) the flood fill accepts.
        class_score: multiplies the score, as in `mask_to_boxes`.

    Returns:
        The box in fg_prob's frame with score = mean fg_prob in the region * class_score, or
        None when the point is outside the map or no case gives a sensible region.
    """
    fg_prob = _check_prob_map(fg_prob)
    height, width = fg_prob.shape
    col, row = int(np.floor(x)), int(np.floor(y))
    if not (0 <= col < width and 0 <= row < height):
        log.warning("point (%.1f, %.1f) lies outside the %dx%d map", x, y, width, height)
        return None
    max_area = max_area_frac * height * width

    # Cases 1 and 2: components of the probability map at the given, then a looser, threshold.
    for level, capped in ((threshold, False), (grow_threshold, True)):
        if fg_prob[row, col] < level:
            continue
        count, labels, stats = _label_components(fg_prob >= level)
        label = labels[row, col]
        area = int(stats[label, cv2.CC_STAT_AREA])
        if capped and area > max_area:
            continue
        score = float(fg_prob[labels == label].mean()) * float(class_score)
        return _box_of_component(stats[label], score)

    # Case 3: grow in colour space from the clicked pixel.
    if image_rgb is None:
        return None
    region = _flood_region(image_rgb, (height, width), col, row, grow_tolerance)
    area = int(region.sum())
    if area > max_area:
        log.debug("colour region at (%d, %d) covers %d px, above the cap; no box", col, row, area)
        return None
    rows, cols = np.nonzero(region)
    score = float(fg_prob[region].mean()) * float(class_score)
    return PseudoBox(
        x1=float(cols.min()),
        y1=float(rows.min()),
        x2=float(cols.max() + 1),
        y2=float(rows.max() + 1),
        score=score,
        area=area,
    )


def _flood_region(
    image_rgb: np.ndarray, size_hw: tuple[int, int], col: int, row: int, tolerance: float
) -> np.ndarray:
    """(H, W) bool: pixels 8-connected to (col, row) whose colour is within `tolerance` of it."""
    image_rgb = np.asarray(image_rgb)
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"image_rgb must be (H, W, 3), got shape {image_rgb.shape}")
    height, width = size_hw
    image = np.ascontiguousarray(image_rgb.astype(np.uint8, copy=False))
    if image.shape[:2] != (height, width):
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    image = cv2.GaussianBlur(image, (_FLOOD_BLUR_KERNEL, _FLOOD_BLUR_KERNEL), 0)

    # FIXED_RANGE compares every pixel with the seed's colour, not with its neighbour, so a slow
    # gradient (flame to sky) cannot carry the fill across the whole image step by step.
    flood_mask = np.zeros((height + 2, width + 2), np.uint8)
    flags = 8 | cv2.FLOODFILL_FIXED_RANGE | cv2.FLOODFILL_MASK_ONLY | (1 << 8)
    diff = (tolerance,) * 3
    cv2.floodFill(image, flood_mask, (col, row), (0, 0, 0), diff, diff, flags)
    return flood_mask[1:-1, 1:-1].astype(bool)


def scale_boxes(
    boxes: Iterable[PseudoBox],
    from_size: tuple[int, int],
    to_size: tuple[int, int],
) -> list[PseudoBox]:
    """Map boxes from one frame to another, for example the working resolution to the image's.

    Args:
        from_size, to_size: (width, height) of the two frames.

    Returns:
        Boxes in `to_size` pixels, clipped to that frame; `area` scaled by the pixel-area ratio.
    """
    from_w, from_h = from_size
    to_w, to_h = to_size
    if min(from_w, from_h, to_w, to_h) <= 0:
        raise ValueError(f"frame sizes must be positive, got {from_size} -> {to_size}")
    sx, sy = to_w / from_w, to_h / from_h
    scaled = []
    for box in boxes:
        scaled.append(
            PseudoBox(
                x1=min(max(box.x1 * sx, 0.0), float(to_w)),
                y1=min(max(box.y1 * sy, 0.0), float(to_h)),
                x2=min(max(box.x2 * sx, 0.0), float(to_w)),
                y2=min(max(box.y2 * sy, 0.0), float(to_h)),
                score=box.score,
                area=int(round(box.area * sx * sy)),
            )
        )
    return scaled


def boxes_to_mask(
    boxes: Sequence[PseudoBox] | Sequence[Sequence[float]], size: tuple[int, int]
) -> np.ndarray:
    """Fill boxes into a (H, W) bool mask of `size` = (width, height).

    A pixel is inside when its square overlaps the box: columns floor(x1) .. ceil(x2) - 1.
    Accepts PseudoBox objects or (x1, y1, x2, y2) tuples.
    """
    width, height = size
    mask = np.zeros((height, width), dtype=bool)
    for box in boxes:
        x1, y1, x2, y2 = box.xyxy if isinstance(box, PseudoBox) else box[:4]
        c1, r1 = max(int(np.floor(x1)), 0), max(int(np.floor(y1)), 0)
        c2, r2 = min(int(np.ceil(x2)), width), min(int(np.ceil(y2)), height)
        if c2 > c1 and r2 > r1:
            mask[r1:r2, c1:c2] = True
    return mask
