"""Small keyword-only queries over the schema, shared by ingest, export, the app and tests."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Box, Image, LabelClass, Mask, Tag

T = TypeVar("T")

# Rows per IN (...) list or bulk insert: well under SQLite's 32 766 bound parameters and
# PostgreSQL's 65 535, and large enough that round trips do not dominate.
CHUNK = 500


def chunked(items: Sequence[T] | Iterable[T], size: int = CHUNK) -> Iterator[list[T]]:
    """Consecutive lists of at most `size` items."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def class_ids(session: Session) -> dict[str, int]:
    """{class name: label_class.id} for the workspace's classes."""
    return {name: id_ for id_, name in session.execute(select(LabelClass.id, LabelClass.name))}


def class_names(session: Session) -> dict[int, str]:
    """{label_class.id: class name}."""
    return {id_: name for name, id_ in class_ids(session).items()}


def image_ids_by_hash(session: Session, *, hashes: Iterable[str]) -> dict[str, int]:
    """{content hash: image.id} for the hashes that are already in the workspace."""
    found: dict[str, int] = {}
    for batch in chunked(list(hashes)):
        rows = session.execute(
            select(Image.content_hash, Image.id).where(Image.content_hash.in_(batch))
        )
        found.update({h: i for h, i in rows})
    return found


def images_in_split(session: Session, *, split: str | None = None) -> list[Image]:
    """Images of a split (every image when split is None), in id order."""
    query = select(Image).order_by(Image.id)
    if split is not None:
        query = query.where(Image.split == split)
    return list(session.scalars(query))


def count_images(session: Session, *, split: str | None = None) -> int:
    query = select(func.count(Image.id))
    if split is not None:
        query = query.where(Image.split == split)
    return int(session.scalar(query) or 0)


def splits(session: Session) -> dict[str, int]:
    """{split name: image count}."""
    rows = session.execute(select(Image.split, func.count(Image.id)).group_by(Image.split))
    return {split: count for split, count in rows}


def tag_counts(
    session: Session, *, origin: str | None = None, split: str | None = None
) -> dict[str, dict[bool, int]]:
    """{class name: {True: images tagged present, False: images tagged absent}}."""
    query = (
        select(LabelClass.name, Tag.present, func.count(Tag.id))
        .join(LabelClass, Tag.class_id == LabelClass.id)
        .group_by(LabelClass.name, Tag.present)
    )
    if origin is not None:
        query = query.where(Tag.origin == origin)
    if split is not None:
        query = query.join(Image, Tag.image_id == Image.id).where(Image.split == split)
    counts: dict[str, dict[bool, int]] = {}
    for name, present, count in session.execute(query):
        counts.setdefault(name, {True: 0, False: 0})[bool(present)] = count
    return counts


def image_tag_sets(
    session: Session, *, origins: Sequence[str], split: str | None = None
) -> dict[int, dict[str, bool]]:
    """{image id: {class name: present}} from tags of the given origins.

    When several origins tag the same class of one image, the later origin in `origins` wins
    (pass ("given", "reviewer") to let a reviewer's word override the data's).
    """
    query = (
        select(Tag.image_id, LabelClass.name, Tag.present, Tag.origin)
        .join(LabelClass, Tag.class_id == LabelClass.id)
        .where(Tag.origin.in_(list(origins)))
    )
    if split is not None:
        query = query.join(Image, Tag.image_id == Image.id).where(Image.split == split)
    rank = {origin: i for i, origin in enumerate(origins)}
    best: dict[tuple[int, str], tuple[int, bool]] = {}
    for image_id, name, present, origin in session.execute(query):
        key = (image_id, name)
        if key not in best or rank[origin] >= best[key][0]:
            best[key] = (rank[origin], bool(present))
    result: dict[int, dict[str, bool]] = {}
    for (image_id, name), (_, present) in best.items():
        result.setdefault(image_id, {})[name] = present
    return result


def box_counts(session: Session, *, split: str | None = None) -> dict[tuple[str, str], int]:
    """{(origin, status): number of boxes}."""
    query = select(Box.origin, Box.status, func.count(Box.id)).group_by(Box.origin, Box.status)
    if split is not None:
        query = query.join(Image, Box.image_id == Image.id).where(Image.split == split)
    return {(origin, status): count for origin, status, count in session.execute(query)}


def count_masks(session: Session, *, origin: str | None = None) -> int:
    query = select(func.count(Mask.id))
    if origin is not None:
        query = query.where(Mask.origin == origin)
    return int(session.scalar(query) or 0)
