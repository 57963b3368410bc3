"""Synthetic proposals: a workspace that looks as if `pyrolabel propose` had run over it.

For tests, the end-to-end browser tests and the review-app latency bench, which need images,
a proposal run, pseudo boxes and CAM / mask PNGs without training a classifier.

Layout written (the one `propose` uses):
    cams/<run id>/<image id>_<class>.png    uint8 CAM heat, 255 = hottest
    masks/<run id>/<image id>_<class>.png   uint8 foreground probability * 255
ProposalImage.cam_dir / mask_dir hold "cams/<run id>" / "masks/<run id>".

Each image is drawn from a small pool of scenes (a blob of fire and one of smoke on a dark
background) so that 100 000 rows need only a few dozen distinct files; the per-image PNGs are
hard links to the scene's.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import func, insert, select, text

from db.models import (
    Box,
    BoxOrigin,
    BoxStatus,
    Image,
    LabelClass,
    ProposalImage,
    ProposalRun,
    utcnow,
)
from db.workspace import Workspace

# Colours of the drawn objects, RGB: a flame and a grey plume, so a colour flood fill from a
# click finds them as a reviewer would.
_FIRE_RGB = (255, 140, 20)
_SMOKE_RGB = (150, 150, 155)


@dataclass
class SyntheticConfig:
    """What to generate.

    image_size: (width, height) of drawn images (ignored with image_pool).
    image_pool: real image files to point the rows at, cycled; None draws synthetic scenes.
    boxes_per_image: pseudo boxes per image (fire, smoke, then decoys), all pending.
    scenes: distinct drawings (and CAM / mask files) cycled over the images.
    mask_size: (width, height) of CAM and mask PNGs; None = the image size. propose writes
        them at its working resolution, so the app must not assume the image's.
    """

    n_images: int = 12
    boxes_per_image: int = 3
    image_size: tuple[int, int] = (128, 96)
    image_pool: list[Path] | None = None
    scenes: int = 16
    mask_size: tuple[int, int] | None = None
    splits: dict[str, float] = field(default_factory=lambda: {"train": 0.75, "val": 0.25})
    seed: int = 0


@dataclass(frozen=True)
class Scene:
    """One drawing: its image file, object boxes (x1, y1, x2, y2, class) in image pixels."""

    image_path: Path
    width: int
    height: int
    objects: list[tuple[float, float, float, float, str]]
    cam_files: dict[str, Path]
    mask_files: dict[str, Path]


@dataclass(frozen=True)
class SyntheticResult:
    run_id: int
    image_ids: list[int]
    box_count: int
    scenes: list[Scene]


def _blob(height: int, width: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """(H, W) float in [0, 1]: a soft ellipse, 1 in its core, fading out past its rim."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    d = ((xx - cx) / max(rx, 1.0)) ** 2 + ((yy - cy) / max(ry, 1.0)) ** 2
    return np.clip(1.5 - d, 0.0, 1.0)


def _make_scene(
    index: int, out_dir: Path, config: SyntheticConfig, rng: np.random.Generator, classes: list[str]
) -> Scene:
    if config.image_pool:
        image_path = Path(config.image_pool[index % len(config.image_pool)]).resolve()
        with PILImage.open(image_path) as im:
            width, height = im.size
    else:
        width, height = config.image_size
        image_path = out_dir / f"scene_{index:04d}.png"
    mask_w, mask_h = config.mask_size or (width, height)

    # Objects: a fire blob on the left half, a smoke blob on the right, sizes varying.
    objects = []
    maps: dict[str, np.ndarray] = {}
    cams: dict[str, np.ndarray] = {}
    for k, name in enumerate(classes):
        cx = (0.25 + 0.5 * (k % 2) + rng.uniform(-0.08, 0.08)) * width
        cy = rng.uniform(0.35, 0.65) * height
        rx, ry = rng.uniform(0.08, 0.15) * width, rng.uniform(0.1, 0.2) * height
        objects.append(
            (max(cx - rx, 0.0), max(cy - ry, 0.0), min(cx + rx, width), min(cy + ry, height), name)
        )
        sx, sy = mask_w / width, mask_h / height
        maps[name] = _blob(mask_h, mask_w, cx * sx, cy * sy, rx * sx, ry * sy)
        # The CAM is the mask's blurrier, wider parent: RS+EPM sharpens it into the mask.
        cams[name] = _blob(mask_h, mask_w, cx * sx, cy * sy, 1.6 * rx * sx, 1.6 * ry * sy) * 0.9

    if not config.image_pool:
        # A dark noisy background with the objects painted where their masks are.
        canvas = rng.integers(10, 40, size=(height, width, 3)).astype(np.float32)
        for k, fg in enumerate(maps.values()):
            colour = np.array(_FIRE_RGB if k % 2 == 0 else _SMOKE_RGB, np.float32)
            full = (
                np.asarray(
                    PILImage.fromarray((fg * 255).astype(np.uint8)).resize((width, height))
                ).astype(np.float32)[..., None]
                / 255.0
            )
            full = (full > 0.5).astype(np.float32)
            canvas = canvas * (1 - full) + colour * full
        PILImage.fromarray(canvas.clip(0, 255).astype(np.uint8)).save(image_path)

    cam_files, mask_files = {}, {}
    for name, fg in maps.items():
        cam_files[name] = out_dir / f"scene_{index:04d}_{name}_cam.png"
        mask_files[name] = out_dir / f"scene_{index:04d}_{name}_mask.png"
        PILImage.fromarray((cams[name] * 255).astype(np.uint8)).save(cam_files[name])
        PILImage.fromarray((fg * 255).astype(np.uint8)).save(mask_files[name])
    return Scene(image_path, width, height, objects, cam_files, mask_files)


def _link(source: Path, target: Path) -> None:
    """Hard-link (fast, no space) and fall back to a copy across file systems."""
    try:
        os.link(source, target)
    except FileExistsError:
        pass
    except OSError:
        shutil.copyfile(source, target)


def build_proposals(workspace: Workspace, config: SyntheticConfig | None = None) -> SyntheticResult:
    """Add images, a finished proposal run, pending pseudo boxes and CAM / mask PNGs.

    The workspace must be initialised. Image rows get unique synthetic content hashes, so
    many rows may point at one file. Returns the run id and the new image ids (in insert order).
    """
    config = config or SyntheticConfig()
    rng = np.random.default_rng(config.seed)
    scene_dir = workspace.root / "synthetic"
    scene_dir.mkdir(parents=True, exist_ok=True)

    with workspace.transaction() as session:
        classes = list(session.scalars(select(LabelClass.name).order_by(LabelClass.index)))
        class_ids = {
            name: id_ for name, id_ in session.execute(select(LabelClass.name, LabelClass.id))
        }
        first_image = (session.scalar(select(func.max(Image.id))) or 0) + 1
        first_box = (session.scalar(select(func.max(Box.id))) or 0) + 1
        first_proposal = (session.scalar(select(func.max(ProposalImage.id))) or 0) + 1
        run = ProposalRun(split=None, state="running", params={"synthetic": True})
        session.add(run)
        session.flush()
        run_id = run.id

    scenes = [
        _make_scene(k, scene_dir, config, rng, classes)
        for k in range(min(config.scenes, config.n_images))
    ]
    cam_dir, mask_dir = f"cams/{run_id}", f"masks/{run_id}"
    (workspace.root / cam_dir).mkdir(parents=True, exist_ok=True)
    (workspace.root / mask_dir).mkdir(parents=True, exist_ok=True)

    # Rows, built in memory and inserted in bulk: 100 000 images take seconds this way.
    split_names = list(config.splits)
    split_p = np.array([config.splits[s] for s in split_names], np.float64)
    split_p /= split_p.sum()
    now = utcnow()
    images, proposals, boxes = [], [], []
    box_id = first_box
    for offset in range(config.n_images):
        image_id = first_image + offset
        scene = scenes[offset % len(scenes)]
        images.append(
            {
                "id": image_id,
                "path": str(scene.image_path),
                "content_hash": hashlib.sha256(
                    f"synthetic-{run_id}-{image_id}".encode()
                ).hexdigest(),
                "width": scene.width,
                "height": scene.height,
                "split": split_names[int(rng.choice(len(split_names), p=split_p))],
                "source": "synthetic",
                "created_at": now + timedelta(microseconds=offset),
            }
        )
        probs = {name: float(rng.uniform(0.2, 1.0)) for name in classes}
        proposals.append(
            {
                "id": first_proposal + offset,
                "run_id": run_id,
                "image_id": image_id,
                "probs": probs,
                "cam_dir": cam_dir,
                "mask_dir": mask_dir,
                "uncertainty": float(rng.uniform()),
                "disagreement": float(rng.uniform()),
                "created_at": now,
            }
        )
        for k in range(config.boxes_per_image):
            if k < len(scene.objects):
                x1, y1, x2, y2, name = scene.objects[k]
                jitter = rng.uniform(-0.03, 0.03, size=4) * np.tile([scene.width, scene.height], 2)
                x1, y1, x2, y2 = np.array([x1, y1, x2, y2]) + jitter
            else:
                # Decoys: small boxes elsewhere, the kind of false positive reviewers reject.
                name = classes[k % len(classes)]
                w, h = rng.uniform(0.05, 0.15) * scene.width, rng.uniform(0.05, 0.15) * scene.height
                x1, y1 = rng.uniform(0, scene.width - w), rng.uniform(0, scene.height - h)
                x2, y2 = x1 + w, y1 + h
            x1, x2 = sorted(
                (float(np.clip(x1, 0, scene.width - 2)), float(np.clip(x2, 1, scene.width)))
            )
            y1, y2 = sorted(
                (float(np.clip(y1, 0, scene.height - 2)), float(np.clip(y2, 1, scene.height)))
            )
            x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
            boxes.append(
                {
                    "id": box_id,
                    "image_id": image_id,
                    "class_id": class_ids[name],
                    "x1": x1,
                    "y1": y1,
                    "x2": x2,
                    "y2": y2,
                    "origin": BoxOrigin.PSEUDO.value,
                    "status": BoxStatus.PENDING.value,
                    "score": float(rng.uniform(0.3, 0.95)),
                    "proposal_run_id": run_id,
                    "version": 1,
                    "created_at": now,
                    "updated_at": now,
                }
            )
            box_id += 1

    with workspace.transaction() as session:
        for table, rows in ((Image, images), (ProposalImage, proposals), (Box, boxes)):
            for start in range(0, len(rows), 20_000):
                session.execute(insert(table), rows[start : start + 20_000])
        if session.get_bind().dialect.name == "postgresql":
            # Ids were given explicitly (to link rows without a round trip each); move the
            # sequences past them so later inserts do not collide.
            for table in ("image", "proposal_image", "box"):
                session.execute(
                    text(
                        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                        f"(SELECT max(id) FROM {table}))"
                    )
                )
        run = session.get(ProposalRun, run_id)
        run.state = "done"
        run.image_count = len(images)
        run.finished_at = utcnow()

    # Per-image CAM and mask files, hard links to their scene's.
    for offset in range(config.n_images):
        image_id = first_image + offset
        scene = scenes[offset % len(scenes)]
        for name in classes:
            _link(scene.cam_files[name], workspace.root / cam_dir / f"{image_id}_{name}.png")
            _link(scene.mask_files[name], workspace.root / mask_dir / f"{image_id}_{name}.png")

    return SyntheticResult(
        run_id=run_id,
        image_ids=[row["id"] for row in images],
        box_count=len(boxes),
        scenes=scenes,
    )
