"""Training samples for the RS+EPM network: image path, tag vector, reviewer points.

The dataset reads images with core.images.read_rgb (EXIF-aware), resizes them to a square
working size and augments them (random scale and crop, horizontal flip, light colour jitter).
Reviewer points follow every geometric step and come out as disks on the augmented frame.
Augmentation draws from a generator seeded by (seed, epoch, index), so a run repeats exactly
and a resumed run sees the same images as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from core.images import ImageError, read_rgb
from core.rsepm import IMAGENET_MEAN, IMAGENET_STD
from core.seeds import rasterize_points

log = logging.getLogger(__name__)

BINARY_CLASS = "fire-like event"


@dataclass(frozen=True)
class ClassifierSample:
    """One training image.

    path: image file.
    tags: one value per class, 1.0 present, 0.0 absent, -1.0 unknown (no tag of that class).
    points: reviewer points (class index, x, y) in pixels of the original image (EXIF-transposed,
        as core.images.read_rgb returns it). A point of a class the tags call absent is dropped:
        points never override a tag.
    """

    path: str
    tags: tuple[float, ...]
    points: tuple[tuple[int, float, float], ...] = field(default_factory=tuple)


def to_binary(samples: Sequence[ClassifierSample]) -> list[ClassifierSample]:
    """Collapse every class into one, BINARY_CLASS: present when any class is present, absent
    when every class is absent, unknown otherwise."""
    out = []
    for sample in samples:
        if any(t > 0.5 for t in sample.tags):
            present = 1.0
        elif all(t == 0.0 for t in sample.tags):
            present = 0.0
        else:
            present = -1.0
        points = tuple((0, x, y) for _, x, y in sample.points)
        out.append(ClassifierSample(sample.path, (present,), points))
    return out


def normalize_image(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float normalised with ImageNet statistics."""
    tensor = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (tensor - mean) / std


class ClassifierDataset(Dataset):
    """Augmented training images.

    Each item is a dict:
        image: (3, S, S) float, normalised; S = image_size.
        tags: (C,) float.
        point_seeds: (C, S, S) uint8, 1 inside the disks around the image's reviewer points.
        index: int, position in `samples`.

    Args:
        samples: the training set.
        num_classes: C.
        image_size: S, the square training size.
        augment: False for evaluation (plain resize).
        scale_range: random upscale before the S x S crop; (1, 1) for none.
        point_radius_frac: disk radius as a fraction of S.
        seed: base seed of the augmentation.
    """

    def __init__(
        self,
        samples: Sequence[ClassifierSample],
        num_classes: int,
        image_size: int = 224,
        augment: bool = True,
        scale_range: tuple[float, float] = (1.0, 1.4),
        point_radius_frac: float = 0.04,
        seed: int = 0,
    ):
        self.samples = list(samples)
        self.num_classes = num_classes
        self.image_size = image_size
        self.augment = augment
        self.scale_range = scale_range
        self.point_radius = max(1.0, point_radius_frac * image_size)
        self.seed = seed
        self.epoch = 0
        for sample in self.samples:
            if len(sample.tags) != num_classes:
                raise ValueError(
                    f"{sample.path}: {len(sample.tags)} tags for {num_classes} classes"
                )

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's augmentation (call before each epoch, in every worker's parent)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        tags = sample.tags
        points = [p for p in sample.points if tags[p[0]] > 0.5]
        try:
            rgb = read_rgb(sample.path)
        except ImageError as err:
            # One unreadable file must not stop a long run: it becomes a grey image whose tags
            # are all unknown, so no loss term learns from it.
            log.warning("training image skipped: %s", err)
            rgb = np.full((self.image_size, self.image_size, 3), 128, dtype=np.uint8)
            tags, points = (-1.0,) * self.num_classes, []
        height, width = rgb.shape[:2]

        # Geometry: resize to a square of side S * scale, crop S x S, maybe flip. Points follow.
        size = self.image_size
        scale = rng.uniform(*self.scale_range) if self.augment else 1.0
        side = max(size, int(math.ceil(size * scale)))
        rgb = cv2.resize(rgb, (side, side), interpolation=cv2.INTER_LINEAR)
        top = int(rng.integers(0, side - size + 1)) if self.augment else 0
        left = int(rng.integers(0, side - size + 1)) if self.augment else 0
        rgb = rgb[top : top + size, left : left + size]
        points = [(c, x * side / width - left, y * side / height - top) for c, x, y in points]
        if self.augment and rng.random() < 0.5:
            rgb = rgb[:, ::-1]
            points = [(c, size - x, y) for c, x, y in points]

        # Photometric: brightness and contrast jitter, mild so flame colour stays flame colour.
        image = normalize_image(rgb)
        if self.augment:
            contrast = rng.uniform(0.8, 1.2)
            brightness = rng.uniform(-0.2, 0.2)
            image = image * contrast + brightness

        point_seeds = rasterize_points(points, self.num_classes, size, size, self.point_radius)
        return {
            "image": image,
            "tags": torch.tensor(tags, dtype=torch.float32),
            "point_seeds": point_seeds,
            "index": index,
        }
