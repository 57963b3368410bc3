"""What reviewers do to boxes, points and tags, each change with an append-only review event.

Every function takes the session of an open transaction, changes rows, writes ReviewEvent rows
and flushes; the caller commits (`with workspace.transaction() as session: ...`), so a change and
its events are saved together or not at all.

Concurrent edits: a write names the `version` of each row as the reviewer read it. When a row
has moved on since, StaleEditError says who changed it and when, and nothing is written. The
versions are checked again by the database on flush (version_id_col), which closes the gap
between our check and the UPDATE.

Events: one event per changed row (before / after are the row as a dict; None when the row was
created / removed). An action that changes several rows (accept all, nothing here, an edit, a
point with its proposed box) also writes a parent event on entity "image" whose
after["events"] lists its children; undo reverts a parent with all its children.

Boxes are (x1, y1, x2, y2) in pixels of the original image, 0 <= x1 < x2 <= width.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from core.boxes import PseudoBox, point_to_box, scale_boxes
from db.models import (
    Box,
    BoxOrigin,
    BoxStatus,
    FalsePositiveReason,
    Image,
    LabelClass,
    Point,
    ReviewEvent,
    Tag,
    TagOrigin,
    utcnow,
)

log = logging.getLogger(__name__)

# Free text is required for this reason key: "other" alone teaches nobody anything.
OTHER_REASON = "other"
NOTHING_HERE_NOTE = "nothing here"

UNDO = "undo"
# Boxes in these states were decided by a later row or removed; acting on them is a mistake.
_FINAL_STATUSES = (BoxStatus.EDITED, BoxStatus.DELETED)

_BOX_FIELDS = (
    "image_id",
    "class_id",
    "x1",
    "y1",
    "x2",
    "y2",
    "origin",
    "status",
    "score",
    "false_positive_reason",
    "false_positive_note",
    "proposal_run_id",
    "point_id",
    "replaced_by_id",
)
_POINT_FIELDS = ("image_id", "class_id", "x", "y", "reviewer", "deleted")
_TAG_FIELDS = ("image_id", "class_id", "present", "origin", "score", "proposal_run_id")

# What undo may write back into an existing row; identity columns (image, origin) never change.
_RESTORABLE = {
    "box": (
        "class_id",
        "x1",
        "y1",
        "x2",
        "y2",
        "status",
        "false_positive_reason",
        "false_positive_note",
        "replaced_by_id",
        "point_id",
    ),
    "point": ("deleted",),
    "tag": ("present", "score"),
}
_MODELS: dict[str, type] = {"box": Box, "point": Point, "tag": Tag}


class ReviewError(ValueError):
    """An action that makes no sense for this row (a reference box, an unknown reason, ...)."""


class StaleEditError(RuntimeError):
    """The row changed since the reviewer read it; the app shows the message and reloads."""

    def __init__(
        self,
        *,
        entity: str,
        entity_id: int,
        changed_by: str | None = None,
        changed_at: datetime | None = None,
        detail: str | None = None,
    ):
        self.entity = entity
        self.entity_id = entity_id
        self.changed_by = changed_by
        self.changed_at = changed_at
        when = f"{changed_at:%Y-%m-%d %H:%M:%S} UTC" if changed_at else "an unknown time"
        what = detail or f"changed by {changed_by or 'someone'} at {when}"
        super().__init__(f"{entity} {entity_id} was {what}, reload")


# ---------------------------------------------------------------------------------------------
# Snapshots and events


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)


def snapshot(row: Box | Point | Tag) -> dict[str, Any]:
    """The row as a JSON-able dict: its id, version and the fields undo can restore."""
    fields = {Box: _BOX_FIELDS, Point: _POINT_FIELDS, Tag: _TAG_FIELDS}[type(row)]
    data = {"id": row.id, "version": row.version}
    data.update({name: _jsonable(getattr(row, name)) for name in fields})
    return data


def _entity_name(row: Box | Point | Tag) -> str:
    return {Box: "box", Point: "point", Tag: "tag"}[type(row)]


def _event(
    session: Session,
    *,
    reviewer: str,
    action: str,
    at: datetime,
    entity: str,
    entity_id: int | None,
    image_id: int | None,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    undoes_id: int | None = None,
) -> ReviewEvent:
    event = ReviewEvent(
        reviewer=reviewer,
        action=action,
        at=at,
        entity=entity,
        entity_id=entity_id,
        image_id=image_id,
        before=before,
        after=after,
        undoes_id=undoes_id,
    )
    session.add(event)
    session.flush()
    return event


def _parent(
    session: Session,
    *,
    reviewer: str,
    action: str,
    at: datetime,
    image_id: int,
    children: list[ReviewEvent],
) -> ReviewEvent:
    """The image-level event of an action; after["events"] lists the row events it made."""
    return _event(
        session,
        reviewer=reviewer,
        action=action,
        at=at,
        entity="image",
        entity_id=image_id,
        image_id=image_id,
        before=None,
        after={"events": [child.id for child in children]},
    )


def _group(
    session: Session,
    *,
    reviewer: str,
    action: str,
    at: datetime,
    image_id: int,
    children: list[ReviewEvent],
) -> ReviewEvent:
    """The event undo reverts: the lone row event, or a parent over several."""
    if len(children) == 1:
        return children[0]
    return _parent(
        session, reviewer=reviewer, action=action, at=at, image_id=image_id, children=children
    )


def _flush(session: Session, row: Box | Point | Tag) -> None:
    """Flush, turning the database's own version check into the error the app shows."""
    try:
        session.flush()
    except StaleDataError as err:
        session.rollback()
        raise StaleEditError(
            entity=_entity_name(row), entity_id=row.id, detail="changed by someone else just now"
        ) from err


def _change(
    session: Session,
    row: Box | Point | Tag,
    *,
    reviewer: str,
    action: str,
    at: datetime,
    **values: Any,
) -> ReviewEvent:
    """Set `values` on an existing row and record the event."""
    before = snapshot(row)
    for name, value in values.items():
        setattr(row, name, value)
    if isinstance(row, Box | Tag):
        row.updated_by = reviewer
        row.updated_at = at
    _flush(session, row)
    return _event(
        session,
        reviewer=reviewer,
        action=action,
        at=at,
        entity=_entity_name(row),
        entity_id=row.id,
        image_id=row.image_id,
        before=before,
        after=snapshot(row),
    )


def _create(
    session: Session, row: Box | Point | Tag, *, reviewer: str, action: str, at: datetime
) -> ReviewEvent:
    session.add(row)
    session.flush()
    return _event(
        session,
        reviewer=reviewer,
        action=action,
        at=at,
        entity=_entity_name(row),
        entity_id=row.id,
        image_id=row.image_id,
        before=None,
        after=snapshot(row),
    )


# ---------------------------------------------------------------------------------------------
# Lookups and checks


def _reviewer(name: str) -> str:
    name = (name or "").strip()
    if not name:
        raise ReviewError("a reviewer name is required")
    return name


def _changed_by(row: Box | Point | Tag) -> tuple[str | None, datetime | None]:
    if isinstance(row, Point):
        return row.reviewer, row.created_at
    return row.updated_by, row.updated_at


def _stale(row: Box | Point | Tag) -> StaleEditError:
    who, when = _changed_by(row)
    return StaleEditError(
        entity=_entity_name(row), entity_id=row.id, changed_by=who, changed_at=when
    )


def _box_for_write(session: Session, box_id: int, version: int) -> Box:
    box = session.get(Box, box_id, populate_existing=True)
    if box is None:
        raise StaleEditError(entity="box", entity_id=box_id, detail="removed by someone else")
    if box.version != version:
        raise _stale(box)
    if box.origin == BoxOrigin.REFERENCE:
        raise ReviewError(f"box {box_id} is a reference label; reviewers do not change those")
    if box.status in _FINAL_STATUSES:
        raise ReviewError(f"box {box_id} is {box.status}; act on the box that replaced it")
    return box


def _class_id(session: Session, class_name: str) -> int:
    class_id = session.scalar(select(LabelClass.id).where(LabelClass.name == class_name))
    if class_id is None:
        names = ", ".join(session.scalars(select(LabelClass.name).order_by(LabelClass.index)))
        raise ReviewError(f"unknown class {class_name!r}; the workspace has {names}")
    return class_id


def _image(session: Session, image_id: int) -> Image:
    image = session.get(Image, image_id)
    if image is None:
        raise ReviewError(f"no image {image_id}")
    return image


def _clip_box(
    image: Image, x1: float, y1: float, x2: float, y2: float
) -> tuple[float, float, float, float]:
    """Order and clip corners to the image; refuse a box with no area left."""
    x1, x2 = sorted((float(x1), float(x2)))
    y1, y2 = sorted((float(y1), float(y2)))
    x1, x2 = max(x1, 0.0), min(x2, float(image.width))
    y1, y2 = max(y1, 0.0), min(y2, float(image.height))
    if not (x1 < x2 and y1 < y2):
        raise ReviewError(
            f"box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) has no area inside the "
            f"{image.width}x{image.height} image"
        )
    return x1, y1, x2, y2


def _check_versions(session: Session, boxes: list[Box], box_versions: Mapping[int, int]) -> None:
    """Every box the action touches must be one the reviewer saw, at the version they saw."""
    for box in boxes:
        if box.id not in box_versions:
            who, when = _changed_by(box)
            raise StaleEditError(
                entity="box",
                entity_id=box.id,
                changed_by=who,
                changed_at=when,
                detail=f"added by {who or 'someone'} since you loaded the image",
            )
        if box.version != box_versions[box.id]:
            raise _stale(box)


def false_positive_reasons(
    session: Session, *, active_only: bool = True
) -> list[FalsePositiveReason]:
    """The workspace's reasons in display order (digit shortcuts follow this order)."""
    query = select(FalsePositiveReason).order_by(
        FalsePositiveReason.ordinal, FalsePositiveReason.id
    )
    if active_only:
        query = query.where(FalsePositiveReason.active.is_(True))
    return list(session.scalars(query))


def save_false_positive_reasons(
    session: Session, *, reasons: Sequence[tuple[str, str, bool]]
) -> None:
    """Make the workspace's reasons exactly `reasons`: (key, label, active), in this order.

    A reason left out is deleted, unless rejected boxes use it: then it is only deactivated,
    so their reason keeps its label on the overview page.
    """
    keys = [key for key, _, _ in reasons]
    for key, label, _ in reasons:
        if not key or len(key) > 32 or not label:
            raise ReviewError(f"reason {key!r}: a key of 1-32 characters and a label are needed")
    if len(set(keys)) != len(keys):
        raise ReviewError("each reason key may appear once")
    existing = {r.key: r for r in false_positive_reasons(session, active_only=False)}
    for ordinal, (key, label, active) in enumerate(reasons):
        row = existing.pop(key, None) or FalsePositiveReason(key=key)
        row.label, row.ordinal, row.active = label, ordinal, bool(active)
        session.add(row)
    for key, row in existing.items():
        used = session.scalar(select(Box.id).where(Box.false_positive_reason == key).limit(1))
        if used is None:
            session.delete(row)
        else:
            row.active = False
            row.ordinal = len(reasons) + row.ordinal
    session.flush()


# ---------------------------------------------------------------------------------------------
# Box actions


def accept_box(session: Session, *, box_id: int, version: int, reviewer: str) -> Box:
    """Accept a proposed (or earlier rejected) box as a true object."""
    reviewer = _reviewer(reviewer)
    box = _box_for_write(session, box_id, version)
    _change(
        session,
        box,
        reviewer=reviewer,
        action="accept",
        at=utcnow(),
        status=BoxStatus.ACCEPTED,
        false_positive_reason=None,
        false_positive_note=None,
    )
    return box


def reject_box(
    session: Session,
    *,
    box_id: int,
    version: int,
    reviewer: str,
    reason: str,
    note: str | None = None,
) -> Box:
    """Reject a box as a false positive; `reason` is a FalsePositiveReason key.

    The "other" reason needs a note saying what the box really shows.
    """
    reviewer = _reviewer(reviewer)
    known = {r.key for r in false_positive_reasons(session)}
    if reason not in known:
        raise ReviewError(f"unknown false-positive reason {reason!r}; use one of {sorted(known)}")
    note = (note or "").strip() or None
    if reason == OTHER_REASON and not note:
        raise ReviewError("reason 'other' needs a note saying what the box shows")
    box = _box_for_write(session, box_id, version)
    _change(
        session,
        box,
        reviewer=reviewer,
        action="reject",
        at=utcnow(),
        status=BoxStatus.REJECTED,
        false_positive_reason=reason,
        false_positive_note=note,
    )
    return box


def delete_box(session: Session, *, box_id: int, version: int, reviewer: str) -> Box:
    """Remove a box that should not exist but is no false positive worth learning (a duplicate)."""
    reviewer = _reviewer(reviewer)
    box = _box_for_write(session, box_id, version)
    _change(session, box, reviewer=reviewer, action="delete", at=utcnow(), status=BoxStatus.DELETED)
    return box


def edit_box(
    session: Session,
    *,
    box_id: int,
    version: int,
    reviewer: str,
    x1: float,
    y1: float,
    x2: float,
    y2: float,
    class_name: str | None = None,
) -> Box:
    """Replace a box with a corrected one; returns the new (accepted, human) box.

    The old box keeps its coordinates for the record, becomes "edited" and points at the new
    one through replaced_by_id, so a proposal's quality can still be measured later.
    """
    reviewer = _reviewer(reviewer)
    box = _box_for_write(session, box_id, version)
    image = _image(session, box.image_id)
    corners = _clip_box(image, x1, y1, x2, y2)
    class_id = _class_id(session, class_name) if class_name else box.class_id
    at = utcnow()
    new_box = Box(
        image_id=box.image_id,
        class_id=class_id,
        x1=corners[0],
        y1=corners[1],
        x2=corners[2],
        y2=corners[3],
        origin=BoxOrigin.HUMAN,
        status=BoxStatus.ACCEPTED,
        updated_by=reviewer,
        updated_at=at,
        created_at=at,
    )
    created = _create(session, new_box, reviewer=reviewer, action="edit", at=at)
    replaced = _change(
        session,
        box,
        reviewer=reviewer,
        action="edit",
        at=at,
        status=BoxStatus.EDITED,
        replaced_by_id=new_box.id,
    )
    _group(
        session,
        reviewer=reviewer,
        action="edit",
        at=at,
        image_id=box.image_id,
        children=[created, replaced],
    )
    return new_box


def add_box(
    session: Session,
    *,
    image_id: int,
    reviewer: str,
    class_name: str,
    x1: float,
    y1: float,
    x2: float,
    y2: float,
) -> Box:
    """A box the reviewer drew on an object the model missed (accepted: a person made it)."""
    reviewer = _reviewer(reviewer)
    image = _image(session, image_id)
    corners = _clip_box(image, x1, y1, x2, y2)
    at = utcnow()
    box = Box(
        image_id=image_id,
        class_id=_class_id(session, class_name),
        x1=corners[0],
        y1=corners[1],
        x2=corners[2],
        y2=corners[3],
        origin=BoxOrigin.HUMAN,
        status=BoxStatus.ACCEPTED,
        updated_by=reviewer,
        updated_at=at,
        created_at=at,
    )
    _create(session, box, reviewer=reviewer, action="add_box", at=at)
    return box


# ---------------------------------------------------------------------------------------------
# Image actions


def _live_boxes(session: Session, image_id: int, statuses: tuple[str, ...]) -> list[Box]:
    query = (
        select(Box)
        .where(Box.image_id == image_id, Box.status.in_(statuses))
        .where(Box.origin != BoxOrigin.REFERENCE)
        .order_by(Box.id)
        .execution_options(populate_existing=True)
    )
    return list(session.scalars(query))


def accept_all(
    session: Session, *, image_id: int, reviewer: str, box_versions: Mapping[int, int]
) -> ReviewEvent:
    """Accept every pending box of the image; returns the event undo would revert.

    box_versions: {box id: version} of the boxes the reviewer saw. A pending box missing from
    it (someone added one since) or at another version makes the whole action stale.
    With no pending box left this still records that the reviewer looked at the image and
    found its boxes right, which takes it out of the "to review" queue.
    """
    reviewer = _reviewer(reviewer)
    _image(session, image_id)
    pending = _live_boxes(session, image_id, (BoxStatus.PENDING,))
    _check_versions(session, pending, box_versions)
    at = utcnow()
    children = [
        _change(session, box, reviewer=reviewer, action="accept", at=at, status=BoxStatus.ACCEPTED)
        for box in pending
    ]
    # Always an image-level event, even over one box or none: "accept all" is a decision about
    # the image, and the queue reads it as "reviewed".
    return _parent(
        session, reviewer=reviewer, action="accept_all", at=at, image_id=image_id, children=children
    )


def mark_nothing_here(
    session: Session,
    *,
    image_id: int,
    reviewer: str,
    box_versions: Mapping[int, int],
    point_ids: Collection[int] | None = None,
) -> ReviewEvent:
    """The image shows none of the workspace's classes: it becomes a negative for all of them.

    What changes, all in one undoable action:
    - a reviewer tag `present=False` for every class (created, or flipped when it said present);
    - pending or accepted boxes from the model side (pseudo, model, given) are rejected as false
      positives with no reason key and the note "nothing here" (the reviewer judged the image,
      not each box, so no reason is invented for them);
    - boxes people made (human) are deleted, and the reviewer's points on the image removed,
      since they claim an object the reviewer now says is not there.
    Reference boxes are held-out truth and stay as they are.

    box_versions: {box id: version} of the pending and accepted boxes the reviewer saw.
    point_ids: the points the reviewer saw; a point added since is refused like a new box (None
        skips the check, for callers that showed no points).
    """
    reviewer = _reviewer(reviewer)
    _image(session, image_id)
    live = _live_boxes(session, image_id, (BoxStatus.PENDING, BoxStatus.ACCEPTED))
    _check_versions(session, live, box_versions)
    at = utcnow()
    children: list[ReviewEvent] = []

    # Boxes: model-side proposals become false positives, human ones are withdrawn.
    for box in live:
        if box.origin == BoxOrigin.HUMAN:
            children.append(
                _change(
                    session,
                    box,
                    reviewer=reviewer,
                    action="delete",
                    at=at,
                    status=BoxStatus.DELETED,
                )
            )
        else:
            children.append(
                _change(
                    session,
                    box,
                    reviewer=reviewer,
                    action="reject",
                    at=at,
                    status=BoxStatus.REJECTED,
                    false_positive_reason=None,
                    false_positive_note=NOTHING_HERE_NOTE,
                )
            )

    # Points: a click on an object contradicts "nothing here".
    points = session.scalars(
        select(Point)
        .where(Point.image_id == image_id, Point.deleted.is_(False))
        .execution_options(populate_existing=True)
    )
    for point in points:
        if point_ids is not None and point.id not in point_ids:
            raise StaleEditError(
                entity="point",
                entity_id=point.id,
                changed_by=point.reviewer,
                changed_at=point.created_at,
                detail=f"added by {point.reviewer} since you loaded the image",
            )
        children.append(
            _change(session, point, reviewer=reviewer, action="delete_point", at=at, deleted=True)
        )

    # Tags: one reviewer tag per class saying absent.
    class_ids = list(session.scalars(select(LabelClass.id).order_by(LabelClass.index)))
    existing = {
        tag.class_id: tag
        for tag in session.scalars(
            select(Tag)
            .where(Tag.image_id == image_id, Tag.origin == TagOrigin.REVIEWER)
            .execution_options(populate_existing=True)
        )
    }
    for class_id in class_ids:
        tag = existing.get(class_id)
        if tag is None:
            tag = Tag(
                image_id=image_id,
                class_id=class_id,
                present=False,
                origin=TagOrigin.REVIEWER,
                updated_by=reviewer,
                updated_at=at,
            )
            children.append(_create(session, tag, reviewer=reviewer, action="tag", at=at))
        elif tag.present:
            children.append(
                _change(session, tag, reviewer=reviewer, action="tag", at=at, present=False)
            )

    return _parent(
        session,
        reviewer=reviewer,
        action="nothing_here",
        at=at,
        image_id=image_id,
        children=children,
    )


# ---------------------------------------------------------------------------------------------
# Points


def add_point(
    session: Session,
    *,
    image_id: int,
    reviewer: str,
    class_name: str,
    x: float,
    y: float,
    fg_prob: np.ndarray | None = None,
    image_rgb: np.ndarray | None = None,
    threshold: float = 0.5,
    class_score: float = 1.0,
) -> tuple[Point, Box | None]:
    """A click on a missed object, and the box it proposes (pending, shown for acceptance).

    Args:
        x, y: the click in pixels of the original image.
        fg_prob: (h, w) float in [0, 1], the class's foreground probability (the RS+EPM mask) at
            any resolution; None when the image has none.
        image_rgb: (H, W, 3) uint8 RGB, for growing a region of similar colour when the mask
            has nothing at the click.
        threshold: the mask threshold the reviewer is looking at.

    Returns:
        The point, and a pending human box from the mask component holding the click or a
        region grown from it (core.boxes.point_to_box); None when neither gives a region.
        The point alone is still a training seed.
    """
    reviewer = _reviewer(reviewer)
    image = _image(session, image_id)
    if not (0 <= x < image.width and 0 <= y < image.height):
        raise ReviewError(
            f"point ({x:g}, {y:g}) lies outside the {image.width}x{image.height} image"
        )
    class_id = _class_id(session, class_name)
    at = utcnow()
    point = Point(image_id=image_id, class_id=class_id, x=float(x), y=float(y), reviewer=reviewer)
    point.created_at = at
    children = [_create(session, point, reviewer=reviewer, action="add_point", at=at)]

    proposed = _propose_from_point(image, x, y, fg_prob, image_rgb, threshold, class_score)
    box = None
    if proposed is not None:
        box = Box(
            image_id=image_id,
            class_id=class_id,
            x1=proposed.x1,
            y1=proposed.y1,
            x2=proposed.x2,
            y2=proposed.y2,
            origin=BoxOrigin.HUMAN,
            status=BoxStatus.PENDING,
            score=proposed.score,
            point_id=point.id,
            updated_by=reviewer,
            updated_at=at,
            created_at=at,
        )
        children.append(_create(session, box, reviewer=reviewer, action="add_point", at=at))
    _group(
        session, reviewer=reviewer, action="add_point", at=at, image_id=image_id, children=children
    )
    return point, box


def _propose_from_point(
    image: Image,
    x: float,
    y: float,
    fg_prob: np.ndarray | None,
    image_rgb: np.ndarray | None,
    threshold: float,
    class_score: float,
) -> PseudoBox | None:
    """point_to_box in the mask's frame, mapped back to pixels of the original image."""
    if fg_prob is None:
        if image_rgb is None:
            return None
        # No mask: an all-background map leaves only the colour region grown from the click.
        fg_prob = np.zeros(image_rgb.shape[:2], np.float32)
    map_h, map_w = fg_prob.shape
    sx, sy = map_w / image.width, map_h / image.height
    box = point_to_box(
        fg_prob,
        x * sx,
        y * sy,
        threshold=threshold,
        image_rgb=image_rgb,
        class_score=class_score,
    )
    if box is None:
        return None
    (scaled,) = scale_boxes([box], (map_w, map_h), (image.width, image.height))
    if not (scaled.x1 < scaled.x2 and scaled.y1 < scaled.y2):
        return None
    return scaled


# ---------------------------------------------------------------------------------------------
# Undo


def last_undoable(session: Session, *, reviewer: str) -> ReviewEvent | None:
    """The reviewer's latest action that no undo has reverted yet.

    Walks the reviewer's events newest first. An undo always comes after what it undoes, so the
    ids undone so far are known by the time the walk reaches them; the walk ends at the first
    action not among them, after a few events in the usual case.
    """
    undone: set[int] = set()
    last_id = None
    while True:
        query = select(ReviewEvent).where(ReviewEvent.reviewer == reviewer)
        if last_id is not None:
            query = query.where(ReviewEvent.id < last_id)
        batch = list(session.scalars(query.order_by(ReviewEvent.id.desc()).limit(200)))
        if not batch:
            return None
        for event in batch:
            if event.action == UNDO:
                undone.add(event.undoes_id)
            elif event.id not in undone:
                # A group's children come before their parent and are undone with it, so the
                # walk meets a live parent before any of its children.
                return event
            last_id = event.id


def undo(session: Session, *, reviewer: str) -> ReviewEvent | None:
    """Revert the reviewer's latest action not yet undone; returns the undo event, or None.

    Calling it again walks further back. Each reverted row gets an "undo" event pointing at the
    event it reverts; a row someone else changed since is stale and nothing is reverted.
    """
    reviewer = _reviewer(reviewer)
    target = last_undoable(session, reviewer=reviewer)
    if target is None:
        return None
    at = utcnow()
    if target.entity != "image":
        return _revert(session, target, reviewer=reviewer, at=at)

    children = [session.get(ReviewEvent, child_id) for child_id in target.after["events"]]
    # Newest first: an edit created its new box before pointing the old one at it.
    for child in reversed(children):
        _revert(session, child, reviewer=reviewer, at=at)
    return _event(
        session,
        reviewer=reviewer,
        action=UNDO,
        at=at,
        entity="image",
        entity_id=target.entity_id,
        image_id=target.image_id,
        before=None,
        after=None,
        undoes_id=target.id,
    )


def _revert(session: Session, event: ReviewEvent, *, reviewer: str, at: datetime) -> ReviewEvent:
    """Put one row back as it was before `event`, checking nobody changed it since."""
    model = _MODELS[event.entity]
    row = session.get(model, event.entity_id, populate_existing=True)
    if row is None:
        raise StaleEditError(
            entity=event.entity, entity_id=event.entity_id, detail="removed by someone else"
        )
    # The row must still be as the action left it. Comparing contents, not versions: an undo of
    # a later action by the same reviewer restores the fields but bumps the version again.
    before = snapshot(row)
    if any(before[name] != event.after[name] for name in _RESTORABLE[event.entity]):
        raise _stale(row)

    if event.before is None:
        # The action created the row: remove it again (its creation stays in the history).
        session.delete(row)
        _flush(session, row)
        after = None
    else:
        for name in _RESTORABLE[event.entity]:
            setattr(row, name, event.before[name])
        if isinstance(row, Box | Tag):
            row.updated_by = reviewer
            row.updated_at = at
        _flush(session, row)
        after = snapshot(row)
    return _event(
        session,
        reviewer=reviewer,
        action=UNDO,
        at=at,
        entity=event.entity,
        entity_id=event.entity_id,
        image_id=event.image_id,
        before=before,
        after=after,
        undoes_id=event.id,
    )
