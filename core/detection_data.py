"""Detection samples: reading YOLO-labelled folders, holding out whole clips, and the dataset
that resizes, caches and augments images for the detectors.

A sample is a tuple (image path, boxes, labels): boxes (N, 4) float (x1, y1, x2, y2) in pixels
of the original image (EXIF orientation applied), labels (N,) int class indices. A hard
negative (a reviewer's "nothing here", a false-positive image) has N = 0.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from core.images import is_image_file, read_header, read_rgb

log = logging.getLogger(__name__)

DetectionSample = tuple[str, np.ndarray, np.ndarray]


def make_sample(path: str | Path, boxes: Sequence, labels: Sequence) -> DetectionSample:
    """Normalise one sample: boxes to a (N, 4) float32 array, labels to (N,) int64."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(boxes) != len(labels):
        raise ValueError(f"{path}: {len(boxes)} boxes but {len(labels)} labels")
    return str(path), boxes, labels


def load_yolo_samples(root: str | Path) -> tuple[list[DetectionSample], list[str]]:
    """Read a folder with images/, labels/ (YOLO `class cx cy w h`, normalised) and classes.txt.

    Returns:
        (samples sorted by file name, class names). An empty or missing label file makes the
        image a negative. Boxes are converted to pixels using the image header's size.
    """
    root = Path(root)
    class_names = [line.strip() for line in (root / "classes.txt").read_text().splitlines()]
    class_names = [name for name in class_names if name]
    samples = []
    for image_path in sorted((root / "images").iterdir()):
        if not is_image_file(image_path):
            continue
        header = read_header(image_path)
        label_path = root / "labels" / f"{image_path.stem}.txt"
        boxes, labels = [], []
        if label_path.is_file():
            for line_number, line in enumerate(label_path.read_text().splitlines(), 1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) != 5:
                    raise ValueError(f"{label_path}:{line_number}: expected 5 fields, got {line}")
                cls, cx, cy, w, h = int(fields[0]), *map(float, fields[1:])
                x1 = max(0.0, (cx - w / 2) * header.width)
                y1 = max(0.0, (cy - h / 2) * header.height)
                x2 = min(float(header.width), (cx + w / 2) * header.width)
                y2 = min(float(header.height), (cy + h / 2) * header.height)
                if x2 - x1 < 1 or y2 - y1 < 1:
                    log.warning("%s:%d: degenerate box skipped", label_path, line_number)
                    continue
                boxes.append((x1, y1, x2, y2))
                labels.append(cls)
        samples.append(make_sample(image_path, boxes, labels))
    return samples, class_names


def clip_name(path: str | Path, block: int = 100) -> str:
    """The clip an image comes from, for splits that never put one clip on both sides.

    Roboflow exports name video frames `<clip>_mp4-<frame>_jpg_<hash>`; other frames are
    `img_<number>_jpg_<hash>`, where neighbouring numbers are neighbouring frames, so numbers are
    grouped in blocks of `block`.
    """
    stem = Path(path).stem
    if "_mp4-" in stem:
        return stem.split("_mp4-")[0]
    match = re.match(r"img_(\d+)", stem)
    if match:
        return f"img_block{int(match.group(1)) // block}"
    return stem.split("_jpg")[0]


def split_by_clip(
    samples: Sequence[DetectionSample], holdout: float = 0.2, seed: int = 0
) -> tuple[list[DetectionSample], list[DetectionSample]]:
    """(train, held out): whole clips go to one side, about `holdout` of the images held out."""
    clips: dict[str, list[DetectionSample]] = {}
    for sample in samples:
        clips.setdefault(clip_name(sample[0]), []).append(sample)
    names = sorted(clips)
    random.Random(seed).shuffle(names)
    target = holdout * len(samples)
    held: list[DetectionSample] = []
    train: list[DetectionSample] = []
    for name in names:
        (held if len(held) < target else train).extend(clips[name])
    return train, held


class DetectionDataset(Dataset):
    """Images resized so the longer side is `image_size`, with their boxes in that frame.

    Item i is (image (3, h, w) float in [0, 1], target {"boxes": (N, 4) float32 x1y1x2y2 in
    the resized frame, "labels": (N,) int64}, index i). `scale(i)` maps resized pixels back to
    the original ones (original = resized / scale).

    Augmentation (when `augment`): horizontal flip with probability `hflip`, and a random zoom
    by a factor in `scale_range` that crops (zoom in) or pads with grey (zoom out) back to the
    same size, so the detector sees objects at more sizes. The random draw depends only on
    (seed, epoch, index), so a resumed or distributed run sees the same augmentations.
    Resized images are cached in memory as uint8 (h * w * 3 bytes each).
    """

    def __init__(
        self,
        samples: Sequence[DetectionSample],
        image_size: int,
        *,
        augment: bool = False,
        hflip: float = 0.5,
        scale_range: tuple[float, float] = (0.75, 1.25),
        seed: int = 0,
        cache: bool = True,
    ) -> None:
        self.samples = [make_sample(*sample) for sample in samples]
        self.image_size = image_size
        self.augment = augment
        self.hflip = hflip
        self.scale_range = scale_range
        self.seed = seed
        self.epoch = 0
        self.cache = cache
        self._images: dict[int, Tensor] = {}
        self._scales: dict[int, float] = {}
        self._sizes: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def original_size(self, index: int) -> tuple[int, int]:
        """(width, height) of the original image."""
        if index not in self._sizes:
            header = read_header(self.samples[index][0])
            self._sizes[index] = (header.width, header.height)
        return self._sizes[index]

    def scale(self, index: int) -> float:
        width, height = self.original_size(index)
        return self.image_size / max(width, height)

    def _resized(self, index: int) -> Tensor:
        """(3, h, w) uint8, longer side image_size."""
        if index in self._images:
            return self._images[index]
        rgb = read_rgb(self.samples[index][0])
        height, width = rgb.shape[:2]
        self._sizes[index] = (width, height)
        scale = self.image_size / max(width, height)
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        image = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).float()
        image = F.interpolate(image, size=size, mode="bilinear", antialias=True)
        image = image.round().clamp(0, 255).to(torch.uint8)[0]
        if self.cache:
            self._images[index] = image
        return image

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor], int]:
        image = self._resized(index).float() / 255
        _, boxes, labels = self.samples[index]
        boxes = torch.from_numpy(boxes) * self.scale(index)
        labels = torch.from_numpy(labels)
        if self.augment:
            generator = torch.Generator().manual_seed(
                hash((self.seed, self.epoch, index)) % (2**63)
            )
            image, boxes, labels = _augment(
                image, boxes, labels, self.hflip, self.scale_range, generator
            )
        return image, {"boxes": boxes.float(), "labels": labels.long()}, index


def _augment(
    image: Tensor,
    boxes: Tensor,
    labels: Tensor,
    hflip: float,
    scale_range: tuple[float, float],
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor]:
    """Flip and zoom one image (3, h, w) with its boxes (N, 4) x1y1x2y2; output keeps (h, w)."""
    _, height, width = image.shape
    if torch.rand((), generator=generator) < hflip:
        image = image.flip(-1)
        boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)

    low, high = scale_range
    factor = float(low + (high - low) * torch.rand((), generator=generator))
    if abs(factor - 1) < 1e-3:
        return image, boxes, labels
    new_h, new_w = max(1, round(height * factor)), max(1, round(width * factor))
    zoomed = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False)
    zoomed = zoomed[0].clamp(0, 1)
    boxes = boxes * torch.tensor([new_w / width, new_h / height] * 2)
    # Offset of the output window inside the zoomed image (negative: the image is padded).
    dx = int(
        torch.randint(min(0, new_w - width), max(0, new_w - width) + 1, (), generator=generator)
    )
    dy = int(
        torch.randint(min(0, new_h - height), max(0, new_h - height) + 1, (), generator=generator)
    )
    canvas = torch.full((3, height, width), 0.5)
    src_x1, src_y1 = max(0, dx), max(0, dy)
    dst_x1, dst_y1 = max(0, -dx), max(0, -dy)
    copy_w = min(new_w - src_x1, width - dst_x1)
    copy_h = min(new_h - src_y1, height - dst_y1)
    canvas[:, dst_y1 : dst_y1 + copy_h, dst_x1 : dst_x1 + copy_w] = zoomed[
        :, src_y1 : src_y1 + copy_h, src_x1 : src_x1 + copy_w
    ]

    # Move boxes into the window and keep those with at least a third of their area inside.
    shifted = boxes - torch.tensor([dx, dy, dx, dy], dtype=boxes.dtype)
    clipped = shifted.clone()
    clipped[:, 0::2] = clipped[:, 0::2].clamp(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clamp(0, height)
    area = (shifted[:, 2] - shifted[:, 0]) * (shifted[:, 3] - shifted[:, 1])
    kept_area = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = (kept_area >= area / 3) & (clipped[:, 2] - clipped[:, 0] >= 2)
    keep &= clipped[:, 3] - clipped[:, 1] >= 2
    return canvas, clipped[keep], labels[keep]


def collate(batch: list) -> tuple[list[Tensor], list[dict[str, Tensor]], list[int]]:
    """Keep images as a list: the detector pads them itself."""
    images, targets, indices = zip(*batch, strict=True)
    return list(images), list(targets), list(indices)


__all__ = [
    "DetectionDataset",
    "DetectionSample",
    "clip_name",
    "collate",
    "load_yolo_samples",
    "make_sample",
    "split_by_clip",
]
