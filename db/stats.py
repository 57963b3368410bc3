"""Counts for the dataset overview page: what the workspace holds and how review is going.

Each function is one GROUP BY over a table (a few hundred ms at 300 000 boxes on SQLite), so
the app caches the overview for a short while rather than asking on every rerun.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import distinct, func, select
from sqlalchemy.orm import Session

from db.models import (
    Box,
    BoxOrigin,
    BoxStatus,
    Image,
    LabelClass,
    Point,
    ProposalImage,
    ReviewEvent,
    Tag,
    utcnow,
)

# Undo events are bookkeeping, not decisions; image-level parents repeat their children.
_NOT_DECISIONS = ("undo",)


@dataclass
class Overview:
    """The dataset page's numbers.

    boxes: rows of (class, status, origin, count).
    tags: rows of (class, origin, present, count).
    fp_by_reason: {reason key or "" for none given: count} over rejected boxes.
    throughput: rows of (reviewer, day "YYYY-MM-DD", decisions).
    """

    images_by_split: dict[str, int] = field(default_factory=dict)
    boxes: list[tuple[str, str, str, int]] = field(default_factory=list)
    tags: list[tuple[str, str, bool, int]] = field(default_factory=list)
    points: int = 0
    proposed_images: int = 0
    reviewed_images: int = 0
    pending_images: int = 0
    fp_by_reason: dict[str, int] = field(default_factory=dict)
    throughput: list[tuple[str, str, int]] = field(default_factory=list)

    @property
    def images(self) -> int:
        return sum(self.images_by_split.values())


def images_by_split(session: Session) -> dict[str, int]:
    rows = session.execute(select(Image.split, func.count()).group_by(Image.split))
    return {split: count for split, count in rows}


def box_counts(session: Session) -> list[tuple[str, str, str, int]]:
    """(class, status, origin, count) for every combination present."""
    rows = session.execute(
        select(LabelClass.name, Box.status, Box.origin, func.count())
        .join(LabelClass, LabelClass.id == Box.class_id)
        .group_by(LabelClass.name, Box.status, Box.origin)
        .order_by(LabelClass.name, Box.status, Box.origin)
    )
    return [(name, status, origin, count) for name, status, origin, count in rows]


def tag_counts(session: Session) -> list[tuple[str, str, bool, int]]:
    rows = session.execute(
        select(LabelClass.name, Tag.origin, Tag.present, func.count())
        .join(LabelClass, LabelClass.id == Tag.class_id)
        .group_by(LabelClass.name, Tag.origin, Tag.present)
        .order_by(LabelClass.name, Tag.origin, Tag.present)
    )
    return [(name, origin, bool(present), count) for name, origin, present, count in rows]


def false_positives_by_reason(session: Session) -> dict[str, int]:
    rows = session.execute(
        select(Box.false_positive_reason, func.count())
        .where(Box.status == BoxStatus.REJECTED)
        .group_by(Box.false_positive_reason)
    )
    return {reason or "": count for reason, count in rows}


def review_progress(session: Session) -> tuple[int, int, int]:
    """(images with proposals, images a reviewer touched, images with a pending box)."""
    proposed = session.scalar(select(func.count(distinct(ProposalImage.image_id)))) or 0
    reviewed = (
        session.scalar(
            select(func.count(distinct(ReviewEvent.image_id))).where(
                ReviewEvent.action.not_in(_NOT_DECISIONS)
            )
        )
        or 0
    )
    pending = (
        session.scalar(
            select(func.count(distinct(Box.image_id))).where(
                Box.status == BoxStatus.PENDING, Box.origin != BoxOrigin.REFERENCE
            )
        )
        or 0
    )
    return int(proposed), int(reviewed), int(pending)


def reviewer_throughput(
    session: Session, *, since: datetime | None = None, days: int = 30
) -> list[tuple[str, str, int]]:
    """(reviewer, day, decisions) over the last `days` days; a decision is a row event.

    Image-level parent events (accept all, nothing here) are not counted again on top of the
    row events under them, and neither are undos.
    """
    since = since or utcnow() - timedelta(days=days)
    day = func.date(ReviewEvent.at)
    rows = session.execute(
        select(ReviewEvent.reviewer, day, func.count())
        .where(
            ReviewEvent.at >= since,
            ReviewEvent.entity != "image",
            ReviewEvent.action.not_in(_NOT_DECISIONS),
        )
        .group_by(ReviewEvent.reviewer, day)
        .order_by(day, ReviewEvent.reviewer)
    )
    return [(reviewer, str(d), count) for reviewer, d, count in rows]


def overview(session: Session) -> Overview:
    proposed, reviewed, pending = review_progress(session)
    return Overview(
        images_by_split=images_by_split(session),
        boxes=box_counts(session),
        tags=tag_counts(session),
        points=int(
            session.scalar(select(func.count()).select_from(Point).where(Point.deleted.is_(False)))
            or 0
        ),
        proposed_images=proposed,
        reviewed_images=reviewed,
        pending_images=pending,
        fp_by_reason=false_positives_by_reason(session),
        throughput=reviewer_throughput(session),
    )
