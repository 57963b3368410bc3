"""Queries behind `train classifier` and `propose`: training samples, model versions, proposal runs.

Small keyword-only functions that take a session. Bulk writes go in chunks (db.queries.CHUNK)
so one commit per chunk of images keeps a run resumable without a round trip per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from db.models import (
    Box,
    BoxOrigin,
    BoxStatus,
    Image,
    LabelClass,
    ModelVersion,
    Point,
    ProposalImage,
    ProposalRun,
    Tag,
    TagOrigin,
    utcnow,
)
from db.queries import chunked, image_tag_sets

# Tags training reads, later origins winning: a reviewer's word overrides the data's. Reference
# tags (from `ingest --tags-only` of held-out truth) and model tags are never trained on.
TRAINING_TAG_ORIGINS = (TagOrigin.GIVEN, TagOrigin.REVIEWER)

RUN_RUNNING = "running"
RUN_DONE = "done"


@dataclass
class TrainingImage:
    """One image for the classifier.

    tags: {class name: True present / False absent}; a missing class is unknown.
    points: (class name, x, y) in pixels of the original image.
    """

    image_id: int
    path: str
    width: int
    height: int
    tags: dict[str, bool] = field(default_factory=dict)
    points: list[tuple[str, float, float]] = field(default_factory=list)


def training_images(session: Session, *, splits: Sequence[str]) -> list[TrainingImage]:
    """Images of the given splits that say something a classifier can learn from.

    A class is present when a given or reviewer tag says so (the reviewer's wins), when a
    trusted box of it exists (given, human, or an accepted proposal), or when a reviewer put a
    point on it and no tag calls it absent. Images with no known class are left out.
    """
    names = {id_: name for id_, name in session.execute(select(LabelClass.id, LabelClass.name))}
    images = {
        row.id: TrainingImage(row.id, row.path, row.width, row.height)
        for row in session.execute(
            select(Image.id, Image.path, Image.width, Image.height)
            .where(Image.split.in_(list(splits)))
            .order_by(Image.id)
        )
    }
    for split in splits:
        for image_id, tags in image_tag_sets(
            session, origins=[str(o) for o in TRAINING_TAG_ORIGINS], split=split
        ).items():
            if image_id in images:
                images[image_id].tags.update(tags)

    # Boxes that train (as db.curation counts them) also say their class is present: given
    # boxes, accepted proposals, and a reviewer's drawn boxes (point-grown ones once accepted).
    standing = [str(BoxStatus.PENDING), str(BoxStatus.ACCEPTED)]
    trusted = or_(
        and_(Box.origin == BoxOrigin.GIVEN, Box.status.in_(standing)),
        and_(Box.origin == BoxOrigin.PSEUDO, Box.status == BoxStatus.ACCEPTED),
        and_(
            Box.origin == BoxOrigin.HUMAN,
            Box.status.in_(standing),
            or_(Box.status == BoxStatus.ACCEPTED, Box.point_id.is_(None)),
        ),
    )
    box_query = (
        select(Box.image_id, Box.class_id)
        .join(Image, Box.image_id == Image.id)
        .where(Image.split.in_(list(splits)), trusted)
        .distinct()
    )
    for image_id, class_id in session.execute(box_query):
        # Someone drew the object: that outranks an image-level "absent".
        images[image_id].tags[names[class_id]] = True

    point_query = (
        select(Point.image_id, Point.class_id, Point.x, Point.y)
        .join(Image, Point.image_id == Image.id)
        .where(Image.split.in_(list(splits)), Point.deleted.is_(False))
        .order_by(Point.id)
    )
    for image_id, class_id, x, y in session.execute(point_query):
        image, name = images[image_id], names[class_id]
        if image.tags.get(name) is False:
            continue  # points never override a tag that says the class is absent
        image.tags[name] = True
        image.points.append((name, float(x), float(y)))
    return [image for image in images.values() if image.tags]


# ----------------------------------------------------------------------------------------------
# Model versions.


def add_model_version(
    session: Session,
    *,
    kind: str,
    arch: str,
    path: str,
    classes: Sequence[str],
    config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> int:
    """Register a trained model; returns its id."""
    row = ModelVersion(
        kind=kind, arch=arch, path=path, classes=list(classes), config=config, metrics=metrics
    )
    session.add(row)
    session.flush()
    return row.id


def get_model_version(
    session: Session, *, kind: str, model_id: int | None = None
) -> ModelVersion | None:
    """The model version `model_id` (of that kind), or the newest of the kind when None."""
    query = select(ModelVersion).where(ModelVersion.kind == kind)
    if model_id is not None:
        query = query.where(ModelVersion.id == model_id)
    return session.scalar(query.order_by(ModelVersion.id.desc()).limit(1))


def registered_model_paths(session: Session, *, kind: str) -> set[str]:
    return set(session.scalars(select(ModelVersion.path).where(ModelVersion.kind == kind)))


# ----------------------------------------------------------------------------------------------
# Proposal runs.


def open_proposal_run(
    session: Session, *, model_version_id: int, split: str | None, params: dict[str, Any]
) -> tuple[int, bool]:
    """The unfinished run of this model over this split with the same params, else a new one.

    Returns:
        (run id, resumed): resumed is True when an interrupted run is continued.
    """
    query = (
        select(ProposalRun)
        .where(
            ProposalRun.model_version_id == model_version_id,
            ProposalRun.state == RUN_RUNNING,
            ProposalRun.split.is_(None) if split is None else ProposalRun.split == split,
        )
        .order_by(ProposalRun.id.desc())
    )
    for run in session.scalars(query):
        if run.params == params:
            return run.id, True
    run = ProposalRun(model_version_id=model_version_id, split=split, params=params)
    session.add(run)
    session.flush()
    return run.id, False


def images_to_propose(
    session: Session, *, run_id: int, split: str | None
) -> list[tuple[int, str, int, int]]:
    """(image id, path, width, height) of the split's images the run has not done, by id."""
    done = select(ProposalImage.image_id).where(ProposalImage.run_id == run_id)
    query = select(Image.id, Image.path, Image.width, Image.height).where(Image.id.notin_(done))
    if split is not None:
        query = query.where(Image.split == split)
    return [tuple(row) for row in session.execute(query.order_by(Image.id))]


@dataclass
class ProposedImage:
    """What `propose` stores for one image.

    probs: {class name: probability}.
    boxes: (class name, x1, y1, x2, y2, score) in pixels of the original image.
    """

    image_id: int
    probs: dict[str, float]
    boxes: list[tuple[str, float, float, float, float, float]]
    cam_dir: str | None
    mask_dir: str | None
    uncertainty: float = 0.0
    disagreement: float = 0.0


def write_proposals(
    session: Session, *, run_id: int, items: Sequence[ProposedImage], tag_threshold: float = 0.5
) -> None:
    """Store a chunk of proposals: one ProposalImage row each, the classifier's probabilities as
    model tags (present when >= tag_threshold; they replace the image's earlier model tags),
    and pseudo boxes (pending). Pending pseudo boxes of earlier runs on these images are marked
    deleted, so the review queue shows each image's latest proposals only; boxes a reviewer
    accepted, rejected or edited stay as they are.
    """
    if not items:
        return
    class_ids = {name: id_ for id_, name in session.execute(select(LabelClass.id, LabelClass.name))}
    image_ids = [item.image_id for item in items]
    for batch in chunked(image_ids):
        session.execute(delete(Tag).where(Tag.image_id.in_(batch), Tag.origin == TagOrigin.MODEL))
        session.execute(
            update(Box)
            .where(
                Box.image_id.in_(batch),
                Box.origin == BoxOrigin.PSEUDO,
                Box.status == BoxStatus.PENDING,
                Box.proposal_run_id != run_id,
            )
            .values(status=BoxStatus.DELETED, version=Box.version + 1, updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    now = utcnow()
    session.execute(
        ProposalImage.__table__.insert(),
        [
            {
                "run_id": run_id,
                "image_id": item.image_id,
                "probs": item.probs,
                "cam_dir": item.cam_dir,
                "mask_dir": item.mask_dir,
                "uncertainty": item.uncertainty,
                "disagreement": item.disagreement,
                "created_at": now,
            }
            for item in items
        ],
    )
    tags = [
        {
            "image_id": item.image_id,
            "class_id": class_ids[name],
            "present": prob >= tag_threshold,
            "origin": str(TagOrigin.MODEL),
            "score": prob,
            "proposal_run_id": run_id,
            "version": 1,
            "updated_at": now,
        }
        for item in items
        for name, prob in item.probs.items()
    ]
    if tags:
        session.execute(Tag.__table__.insert(), tags)
    boxes = [
        {
            "image_id": item.image_id,
            "class_id": class_ids[name],
            "x1": x1,
            "y1": y1,
            "x2": x2,
            "y2": y2,
            "origin": str(BoxOrigin.PSEUDO),
            "status": str(BoxStatus.PENDING),
            "score": score,
            "proposal_run_id": run_id,
            "version": 1,
            "created_at": now,
            "updated_at": now,
        }
        for item in items
        for name, x1, y1, x2, y2, score in item.boxes
    ]
    if boxes:
        session.execute(Box.__table__.insert(), boxes)
    session.execute(
        update(ProposalRun)
        .where(ProposalRun.id == run_id)
        .values(image_count=ProposalRun.image_count + len(items))
    )


def finish_proposal_run_if_complete(session: Session, *, run_id: int) -> bool:
    """Mark the run done when every image of its split has a ProposalImage row."""
    run = session.get(ProposalRun, run_id)
    total = select(func.count(Image.id))
    if run.split is not None:
        total = total.where(Image.split == run.split)
    done = select(func.count(ProposalImage.id)).where(ProposalImage.run_id == run_id)
    if session.scalar(done) < session.scalar(total):
        return False
    run.state = RUN_DONE
    run.finished_at = utcnow()
    return True
