"""CAM and mask inference with the RS+EPM network: multi-scale, flip, gating, final masks.

Everything here runs forward passes only (no gradients), so it is as fast as the classifier.

Shapes: images (N, 3, H, W) normalised with IMAGENET_MEAN/STD; every output map is at the
input resolution (H, W); C is the number of foreground classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from core.rsepm import RSEPMNet
from core.seeds import CLASS_THRESHOLD, edge_predict_mix, normalize_max, pamr


@dataclass(frozen=True)
class InferenceConfig:
    """How CAMs and masks are computed.

    scales: input rescalings; each view is resized to a multiple of 16 pixels.
    flip: add the horizontally flipped view of every scale.
    class_threshold: a class keeps its mask when its probability (mean over views) reaches this
        (0.34 in the released RS+EPM code).
    epm: combine the views' segmentation with EdgePredictMix (core.seeds.edge_predict_mix);
        False gives the plain mean.
    epm_sharpness: see edge_predict_mix.
    pamr_iterations: 0 to skip PAMR refinement of the masks.
    """

    scales: tuple[float, ...] = (0.5, 1.0, 1.5)
    flip: bool = True
    class_threshold: float = CLASS_THRESHOLD
    epm: bool = True
    epm_sharpness: float = 10.0
    pamr_iterations: int = 0


class CamResult(NamedTuple):
    """probs: (N, C) class probabilities, mean of the views' sigmoids.
    cams: (N, C, H, W) float in [0, 1]: ReLU'd CAM, mean over views, divided by its maximum per
        class, then multiplied by the class probability, so an absent class stays near zero
        instead of being stretched into false heat."""

    probs: torch.Tensor
    cams: torch.Tensor


class MaskResult(NamedTuple):
    """probs, cams: as in CamResult.
    fg_probs: (N, C, H, W) float in [0, 1], per-class foreground probability: s / (s + (1 - s)^2)
        with s the segmentation score of the class divided by its maximum; 0 for classes whose
        probability is below the class threshold. fg_probs >= 0.5 is exactly where the class
        beats the released code's background score (1 - s)^2, and any other threshold gives a
        tighter or looser mask from the same map.
    labels: (N, H, W) long, 0 background, 1..C the argmax class, with background scored
        (1 - max_c s_c)^2 as in the released code."""

    probs: torch.Tensor
    cams: torch.Tensor
    fg_probs: torch.Tensor
    labels: torch.Tensor


def _scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    return max(16, round(height * scale / 16) * 16), max(16, round(width * scale / 16) * 16)


def _map_grid(height: int, width: int) -> tuple[int, int]:
    """Where views are combined: stride 4 of the input, the segmentation head's own resolution.
    Mixing there and upsampling the result once costs 16 times less than mixing every view at
    full resolution, and bilinear upsampling adds no detail the maps had not."""
    return max(1, round(height / 4)), max(1, round(width / 4))


def _upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if maps.shape[-2:] == size:
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def _forward_views(
    model: RSEPMNet, images: torch.Tensor, scales: Sequence[float], flip: bool, with_seg: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run every view; return (probs (V, N, C), cams (V, N, C, h, w) ReLU'd, seg probs
    (V, N, C+1, h, w) or None), all views resized to the map grid (h, w) = (H/4, W/4) and
    un-flipped."""
    n, _, height, width = images.shape
    grid = _map_grid(height, width)
    all_probs, all_cams, all_segs = [], [], []
    for scale in scales:
        size = _scaled_size(height, width, scale)
        batch = images
        if size != (height, width):
            batch = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        if flip:
            batch = torch.cat([batch, batch.flip(-1)], dim=0)
        out = model(batch, with_seg=with_seg)
        cams = _upsample(out.cams.clamp(min=0), grid)
        probs = torch.sigmoid(out.logits)
        segs = _upsample(torch.softmax(out.seg_logits, dim=1), grid) if with_seg else None
        parts = [slice(0, n), slice(n, 2 * n)] if flip else [slice(0, n)]
        for index, part in enumerate(parts):
            unflip = (lambda t: t.flip(-1)) if index == 1 else (lambda t: t)
            all_probs.append(probs[part])
            all_cams.append(unflip(cams[part]))
            if segs is not None:
                all_segs.append(unflip(segs[part]))
    seg_stack = torch.stack(all_segs) if with_seg else None
    return torch.stack(all_probs), torch.stack(all_cams), seg_stack


def gate_cams(cams: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Normalise ReLU'd CAMs per class by their maximum and gate them by the class probability.

    cams: (N, C, H, W) >= 0; probs: (N, C) in [0, 1]. Returns (N, C, H, W) in [0, 1].
    """
    return normalize_max(cams) * probs[:, :, None, None]


@torch.no_grad()
def compute_cams(
    model: RSEPMNet, images: torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = False
) -> CamResult:
    """Gated CAMs of a batch (the "plain CAM" method), without running the segmentation head.

    images: (N, 3, H, W) normalised. See CamResult for the outputs.
    """
    was_training = model.training
    model.eval()
    try:
        probs, cams, _ = _forward_views(model, images, scales, flip, with_seg=False)
    finally:
        model.train(was_training)
    mean_probs = probs.mean(dim=0)
    gated = gate_cams(cams.mean(dim=0), mean_probs)
    return CamResult(probs=mean_probs, cams=_upsample(gated, tuple(images.shape[2:])))


@torch.no_grad()
def infer_masks(
    model: RSEPMNet,
    images: torch.Tensor,
    config: InferenceConfig = InferenceConfig(),
) -> MaskResult:
    """Class probabilities, gated CAMs and RS+EPM masks of a batch, from one set of forwards.

    images: (N, 3, H, W) normalised. See MaskResult for the outputs.
    """
    was_training = model.training
    model.eval()
    try:
        probs, cams, segs = _forward_views(model, images, config.scales, config.flip, True)
    finally:
        model.train(was_training)

    # Class probabilities and CAMs: plain means over views.
    size = tuple(images.shape[2:])
    mean_probs = probs.mean(dim=0)  # (N, C)
    gated = _upsample(gate_cams(cams.mean(dim=0), mean_probs), size)

    # Segmentation: views combined edge-aware (EPM) or averaged.
    if config.epm and segs.shape[0] > 1:
        seg = edge_predict_mix(segs, sharpness=config.epm_sharpness)
    else:
        seg = segs.mean(dim=0)  # (N, C+1, H, W)

    # Released-code rule: foreground scores normalised by their maximum, classes below the
    # threshold dropped, background (1 - max foreground)^2.
    kept = (mean_probs >= config.class_threshold).float()[:, :, None, None]
    scores = _upsample(normalize_max(seg[:, 1:]) * kept, size)
    if config.pamr_iterations > 0:
        scores = pamr(images, scores, iterations=config.pamr_iterations).clamp(0, 1)
    background = (1 - scores.max(dim=1, keepdim=True).values) ** 2
    labels = torch.cat([background, scores], dim=1).argmax(dim=1)
    fg_probs = scores / (scores + (1 - scores) ** 2 + 1e-6)
    return MaskResult(probs=mean_probs, cams=gated, fg_probs=fg_probs, labels=labels)
