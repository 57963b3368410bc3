"""The schema: every table pyrolabel keeps, as typed SQLAlchemy 2.0 models.

Coordinates are pixels of the original image as a viewer shows it (EXIF orientation applied),
boxes are (x1, y1, x2, y2) with 0 <= x1 < x2 <= width. Timestamps are timezone-aware UTC.
Masks and CAMs are PNG files in the workspace; rows hold their relative paths, never pixels.

Rows a reviewer can change (tags, boxes, points) carry a `version` that SQLAlchemy bumps on
every update and checks on flush, so two reviewers cannot overwrite each other silently.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC timestamp on every backend (SQLite drops the zone on its own)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; pass a timezone-aware UTC time")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# Stable constraint names, so migrations work on SQLite (batch mode) and PostgreSQL alike.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


class TagOrigin(enum.StrEnum):
    GIVEN = "given"  # came with the data (ingest)
    REVIEWER = "reviewer"  # a person said so in the app
    MODEL = "model"  # a classifier's probability (score holds it)
    REFERENCE = "reference"  # held-out truth from `ingest --tags-only`; training never reads it


class BoxOrigin(enum.StrEnum):
    REFERENCE = "reference"  # ingested with --tags-only: scored against, never trained on
    GIVEN = "given"  # ingested boxes a team already trusts (trained on)
    PSEUDO = "pseudo"  # proposed from a mask
    HUMAN = "human"  # drawn or corrected by a reviewer, or grown from a reviewer's point
    MODEL = "model"  # a detector's prediction


class BoxStatus(enum.StrEnum):
    PENDING = "pending"
    ACCEPTED = "accepted"
    REJECTED = "rejected"  # a false positive; false_positive_reason says why
    EDITED = "edited"  # replaced by a corrected box (see Box.replaced_by_id)
    DELETED = "deleted"


class MaskOrigin(enum.StrEnum):
    REFERENCE = "reference"
    GIVEN = "given"
    PSEUDO = "pseudo"


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_JOB_STATES = (JobState.QUEUED, JobState.RUNNING)


class Setting(Base):
    """Workspace-wide settings as JSON values (e.g. "oidc", "review_threshold")."""

    __tablename__ = "setting"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[dict[str, Any] | list[Any] | None] = mapped_column(JSON)


class LabelClass(Base):
    """A class the workspace detects ("fire", "smoke"); `index` is its position in models."""

    __tablename__ = "label_class"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    index: Mapped[int] = mapped_column(Integer, unique=True)


class FalsePositiveReason(Base):
    """Why a reviewer rejected a box; the list is editable per workspace."""

    __tablename__ = "false_positive_reason"

    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(32), unique=True)
    label: Mapped[str] = mapped_column(String(128))
    ordinal: Mapped[int] = mapped_column(Integer, default=0)
    active: Mapped[bool] = mapped_column(Boolean, default=True)


DEFAULT_FALSE_POSITIVE_REASONS = (
    ("torch", "Patrol light or torch"),
    ("lamp", "Lamp or glare"),
    ("sunset", "Sunset or sky"),
    ("reflection", "Reflection"),
    ("vehicle", "Vehicle lights"),
    ("other", "Other (free text)"),
)


class Image(Base):
    """An image file. It stays where it is; `content_hash` recognises it when moved."""

    __tablename__ = "image"

    id: Mapped[int] = mapped_column(primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    content_hash: Mapped[str] = mapped_column(String(64), unique=True)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    split: Mapped[str] = mapped_column(String(32), default="train", index=True)
    source: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    tags: Mapped[list[Tag]] = relationship(back_populates="image", cascade="all, delete-orphan")
    boxes: Mapped[list[Box]] = relationship(back_populates="image", cascade="all, delete-orphan")
    points: Mapped[list[Point]] = relationship(back_populates="image", cascade="all, delete-orphan")
    masks: Mapped[list[Mask]] = relationship(back_populates="image", cascade="all, delete-orphan")

    __table_args__ = (CheckConstraint("width > 0 AND height > 0", name="positive_size"),)


class Tag(Base):
    """An image-level statement: class present or absent, from one origin."""

    __tablename__ = "tag"

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("image.id", ondelete="CASCADE"), index=True)
    class_id: Mapped[int] = mapped_column(ForeignKey("label_class.id", ondelete="CASCADE"))
    present: Mapped[bool] = mapped_column(Boolean)
    origin: Mapped[str] = mapped_column(String(16))
    score: Mapped[float | None] = mapped_column(Float)
    proposal_run_id: Mapped[int | None] = mapped_column(
        ForeignKey("proposal_run.id", ondelete="CASCADE")
    )
    version: Mapped[int] = mapped_column(Integer, default=1)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    updated_by: Mapped[str | None] = mapped_column(String(128))

    image: Mapped[Image] = relationship(back_populates="tags")
    label_class: Mapped[LabelClass] = relationship()

    __mapper_args__ = {"version_id_col": version}
    __table_args__ = (
        UniqueConstraint("image_id", "class_id", "origin", name="uq_tag_image_class_origin"),
    )


class ProposalRun(Base):
    """One `propose` pass of a classifier over a split."""

    __tablename__ = "proposal_run"

    id: Mapped[int] = mapped_column(primary_key=True)
    model_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_version.id", ondelete="SET NULL")
    )
    split: Mapped[str | None] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), default="running")
    params: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    image_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()


class ProposalImage(Base):
    """What one proposal run computed for one image; also what the review queue sorts by.

    probs: {class name: probability}. uncertainty: closeness of probabilities and box scores to
    their thresholds (1 = on the threshold). disagreement: share of CAM mass outside every box.
    """

    __tablename__ = "proposal_image"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("proposal_run.id", ondelete="CASCADE"))
    image_id: Mapped[int] = mapped_column(ForeignKey("image.id", ondelete="CASCADE"), index=True)
    probs: Mapped[dict[str, Any]] = mapped_column(JSON)
    cam_dir: Mapped[str | None] = mapped_column(Text)  # relative to the workspace
    mask_dir: Mapped[str | None] = mapped_column(Text)
    uncertainty: Mapped[float] = mapped_column(Float, default=0.0, index=True)
    disagreement: Mapped[float] = mapped_column(Float, default=0.0, index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("run_id", "image_id", name="uq_proposal_image_run_image"),)


class Box(Base):
    """A box of one class on one image; see BoxOrigin and BoxStatus for its life."""

    __tablename__ = "box"

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("image.id", ondelete="CASCADE"))
    class_id: Mapped[int] = mapped_column(ForeignKey("label_class.id", ondelete="CASCADE"))
    x1: Mapped[float] = mapped_column(Float)
    y1: Mapped[float] = mapped_column(Float)
    x2: Mapped[float] = mapped_column(Float)
    y2: Mapped[float] = mapped_column(Float)
    origin: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=BoxStatus.PENDING)
    score: Mapped[float | None] = mapped_column(Float)
    false_positive_reason: Mapped[str | None] = mapped_column(String(32))
    false_positive_note: Mapped[str | None] = mapped_column(Text)
    proposal_run_id: Mapped[int | None] = mapped_column(
        ForeignKey("proposal_run.id", ondelete="CASCADE"), index=True
    )
    point_id: Mapped[int | None] = mapped_column(ForeignKey("point.id", ondelete="SET NULL"))
    replaced_by_id: Mapped[int | None] = mapped_column(ForeignKey("box.id", ondelete="SET NULL"))
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    updated_by: Mapped[str | None] = mapped_column(String(128))

    image: Mapped[Image] = relationship(back_populates="boxes")
    label_class: Mapped[LabelClass] = relationship()

    __mapper_args__ = {"version_id_col": version}
    __table_args__ = (
        CheckConstraint("x1 < x2 AND y1 < y2", name="positive_area"),
        Index("ix_box_image_status", "image_id", "status"),
        Index("ix_box_status_origin", "status", "origin"),
    )


class Mask(Base):
    """A binary mask PNG (255 = the class) for one class of one image."""

    __tablename__ = "mask"

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("image.id", ondelete="CASCADE"), index=True)
    class_id: Mapped[int] = mapped_column(ForeignKey("label_class.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(Text)  # absolute, or relative to the workspace
    origin: Mapped[str] = mapped_column(String(16))
    proposal_run_id: Mapped[int | None] = mapped_column(
        ForeignKey("proposal_run.id", ondelete="CASCADE")
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    image: Mapped[Image] = relationship(back_populates="masks")

    __table_args__ = (
        UniqueConstraint("image_id", "class_id", "origin", "proposal_run_id", name="uq_mask_key"),
    )


class Point(Base):
    """A reviewer's click on an object the model missed; a foreground seed for training."""

    __tablename__ = "point"

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("image.id", ondelete="CASCADE"), index=True)
    class_id: Mapped[int] = mapped_column(ForeignKey("label_class.id", ondelete="CASCADE"))
    x: Mapped[float] = mapped_column(Float)
    y: Mapped[float] = mapped_column(Float)
    reviewer: Mapped[str] = mapped_column(String(128))
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    image: Mapped[Image] = relationship(back_populates="points")

    __mapper_args__ = {"version_id_col": version}


class ReviewEvent(Base):
    """Append-only history of every change to a tag, box or point; undo reads it.

    before / after: the changed row as a dict (None when created / deleted).
    """

    __tablename__ = "review_event"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    reviewer: Mapped[str] = mapped_column(String(128), index=True)
    action: Mapped[str] = mapped_column(String(32))
    entity: Mapped[str] = mapped_column(String(16))  # "box", "tag", "point", "image"
    entity_id: Mapped[int | None] = mapped_column(Integer)
    image_id: Mapped[int | None] = mapped_column(
        ForeignKey("image.id", ondelete="CASCADE"), index=True
    )
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    undoes_id: Mapped[int | None] = mapped_column(ForeignKey("review_event.id"))


class ImageLease(Base):
    """Who is looking at an image now; a lease that expires keeps two reviewers apart."""

    __tablename__ = "image_lease"

    image_id: Mapped[int] = mapped_column(
        ForeignKey("image.id", ondelete="CASCADE"), primary_key=True
    )
    reviewer: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = mapped_column(index=True)


class DatasetVersion(Base):
    """The frozen list a job trained on: images, their annotations and roles, at job start."""

    __tablename__ = "dataset_version"

    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    name: Mapped[str | None] = mapped_column(String(128))
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    items: Mapped[list[DatasetItem]] = relationship(
        back_populates="dataset_version", cascade="all, delete-orphan"
    )


class DatasetItem(Base):
    """One image of a dataset version. role: "train", "eval" or "negative" (hard negative).

    annotations: {"boxes": [[x1, y1, x2, y2, class_index], ...], "points": [[x, y, class_index]],
    "tags": {class name: 0 or 1}} as they were when the version was frozen.
    """

    __tablename__ = "dataset_item"

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_version_id: Mapped[int] = mapped_column(
        ForeignKey("dataset_version.id", ondelete="CASCADE"), index=True
    )
    image_id: Mapped[int] = mapped_column(ForeignKey("image.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(16))
    annotations: Mapped[dict[str, Any]] = mapped_column(JSON)

    dataset_version: Mapped[DatasetVersion] = relationship(back_populates="items")


class ModelVersion(Base):
    """A trained network: kind "classifier", "teacher" or "student"; its checkpoint file."""

    __tablename__ = "model_version"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), index=True)
    arch: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)  # relative to the workspace
    classes: Mapped[list[Any]] = mapped_column(JSON)
    config: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    dataset_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("dataset_version.id", ondelete="SET NULL")
    )
    job_id: Mapped[int | None] = mapped_column(ForeignKey("job.id", ondelete="SET NULL"))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_version.id"))  # teacher
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    """A long piece of work (retrain) run by a worker process; the app polls this row.

    active_slot is 1 while the job is queued or running and NULL otherwise; its unique
    constraint is how the database enforces one active job per workspace.
    """

    __tablename__ = "job"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED, index=True)
    active_slot: Mapped[int | None] = mapped_column(Integer, unique=True, default=1)
    options: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    stage: Mapped[str | None] = mapped_column(String(32))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    epoch: Mapped[int | None] = mapped_column(Integer)
    step: Mapped[int | None] = mapped_column(Integer)
    losses: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    eta_s: Mapped[float | None] = mapped_column(Float)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    log_path: Mapped[str | None] = mapped_column(Text)
    pid: Mapped[int | None] = mapped_column(Integer)
    host: Mapped[str | None] = mapped_column(String(255))  # where pid lives
    # What finished stages left behind ({"dataset_version_id": .., "teacher": {...}, ...}), so a
    # resumed job skips them and picks up their checkpoints and model versions.
    results: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_by: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()

    __table_args__ = (CheckConstraint("active_slot IS NULL OR active_slot = 1", name="one_slot"),)
