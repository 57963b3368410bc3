"""Streaming proposals over many images: class probabilities, CAMs, masks, pseudo boxes.

`iter_proposals` is a generator: images are read and resized by a DataLoader (workers
optional), run in batches, and each image's result is yielded and forgotten, so memory stays
flat on 100 000 images. Maps are computed at a square working resolution; `save_proposal_pngs`
and `proposal_boxes` bring them back to the original image's pixels.

Under torchrun each rank takes images[rank::world_size] (RANK and WORLD_SIZE from the
environment), so several GPUs share one run without talking to each other.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from core.boxes import PseudoBox, mask_to_boxes, scale_boxes
from core.cam import InferenceConfig, infer_masks
from core.classifier_data import normalize_image
from core.images import ImageError, read_rgb
from core.rsepm import RSEPMNet

log = logging.getLogger(__name__)


@dataclass
class Proposal:
    """What the network says about one image.

    index: position of the image in the list given to iter_proposals.
    path: the image file.
    width, height: the original image's size (EXIF-transposed), the frame of its boxes.
    probs: (C,) float32 class probabilities.
    cams: (C, S, S) float16 in [0, 1], gated CAMs at the working size S.
    fg_probs: (C, S, S) float16 in [0, 1], per-class RS+EPM foreground probability.
    labels: (S, S) uint8, 0 background, 1..C the argmax class.
    error: why the image could not be read (then every array is empty), else None.
    """

    index: int
    path: str
    width: int
    height: int
    probs: np.ndarray
    cams: np.ndarray
    fg_probs: np.ndarray
    labels: np.ndarray
    error: str | None = None


class _ImageFiles(Dataset):
    """(image (3, S, S) normalised, index, width, height, error) per path; a bad file gives a
    zero image and its error, so one corrupt JPEG does not stop the batch."""

    def __init__(self, paths: Sequence[str | Path], indices: Sequence[int], image_size: int):
        self.paths, self.indices, self.image_size = list(paths), list(indices), image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        size = self.image_size
        try:
            rgb = read_rgb(self.paths[i])
        except ImageError as err:
            return torch.zeros(3, size, size), self.indices[i], 0, 0, str(err)
        height, width = rgb.shape[:2]
        rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_LINEAR)
        return normalize_image(rgb), self.indices[i], width, height, ""


def rank_slice(count: int, rank: int | None = None, world_size: int | None = None) -> range:
    """Indices of the images this process handles: range(rank, count, world_size)."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    return range(rank, count, world_size)


@torch.no_grad()
def iter_proposals(
    model: RSEPMNet,
    image_paths: Sequence[str | Path],
    *,
    image_size: int = 224,
    batch_size: int = 8,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    inference: InferenceConfig = InferenceConfig(),
    rank: int | None = None,
    world_size: int | None = None,
) -> Iterator[Proposal]:
    """Run the RS+EPM network over images, one Proposal per image, in input order.

    Args:
        model: a trained network (core.rsepm.load_rsepm); it is put in eval mode.
        image_paths: the images; under torchrun only this rank's slice is processed.
        image_size: square working resolution S (a multiple of 16; the training size is best).
        batch_size, num_workers: of the DataLoader that reads and resizes images.
        device: None keeps the model's device.
        inference: scales, flip, class threshold, EPM and PAMR settings.
        rank, world_size: override RANK / WORLD_SIZE from the environment.

    Yields:
        Proposal, with `index` the image's position in `image_paths`.
    """
    if image_size % 16:
        raise ValueError(f"image_size must be a multiple of 16, got {image_size}")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    model.to(device).eval()
    indices = list(rank_slice(len(image_paths), rank, world_size))
    files = _ImageFiles([image_paths[i] for i in indices], indices, image_size)
    loader = DataLoader(
        files,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    empty = np.zeros((0,), dtype=np.float32)
    for images, batch_indices, widths, heights, errors in loader:
        result = infer_masks(model, images.to(device, non_blocking=True), inference)
        probs = result.probs.float().cpu().numpy()
        cams = result.cams.half().cpu().numpy()
        fg_probs = result.fg_probs.half().cpu().numpy()
        labels = result.labels.to(torch.uint8).cpu().numpy()
        for k in range(images.shape[0]):
            index = int(batch_indices[k])
            path = str(image_paths[index])
            if errors[k]:
                log.warning("skipping %s", errors[k])
                yield Proposal(index, path, 0, 0, empty, empty, empty, empty, error=errors[k])
                continue
            yield Proposal(
                index=index,
                path=path,
                width=int(widths[k]),
                height=int(heights[k]),
                probs=probs[k],
                cams=cams[k],
                fg_probs=fg_probs[k],
                labels=labels[k],
            )


def _to_original(maps: np.ndarray, proposal: Proposal) -> np.ndarray:
    """(C, S, S) float in [0, 1] -> (C, H, W) uint8 0-255 at the original size."""
    out = np.empty((maps.shape[0], proposal.height, proposal.width), dtype=np.uint8)
    for c in range(maps.shape[0]):
        resized = cv2.resize(
            maps[c].astype(np.float32),
            (proposal.width, proposal.height),
            interpolation=cv2.INTER_LINEAR,
        )
        out[c] = np.clip(resized * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out


def save_proposal_pngs(
    proposal: Proposal,
    class_names: Sequence[str],
    *,
    image_id: str | int,
    cams_dir: str | Path | None,
    masks_dir: str | Path | None,
) -> list[Path]:
    """Write `<cams_dir>/<image_id>_<class>.png` (gated CAM heat) and
    `<masks_dir>/<image_id>_<class>.png` (foreground probability * 255; the binary mask is
    pixel >= threshold * 255) at the original image size. A None directory is skipped.

    Returns:
        The written paths.
    """
    if proposal.error:
        return []
    written = []
    for folder, maps in ((cams_dir, proposal.cams), (masks_dir, proposal.fg_probs)):
        if folder is None:
            continue
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for c, plane in enumerate(_to_original(maps, proposal)):
            path = folder / f"{image_id}_{class_names[c]}.png"
            if not cv2.imwrite(str(path), plane):
                raise OSError(f"could not write {path}")
            written.append(path)
    return written


def proposal_boxes(
    proposal: Proposal,
    *,
    threshold: float = 0.5,
    min_area_frac: float = 0.001,
) -> dict[int, list[PseudoBox]]:
    """Pseudo boxes per class index, (x1, y1, x2, y2) in pixels of the original image.

    Connected components of fg_probs >= threshold at the working size (core.boxes.mask_to_boxes,
    scored with the class probability), then scaled to the original frame. Classes below the
    inference class threshold have all-zero maps and so no boxes.
    """
    if proposal.error:
        return {}
    size = proposal.fg_probs.shape[1:]
    boxes = {}
    for c in range(proposal.fg_probs.shape[0]):
        found = mask_to_boxes(
            proposal.fg_probs[c].astype(np.float32),
            threshold=threshold,
            class_score=float(proposal.probs[c]),
            min_area_frac=min_area_frac,
        )
        if found:
            boxes[c] = scale_boxes(found, (size[1], size[0]), (proposal.width, proposal.height))
    return boxes


def proposal_uncertainty(
    proposal: Proposal,
    boxes: dict[int, list[PseudoBox]],
    *,
    tag_threshold: float = 0.5,
    box_threshold: float = 0.5,
) -> float:
    """How close the image's class probabilities and box scores are to their thresholds: 1 when
    one sits on its threshold, 0 when all are at 0 or 1. The review queue shows these first."""
    values = [(float(p), tag_threshold) for p in proposal.probs]
    values += [(box.score, box_threshold) for found in boxes.values() for box in found]
    if not values:
        return 0.0
    return max(1.0 - abs(v - t) / max(t, 1.0 - t) for v, t in values)


def cam_outside_boxes(proposal: Proposal, boxes: dict[int, list[PseudoBox]]) -> float:
    """Share of the gated CAM mass that no box of its class covers, in [0, 1].

    High when the classifier looks at something the masks did not turn into a box (a missed
    object, or heat the masks rightly dropped); the review queue can sort by it.
    boxes: per class index, in pixels of the original image.
    """
    if proposal.error or proposal.cams.size == 0:
        return 0.0
    cams = proposal.cams.astype(np.float32)
    total = float(cams.sum())
    if total <= 0:
        return 0.0
    map_height, map_width = cams.shape[1:]
    sx, sy = map_width / proposal.width, map_height / proposal.height
    inside = 0.0
    for c, found in boxes.items():
        covered = np.zeros((map_height, map_width), dtype=bool)
        for box in found:
            x1, x2 = int(np.floor(box.x1 * sx)), int(np.ceil(box.x2 * sx))
            y1, y2 = int(np.floor(box.y1 * sy)), int(np.ceil(box.y2 * sy))
            covered[y1:y2, x1:x2] = True
        inside += float(cams[c][covered].sum())
    return float(min(1.0, max(0.0, 1.0 - inside / total)))
