"""Write a workspace's annotations as COCO, YOLO, Pascal VOC or mask PNGs (`pyrolabel export`).

What is exported: boxes given with the data or drawn by reviewers, and proposals a reviewer
accepted (pseudo and model boxes, and boxes grown from a reviewer's point); reference boxes
(from `ingest --tags-only`) and pending proposals, with their scores, only when asked.
Rejected, replaced (edited) and deleted boxes never.

Which images: those with at least one exported box, and negatives, whose tags (given, or a
reviewer's, which wins) say every class is absent. An image tagged with a class but without
an exported box of it is left out, since every format here would read it as a negative.

Masks (`DIR/<class>/<image name>.png`): masks given with the data (reference masks when asked),
and the latest RS+EPM mask of each exported box's class inside that box, so what reviewers
accepted becomes pixels too; negatives get an empty mask of every class.

Names. Label files are named by the image's file stem when stems are unique, else by the path
relative to the images' common folder, so ingesting the export finds each image again.
Images are not copied; YOLO gets an images.txt list and COCO an `images_root` in its info.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from sqlalchemy import or_, select

from core.formats import BoxLabel, coco_document, read_mask, voc_xml, write_mask, write_yolo_text
from db.models import (
    Box,
    BoxOrigin,
    BoxStatus,
    Image,
    Mask,
    MaskOrigin,
    ProposalImage,
    ProposalRun,
    TagOrigin,
)
from db.queries import chunked, class_names, image_tag_sets
from db.workspace import Workspace, WorkspaceError

log = logging.getLogger(__name__)

FORMATS = ("coco", "yolo", "voc", "masks")
# `propose` writes foreground probability * 255; a run that records no threshold is cut here.
DEFAULT_MASK_THRESHOLD = 0.5


@dataclass
class ExportReport:
    format: str
    out_dir: Path
    images: int = 0
    negatives: int = 0
    boxes: int = 0
    masks: int = 0
    left_out: int = 0  # images tagged present without an exported box
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        what = f"{self.masks} masks" if self.format == "masks" else f"{self.boxes} boxes"
        text = (
            f"exported {self.images} images ({self.negatives} negatives), {what} as "
            f"{self.format} to {self.out_dir}"
        )
        if self.left_out:
            text += f"; left out {self.left_out} tagged images without an exported box"
        return text


@dataclass
class _ExportImage:
    id: int
    path: Path
    width: int
    height: int
    boxes: list[BoxLabel] = field(default_factory=list)


def export_annotations(
    workspace: Workspace,
    fmt: str,
    out_dir: str | Path,
    *,
    split: str | None = None,
    include_reference: bool = False,
    include_pending: bool = False,
) -> ExportReport:
    """Export the annotations of `split` (every split when None) as `fmt` into `out_dir`.

    Raises:
        WorkspaceError: unknown format.
    """
    if fmt not in FORMATS:
        raise WorkspaceError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    report = ExportReport(format=fmt, out_dir=out_dir)
    with workspace.session() as session:
        classes = workspace.classes(session)
        if fmt == "masks":
            _export_masks(
                session, workspace, out_dir, split, include_reference, include_pending, report
            )
            return report
        images = _select_images(
            session, workspace, split, include_reference, include_pending, classes, report
        )
    names = export_names([image.path for image in images])
    out_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "yolo":
        _write_yolo(out_dir, images, names, classes)
    elif fmt == "voc":
        _write_voc(out_dir, images, names)
    else:
        _write_coco(out_dir, images, classes)
    report.images = len(images)
    report.boxes = sum(len(image.boxes) for image in images)
    return report


def _box_filter(include_reference: bool, include_pending: bool):
    """SQL condition for the boxes an export holds (see the module docstring)."""
    # A drawn human box is the reviewer's own word from the start; one grown from a point is a
    # proposal shown for acceptance, like a pseudo box (db.curation reads them the same way).
    drawn = (Box.origin == BoxOrigin.GIVEN) | (
        (Box.origin == BoxOrigin.HUMAN) & Box.point_id.is_(None)
    )
    trusted = drawn & Box.status.in_([BoxStatus.ACCEPTED, BoxStatus.PENDING])
    proposed = Box.origin.in_([BoxOrigin.PSEUDO, BoxOrigin.MODEL]) | (
        (Box.origin == BoxOrigin.HUMAN) & Box.point_id.is_not(None)
    )
    conditions = [trusted, proposed & (Box.status == BoxStatus.ACCEPTED)]
    if include_pending:
        conditions.append(proposed & (Box.status == BoxStatus.PENDING))
    if include_reference:
        conditions.append(
            (Box.origin == BoxOrigin.REFERENCE)
            & Box.status.in_([BoxStatus.ACCEPTED, BoxStatus.PENDING])
        )
    return or_(*conditions)


def _select_images(
    session,
    workspace: Workspace,
    split: str | None,
    include_reference: bool,
    include_pending: bool,
    classes: list[str],
    report: ExportReport,
) -> list[_ExportImage]:
    names = class_names(session)
    image_query = select(Image.id, Image.path, Image.width, Image.height).order_by(Image.id)
    if split is not None:
        image_query = image_query.where(Image.split == split)
    images = {
        id_: _ExportImage(id_, workspace.absolute(path), width, height)
        for id_, path, width, height in session.execute(image_query)
    }

    box_query = (
        select(Box.image_id, Box.class_id, Box.x1, Box.y1, Box.x2, Box.y2, Box.status, Box.score)
        .where(_box_filter(include_reference, include_pending))
        .order_by(Box.image_id, Box.id)
    )
    if split is not None:
        box_query = box_query.join(Image, Box.image_id == Image.id).where(Image.split == split)
    for image_id, class_id, x1, y1, x2, y2, status, score in session.execute(box_query):
        # Scores travel with proposals still waiting for a reviewer; accepted boxes are truth.
        kept_score = score if status == BoxStatus.PENDING else None
        images[image_id].boxes.append(BoxLabel(names[class_id], x1, y1, x2, y2, kept_score))

    tags = image_tag_sets(session, origins=(TagOrigin.GIVEN, TagOrigin.REVIEWER), split=split)
    selected = []
    for image in images.values():
        image_tags = tags.get(image.id, {})
        if image.boxes:
            selected.append(image)
        elif image_tags and all(image_tags.get(cls) is False for cls in classes):
            selected.append(image)
            report.negatives += 1
        elif any(image_tags.values()):
            report.left_out += 1
    return selected


def export_names(paths: list[Path]) -> dict[Path, str]:
    """{image path: export name without suffix}: the file stem when stems are unique, else the
    path relative to the images' common folder (POSIX)."""
    stems = [path.stem for path in paths]
    if len(set(stems)) == len(stems):
        return dict(zip(paths, stems, strict=True))
    root = _common_root(paths)
    return {path: path.relative_to(root).with_suffix("").as_posix() for path in paths}


def _common_root(paths: list[Path]) -> Path:
    if not paths:
        return Path(".")
    return Path(os.path.commonpath([str(path.parent) for path in paths]))


def _write_yolo(out_dir: Path, images: list[_ExportImage], names, classes: list[str]) -> None:
    (out_dir / "classes.txt").write_text("".join(f"{name}\n" for name in classes))
    labels_dir = out_dir / "labels"
    for image in images:
        target = labels_dir / f"{names[image.path]}.txt"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(write_yolo_text(image.boxes, image.width, image.height, classes))
    (out_dir / "images.txt").write_text("".join(f"{image.path}\n" for image in images))


def _write_voc(out_dir: Path, images: list[_ExportImage], names) -> None:
    annotations = out_dir / "Annotations"
    for image in images:
        target = annotations / f"{names[image.path]}.xml"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(voc_xml(image.path.name, image.width, image.height, image.boxes))


def _write_coco(out_dir: Path, images: list[_ExportImage], classes: list[str]) -> None:
    root = _common_root([image.path for image in images])
    document = coco_document(
        [
            (image.id, image.path.relative_to(root).as_posix(), image.width, image.height)
            for image in images
        ],
        [(image.id, box) for image in images for box in image.boxes],
        classes,
    )
    document["info"]["images_root"] = str(root)
    (out_dir / "annotations.json").write_text(json.dumps(document, indent=1))


def _export_masks(
    session,
    workspace: Workspace,
    out_dir: Path,
    split: str | None,
    include_reference: bool,
    include_pending: bool,
    report: ExportReport,
) -> None:
    """DIR/<class>/<image name>.png, 255 for the class. A class's mask on an image is the union
    of the masks given with the data (and reference masks, when asked) and of the image's latest
    RS+EPM mask (probability at or above its run's threshold) inside the boxes of that class the
    export holds: the pseudo mask where a reviewer accepted an object, cut to what they accepted.
    Negatives (tags say every class is absent) get an empty mask of every class."""
    origins = [MaskOrigin.GIVEN]
    if include_reference:
        origins.append(MaskOrigin.REFERENCE)
    names = class_names(session)
    classes = list(names.values())
    sizes: dict[int, tuple[Path, int, int]] = {}  # image id -> (path, width, height)

    # Mask files: given (and reference) masks, one or more per (image, class).
    files: dict[tuple[int, str], list[Path]] = defaultdict(list)
    query = (
        select(Mask.image_id, Mask.class_id, Mask.path, Image.path, Image.width, Image.height)
        .join(Image, Mask.image_id == Image.id)
        .where(Mask.origin.in_(origins))
        .order_by(Mask.image_id, Mask.id)
    )
    if split is not None:
        query = query.where(Image.split == split)
    for image_id, class_id, mask_path, image_path, width, height in session.execute(query):
        files[(image_id, names[class_id])].append(workspace.absolute(mask_path))
        sizes[image_id] = (workspace.absolute(image_path), width, height)

    # The images a box export would hold: their boxes cut the pseudo masks (never reference
    # boxes: those are the truth a proposal is scored against, not something a reviewer made),
    # and those without a box are the negatives.
    cut_to: dict[tuple[int, str], list[BoxLabel]] = defaultdict(list)
    negatives = []
    for image in _select_images(
        session, workspace, split, False, include_pending, classes, ExportReport("masks", out_dir)
    ):
        sizes[image.id] = (image.path, image.width, image.height)
        for box in image.boxes:
            cut_to[(image.id, box.class_name)].append(box)
        if not image.boxes:
            negatives.append(image.id)
    latest = _latest_proposal_masks(session, workspace, {image_id for image_id, _ in cut_to})

    out: dict[tuple[int, str], np.ndarray] = {}
    for key in sorted(set(files) | set(cut_to)):
        image_id, cls = key
        _, width, height = sizes[image_id]
        union = np.zeros((height, width), dtype=bool)
        for mask_path in files.get(key, []):
            mask = _read_export_mask(mask_path, (width, height), report)
            if mask is not None:
                union |= mask
        if key in cut_to and image_id in latest:
            mask_dir, threshold = latest[image_id]
            probability = _read_probability(mask_dir / f"{image_id}_{cls}.png", (width, height))
            if probability is not None:
                inside = np.zeros_like(union)
                for box in cut_to[key]:
                    x1, y1 = max(0, int(np.floor(box.x1))), max(0, int(np.floor(box.y1)))
                    x2, y2 = min(width, int(np.ceil(box.x2))), min(height, int(np.ceil(box.y2)))
                    inside[y1:y2, x1:x2] = True
                union |= inside & (probability >= threshold * 255.0)
        if key in files or union.any():
            out[key] = union
    for image_id in negatives:
        _, width, height = sizes[image_id]
        for cls in classes:
            out.setdefault((image_id, cls), np.zeros((height, width), dtype=bool))
    report.negatives = len(negatives)

    export = export_names([sizes[image_id][0] for image_id in sorted({k[0] for k in out})])
    for (image_id, cls), mask in out.items():
        write_mask(out_dir / cls / f"{export[sizes[image_id][0]]}.png", mask)
        report.masks += 1
    report.images = len({image_id for image_id, _ in out})
    out_dir.mkdir(parents=True, exist_ok=True)


def _latest_proposal_masks(
    session, workspace: Workspace, image_ids: set[int]
) -> dict[int, tuple[Path, float]]:
    """{image id: (folder of its latest proposal's mask PNGs, that run's mask threshold)}."""
    found: dict[int, tuple[Path, float]] = {}
    for batch in chunked(sorted(image_ids)):
        rows = session.execute(
            select(ProposalImage.image_id, ProposalImage.mask_dir, ProposalRun.params)
            .join(ProposalRun, ProposalRun.id == ProposalImage.run_id)
            .where(ProposalImage.image_id.in_(batch), ProposalImage.mask_dir.is_not(None))
            .order_by(ProposalImage.id)
        )
        for image_id, mask_dir, params in rows:  # later rows (newer runs) win
            threshold = (params or {}).get("mask_threshold", (params or {}).get("threshold"))
            if not isinstance(threshold, int | float):
                threshold = DEFAULT_MASK_THRESHOLD
            found[image_id] = (workspace.absolute(mask_dir), float(threshold))
    return found


def _read_export_mask(path: Path, size: tuple[int, int], report: ExportReport):
    """A given mask as (H, W) bool, or None (with a problem line) when unusable."""
    width, height = size
    try:
        mask = read_mask(path)
    except Exception as err:  # Pillow raises many types for a missing or broken file
        report.problems.append(f"{path}: cannot read the mask ({err}); skipped")
        return None
    if mask.shape != (height, width):
        report.problems.append(
            f"{path}: {mask.shape[1]}x{mask.shape[0]} mask for a {width}x{height} image; skipped"
        )
        return None
    return mask


def _read_probability(path: Path, size: tuple[int, int]) -> np.ndarray | None:
    """A proposal's foreground probability PNG (probability * 255) as (H, W) uint8 at `size`."""
    plane = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if plane is None:
        log.warning("proposal mask %s is missing or unreadable; its boxes export no mask", path)
        return None
    if plane.shape != (size[1], size[0]):
        plane = cv2.resize(plane, size, interpolation=cv2.INTER_LINEAR)
    return plane
