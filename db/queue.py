"""The review queue: which image a reviewer sees next, and leases that keep reviewers apart.

The queue walks the latest ProposalImage of each image in one of four orders (uncertainty,
disagreement, newest, random) with keyset pagination: each page starts strictly after the last
item of the page before, found through an index, so asking for the next image costs the same
on image 100 as on image 100 000 and nothing ever counts or sorts the whole table.

Filters (class, status, split, false-positive reason, reviewer) are EXISTS checks per
candidate through the (image_id, ...) indexes. A filter that matches few images makes a page
walk further; the walk is shared by the whole page, and pages are asked for once per
`page_size` decisions, not per keystroke.

Leases: a reviewer holds a lease on the image they look at, renewed on every action and
expiring after LEASE_TTL; the queue skips images another reviewer holds, and claiming one is a
single atomic upsert, so two reviewers never get the same image at once.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import (
    ColumnElement,
    and_,
    exists,
    func,
    literal,
    or_,
    select,
    tuple_,
)
from sqlalchemy.orm import Session, aliased

from db.models import (
    Box,
    BoxOrigin,
    BoxStatus,
    Image,
    ImageLease,
    LabelClass,
    ProposalImage,
    ReviewEvent,
    utcnow,
)

# Long enough for a reviewer who pauses on a hard image; short enough that a closed browser
# frees its image within minutes.
LEASE_TTL = timedelta(minutes=10)

# A multiplicative hash of the proposal id (Lehmer / MINSTD constants): a fixed shuffle that
# needs no stored random column and runs on SQLite and PostgreSQL alike.
_RANDOM_MULTIPLIER = 48271
_RANDOM_MODULUS = 2_147_483_647


class QueueOrder(enum.StrEnum):
    UNCERTAINTY = "uncertainty"  # probabilities and box scores nearest their thresholds first
    DISAGREEMENT = "disagreement"  # most CAM mass outside every box first
    NEWEST = "newest"  # latest proposals first
    RANDOM = "random"  # a fixed shuffle per seed


class ReviewState(enum.StrEnum):
    """Which images the queue holds; box statuses select images holding such a box."""

    TO_REVIEW = "to_review"  # a pending box, or proposed and never touched by anyone
    REVIEWED = "reviewed"  # touched by a reviewer and no pending box left
    ACCEPTED = BoxStatus.ACCEPTED.value
    REJECTED = BoxStatus.REJECTED.value
    EDITED = BoxStatus.EDITED.value
    DELETED = BoxStatus.DELETED.value
    ALL = "all"


@dataclass(frozen=True)
class QueueFilter:
    """What a reviewer asked to see.

    classes: only images with a box of one of these classes (in the status asked for; images
        never touched and with no box drop out when a class is asked for).
    fp_reason: only images with a box rejected for this reason key.
    reviewer: only images this reviewer has acted on.
    """

    classes: tuple[str, ...] = ()
    state: ReviewState = ReviewState.TO_REVIEW
    split: str | None = None
    fp_reason: str | None = None
    reviewer: str | None = None


@dataclass(frozen=True)
class QueueCursor:
    """Where a page ended: the sort key and proposal id of its last item."""

    key: float
    proposal_id: int


@dataclass(frozen=True)
class QueueItem:
    image_id: int
    proposal_id: int
    uncertainty: float
    disagreement: float
    cursor: QueueCursor


@dataclass
class QueueState:
    """A reviewer's walk through the queue: the cursor and the prefetched items ahead."""

    order: QueueOrder = QueueOrder.UNCERTAINTY
    filters: QueueFilter = field(default_factory=QueueFilter)
    seed: int = 0
    cursor: QueueCursor | None = None
    ahead: list[QueueItem] = field(default_factory=list)
    exhausted: bool = False


def _sort_key(order: QueueOrder, seed: int) -> ColumnElement:
    if order == QueueOrder.UNCERTAINTY:
        return ProposalImage.uncertainty
    if order == QueueOrder.DISAGREEMENT:
        return ProposalImage.disagreement
    if order == QueueOrder.NEWEST:
        return ProposalImage.id
    return (ProposalImage.id * _RANDOM_MULTIPLIER + literal(seed % _RANDOM_MODULUS)) % (
        _RANDOM_MODULUS
    )


def _box_exists(*conditions: ColumnElement) -> ColumnElement:
    """Some non-reference box of this image meets `conditions`; probed per candidate."""
    return exists().where(
        Box.image_id == ProposalImage.image_id, Box.origin != BoxOrigin.REFERENCE, *conditions
    )


def _image_with_box(*conditions: ColumnElement) -> ColumnElement:
    """The same as `_box_exists`, written as IN (boxes meeting the conditions).

    For the rare states (rejected, edited, a reason): the database reads the few matching boxes
    through ix_box_status_origin and sorts their images, instead of probing every proposal in
    queue order until a page is full (measured on 100 000 images with 300 rejected boxes:
    12 ms against 1 s).
    """
    return ProposalImage.image_id.in_(
        select(Box.image_id).where(Box.origin != BoxOrigin.REFERENCE, *conditions)
    )


def _touched() -> ColumnElement:
    return exists().where(ReviewEvent.image_id == ProposalImage.image_id)


def _filter_conditions(
    session: Session, filters: QueueFilter, reviewer: str, now: datetime
) -> list[ColumnElement]:
    conditions: list[ColumnElement] = []

    # Only the latest proposal of each image counts: an older run's row would show it twice.
    newer = aliased(ProposalImage)
    conditions.append(
        ~exists().where(newer.image_id == ProposalImage.image_id, newer.id > ProposalImage.id)
    )

    # Another reviewer's live lease hides the image.
    conditions.append(
        ~exists().where(
            ImageLease.image_id == ProposalImage.image_id,
            ImageLease.reviewer != reviewer,
            ImageLease.expires_at > now,
        )
    )

    class_condition: list[ColumnElement] = []
    if filters.classes:
        class_ids = list(
            session.scalars(select(LabelClass.id).where(LabelClass.name.in_(filters.classes)))
        )
        class_condition = [Box.class_id.in_(class_ids)]

    state = ReviewState(filters.state)
    if state == ReviewState.TO_REVIEW:
        pending = _box_exists(Box.status == BoxStatus.PENDING, *class_condition)
        conditions.append(pending if filters.classes else or_(pending, ~_touched()))
    elif state == ReviewState.REVIEWED:
        conditions.append(_touched())
        conditions.append(~_box_exists(Box.status == BoxStatus.PENDING))
        if filters.classes:
            conditions.append(_box_exists(*class_condition))
    elif state == ReviewState.ALL:
        if filters.classes:
            conditions.append(_box_exists(*class_condition))
    else:
        conditions.append(_image_with_box(Box.status == state.value, *class_condition))

    if filters.fp_reason:
        conditions.append(
            _image_with_box(
                Box.status == BoxStatus.REJECTED, Box.false_positive_reason == filters.fp_reason
            )
        )
    if filters.reviewer:
        conditions.append(
            ProposalImage.image_id.in_(
                select(ReviewEvent.image_id).where(ReviewEvent.reviewer == filters.reviewer)
            )
        )
    if filters.split:
        conditions.append(
            exists().where(Image.id == ProposalImage.image_id, Image.split == filters.split)
        )
    return conditions


def queue_page(
    session: Session,
    *,
    reviewer: str,
    order: QueueOrder = QueueOrder.UNCERTAINTY,
    filters: QueueFilter | None = None,
    after: QueueCursor | None = None,
    limit: int = 20,
    seed: int = 0,
    now: datetime | None = None,
) -> list[QueueItem]:
    """The next `limit` images of the queue after `after` (None: from the start).

    Highest sort key first (most uncertain, most disagreement, newest; random is a fixed
    shuffle per seed), ties broken by proposal id. Images another reviewer leases are skipped.
    """
    filters = filters or QueueFilter()
    now = now or utcnow()
    key = _sort_key(QueueOrder(order), seed).label("key")
    query = select(
        ProposalImage.id,
        ProposalImage.image_id,
        ProposalImage.uncertainty,
        ProposalImage.disagreement,
        key,
    ).where(*_filter_conditions(session, filters, reviewer, now))
    sort_expr = _sort_key(QueueOrder(order), seed)
    if after is not None:
        query = query.where(tuple_(sort_expr, ProposalImage.id) < (after.key, after.proposal_id))
    query = query.order_by(sort_expr.desc(), ProposalImage.id.desc()).limit(limit)
    return [
        QueueItem(
            image_id=row.image_id,
            proposal_id=row.id,
            uncertainty=row.uncertainty,
            disagreement=row.disagreement,
            cursor=QueueCursor(key=float(row.key), proposal_id=row.id),
        )
        for row in session.execute(query)
    ]


def still_queued(
    session: Session,
    *,
    reviewer: str,
    item: QueueItem,
    filters: QueueFilter | None = None,
    now: datetime | None = None,
) -> bool:
    """Whether a prefetched item still belongs to the queue (nobody reviewed or leased it)."""
    filters = filters or QueueFilter()
    query = select(ProposalImage.id).where(
        ProposalImage.id == item.proposal_id,
        *_filter_conditions(session, filters, reviewer, now or utcnow()),
    )
    return session.scalar(query) is not None


# ---------------------------------------------------------------------------------------------
# Leases


def _upsert(session: Session):
    """The dialect's INSERT with ON CONFLICT; imported here, as the engine already loaded it.

    (The PostgreSQL dialect takes 30 ms to import, which a SQLite workspace never needs.)
    """
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


def acquire_lease(
    session: Session,
    *,
    image_id: int,
    reviewer: str,
    ttl: timedelta = LEASE_TTL,
    now: datetime | None = None,
) -> bool:
    """Take or renew the lease on an image; False when another reviewer holds a live one.

    One INSERT .. ON CONFLICT DO UPDATE WHERE (free, expired, or already ours): the database
    decides between two reviewers racing for the same image, not a read-then-write here.
    """
    now = now or utcnow()
    insert = _upsert(session)
    statement = insert(ImageLease).values(
        image_id=image_id, reviewer=reviewer, expires_at=now + ttl
    )
    statement = statement.on_conflict_do_update(
        index_elements=[ImageLease.image_id],
        set_={"reviewer": statement.excluded.reviewer, "expires_at": statement.excluded.expires_at},
        where=or_(ImageLease.reviewer == reviewer, ImageLease.expires_at <= now),
    )
    session.execute(statement)
    holder = session.scalar(select(ImageLease.reviewer).where(ImageLease.image_id == image_id))
    return holder == reviewer


def release_lease(session: Session, *, image_id: int, reviewer: str) -> None:
    """Give an image back (only the holder's own lease is removed)."""
    lease = session.get(ImageLease, image_id)
    if lease is not None and lease.reviewer == reviewer:
        session.delete(lease)
        session.flush()


def lease_holder(
    session: Session, *, image_id: int, now: datetime | None = None
) -> tuple[str, datetime] | None:
    """(reviewer, expires_at) of the live lease on an image, or None."""
    row = session.execute(
        select(ImageLease.reviewer, ImageLease.expires_at).where(
            and_(ImageLease.image_id == image_id, ImageLease.expires_at > (now or utcnow()))
        )
    ).first()
    return (row.reviewer, row.expires_at) if row else None


def release_expired(session: Session, *, now: datetime | None = None) -> int:
    """Delete leases past their time (housekeeping; the queue ignores them anyway)."""
    result = session.execute(
        ImageLease.__table__.delete().where(ImageLease.expires_at <= (now or utcnow()))
    )
    return result.rowcount or 0


# ---------------------------------------------------------------------------------------------
# Walking the queue


def claim_next(
    session: Session,
    *,
    reviewer: str,
    state: QueueState,
    page_size: int = 20,
    now: datetime | None = None,
) -> QueueItem | None:
    """Lease the next image of the queue for the reviewer and move the cursor past it.

    Prefetched items in `state.ahead` are used first, each checked again (another reviewer may
    have reviewed or leased it since it was fetched); a new page is read only when they run out.
    Returns None when the queue is empty. The caller commits, which makes the lease visible.
    """
    now = now or utcnow()
    while True:
        if not state.ahead:
            if state.exhausted:
                return None
            state.ahead = queue_page(
                session,
                reviewer=reviewer,
                order=state.order,
                filters=state.filters,
                after=state.cursor,
                limit=page_size,
                seed=state.seed,
                now=now,
            )
            if len(state.ahead) < page_size:
                state.exhausted = True
            if not state.ahead:
                return None
        item = state.ahead.pop(0)
        state.cursor = item.cursor
        if not still_queued(session, reviewer=reviewer, item=item, filters=state.filters, now=now):
            continue
        if acquire_lease(session, image_id=item.image_id, reviewer=reviewer, now=now):
            return item


def queue_size(
    session: Session,
    *,
    reviewer: str,
    filters: QueueFilter | None = None,
    now: datetime | None = None,
) -> int:
    """How many images the queue holds. A full count: for overview pages, not per keystroke."""
    filters = filters or QueueFilter()
    query = select(func.count(ProposalImage.id)).where(
        *_filter_conditions(session, filters, reviewer, now or utcnow())
    )
    return int(session.scalar(query) or 0)
