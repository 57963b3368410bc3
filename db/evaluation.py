"""Queries behind `pyrolabel evaluate`: a proposal run's output beside the reference labels.

What counts as the truth about an image:
- reference boxes and masks (`ingest --tags-only`, origin "reference") mark their class present
  and say where it is;
- tags say whether a class is present or absent; a reviewer's tag overrides a reference tag,
  which overrides a given one. Model tags are predictions, never truth.
What counts as the run's output: its pseudo boxes (every status: the proposer is scored, not
the review) and its pseudo masks (Mask rows of the run, else the PNGs `propose` wrote under the
run's mask folder as `<image id>_<class>.png`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import (
    Box,
    BoxOrigin,
    Image,
    LabelClass,
    Mask,
    MaskOrigin,
    ProposalImage,
    ProposalRun,
    Tag,
    TagOrigin,
)

# Later entries win when two origins disagree about one image and class.
_TAG_PRECEDENCE = (TagOrigin.GIVEN, TagOrigin.REFERENCE, TagOrigin.REVIEWER)


@dataclass
class EvaluationImage:
    """One image of a proposal run with its reference labels and the run's output.

    Boxes are (x1, y1, x2, y2) in pixels of the original image, then the class index (and the
    score for predictions). Mask paths are as stored (absolute, or relative to the workspace).
    present / absent: class indices the truth says are in / not in the image; a class in
    neither is unknown and left out of that class's scores.
    """

    image_id: int
    path: str
    width: int
    height: int
    mask_dir: str | None
    reference_boxes: list[tuple[float, float, float, float, int]] = field(default_factory=list)
    reference_masks: dict[int, str] = field(default_factory=dict)
    predicted_boxes: list[tuple[float, float, float, float, int, float]] = field(
        default_factory=list
    )
    predicted_masks: dict[int, str] = field(default_factory=dict)
    present: set[int] = field(default_factory=set)
    absent: set[int] = field(default_factory=set)


def find_proposal_run(
    session: Session, *, run_id: int | None = None, split: str | None = None
) -> ProposalRun | None:
    """The run asked for, else the latest finished run over `split` (or over all images when
    split is None), else the latest run of any state."""
    if run_id is not None:
        return session.get(ProposalRun, run_id)
    query = select(ProposalRun).order_by(ProposalRun.id.desc())
    if split is not None:
        query = query.where((ProposalRun.split == split) | (ProposalRun.split.is_(None)))
    runs = list(session.scalars(query.limit(50)))
    for run in runs:
        if run.finished_at is not None:
            return run
    return runs[0] if runs else None


def evaluation_images(
    session: Session, *, run_id: int, split: str | None = None
) -> list[EvaluationImage]:
    """Every image the run processed (in `split` when given), with truth and output, in id
    order. A few bulk queries, none per image."""
    images_query = (
        select(Image.id, Image.path, Image.width, Image.height, ProposalImage.mask_dir)
        .join(ProposalImage, ProposalImage.image_id == Image.id)
        .where(ProposalImage.run_id == run_id)
        .order_by(Image.id)
    )
    if split is not None:
        images_query = images_query.where(Image.split == split)
    images = {
        row.id: EvaluationImage(row.id, row.path, row.width, row.height, row.mask_dir)
        for row in session.execute(images_query)
    }
    if not images:
        return []
    in_run = select(ProposalImage.image_id).where(ProposalImage.run_id == run_id)

    # Tags: the winning origin per image and class.
    tags: dict[tuple[int, int], tuple[int, bool]] = {}
    tag_rows = session.execute(
        select(Tag.image_id, LabelClass.index, Tag.present, Tag.origin)
        .join(LabelClass, LabelClass.id == Tag.class_id)
        .where(Tag.image_id.in_(in_run), Tag.origin.in_([o.value for o in _TAG_PRECEDENCE]))
    )
    for image_id, class_index, present, origin in tag_rows:
        rank = [o.value for o in _TAG_PRECEDENCE].index(origin)
        key = (image_id, class_index)
        if key not in tags or rank > tags[key][0]:
            tags[key] = (rank, bool(present))
    for (image_id, class_index), (_, present) in tags.items():
        if image_id in images:
            (images[image_id].present if present else images[image_id].absent).add(class_index)

    # Boxes: the references, and the run's pseudo boxes.
    box_rows = session.execute(
        select(
            Box.image_id, LabelClass.index, Box.x1, Box.y1, Box.x2, Box.y2, Box.origin, Box.score
        )
        .join(LabelClass, LabelClass.id == Box.class_id)
        .where(
            Box.image_id.in_(in_run),
            (Box.origin == BoxOrigin.REFERENCE.value)
            | ((Box.origin == BoxOrigin.PSEUDO.value) & (Box.proposal_run_id == run_id)),
        )
        .order_by(Box.id)
    )
    for image_id, class_index, x1, y1, x2, y2, origin, score in box_rows:
        image = images.get(image_id)
        if image is None:
            continue
        if origin == BoxOrigin.REFERENCE.value:
            image.reference_boxes.append((x1, y1, x2, y2, class_index))
        else:
            image.predicted_boxes.append((x1, y1, x2, y2, class_index, float(score or 0.0)))

    # Masks: the references, and the run's own.
    mask_rows = session.execute(
        select(Mask.image_id, LabelClass.index, Mask.path, Mask.origin)
        .join(LabelClass, LabelClass.id == Mask.class_id)
        .where(
            Mask.image_id.in_(in_run),
            (Mask.origin == MaskOrigin.REFERENCE.value)
            | ((Mask.origin == MaskOrigin.PSEUDO.value) & (Mask.proposal_run_id == run_id)),
        )
    )
    for image_id, class_index, path, origin in mask_rows:
        image = images.get(image_id)
        if image is None:
            continue
        if origin == MaskOrigin.REFERENCE.value:
            image.reference_masks[class_index] = path
        else:
            image.predicted_masks[class_index] = path

    # Reference boxes and masks are the strongest word on presence.
    for image in images.values():
        located = {b[4] for b in image.reference_boxes} | set(image.reference_masks)
        image.present |= located
        image.absent -= located
    return list(images.values())


def class_names(session: Session) -> list[str]:
    """The workspace's classes in model order (index 0 first)."""
    return list(session.scalars(select(LabelClass.name).order_by(LabelClass.index)))


def reference_counts(session: Session, *, split: str | None = None) -> dict[str, int]:
    """How many reference boxes and masks the images (of `split`) hold: for the hint shown when
    there is nothing to score against."""
    counts = {}
    for model, origin in ((Box, BoxOrigin.REFERENCE), (Mask, MaskOrigin.REFERENCE)):
        query = select(func.count(model.id)).join(Image, Image.id == model.image_id)
        query = query.where(model.origin == origin.value)
        if split is not None:
            query = query.where(Image.split == split)
        counts[model.__tablename__] = int(session.scalar(query) or 0)
    return counts
