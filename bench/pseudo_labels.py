"""Pseudo labels from tags, measured on real data: plain CAM, RS+EPM, grad-cam, a colour rule.

    .venv/bin/python -m bench.pseudo_labels            # full run, under an hour on 2 CPU cores
    .venv/bin/python -m bench.pseudo_labels --quick    # a smoke test of the whole path

One RS+EPM network is trained on the image-level tags of ../shared/data (the masks and boxes
are references only) with some clips held out:

    fire-boxes  tags from its YOLO boxes; held out by clip: the name before `_mp4-`, or the
                block of 100 image numbers for the `img_<n>_...` frames
    fire-masks  every frame tagged fire; held out by whole video (VideoNN)
    fire-tags   its `fire` column; held out by a hash of the file name

Sources that say nothing about smoke (fire-masks, fire-tags) tag smoke as unknown (-1), which
the classification loss leaves out: many fire photos show smoke too.

Every method turns one image into a (C, S, S) map per class in [0, 1] at the working size S;
a mask is `map >= t`, a pseudo box is a connected component of that mask (core.boxes). The
learnt methods share the classifier: its class probabilities (mean over the RS+EPM views) gate
every map to zero for a class below the released code's class threshold (0.34) and score every
box, so they differ only in where they put the object:

    CAM        the network's own gated CAM (multi-scale + flip, as RS+EPM uses it)
    RS+EPM     the segmentation head's masks (core.cam.infer_masks)
    GradCAM, GradCAM++, EigenCAM
               the pytorch-grad-cam library on the same network's last backbone stage; its
               maps are min-max scaled per image by the library, then gated like the CAM
    colour     Celik and Demirel's YCbCr fire-pixel rule (core.colour_rule), fire only, no
               classifier at all

The threshold t of each method is chosen on TRAINING images only (fire-masks frames for masks,
fire-boxes images for boxes), from a small grid, then applied to the held-out part:

    mIoU, fire IoU   fire-masks held-out videos, at the original frame size, VOC style
                     (background and fire pooled over all frames)
    AP50             fire-boxes held-out clips, COCO AP at IoU 0.5 with pycocotools
    false alarms     held-out images without fire (fire-boxes and fire-tags) that get a fire
                     box, at the box threshold

Throughput: `propose`'s computation (CAM, masks, boxes; images read from disk) against
pytorch-grad-cam's GradCAM for both classes, same backbone, resolution and batch size.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from core.boxes import mask_to_boxes, scale_boxes
from core.cam import InferenceConfig, infer_masks
from core.classifier_data import ClassifierSample, normalize_image
from core.colour_rule import fire_colour_score
from core.device import pick_device, seed_everything
from core.images import read_header, read_rgb
from core.metrics import IoUAccumulator, coco_box_ap
from core.propose import iter_proposals, proposal_boxes
from core.rsepm import RSEPMNet, load_rsepm
from core.train_classifier import (
    ClassifierConfig,
    TrainCallback,
    save_for_inference,
    train_classifier,
)

log = logging.getLogger("bench.pseudo_labels")

CLASSES = ("fire", "smoke")
FIRE, SMOKE = 0, 1
UNKNOWN = -1.0  # a tag the source does not give (core.classifier_data.ClassifierSample)
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"

LEARNT_METHODS = ("CAM", "RS+EPM", "GradCAM", "GradCAM++", "EigenCAM")
METHODS = (*LEARNT_METHODS, "colour")

# Grids the thresholds are chosen from. The colour rule's grid is over the paper's tau (the
# minimum |Cb - Cr|, 40 in the paper); see core.colour_rule.fire_colour_score. Both reach past
# what the training images pick: with grids ending at 0.8 and tau 80, four of the six methods
# picked that last value for masks, so the best threshold may have lain beyond it.
MAP_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
COLOUR_TAUS = (10, 20, 30, 40, 50, 60, 70, 80, 100, 120)


def threshold_grid(method: str) -> tuple[float, ...]:
    if method == "colour":
        return tuple((tau - 0.5) / 255 for tau in COLOUR_TAUS)
    return MAP_GRID


def threshold_label(method: str, threshold: float) -> str:
    if method == "colour":
        return f"tau={round(threshold * 255 + 0.5)}"
    return f"{threshold:.2f}"


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of a run. The defaults are the full run; `quick()` is a smoke test.

    The full run is sized for 2 CPU cores and under an hour (measured in CPU seconds per image
    on resnet10 at 224 px: 0.18 for a warm-up training step, 0.38 with the segmentation head
    and RecurSeed, 2.3 to compute every method's maps at evaluation). At 160 px, 16 epochs and
    about 1100 training images, training takes about 2900 CPU seconds and evaluation about 800.
    """

    data_dir: Path = DEFAULT_DATA
    arch: str = "resnet10"
    image_size: int = 160
    # The engine's 22-epoch schedule (6 warm-up, recursion from 12) shortened in proportion.
    epochs: int = 16
    warmup_epochs: int = 4
    recursion_start_epoch: int = 9
    batch_size: int = 16
    held_out_frac: float = 0.25
    # The fire-masks frames are every second frame of their videos, still near copies of their
    # neighbours: training on one in four of them costs a quarter of the time and loses little.
    mask_frame_stride: int = 4
    # Training images scored to choose thresholds (a spread-out subset, to bound the time).
    max_threshold_images: int = 96
    max_per_source: int | None = None  # cap every source (quick mode)
    scales: tuple[float, ...] = (0.5, 1.0, 1.5)
    flip: bool = True
    eval_batch_size: int = 8
    throughput_images: int = 64
    min_area_frac: float = 0.001
    seed: int = 0
    device: str | None = None

    @classmethod
    def quick(cls, **overrides) -> BenchConfig:
        settings = dict(
            image_size=64,
            epochs=3,
            warmup_epochs=1,
            recursion_start_epoch=2,
            batch_size=8,
            max_threshold_images=24,
            max_per_source=40,
            scales=(1.0,),
            flip=False,
            throughput_images=16,
        )
        settings.update(overrides)
        return cls(**settings)


# ---------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class Item:
    """One image of the development data.

    tags: (fire, smoke), 1.0 present, 0.0 absent, -1.0 unknown.
    boxes: reference boxes (x1, y1, x2, y2, class index) in pixels of the image; only
        fire-boxes has them (`has_boxes`).
    mask_path: reference fire mask (PNG, 255 = fire); only fire-masks has them.
    group: the clip or video the image belongs to; held-out splits never cut a group.
    """

    path: str
    source: str
    group: str
    width: int
    height: int
    tags: tuple[float, float]
    boxes: tuple[tuple[float, float, float, float, int], ...] = ()
    has_boxes: bool = False
    mask_path: str | None = None


def _stable_hash(text: str) -> int:
    return int(hashlib.sha1(text.encode()).hexdigest()[:12], 16)


def fire_boxes_group(name: str) -> str:
    """`fire1_mp4-23_jpg_...` -> `fire1`; `img_934_jpg_...` -> `img_block_9` (n // 100)."""
    if "_mp4-" in name:
        return name.split("_mp4-")[0]
    parts = name.split("_")
    if len(parts) > 1 and parts[0] == "img" and parts[1].isdigit():
        return f"img_block_{int(parts[1]) // 100}"
    return Path(name).stem


def load_fire_boxes(root: Path) -> list[Item]:
    items = []
    for image_path in sorted((root / "images").iterdir()):
        header = read_header(image_path)
        label_path = root / "labels" / f"{image_path.stem}.txt"
        boxes = []
        for line in label_path.read_text().splitlines() if label_path.exists() else []:
            if not line.strip():
                continue
            label, cx, cy, w, h = line.split()[:5]
            cx, w = float(cx) * header.width, float(w) * header.width
            cy, h = float(cy) * header.height, float(h) * header.height
            x1, y1 = max(cx - w / 2, 0.0), max(cy - h / 2, 0.0)
            x2, y2 = min(cx + w / 2, header.width), min(cy + h / 2, header.height)
            if x2 > x1 and y2 > y1:
                boxes.append((x1, y1, x2, y2, int(label)))
        present = {b[4] for b in boxes}
        items.append(
            Item(
                path=str(image_path),
                source="fire-boxes",
                group=fire_boxes_group(image_path.name),
                width=header.width,
                height=header.height,
                tags=(float(FIRE in present), float(SMOKE in present)),
                boxes=tuple(boxes),
                has_boxes=True,
            )
        )
    return items


def load_fire_masks(root: Path) -> list[Item]:
    items = []
    for image_path in sorted((root / "images").iterdir()):
        header = read_header(image_path)
        mask_path = root / "masks" / f"{image_path.stem}.png"
        items.append(
            Item(
                path=str(image_path),
                source="fire-masks",
                group=image_path.name.split("_")[0],
                width=header.width,
                height=header.height,
                tags=(1.0, UNKNOWN),
                mask_path=str(mask_path) if mask_path.exists() else None,
            )
        )
    return items


def load_fire_tags(root: Path) -> list[Item]:
    items = []
    with open(root / "tags.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            image_path = root / "images" / row["image"]
            if not image_path.exists():
                log.warning("fire-tags: %s is listed but missing; skipped", image_path)
                continue
            header = read_header(image_path)
            items.append(
                Item(
                    path=str(image_path),
                    source="fire-tags",
                    group=row["image"],  # independent web photos: each its own group
                    width=header.width,
                    height=header.height,
                    tags=(float(int(row["fire"]) > 0), UNKNOWN),
                )
            )
    return items


def split_by_group(
    items: Sequence[Item], held_out_frac: float, salt: str = "pyrolabel"
) -> tuple[list[Item], list[Item]]:
    """Hold out whole groups, taken in the order of a salted hash, each one only if it brings
    the held-out share closer to held_out_frac (so one long video cannot overshoot it).

    Deterministic: the same data give the same split on every machine.
    """
    groups: dict[str, list[Item]] = {}
    for item in items:
        groups.setdefault(item.group, []).append(item)
    order = sorted(groups, key=lambda g: _stable_hash(f"{salt}:{g}"))
    wanted = held_out_frac * len(items)
    held_out, train = [], []
    for group in order:
        members = groups[group]
        closer = abs(len(held_out) + len(members) - wanted) < abs(len(held_out) - wanted)
        (held_out if closer else train).extend(members)
    return train, held_out


def spread_subset(items: Sequence[Item], limit: int | None) -> list[Item]:
    """At most `limit` items, evenly spaced, so every clip keeps some."""
    if limit is None or len(items) <= limit:
        return list(items)
    positions = np.linspace(0, len(items) - 1, limit).round().astype(int)
    return [items[i] for i in sorted(set(positions.tolist()))]


@dataclass
class BenchData:
    train: list[Item]  # the classifier learns the tags of these
    threshold_masks: list[Item]  # training fire-masks frames that choose mask thresholds
    threshold_boxes: list[Item]  # training fire-boxes images that choose box thresholds
    held_out: list[Item]  # everything scored
    summary: dict = field(default_factory=dict)


def load_bench_data(config: BenchConfig) -> BenchData:
    data_dir = Path(config.data_dir)
    if not (data_dir / "fire-boxes").is_dir():
        raise FileNotFoundError(
            f"no development data at {data_dir}; pass --data DIR (the shared/data folder)"
        )
    sources = {
        "fire-boxes": load_fire_boxes(data_dir / "fire-boxes"),
        "fire-masks": load_fire_masks(data_dir / "fire-masks"),
        "fire-tags": load_fire_tags(data_dir / "fire-tags"),
    }
    train, held_out, summary = [], [], {}
    threshold_masks, threshold_boxes = [], []
    for name, items in sources.items():
        items = spread_subset(items, config.max_per_source)
        source_train, source_held = split_by_group(items, config.held_out_frac)
        if name == "fire-masks":
            threshold_masks = spread_subset(source_train, config.max_threshold_images)
            source_train = source_train[:: config.mask_frame_stride]
        if name == "fire-boxes":
            threshold_boxes = spread_subset(source_train, config.max_threshold_images)
        train.extend(source_train)
        held_out.extend(source_held)
        summary[name] = {
            "train": len(source_train),
            "held_out": len(source_held),
            "held_out_groups": sorted({i.group for i in source_held}),
        }
    return BenchData(train, threshold_masks, threshold_boxes, held_out, summary)


# ---------------------------------------------------------------------------------------------
# Methods: a batch of images -> per-class maps in [0, 1] and the probabilities boxes are scored by


@dataclass
class Batch:
    items: list[Item]
    rgb: np.ndarray  # (N, S, S, 3) uint8, each image resized to the working size
    images: torch.Tensor  # (N, 3, S, S) normalised, on the device


def iter_batches(
    items: Sequence[Item], image_size: int, batch_size: int, device: torch.device
) -> Iterator[Batch]:
    for start in range(0, len(items), batch_size):
        chunk = list(items[start : start + batch_size])
        rgb = np.stack(
            [
                cv2.resize(read_rgb(item.path), (image_size, image_size), cv2.INTER_LINEAR)
                for item in chunk
            ]
        )
        images = torch.stack([normalize_image(im) for im in rgb]).to(device)
        yield Batch(chunk, rgb, images)


class _LogitsOnly(torch.nn.Module):
    """The RS+EPM network as a plain classifier (images -> (N, C) logits) for pytorch-grad-cam."""

    def __init__(self, net: RSEPMNet):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images, with_seg=False).logits


def _last_backbone_stage(net: RSEPMNet) -> torch.nn.Module:
    backbone = net.backbone
    return backbone.layer4 if hasattr(backbone, "layer4") else backbone.high


class MethodRunner:
    """Computes every method's maps for a batch; see the module docstring."""

    def __init__(self, net: RSEPMNet, config: BenchConfig):
        from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus

        self.net = net.eval()
        self.inference = InferenceConfig(scales=config.scales, flip=config.flip)
        wrapper = _LogitsOnly(net).eval()
        target_layers = [_last_backbone_stage(net)]
        self.grad_cams = {
            "GradCAM": GradCAM(model=wrapper, target_layers=target_layers),
            "GradCAM++": GradCAMPlusPlus(model=wrapper, target_layers=target_layers),
            "EigenCAM": EigenCAM(model=wrapper, target_layers=target_layers),
        }

    def close(self) -> None:
        for cam in self.grad_cams.values():
            cam.activations_and_grads.release()

    def __call__(self, batch: Batch) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Returns (probs (N, C), {method: maps (N, C, S, S) float32 in [0, 1]})."""
        with torch.no_grad():
            result = infer_masks(self.net, batch.images, self.inference)
        probs = result.probs.cpu().numpy()
        kept = (probs >= self.inference.class_threshold).astype(np.float32)
        gate = (probs * kept)[:, :, None, None]
        maps = {
            "CAM": result.cams.cpu().numpy() * kept[:, :, None, None],
            "RS+EPM": result.fg_probs.cpu().numpy(),
        }
        maps.update(self._grad_cam_maps(batch.images, gate))
        colour = np.zeros_like(maps["CAM"])
        colour[:, FIRE] = np.stack([fire_colour_score(im) for im in batch.rgb])
        maps["colour"] = colour
        return probs, {name: m.astype(np.float32, copy=False) for name, m in maps.items()}

    def _grad_cam_maps(self, images: torch.Tensor, gate: np.ndarray) -> dict[str, np.ndarray]:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        n, num_classes = gate.shape[:2]
        maps = {}
        for name, cam in self.grad_cams.items():
            per_class = []
            for c in range(num_classes):
                if name == "EigenCAM" and per_class:
                    # EigenCAM ignores the target (first principal component of the
                    # activations); one map serves every class.
                    per_class.append(per_class[0])
                    continue
                targets = [ClassifierOutputTarget(c)] * n
                per_class.append(cam(input_tensor=images, targets=targets))  # (N, S, S)
            maps[name] = np.stack(per_class, axis=1) * gate
        return maps


# ---------------------------------------------------------------------------------------------
# Scoring


class MethodScores:
    """Streaming scores of one method at every threshold of its grid, on one set of images."""

    def __init__(self, method: str, min_area_frac: float):
        self.method = method
        self.grid = threshold_grid(method)
        self.min_area_frac = min_area_frac
        self.masks = [IoUAccumulator(2, ["background", "fire"]) for _ in self.grid]
        self.predictions: list[list[dict]] = [[] for _ in self.grid]
        self.box_gt: list[dict] = []
        self.fire_free = 0
        self.fire_alarms = [0] * len(self.grid)

    def update(self, item: Item, maps: np.ndarray, probs: np.ndarray) -> None:
        """maps: (C, S, S) in [0, 1] for this image; probs: (C,)."""
        size = maps.shape[-1]

        # Masks: the fire map at the frame's own size, against the reference mask.
        if item.mask_path is not None:
            reference = cv2.imread(item.mask_path, cv2.IMREAD_GRAYSCALE)
            if reference is None:
                raise FileNotFoundError(f"cannot read reference mask {item.mask_path}")
            reference = (reference >= 128).astype(np.int64)
            height, width = reference.shape
            fire_map = cv2.resize(maps[FIRE], (width, height), interpolation=cv2.INTER_LINEAR)
            for accumulator, threshold in zip(self.masks, self.grid, strict=True):
                accumulator.update((fire_map >= threshold).astype(np.int64), reference)

        # Boxes: components at the working size, mapped to pixels of the image.
        scored = item.has_boxes or item.tags[FIRE] == 0
        if not scored:
            return
        if item.has_boxes:
            self.box_gt.append(
                {
                    "image_id": item.path,
                    "width": item.width,
                    "height": item.height,
                    "boxes": [b[:4] for b in item.boxes],
                    "labels": [b[4] for b in item.boxes],
                }
            )
        if item.tags[FIRE] == 0:
            self.fire_free += 1
        for index, threshold in enumerate(self.grid):
            boxes, labels, scores = [], [], []
            for c in range(maps.shape[0]):
                class_score = 1.0 if self.method == "colour" else float(probs[c])
                found = mask_to_boxes(
                    maps[c],
                    threshold=threshold,
                    class_score=class_score,
                    min_area_frac=self.min_area_frac,
                )
                found = scale_boxes(found, (size, size), (item.width, item.height))
                boxes += [b.xyxy for b in found]
                labels += [c] * len(found)
                scores += [b.score for b in found]
            if item.has_boxes:
                self.predictions[index].append(
                    {"image_id": item.path, "boxes": boxes, "labels": labels, "scores": scores}
                )
            if item.tags[FIRE] == 0 and FIRE in labels:
                self.fire_alarms[index] += 1

    def mask_scores(self, index: int) -> dict:
        result = self.masks[index].result()
        return {"mIoU": result["mIoU"], "fire_IoU": result["iou"]["fire"]}

    def box_scores(self, index: int) -> dict:
        if not self.box_gt:
            return {"AP50_fire": math.nan, "AP50_smoke": math.nan, "AP50": math.nan}
        result = coco_box_ap(self.box_gt, self.predictions[index], CLASSES)
        fire = result["per_class"]["fire"]["AP50"]
        smoke = result["per_class"]["smoke"]["AP50"]
        # The colour rule has no smoke class; its box threshold is chosen on fire alone.
        mean = fire if self.method == "colour" else float(np.nanmean([fire, smoke]))
        return {"AP50_fire": fire, "AP50_smoke": smoke, "AP50": mean}

    def false_alarm_rate(self, index: int) -> float:
        return self.fire_alarms[index] / self.fire_free if self.fire_free else math.nan


def score_images(
    runner: MethodRunner,
    items: Sequence[Item],
    config: BenchConfig,
    device: torch.device,
    desc: str,
) -> dict[str, MethodScores]:
    scores = {m: MethodScores(m, config.min_area_frac) for m in METHODS}
    done, started = 0, time.monotonic()
    for batch in iter_batches(items, config.image_size, config.eval_batch_size, device):
        probs, maps = runner(batch)
        for i, item in enumerate(batch.items):
            for method in METHODS:
                scores[method].update(item, maps[method][i], probs[i])
        done += len(batch.items)
        if done % (config.eval_batch_size * 10) == 0 or done == len(items):
            print(f"  {desc}: {done}/{len(items)} images, {time.monotonic() - started:.0f} s")
    return scores


def choose(values: Sequence[float]) -> int:
    """Index of the best value; nan counts as worst, ties go to the lower threshold."""
    cleaned = [-math.inf if math.isnan(v) else v for v in values]
    return int(np.argmax(cleaned))


# ---------------------------------------------------------------------------------------------
# Throughput


def _best_of_two(work: Callable[[], None]) -> float:
    """Seconds of the faster of two runs of `work`."""
    seconds = []
    for _ in range(2):
        started = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - started)
    return min(seconds)


def measure_throughput(
    net: RSEPMNet, items: Sequence[Item], config: BenchConfig, device: torch.device
) -> dict[str, float]:
    """Images per second from files on disk to pseudo boxes in image pixels, one process.

    propose: core.propose.iter_proposals + proposal_boxes, what `pyrolabel propose` runs per
        image (less the PNG and database writes), with the bench's scales and flip, and again
        at one scale without flip.
    GradCAM: pytorch-grad-cam's GradCAM for each class on the same network, at the same size
        and batch size, images read the same way, boxes from core.boxes.
    A first batch of each is run untimed (allocator and thread pool warm-up); each is then
    timed twice and the faster pass kept, since other work on a shared machine only slows a
    pass down.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    paths = [item.path for item in items]

    def time_propose(inference: InferenceConfig) -> float:
        def run(chosen: Sequence[str]) -> None:
            for proposal in iter_proposals(
                net,
                chosen,
                image_size=config.image_size,
                batch_size=config.eval_batch_size,
                device=device,
                inference=inference,
            ):
                proposal_boxes(proposal, min_area_frac=config.min_area_frac)

        run(paths[: config.eval_batch_size])
        return len(paths) / _best_of_two(lambda: run(paths))

    grad_cam = GradCAM(model=_LogitsOnly(net).eval(), target_layers=[_last_backbone_stage(net)])

    def time_grad_cam() -> float:
        def run(chosen: Sequence[Item]) -> None:
            for batch in iter_batches(chosen, config.image_size, config.eval_batch_size, device):
                n = batch.images.shape[0]
                for c in range(len(CLASSES)):
                    maps = grad_cam(
                        input_tensor=batch.images, targets=[ClassifierOutputTarget(c)] * n
                    )
                    for item, class_map in zip(batch.items, maps, strict=True):
                        found = mask_to_boxes(class_map, min_area_frac=config.min_area_frac)
                        size = (config.image_size, config.image_size)
                        scale_boxes(found, size, (item.width, item.height))

        run(items[: config.eval_batch_size])
        return len(items) / _best_of_two(lambda: run(items))

    try:
        return {
            "propose": time_propose(InferenceConfig(scales=config.scales, flip=config.flip)),
            "propose_single_scale": time_propose(InferenceConfig(scales=(1.0,), flip=False)),
            "GradCAM": time_grad_cam(),
        }
    finally:
        grad_cam.activations_and_grads.release()


# ---------------------------------------------------------------------------------------------
# The run


class _EpochPrinter(TrainCallback):
    def on_epoch_end(self, info) -> None:
        losses = " ".join(f"{k}={v:.3f}" for k, v in info.losses.items())
        print(
            f"  epoch {info.epoch + 1}/{info.epochs} [{info.stage}] {losses} ({info.seconds:.0f} s)"
        )


def train_network(config: BenchConfig, data: BenchData, output_dir: Path) -> tuple[RSEPMNet, float]:
    samples = [ClassifierSample(item.path, item.tags) for item in data.train]
    train_config = ClassifierConfig(
        arch=config.arch,
        image_size=config.image_size,
        epochs=config.epochs,
        warmup_epochs=config.warmup_epochs,
        recursion_start_epoch=config.recursion_start_epoch,
        batch_size=config.batch_size,
        seed=config.seed,
        device=config.device,
        num_workers=1,
    )
    result = train_classifier(train_config, samples, CLASSES, output_dir, callback=_EpochPrinter())
    if result.interrupted:
        raise KeyboardInterrupt
    return result.model, result.seconds


def run_bench(
    config: BenchConfig, checkpoint: Path | None = None, save_network: Path | None = None
) -> dict:
    seed_everything(config.seed)
    device = pick_device(config.device)
    bench_started = time.monotonic()

    # Data and split.
    data = load_bench_data(config)
    print(f"data: {len(data.train)} training images (tags only), {len(data.held_out)} held out")
    for name, part in data.summary.items():
        groups = part["held_out_groups"]
        shown = ", ".join(groups) if len(groups) <= 8 else f"{len(groups)} groups"
        print(f"  {name}: train {part['train']}, held out {part['held_out']} ({shown})")

    # One network, trained on the tags.
    if checkpoint is not None:
        net, _ = load_rsepm(checkpoint, device)
        train_seconds = math.nan
        print(f"network: loaded {checkpoint}")
    else:
        print(
            f"training {config.arch} at {config.image_size} px for {config.epochs} epochs "
            f"on {device}"
        )
        with tempfile.TemporaryDirectory(prefix="bench-pseudo-") as tmp:
            net, train_seconds = train_network(config, data, Path(tmp))
            if save_network is not None:
                save_for_inference(Path(tmp) / "last.pt", save_network)
                print(f"network saved to {save_network}")
        print(f"training time: {train_seconds / 60:.1f} min")
    net.eval()

    # Scores at every threshold: training images (to choose), held-out images (to report).
    runner = MethodRunner(net, config)
    try:
        chosen_on = score_images(
            runner, data.threshold_masks + data.threshold_boxes, config, device, "training"
        )
        # Held-out fire photos with neither a mask nor boxes have nothing to be scored against.
        scored = [i for i in data.held_out if i.mask_path or i.has_boxes or i.tags[FIRE] == 0]
        held_out = score_images(runner, scored, config, device, "held out")
    finally:
        runner.close()

    rows = {}
    for method in METHODS:
        train_scores = chosen_on[method]
        grid = train_scores.grid
        mask_index = choose([train_scores.mask_scores(i)["mIoU"] for i in range(len(grid))])
        box_index = choose([train_scores.box_scores(i)["AP50"] for i in range(len(grid))])
        masks = held_out[method].mask_scores(mask_index)
        boxes = held_out[method].box_scores(box_index)
        rows[method] = {
            "mask_threshold": threshold_label(method, grid[mask_index]),
            "mIoU": masks["mIoU"],
            "fire_IoU": masks["fire_IoU"],
            "box_threshold": threshold_label(method, grid[box_index]),
            "AP50_fire": boxes["AP50_fire"],
            "AP50_smoke": boxes["AP50_smoke"] if method != "colour" else math.nan,
            "false_alarm_fire": held_out[method].false_alarm_rate(box_index),
            "fire_free_images": held_out[method].fire_free,
        }

    # Speed.
    speed_items = spread_subset(data.held_out, config.throughput_images)
    throughput = measure_throughput(net, speed_items, config, device)

    report = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "device": str(device),
        "data": data.summary,
        "training_seconds": train_seconds,
        "methods": rows,
        "throughput_images_per_s": throughput,
        "total_seconds": time.monotonic() - bench_started,
    }
    print()
    print(markdown_table(report))
    return report


def _fmt(value: float, percent: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}" if percent else f"{value:.1f}"


def markdown_table(report: dict) -> str:
    lines = [
        "| method | mIoU | fire IoU | AP50 fire | AP50 smoke | false alarms (fire) "
        "| mask thr | box thr |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, row in report["methods"].items():
        lines.append(
            f"| {method} | {_fmt(row['mIoU'])} | {_fmt(row['fire_IoU'])} "
            f"| {_fmt(row['AP50_fire'])} | {_fmt(row['AP50_smoke'])} "
            f"| {_fmt(row['false_alarm_fire'])} | {row['mask_threshold']} "
            f"| {row['box_threshold']} |"
        )
    speed = report["throughput_images_per_s"]
    config = report["config"]
    lines.append("")
    lines.append(
        f"Throughput at {config['image_size']} px, {config['arch']}, batch "
        f"{config['eval_batch_size']}, {report['device']}: propose {speed['propose']:.1f} img/s "
        f"(scales {tuple(config['scales'])}, flip {config['flip']}), propose single-scale "
        f"{speed['propose_single_scale']:.1f} img/s, pytorch-grad-cam GradCAM "
        f"{speed['GradCAM']:.1f} img/s."
    )
    training = report["training_seconds"]
    training_text = "loaded" if math.isnan(training) else f"{training / 60:.1f} min"
    lines.append(
        f"Training: {training_text}; whole bench {report['total_seconds'] / 60:.1f} min. "
        "Scores in percent on held-out clips; false alarms: share of held-out fire-free images "
        f"({report['methods']['CAM']['fire_free_images']}) with a fire box."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run, a smoke test")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared/data folder")
    parser.add_argument("--checkpoint", type=Path, help="skip training: evaluate this network")
    parser.add_argument("--epochs", type=int, help="override the number of epochs")
    parser.add_argument("--image-size", type=int, help="override the working size (x16)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: the best available)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--save-network",
        type=Path,
        metavar="FILE",
        help="keep the trained network (half precision; assets/demo/classifier.pt is made so)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    overrides = {"data_dir": args.data, "device": args.device}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.image_size is not None:
        overrides["image_size"] = args.image_size
    config = BenchConfig.quick(**overrides) if args.quick else BenchConfig(**overrides)
    if config.recursion_start_epoch > config.epochs:
        # A shortened run keeps the three stages in proportion.
        config = BenchConfig(
            **{
                **asdict(config),
                "warmup_epochs": max(1, config.epochs * 3 // 11),
                "recursion_start_epoch": max(1, config.epochs * 6 // 11),
            }
        )

    report = run_bench(config, checkpoint=args.checkpoint, save_network=args.save_network)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
