"""The review image: the photo with CAM heat, the RS+EPM mask and boxes drawn over it.

Rendering is split by cost. The base layer (decode the image, resize, blend CAM and mask) costs
tens of milliseconds and depends only on the image and the layer settings, so it is cached and
prepared for the next queue item in a background thread before the reviewer asks for it. Boxes
change with every decision and cost a millisecond to draw, so they are drawn on every rerun.

Frames: boxes are (x1, y1, x2, y2) in pixels of the original image; the displayed image is the
original scaled by one factor (`display_scale`), and clicks on it are mapped back by it.
CAM and mask PNGs (see core.propose.save_proposal_pngs) may be at any resolution: they are
resized to the displayed frame here and to the image frame when boxes are derived from them.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from core.boxes import PseudoBox, mask_to_boxes, scale_boxes
from core.images import ImageError, read_rgb

log = logging.getLogger(__name__)

# The longest displayed side: a 608 px CCTV frame shows at full size, a 4K frame fits a laptop.
DISPLAY_MAX_SIDE = 720

# RGB per class index (fire orange, smoke blue-grey, then distinct hues) for masks and labels.
CLASS_COLOURS = ((255, 120, 0), (120, 170, 255), (80, 220, 120), (220, 80, 220), (240, 220, 60))
# RGB per box state; the current box also gets a thick white frame.
STATE_COLOURS = {
    "pending": (255, 215, 0),
    "accepted": (40, 220, 90),
    "rejected": (240, 50, 50),
    "edited": (150, 150, 150),
    "deleted": (110, 110, 110),
    "reference": (60, 140, 255),
    "derived": (255, 0, 255),
}


@dataclass(frozen=True)
class ImageSource:
    """What the base layer needs to know about one image; hashable, so it keys the cache.

    cam_dir / mask_dir: absolute folders holding <image_id>_<class>.png, or None.
    """

    image_id: int
    path: str
    width: int
    height: int
    cam_dir: str | None = None
    mask_dir: str | None = None

    def cam_path(self, class_name: str) -> Path | None:
        return Path(self.cam_dir) / f"{self.image_id}_{class_name}.png" if self.cam_dir else None

    def mask_path(self, class_name: str) -> Path | None:
        return Path(self.mask_dir) / f"{self.image_id}_{class_name}.png" if self.mask_dir else None


@dataclass(frozen=True)
class Layers:
    """The reviewer's layer settings. cam_class / mask_class: a class name or None (off)."""

    show_image: bool = True
    cam_class: str | None = None
    mask_class: str | None = None
    opacity: float = 0.45
    threshold: float = 0.5
    mask_colour: tuple[int, int, int] = CLASS_COLOURS[0]


@dataclass(frozen=True)
class DrawBox:
    """A box to draw: (x1, y1, x2, y2) in original-image pixels, its state and a short label."""

    x1: float
    y1: float
    x2: float
    y2: float
    state: str
    label: str = ""
    current: bool = False


def display_scale(width: int, height: int, max_side: int = DISPLAY_MAX_SIDE) -> float:
    """Displayed pixels per original pixel (small images are enlarged so boxes stay visible)."""
    return max_side / max(width, height)


def display_size(width: int, height: int, max_side: int = DISPLAY_MAX_SIDE) -> tuple[int, int]:
    """(width, height) of the displayed frame."""
    scale = display_scale(width, height, max_side)
    return max(int(round(width * scale)), 1), max(int(round(height * scale)), 1)


def load_map(path: Path | None) -> np.ndarray | None:
    """A CAM or mask PNG as (h, w) uint8, or None when there is none."""
    if path is None or not path.exists():
        return None
    plane = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if plane is None:
        log.warning("unreadable map %s; shown without it", path)
    return plane


def _placeholder(size: tuple[int, int], text: str) -> np.ndarray:
    width, height = size
    canvas = np.full((height, width, 3), 40, np.uint8)
    cv2.putText(canvas, text, (10, height // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (230, 230, 230), 1)
    return canvas


def compose_base(source: ImageSource, layers: Layers, size: tuple[int, int]) -> np.ndarray:
    """(h, w, 3) uint8 RGB of `size` = (w, h): the image with CAM heat and mask blended in.

    CAM heat is blended per pixel (alpha = opacity * heat), so cold regions show the photo
    untouched; the mask region `fg >= threshold` is tinted and outlined.
    """
    width, height = size
    if layers.show_image:
        try:
            rgb = read_rgb(source.path)
            canvas = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        except (ImageError, OSError) as err:
            log.warning("image %s cannot be shown: %s", source.path, err)
            canvas = _placeholder(size, "image missing or unreadable")
    else:
        canvas = np.full((height, width, 3), 24, np.uint8)
    canvas = canvas.astype(np.float32)

    if layers.cam_class:
        heat = load_map(source.cam_path(layers.cam_class))
        if heat is not None:
            heat = cv2.resize(heat, size, interpolation=cv2.INTER_LINEAR)
            colour = cv2.cvtColor(cv2.applyColorMap(heat, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
            alpha = (layers.opacity * heat.astype(np.float32) / 255.0)[..., None]
            canvas = canvas * (1 - alpha) + colour.astype(np.float32) * alpha

    if layers.mask_class:
        fg = load_map(source.mask_path(layers.mask_class))
        if fg is not None:
            fg = cv2.resize(fg, size, interpolation=cv2.INTER_LINEAR)
            region = fg >= layers.threshold * 255.0
            tint = np.array(layers.mask_colour, np.float32)
            canvas[region] = canvas[region] * (1 - layers.opacity) + tint * layers.opacity
            contours, _ = cv2.findContours(
                region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
            )
            out = np.ascontiguousarray(canvas.clip(0, 255).astype(np.uint8))
            cv2.drawContours(out, contours, -1, layers.mask_colour, 1)
            return out
    return canvas.clip(0, 255).astype(np.uint8)


def derive_boxes(
    fg_u8: np.ndarray,
    *,
    threshold: float,
    image_size: tuple[int, int],
    class_score: float = 1.0,
    min_area_frac: float = 0.001,
) -> list[PseudoBox]:
    """Boxes of this mask at `threshold`, in pixels of the original image (w, h = image_size).

    The same rule propose uses (core.boxes.mask_to_boxes), so moving the threshold slider shows
    why a proposed box exists and what another threshold would have given.
    """
    fg_prob = fg_u8.astype(np.float32) / 255.0
    found = mask_to_boxes(
        fg_prob, threshold=threshold, class_score=class_score, min_area_frac=min_area_frac
    )
    return scale_boxes(found, (fg_u8.shape[1], fg_u8.shape[0]), image_size)


def draw_boxes(base: np.ndarray, boxes: Sequence[DrawBox], scale: float) -> np.ndarray:
    """A copy of `base` (h, w, 3) RGB with the boxes drawn; `scale` = displayed / original px."""
    out = base.copy()
    height, width = out.shape[:2]
    # Current box last, so its frame is on top.
    for box in sorted(boxes, key=lambda b: b.current):
        colour = STATE_COLOURS.get(box.state, (255, 255, 255))
        p1 = (int(round(box.x1 * scale)), int(round(box.y1 * scale)))
        p2 = (
            min(int(round(box.x2 * scale)) - 1, width - 1),
            min(int(round(box.y2 * scale)) - 1, height - 1),
        )
        if box.current:
            cv2.rectangle(out, (p1[0] - 2, p1[1] - 2), (p2[0] + 2, p2[1] + 2), (255, 255, 255), 2)
        thickness = 1 if box.state in ("derived", "reference", "edited", "deleted") else 2
        cv2.rectangle(out, p1, p2, colour, thickness)
        if box.label:
            (tw, th), _ = cv2.getTextSize(box.label, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
            ty = p1[1] - 4 if p1[1] - th - 6 >= 0 else p2[1] + th + 4
            cv2.rectangle(out, (p1[0], ty - th - 3), (p1[0] + tw + 4, ty + 3), colour, -1)
            cv2.putText(
                out, box.label, (p1[0] + 2, ty), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1
            )
    return out


def encode_jpeg(rgb: np.ndarray, quality: int = 88) -> bytes:
    ok, data = cv2.imencode(
        ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return data.tobytes()


class OverlayCache:
    """Base layers by (image, layers, size), computed at most once, also ahead of time.

    One instance serves every browser session of the server (it lives in st.cache_resource);
    a lock guards the LRU, and a small thread pool renders prefetched items while the reviewer
    looks at the current one. Entries are futures, so asking for an item being prefetched
    waits for that work instead of repeating it.
    """

    def __init__(self, max_items: int = 64, workers: int = 1):
        self.max_items = max_items
        self._items: OrderedDict[tuple, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="overlay")

    def _future(self, key: tuple, compute: Callable[[], object], background: bool) -> Future:
        with self._lock:
            future = self._items.get(key)
            if future is not None:
                self._items.move_to_end(key)
                return future
            if background:
                future = self._pool.submit(compute)
            else:
                future = Future()
            self._items[key] = future
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        if not background:
            try:
                future.set_result(compute())
            except Exception as err:  # noqa: BLE001 - handed to every waiter of this future
                future.set_exception(err)
                with self._lock:
                    self._items.pop(key, None)
        return future

    def base(self, source: ImageSource, layers: Layers, size: tuple[int, int]) -> np.ndarray:
        key = ("base", source, layers, size)
        return self._future(key, lambda: compose_base(source, layers, size), False).result()

    def prefetch(self, source: ImageSource, layers: Layers, size: tuple[int, int]) -> None:
        """Start rendering an item's base layer (and reading its masks) in the background."""
        key = ("base", source, layers, size)
        self._future(key, lambda: compose_base(source, layers, size), True)

    def map(self, path: Path | None) -> np.ndarray | None:
        """A CAM or mask PNG, cached like base layers (the threshold slider re-reads it)."""
        key = ("map", str(path))
        return self._future(key, lambda: load_map(path), False).result()

    def prefetch_map(self, path: Path | None) -> None:
        self._future(("map", str(path)), lambda: load_map(path), True)

    def derived(
        self,
        path: Path | None,
        *,
        threshold: float,
        image_size: tuple[int, int],
        class_score: float,
    ) -> list[PseudoBox]:
        """derive_boxes of a mask PNG, cached: a connected-component pass costs ~5 ms a rerun."""
        key = ("derived", str(path), threshold, image_size, class_score)
        return self._future(
            key, lambda: self._derive(path, threshold, image_size, class_score), False
        ).result()

    def prefetch_derived(
        self,
        path: Path | None,
        *,
        threshold: float,
        image_size: tuple[int, int],
        class_score: float,
    ) -> None:
        """Read a mask and derive its boxes in the background."""
        # The map is queued first, so the derivation never waits on work queued behind it.
        self.prefetch_map(path)
        key = ("derived", str(path), threshold, image_size, class_score)
        self._future(key, lambda: self._derive(path, threshold, image_size, class_score), True)

    def _derive(
        self, path: Path | None, threshold: float, image_size: tuple[int, int], class_score: float
    ) -> list[PseudoBox]:
        fg = self.map(path)
        if fg is None:
            return []
        return derive_boxes(fg, threshold=threshold, image_size=image_size, class_score=class_score)
