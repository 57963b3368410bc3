"""The curated set: what reviewers accepted, frozen into a DatasetVersion when a job starts.

A retrain job trains on a snapshot, never on live rows, so a reviewer who keeps working while
the job runs cannot change what it trained on, and the Models page can say exactly which
annotations a model saw.

Roles of the frozen items (DatasetItem.role):

    train     an image of a training split with at least one box to learn from, or with
              reviewer points only (points-only images are for the classifier; a detector
              skips them, since an image with an unboxed object is not a negative)
    negative  a hard negative: no box to learn from and known to be free of every class,
              because a reviewer rejected boxes on it as false positives or marked "nothing
              here", or its given tags say no class is present (fire-free scenes help the
              detector as much as hard negatives do)
    eval      an image of an evaluation split that can be scored: it has truth boxes, or it
              is known to be free of every class

Boxes trained on: given boxes (not rejected or deleted), accepted pseudo boxes, reviewers'
human boxes (a corrected box replaces the pseudo box it edits; a point-grown proposal counts
only once accepted). Never model boxes, never pending pseudo boxes.

Reference labels (ingested with `--tags-only`) are held-out truth: DESIGN says training never
reads them. A user who keeps a split of reference-labelled images for training can opt in with
`include_reference=True` (`pyrolabel retrain --train-on-reference`); by default they are only
ground truth on evaluation splits. Evaluation splits never contribute a training item,
whatever the options.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from db.models import (
    Box,
    BoxOrigin,
    BoxStatus,
    DatasetItem,
    DatasetVersion,
    Image,
    LabelClass,
    Point,
    Tag,
    TagOrigin,
)

log = logging.getLogger(__name__)

DEFAULT_EVAL_SPLITS = ("val", "test")

ROLE_TRAIN = "train"
ROLE_NEGATIVE = "negative"
ROLE_EVAL = "eval"

# The reason recorded for boxes rejected without a reason key, and for images reviewers marked
# empty by tags alone.
NOTHING_HERE = "nothing here"

# Box statuses that still stand: rejected, deleted and edited (replaced) boxes do not.
_STANDING = (BoxStatus.PENDING, BoxStatus.ACCEPTED)

# Whose word on a tag counts, most trusted first; model tags are guesses and never count.
_TAG_TRUST = (TagOrigin.REVIEWER, TagOrigin.GIVEN, TagOrigin.REFERENCE)


@dataclass
class _ImageRows:
    """Everything the curation reads about one image."""

    split: str
    train_boxes: list[list[float]] = field(default_factory=list)
    truth_boxes: list[list[float]] = field(default_factory=list)
    rejected: list[list[Any]] = field(default_factory=list)
    points: list[list[float]] = field(default_factory=list)
    tags: dict[str, dict[str, bool]] = field(default_factory=dict)  # origin -> class -> present


def _trains_on(box: Any, include_reference: bool) -> bool:
    """Whether a box row (origin, status, point_id) is something a training split learns."""
    if box.status not in _STANDING:
        return False
    if box.origin == BoxOrigin.GIVEN:
        return True
    if box.origin == BoxOrigin.PSEUDO:
        return box.status == BoxStatus.ACCEPTED
    if box.origin == BoxOrigin.HUMAN:
        # A box grown from a reviewer's point is a proposal until accepted; a drawn one is
        # the reviewer's own word from the start.
        return box.status == BoxStatus.ACCEPTED or box.point_id is None
    if box.origin == BoxOrigin.REFERENCE:
        return include_reference
    return False


def _is_truth(box: Any) -> bool:
    """Whether a box on an evaluation split is ground truth to score against."""
    if box.origin == BoxOrigin.REFERENCE:
        return box.status != BoxStatus.DELETED
    return _trains_on(box, include_reference=False)


def _merged_tags(
    tags: dict[str, dict[str, bool]], classes: Sequence[str], include_reference: bool
) -> dict[str, int]:
    """One present/absent per class: the most trusted origin that says anything wins."""
    merged = {}
    for name in classes:
        for origin in _TAG_TRUST:
            if origin == TagOrigin.REFERENCE and not include_reference:
                continue
            if name in tags.get(origin, {}):
                merged[name] = int(tags[origin][name])
                break
    return merged


def _load_rows(
    session: Session, *, classes: Sequence[str], eval_splits: set[str], include_reference: bool
) -> dict[int, _ImageRows]:
    """Read images, boxes, points and tags in one query each (no per-image round trips)."""
    class_index = dict(session.execute(select(LabelClass.id, LabelClass.index)).all())
    class_name = dict(session.execute(select(LabelClass.id, LabelClass.name)).all())
    rows = {
        image_id: _ImageRows(split=split)
        for image_id, split in session.execute(select(Image.id, Image.split))
    }

    box_columns = (
        Box.image_id,
        Box.class_id,
        Box.x1,
        Box.y1,
        Box.x2,
        Box.y2,
        Box.origin,
        Box.status,
        Box.point_id,
        Box.false_positive_reason,
    )
    for box in session.execute(select(*box_columns).order_by(Box.id)):
        image = rows[box.image_id]
        coords = [box.x1, box.y1, box.x2, box.y2, class_index[box.class_id]]
        if box.status == BoxStatus.REJECTED and box.origin != BoxOrigin.REFERENCE:
            # No reason key: the reviewer rejected the whole image ("nothing here", db.review).
            image.rejected.append([*coords, box.false_positive_reason or NOTHING_HERE])
        if image.split in eval_splits:
            if _is_truth(box):
                image.truth_boxes.append(coords)
        elif _trains_on(box, include_reference):
            image.train_boxes.append(coords)

    point_columns = (Point.image_id, Point.x, Point.y, Point.class_id)
    for point in session.execute(select(*point_columns).where(Point.deleted.is_(False))):
        rows[point.image_id].points.append([point.x, point.y, class_index[point.class_id]])

    tag_columns = (Tag.image_id, Tag.class_id, Tag.present, Tag.origin)
    for tag in session.execute(select(*tag_columns).where(Tag.origin != TagOrigin.MODEL)):
        by_origin = rows[tag.image_id].tags.setdefault(tag.origin, {})
        by_origin[class_name[tag.class_id]] = bool(tag.present)
    return rows


def _role(image: _ImageRows, tags: dict[str, int], classes: Sequence[str]) -> str | None:
    """The role of a training-split image, or None when it has nothing to teach a detector."""
    if image.train_boxes or image.points:
        return ROLE_TRAIN
    if any(tags.values()):
        return None  # a class is there but nobody boxed it: neither example nor negative
    reviewed_empty = bool(image.rejected) or any(
        not present for present in image.tags.get(TagOrigin.REVIEWER, {}).values()
    )
    all_absent = len(tags) == len(classes)
    if reviewed_empty or all_absent:
        return ROLE_NEGATIVE
    return None


def _eval_role(image: _ImageRows, tags: dict[str, int], classes: Sequence[str]) -> bool:
    """Whether an evaluation-split image can be scored (its boxes are the whole truth)."""
    if image.truth_boxes:
        return True
    if any(tags.values()):
        return False  # fire that nobody boxed would make every correct detection a false one
    return len(tags) == len(classes) or bool(image.rejected)


def freeze_dataset_version(
    session: Session,
    *,
    eval_splits: Iterable[str] = DEFAULT_EVAL_SPLITS,
    include_reference: bool = False,
    name: str | None = None,
) -> DatasetVersion:
    """Freeze the curated set as it is now into a new DatasetVersion (flushed, not committed).

    Args:
        session: an open session; the caller commits.
        eval_splits: splits held out for evaluation; their images only ever get role "eval".
        include_reference: train on reference boxes and tags of training splits (off by
            default: DESIGN keeps reference labels out of training).
        name: a label for the Models page, e.g. "job 7".

    Returns:
        The DatasetVersion, with `summary` = {"eval_splits", "include_reference", "images":
        {role: count}, "boxes": {role: {class: count}}, "negatives_by_reason": {reason: count},
        "points": count}. Its items hold annotations {"boxes": [[x1, y1, x2, y2, class_index]],
        "points": [[x, y, class_index]], "tags": {class: 0 or 1}, "rejected": [[x1, y1, x2,
        y2, class_index, reason]]}, boxes in pixels of the original image.
    """
    eval_splits = set(eval_splits)
    classes = list(session.scalars(select(LabelClass.name).order_by(LabelClass.index)))
    rows = _load_rows(
        session, classes=classes, eval_splits=eval_splits, include_reference=include_reference
    )

    # Decide each image's role and freeze its annotations.
    items = []
    image_counts: Counter[str] = Counter()
    box_counts: dict[str, Counter[str]] = defaultdict(Counter)
    negatives_by_reason: Counter[str] = Counter()
    point_count = 0
    for image_id, image in rows.items():
        is_eval = image.split in eval_splits
        tags = _merged_tags(image.tags, classes, include_reference=is_eval or include_reference)
        if is_eval:
            role = ROLE_EVAL if _eval_role(image, tags, classes) else None
            boxes = image.truth_boxes
        else:
            role = _role(image, tags, classes)
            boxes = image.train_boxes
        if role is None:
            continue
        items.append(
            {
                "image_id": image_id,
                "role": role,
                "annotations": {
                    "boxes": boxes,
                    "points": image.points if role == ROLE_TRAIN else [],
                    "tags": tags,
                    "rejected": image.rejected,
                },
            }
        )
        image_counts[role] += 1
        for box in boxes:
            box_counts[role][classes[int(box[4])]] += 1
        if role == ROLE_NEGATIVE:
            reasons = {r[5] for r in image.rejected} or {NOTHING_HERE}
            negatives_by_reason.update(reasons)
        if role == ROLE_TRAIN:
            point_count += len(image.points)

    version = DatasetVersion(
        name=name,
        summary={
            "eval_splits": sorted(eval_splits),
            "include_reference": include_reference,
            "images": dict(image_counts),
            "boxes": {role: dict(counts) for role, counts in box_counts.items()},
            "negatives_by_reason": dict(negatives_by_reason),
            "points": point_count,
        },
    )
    session.add(version)
    session.flush()
    if items:
        for item in items:
            item["dataset_version_id"] = version.id
        session.execute(insert(DatasetItem), items)
    log.info(
        "froze dataset version %d: %s",
        version.id,
        ", ".join(f"{n} {role}" for role, n in sorted(image_counts.items())) or "empty",
    )
    return version


@dataclass(frozen=True)
class FrozenItem:
    """One frozen image as training and evaluation read it. Boxes (x1, y1, x2, y2) pixels."""

    image_id: int
    path: str
    width: int
    height: int
    role: str
    boxes: list[list[float]]  # [x1, y1, x2, y2, class_index]
    points: list[list[float]]  # [x, y, class_index]
    tags: dict[str, int]
    rejected: list[list[Any]]  # [x1, y1, x2, y2, class_index, reason]


def dataset_items(
    session: Session, *, dataset_version_id: int, roles: Iterable[str] | None = None
) -> list[FrozenItem]:
    """The items of a dataset version with their image paths, in image id order."""
    query = (
        select(DatasetItem, Image.path, Image.width, Image.height)
        .join(Image, Image.id == DatasetItem.image_id)
        .where(DatasetItem.dataset_version_id == dataset_version_id)
        .order_by(DatasetItem.image_id)
    )
    if roles is not None:
        query = query.where(DatasetItem.role.in_(list(roles)))
    result = []
    for item, path, width, height in session.execute(query):
        annotations = item.annotations or {}
        result.append(
            FrozenItem(
                image_id=item.image_id,
                path=path,
                width=width,
                height=height,
                role=item.role,
                boxes=annotations.get("boxes", []),
                points=annotations.get("points", []),
                tags=annotations.get("tags", {}),
                rejected=annotations.get("rejected", []),
            )
        )
    return result
