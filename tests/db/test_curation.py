"""The curated set a retrain job freezes: what is trained on, what is a hard negative, what is
held out, and that evaluation splits never leak into training."""

from __future__ import annotations

import random

import pytest
from sqlalchemy import select

from db.curation import dataset_items, freeze_dataset_version
from db.models import (
    Box,
    BoxOrigin,
    BoxStatus,
    DatasetItem,
    Image,
    LabelClass,
    Point,
    Tag,
    TagOrigin,
)

FIRE, SMOKE = 0, 1


class Rows:
    """Adds images and annotations with little ceremony."""

    def __init__(self, session):
        self.session = session
        self.class_ids = dict(session.execute(select(LabelClass.index, LabelClass.id)).all())
        self.count = 0

    def image(self, split: str = "train") -> Image:
        self.count += 1
        image = Image(
            path=f"/data/{self.count}.jpg",
            content_hash=f"{self.count:064x}",
            width=100,
            height=80,
            split=split,
        )
        self.session.add(image)
        self.session.flush()
        return image

    def box(self, image, cls, origin, status=BoxStatus.PENDING, xy=(10, 10, 30, 30), **kw) -> Box:
        box = Box(
            image_id=image.id,
            class_id=self.class_ids[cls],
            x1=xy[0],
            y1=xy[1],
            x2=xy[2],
            y2=xy[3],
            origin=origin,
            status=status,
            **kw,
        )
        self.session.add(box)
        self.session.flush()
        return box

    def tag(self, image, cls, present, origin=TagOrigin.GIVEN) -> None:
        self.session.add(
            Tag(image_id=image.id, class_id=self.class_ids[cls], present=present, origin=origin)
        )

    def point(self, image, cls, x=50.0, y=40.0, deleted=False) -> Point:
        point = Point(
            image_id=image.id,
            class_id=self.class_ids[cls],
            x=x,
            y=y,
            reviewer="ana",
            deleted=deleted,
        )
        self.session.add(point)
        self.session.flush()
        return point


def _items(session, version_id):
    return {item.image_id: item for item in dataset_items(session, dataset_version_id=version_id)}


def test_training_boxes_are_what_reviewers_accepted_or_made(workspace):
    with workspace.transaction() as session:
        rows = Rows(session)
        image = rows.image()
        rows.box(image, FIRE, BoxOrigin.PSEUDO, BoxStatus.ACCEPTED, (1, 1, 11, 11))
        rows.box(image, FIRE, BoxOrigin.PSEUDO, BoxStatus.PENDING, (2, 2, 12, 12))
        rows.box(
            image,
            FIRE,
            BoxOrigin.PSEUDO,
            BoxStatus.REJECTED,
            (3, 3, 13, 13),
            false_positive_reason="lamp",
        )
        replacement = rows.box(image, SMOKE, BoxOrigin.HUMAN, BoxStatus.ACCEPTED, (4, 4, 44, 44))
        rows.box(
            image,
            SMOKE,
            BoxOrigin.PSEUDO,
            BoxStatus.EDITED,
            (5, 5, 15, 15),
            replaced_by_id=replacement.id,
        )
        rows.box(image, FIRE, BoxOrigin.HUMAN, BoxStatus.PENDING, (6, 6, 16, 16))  # drawn
        point = rows.point(image, FIRE)
        rows.box(
            image, FIRE, BoxOrigin.HUMAN, BoxStatus.PENDING, (7, 7, 17, 17), point_id=point.id
        )  # a point's proposal, not yet accepted
        rows.box(image, FIRE, BoxOrigin.HUMAN, BoxStatus.DELETED, (8, 8, 18, 18))
        rows.box(image, SMOKE, BoxOrigin.GIVEN, BoxStatus.ACCEPTED, (9, 9, 19, 19))
        rows.box(image, SMOKE, BoxOrigin.MODEL, BoxStatus.PENDING, (10, 10, 20, 20))
        rows.box(image, FIRE, BoxOrigin.REFERENCE, BoxStatus.PENDING, (11, 11, 21, 21))
        rows.point(image, SMOKE, deleted=True)
        version = freeze_dataset_version(session, eval_splits=["val"])
        version_id = version.id

    with workspace.session() as session:
        item = _items(session, version_id)[image.id]
        assert item.role == "train"
        assert sorted(item.boxes) == [
            [1, 1, 11, 11, FIRE],
            [4, 4, 44, 44, SMOKE],
            [6, 6, 16, 16, FIRE],
            [9, 9, 19, 19, SMOKE],
        ]
        assert item.points == [[50.0, 40.0, FIRE]]
        assert item.rejected == [[3, 3, 13, 13, FIRE, "lamp"]]
        assert item.path == "/data/1.jpg" and (item.width, item.height) == (100, 80)


def test_reference_boxes_of_training_splits_only_on_request(workspace):
    with workspace.transaction() as session:
        rows = Rows(session)
        image = rows.image("train")
        rows.box(image, FIRE, BoxOrigin.REFERENCE, xy=(1, 2, 30, 40))
        rows.tag(image, FIRE, True, TagOrigin.REFERENCE)
        rows.tag(image, SMOKE, False, TagOrigin.REFERENCE)
        default = freeze_dataset_version(session, eval_splits=["val"]).id
        opted_in = freeze_dataset_version(session, eval_splits=["val"], include_reference=True)
        opted_in_id, summary = opted_in.id, opted_in.summary

    with workspace.session() as session:
        assert _items(session, default) == {}
        item = _items(session, opted_in_id)[image.id]
        assert item.boxes == [[1, 2, 30, 40, FIRE]]
        assert item.tags == {"fire": 1, "smoke": 0}
    assert summary["include_reference"] is True
    assert summary["boxes"] == {"train": {"fire": 1}}


def test_hard_negatives(workspace):
    with workspace.transaction() as session:
        rows = Rows(session)
        rejected_only = rows.image()
        rows.box(
            rejected_only, FIRE, BoxOrigin.PSEUDO, BoxStatus.REJECTED, false_positive_reason="torch"
        )
        nothing_here = rows.image()
        rows.tag(nothing_here, FIRE, False, TagOrigin.REVIEWER)
        rows.tag(nothing_here, SMOKE, False, TagOrigin.REVIEWER)
        # db.review's "nothing here" rejects the image's boxes without a reason key.
        rows.box(nothing_here, SMOKE, BoxOrigin.PSEUDO, BoxStatus.REJECTED)
        given_clean = rows.image()
        rows.tag(given_clean, FIRE, False)
        rows.tag(given_clean, SMOKE, False)
        # Fire is there (given tag) but nobody boxed it: neither example nor negative.
        unboxed_fire = rows.image()
        rows.tag(unboxed_fire, FIRE, True)
        rows.box(
            unboxed_fire, FIRE, BoxOrigin.PSEUDO, BoxStatus.REJECTED, false_positive_reason="sunset"
        )
        # A reviewer's "no fire" beats a given "fire".
        overruled = rows.image()
        rows.tag(overruled, FIRE, True)
        rows.tag(overruled, FIRE, False, TagOrigin.REVIEWER)
        # Only one class known absent, nothing reviewed: unknown, left out.
        half_known = rows.image()
        rows.tag(half_known, FIRE, False)
        # A model's guess does not make a negative.
        model_says = rows.image()
        rows.tag(model_says, FIRE, False, TagOrigin.MODEL)
        rows.tag(model_says, SMOKE, False, TagOrigin.MODEL)
        version = freeze_dataset_version(session, eval_splits=["val"])
        version_id, summary = version.id, version.summary

    with workspace.session() as session:
        items = _items(session, version_id)
    assert {i: items[i].role for i in items} == {
        rejected_only.id: "negative",
        nothing_here.id: "negative",
        given_clean.id: "negative",
        overruled.id: "negative",
    }
    assert items[rejected_only.id].boxes == []
    assert items[rejected_only.id].rejected[0][5] == "torch"
    assert items[nothing_here.id].rejected[0][4:] == [SMOKE, "nothing here"]
    assert summary["images"] == {"negative": 4}
    assert summary["negatives_by_reason"] == {"torch": 1, "nothing here": 3}


def test_evaluation_split_truth(workspace):
    with workspace.transaction() as session:
        rows = Rows(session)
        boxed = rows.image("val")
        rows.box(boxed, FIRE, BoxOrigin.REFERENCE, xy=(1, 1, 20, 20))
        rows.box(boxed, SMOKE, BoxOrigin.PSEUDO, BoxStatus.ACCEPTED, xy=(2, 2, 30, 30))
        rows.box(boxed, SMOKE, BoxOrigin.PSEUDO, BoxStatus.PENDING, xy=(3, 3, 30, 30))
        rows.box(boxed, FIRE, BoxOrigin.MODEL, xy=(4, 4, 30, 30))
        rows.point(boxed, FIRE)
        clean = rows.image("val")
        rows.tag(clean, FIRE, False, TagOrigin.REFERENCE)
        rows.tag(clean, SMOKE, False, TagOrigin.REFERENCE)
        unboxed = rows.image("val")
        rows.tag(unboxed, FIRE, True, TagOrigin.REFERENCE)
        version_id = freeze_dataset_version(session, eval_splits=["val"]).id

    with workspace.session() as session:
        items = _items(session, version_id)
    assert {i: items[i].role for i in items} == {boxed.id: "eval", clean.id: "eval"}
    assert sorted(items[boxed.id].boxes) == [[1, 1, 20, 20, FIRE], [2, 2, 30, 30, SMOKE]]
    assert items[boxed.id].points == []  # points are training seeds, not truth
    assert items[clean.id].tags == {"fire": 0, "smoke": 0}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evaluation_splits_never_leak_into_training(workspace, seed):
    """Random annotations on random splits, frozen with random options: an image of an
    evaluation split is only ever an "eval" item, and every trainable annotation of a
    training split is in a training item."""
    rng = random.Random(seed)
    splits = ["train", "val", "test", "extra"]
    eval_splits = rng.sample(splits, 2)
    origins = list(BoxOrigin)
    statuses = list(BoxStatus)
    with workspace.transaction() as session:
        rows = Rows(session)
        split_of = {}
        for _ in range(60):
            image = rows.image(rng.choice(splits))
            split_of[image.id] = image.split
            for _ in range(rng.randint(0, 3)):
                rows.box(
                    image,
                    rng.choice([FIRE, SMOKE]),
                    rng.choice(origins),
                    rng.choice(statuses),
                    false_positive_reason="lamp",
                )
            for cls in (FIRE, SMOKE):
                if rng.random() < 0.4:
                    rows.tag(image, cls, rng.random() < 0.5, rng.choice(list(TagOrigin)))
            if rng.random() < 0.2:
                rows.point(image, FIRE)
        include_reference = rng.random() < 0.5
        version_id = freeze_dataset_version(
            session, eval_splits=eval_splits, include_reference=include_reference
        ).id
        accepted = session.execute(
            select(Box.image_id).where(
                Box.origin == BoxOrigin.PSEUDO, Box.status == BoxStatus.ACCEPTED
            )
        ).all()

    with workspace.session() as session:
        items = list(
            session.scalars(select(DatasetItem).where(DatasetItem.dataset_version_id == version_id))
        )
    assert items, "the random set should yield some items"
    for item in items:
        in_eval = split_of[item.image_id] in eval_splits
        assert (item.role == "eval") == in_eval, (item.role, split_of[item.image_id])
    trained = {item.image_id for item in items if item.role == "train"}
    for (image_id,) in accepted:
        if split_of[image_id] not in eval_splits:
            assert image_id in trained
