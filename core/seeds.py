"""RecurSeed and EdgePredictMix: seeds refined by self-correlation, pseudo masks, edge-aware mixing.

After Jo, Yu and Kim, "RecurSeed and EdgePredictMix" (arXiv:2204.06754, 2022). The thresholds
are those of the authors' released inference code; the training-time use of these functions is
ours (see core.train_classifier).

Shapes: seeds and CAMs are (N, C, h, w) float in [0, 1] on the feature grid (stride 16) unless
said otherwise; a self-correlation map is (N, h*w, h*w) with rows and columns in row-major
position order; pseudo masks are (N, H, W) long with 0 background, 1..C the classes and 255
(IGNORE_INDEX) for the uncertain band.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from core.rsepm import IGNORE_INDEX

# Released-code values (infer_rsepm.py, the tag of the official run).
FIRST_ORDER_THRESHOLD = 0.50  # keep first-order similarities at or above this
SECOND_ORDER_THRESHOLD = 0.10  # keep second-order similarities at or above this
SEED_FG_THRESHOLD = 0.30  # positions whose seed reaches this start the foreground propagation
SEED_BG_THRESHOLD = 0.05  # positions whose seed stays below this start the background propagation
CONFIDENT_FG = 0.55  # refined seed at or above: confident foreground in the pseudo mask
CONFIDENT_BG = 0.10  # refined seed of every class below: confident background
CLASS_THRESHOLD = 0.34  # final masks keep a class whose probability reaches this


def _cosine_rows(x: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between the rows of x: (N, P, D) -> (N, P, P)."""
    x = F.normalize(x, dim=2, eps=1e-6)
    return torch.bmm(x, x.transpose(1, 2))


def self_correlation(
    features: Sequence[torch.Tensor],
    first_threshold: float = FIRST_ORDER_THRESHOLD,
    second_threshold: float = SECOND_ORDER_THRESHOLD,
    center: bool = True,
) -> torch.Tensor:
    """Self-correlation map of feature maps: how alike two positions of one image are.

    First order: cosine similarity between the feature vectors of two positions, ReLU'd, kept
    where it reaches `first_threshold` (else 0). Second order: cosine similarity between two rows
    of the first-order map (two positions are alike when they are alike to the same positions),
    kept where it reaches `second_threshold`. The map of one feature level is the element-wise
    maximum of the two; with several levels (all resized to the first one's grid), the
    element-wise maximum over levels. Combining by maximum is our choice; the paper (following
    SCG, Pan et al. 2021) leaves the combination open.

    Centring (our choice, on by default): the image's mean feature vector is subtracted before
    the cosine. Backbone features come after a ReLU, so raw cosines between any two positions
    are mostly above 0.5: measured on fire frames with a from-scratch ResNet-10, 85% of all
    pairs passed the 0.5 threshold and the refined seeds covered 40% of frames whose fire covers
    1%. Centred, a position is compared by how it differs from the image's average (mostly
    background), and 39% of pairs pass.

    Args:
        features: one or more (N, D, h, w) maps; the first sets the grid.
        center: subtract each image's mean feature vector first.

    Returns:
        (N, h*w, h*w) float in [0, 1], symmetric, positions in row-major order.
    """
    size = features[0].shape[2:]
    combined = None
    for feature in features:
        if feature.shape[2:] != size:
            feature = F.interpolate(feature, size=size, mode="bilinear", align_corners=False)
        rows = feature.flatten(2).transpose(1, 2)  # (N, P, D)
        if center:
            rows = rows - rows.mean(dim=1, keepdim=True)
        first = _cosine_rows(rows).clamp(min=0)
        first = first * (first >= first_threshold)
        second = _cosine_rows(first).clamp(min=0)
        second = second * (second >= second_threshold)
        level = torch.maximum(first, second)
        combined = level if combined is None else torch.maximum(combined, level)
    return combined


def normalize_max(maps: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Divide each (n, c) map by its spatial maximum after ReLU: (N, C, H, W) -> [0, 1]."""
    maps = maps.clamp(min=0)
    peak = maps.flatten(2).max(dim=2).values[:, :, None, None]
    return maps / (peak + eps)


def refine_seeds(
    correlation: torch.Tensor,
    seeds: torch.Tensor,
    present: torch.Tensor,
    fg_threshold: float = SEED_FG_THRESHOLD,
    bg_threshold: float = SEED_BG_THRESHOLD,
) -> torch.Tensor:
    """Propagate seeds through the self-correlation map (the "seed" step of RecurSeed).

    For each present class: the mean correlation row over the positions whose seed reaches
    `fg_threshold` says how much each position looks like the class; the mean row over the
    positions whose seed stays below `bg_threshold` says how much it looks like the rest of the
    image. Each is normalised by its maximum, the second is subtracted from the first, and the
    result, ReLU'd, is normalised by its maximum again. In matrix form the foreground part is
    `correlation @ indicator / count`: the normalised SC applied to the seed.

    Args:
        correlation: (N, P, P) from self_correlation, P = h*w.
        seeds: (N, C, h, w) in [0, 1], e.g. normalize_max(cams).
        present: (N, C) 1 where the class is in the image (tags in training, kept classes in
            inference); absent classes give an all-zero map.

    Returns:
        (N, C, h, w) float in [0, 1].
    """
    n, c, h, w = seeds.shape
    flat = seeds.flatten(2)  # (N, C, P)
    fg = (flat >= fg_threshold).float()
    bg = (flat < bg_threshold).float()
    fg_affinity = torch.bmm(fg, correlation) / fg.sum(dim=2, keepdim=True).clamp(min=1)
    bg_affinity = torch.bmm(bg, correlation) / bg.sum(dim=2, keepdim=True).clamp(min=1)
    fg_affinity = fg_affinity / (fg_affinity.max(dim=2, keepdim=True).values + 1e-5)
    bg_affinity = bg_affinity / (bg_affinity.max(dim=2, keepdim=True).values + 1e-5)
    refined = (fg_affinity - bg_affinity).clamp(min=0)
    refined = refined / (refined.max(dim=2, keepdim=True).values + 1e-5)
    has_fg = (fg.sum(dim=2, keepdim=True) > 0).float()
    refined = refined * has_fg * present[:, :, None].float()
    return refined.view(n, c, h, w)


def pseudo_mask(
    refined: torch.Tensor,
    present: torch.Tensor,
    point_seeds: torch.Tensor | None = None,
    fg_threshold: float = CONFIDENT_FG,
    bg_threshold: float = CONFIDENT_BG,
) -> torch.Tensor:
    """Turn refined seeds into a pseudo mask with an ignored uncertain band.

    A pixel is class c (1-based) when c's refined seed is the largest and reaches
    `fg_threshold`; background when every present class stays below `bg_threshold`; ignored
    otherwise. An image with no present class is background everywhere: a tag saying "no fire"
    is as certain as a drawn mask. Reviewer points win over the seeds but only for classes the
    tags say are present, so a point never overrides a tag that says the class is absent.

    Args:
        refined: (N, C, H, W) in [0, 1].
        present: (N, C) 1 present, 0 absent.
        point_seeds: optional (N, C, H, W), nonzero inside the disks around reviewer points.

    Returns:
        (N, H, W) long: 0 background, 1..C classes, IGNORE_INDEX uncertain.
    """
    present = present.float()[:, :, None, None]
    scores = refined * present
    best, best_class = scores.max(dim=1)  # (N, H, W)
    mask = torch.full_like(best_class, IGNORE_INDEX)
    mask[best < bg_threshold] = 0
    mask[best >= fg_threshold] = best_class[best >= fg_threshold] + 1
    if point_seeds is not None:
        points = (point_seeds > 0).float() * present  # (N, C, H, W)
        has_point, point_class = points.max(dim=1)
        mask[has_point > 0] = point_class[has_point > 0] + 1
    return mask


def rasterize_points(
    points: Sequence[tuple[int, float, float]],
    num_classes: int,
    height: int,
    width: int,
    radius: float,
) -> torch.Tensor:
    """Disks around reviewer points, as foreground seeds.

    Args:
        points: (class index 0..C-1, x, y) in pixels of the (H, W) frame.
        radius: disk radius in pixels of that frame.

    Returns:
        (C, H, W) uint8, 1 inside a disk of the point's class.
    """
    seeds = torch.zeros(num_classes, height, width, dtype=torch.uint8)
    if not points:
        return seeds
    ys = torch.arange(height, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(width, dtype=torch.float32)[None, :] + 0.5
    for class_index, x, y in points:
        if not 0 <= class_index < num_classes:
            raise ValueError(f"point class {class_index} outside 0..{num_classes - 1}")
        disk = (xs - x) ** 2 + (ys - y) ** 2 <= radius**2
        seeds[class_index] |= disk.to(torch.uint8)
    return seeds


# ----------------------------------------------------------------------------------------------
# EdgePredictMix.


def edge_strength(probs: torch.Tensor) -> torch.Tensor:
    """Probability difference between adjacent pixels.

    For each pixel, the largest L1 distance between its class-probability vector and that of a
    4-neighbour (borders compare with themselves, i.e. 0). High on the predicted object edges,
    near zero inside regions.

    Args:
        probs: (N, K, H, W) class probabilities (softmax over K).

    Returns:
        (N, H, W) float in [0, 2].
    """
    padded = F.pad(probs, (1, 1, 1, 1), mode="replicate")
    center = padded[:, :, 1:-1, 1:-1]
    neighbours = (
        padded[:, :, :-2, 1:-1],
        padded[:, :, 2:, 1:-1],
        padded[:, :, 1:-1, :-2],
        padded[:, :, 1:-1, 2:],
    )
    diffs = torch.stack([(center - nb).abs().sum(dim=1) for nb in neighbours], dim=0)
    return diffs.max(dim=0).values


def edge_predict_mix(probs: torch.Tensor, sharpness: float = 10.0) -> torch.Tensor:
    """Combine segmentation predictions of several views (scales, flips) of one image.

    EdgePredictMix uses the probability difference between adjacent pixels to decide whose
    prediction expresses an object's edge. The paper applies this when mixing segmentation
    results; the authors released no training code. Our reading, used at inference over views:
    at each pixel every view gets weight softmax_v(sharpness * edge_v), where edge_v is the
    view's edge_strength there. Inside regions all views are flat, the weights are equal and
    the result is the plain mean (the usual multi-scale average); on an edge, the view that
    draws the edge sharply (a fine scale) dominates the views that blur it (coarse scales). The
    softmax weighting and `sharpness` are our choices.

    Args:
        probs: (V, N, K, H, W) probabilities of V views, already resized to one (H, W) and
            un-flipped.
        sharpness: how strongly edges decide; 0 gives the plain mean.

    Returns:
        (N, K, H, W) probabilities (still summing to 1 over K).
    """
    views = probs.shape[0]
    edges = torch.stack([edge_strength(probs[v]) for v in range(views)], dim=0)  # (V, N, H, W)
    weights = torch.softmax(sharpness * edges, dim=0)[:, :, None]  # (V, N, 1, H, W)
    return (weights * probs).sum(dim=0)


# ----------------------------------------------------------------------------------------------
# PAMR: pixel-adaptive mask refinement (Araslanov and Roth, CVPR 2020), our own small version.


def pamr(
    image: torch.Tensor,
    masks: torch.Tensor,
    iterations: int = 10,
    dilations: Sequence[int] = (1, 2, 4, 8),
    temperature: float = 0.1,
) -> torch.Tensor:
    """Smooth masks along the image's colours: each pixel becomes an affinity-weighted mean of
    its 3x3 neighbours at several dilations, where affinity is a softmax over neighbours of the
    negative colour distance divided by (temperature * local colour spread): a small
    temperature keeps a mask from leaking across a colour edge.

    Args:
        image: (N, 3, H, W) float (any normalisation; only differences matter).
        masks: (N, K, H, W) float maps to refine (probabilities or scores).

    Returns:
        (N, K, H, W) refined maps.
    """
    n, _, h, w = image.shape
    offsets = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    pad = max(dilations)

    def gather(x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, C, O, H, W)
        padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
        return torch.stack(
            [padded[:, :, pad + dy : pad + dy + h, pad + dx : pad + dx + w] for dy, dx in offsets],
            dim=2,
        )

    neighbours = gather(image)  # (N, 3, O, H, W)
    distance = (neighbours - image[:, :, None]).abs()
    spread = temperature * neighbours.std(dim=2, keepdim=True) + 1e-6
    affinity = torch.softmax(-(distance / spread).mean(dim=1), dim=1)  # (N, O, H, W)
    refined = masks
    for _ in range(iterations):
        refined = (gather(refined) * affinity[:, None]).sum(dim=2)
    return refined
