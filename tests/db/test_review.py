"""Review actions: state changes, append-only events, stale edits refused, undo walking back."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import func, select

from db import review
from db.models import Box, BoxOrigin, BoxStatus, Point, ReviewEvent, Tag, TagOrigin
from db.review import ReviewError, StaleEditError
from db.synthetic import SyntheticConfig, build_proposals


@pytest.fixture
def proposals(workspace):
    return build_proposals(workspace, SyntheticConfig(n_images=4, boxes_per_image=3, seed=1))


def _boxes(session, image_id):
    return list(session.scalars(select(Box).where(Box.image_id == image_id).order_by(Box.id)))


def _state(workspace):
    """Everything a review can change, as comparable tuples."""
    with workspace.session() as session:
        boxes = [
            (b.id, b.class_id, b.x1, b.y1, b.x2, b.y2, b.status, b.false_positive_reason,
             b.false_positive_note, b.replaced_by_id)
            for b in session.scalars(select(Box).order_by(Box.id))
        ]  # fmt: skip
        points = [(p.id, p.deleted) for p in session.scalars(select(Point).order_by(Point.id))]
        tags = [
            (t.image_id, t.class_id, t.origin, t.present)
            for t in session.scalars(select(Tag).order_by(Tag.id))
        ]
    return boxes, points, tags


def _event_count(workspace):
    with workspace.session() as session:
        return session.scalar(select(func.count()).select_from(ReviewEvent))


def test_accept_records_event_and_bumps_version(workspace, proposals):
    image_id = proposals.image_ids[0]
    with workspace.transaction() as session:
        box = _boxes(session, image_id)[0]
        review.accept_box(session, box_id=box.id, version=box.version, reviewer="alice")
    with workspace.session() as session:
        box = session.get(Box, box.id)
        assert (box.status, box.version, box.updated_by) == (BoxStatus.ACCEPTED, 2, "alice")
        (event,) = session.scalars(select(ReviewEvent))
        assert (event.reviewer, event.action, event.entity, event.entity_id) == (
            "alice",
            "accept",
            "box",
            box.id,
        )
        assert event.image_id == image_id
        assert event.before["status"] == "pending" and event.before["version"] == 1
        assert event.after["status"] == "accepted" and event.after["version"] == 2
        assert event.at.tzinfo is not None


def test_stale_write_is_refused_and_not_applied(workspace, proposals):
    image_id = proposals.image_ids[0]
    with workspace.session() as session:
        seen = _boxes(session, image_id)[0]  # bob loads the image: version 1
    with workspace.transaction() as session:
        review.accept_box(session, box_id=seen.id, version=seen.version, reviewer="alice")
    events = _event_count(workspace)
    with pytest.raises(StaleEditError, match=r"box \d+ was changed by alice at .* UTC, reload"):
        with workspace.transaction() as session:
            review.reject_box(
                session, box_id=seen.id, version=seen.version, reviewer="bob", reason="lamp"
            )
    with workspace.session() as session:
        box = session.get(Box, seen.id)
        assert (box.status, box.updated_by, box.false_positive_reason) == (
            "accepted",
            "alice",
            None,
        )
    assert _event_count(workspace) == events


def test_reject_reasons(workspace, proposals):
    image_id = proposals.image_ids[1]
    with workspace.transaction() as session:
        first, second, third = _boxes(session, image_id)
        with pytest.raises(ReviewError, match="unknown false-positive reason"):
            review.reject_box(session, box_id=first.id, version=1, reviewer="a", reason="ufo")
        with pytest.raises(ReviewError, match="needs a note"):
            review.reject_box(session, box_id=first.id, version=1, reviewer="a", reason="other")
        review.reject_box(session, box_id=first.id, version=1, reviewer="a", reason="torch")
        review.reject_box(
            session, box_id=second.id, version=1, reviewer="a", reason="other", note=" a flag "
        )
    with workspace.session() as session:
        first, second, _ = _boxes(session, image_id)
        assert (first.status, first.false_positive_reason) == ("rejected", "torch")
        assert (second.false_positive_reason, second.false_positive_note) == ("other", "a flag")


def test_reference_and_replaced_boxes_cannot_be_reviewed(workspace, proposals):
    image_id = proposals.image_ids[0]
    with workspace.transaction() as session:
        reference = Box(
            image_id=image_id, class_id=1, x1=1, y1=1, x2=5, y2=5, origin=BoxOrigin.REFERENCE
        )
        session.add(reference)
        session.flush()
        with pytest.raises(ReviewError, match="reference"):
            review.accept_box(session, box_id=reference.id, version=1, reviewer="a")
        box = _boxes(session, image_id)[0]
        review.delete_box(session, box_id=box.id, version=1, reviewer="a")
        with pytest.raises(ReviewError, match="deleted"):
            review.accept_box(session, box_id=box.id, version=2, reviewer="a")


def test_edit_replaces_box_and_undo_restores_it(workspace, proposals):
    image_id = proposals.image_ids[0]
    before = _state(workspace)
    with workspace.transaction() as session:
        old = _boxes(session, image_id)[0]
        image = old.image
        new = review.edit_box(
            session,
            box_id=old.id,
            version=old.version,
            reviewer="alice",
            x1=image.width + 10,  # corners in any order, clipped to the image
            y1=5,
            x2=20,
            y2=-3,
            class_name="smoke",
        )
        new_id = new.id
    with workspace.session() as session:
        old, new = session.get(Box, old.id), session.get(Box, new_id)
        assert (old.status, old.replaced_by_id) == ("edited", new_id)
        assert (new.origin, new.status, new.label_class.name) == ("human", "accepted", "smoke")
        assert (new.x1, new.y1, new.x2, new.y2) == (20, 0, image.width, 5)
        parent = session.scalars(select(ReviewEvent).order_by(ReviewEvent.id.desc())).first()
        assert (parent.entity, parent.action, len(parent.after["events"])) == ("image", "edit", 2)

    with workspace.transaction() as session:
        review.undo(session, reviewer="alice")
    assert _state(workspace) == before


def test_add_box_refuses_a_box_outside_the_image(workspace, proposals):
    image_id = proposals.image_ids[0]
    with workspace.transaction() as session:
        with pytest.raises(ReviewError, match="no area"):
            review.add_box(
                session, image_id=image_id, reviewer="a", class_name="fire", x1=-9, y1=0, x2=0, y2=9
            )
        with pytest.raises(ReviewError, match="unknown class"):
            review.add_box(
                session, image_id=image_id, reviewer="a", class_name="cat", x1=0, y1=0, x2=9, y2=9
            )
        box = review.add_box(
            session, image_id=image_id, reviewer="a", class_name="fire", x1=2, y1=3, x2=12, y2=13
        )
        assert (box.origin, box.status, box.x1, box.y1, box.x2, box.y2) == (
            "human", "accepted", 2, 3, 12, 13
        )  # fmt: skip


def test_accept_all_checks_every_pending_box_was_seen(workspace, proposals):
    image_id = proposals.image_ids[2]
    with workspace.session() as session:
        seen = {b.id: b.version for b in _boxes(session, image_id)}
    with workspace.transaction() as session:
        review.add_box(
            session, image_id=image_id, reviewer="bob", class_name="fire", x1=0, y1=0, x2=4, y2=4
        )
        extra = Box(image_id=image_id, class_id=1, x1=1, y1=1, x2=3, y2=3, origin=BoxOrigin.PSEUDO)
        session.add(extra)
    with pytest.raises(StaleEditError, match="added by .* since you loaded"):
        with workspace.transaction() as session:
            review.accept_all(session, image_id=image_id, reviewer="alice", box_versions=seen)
    with workspace.session() as session:
        seen = {b.id: b.version for b in _boxes(session, image_id) if b.status == "pending"}
    with workspace.transaction() as session:
        parent = review.accept_all(session, image_id=image_id, reviewer="alice", box_versions=seen)
        assert (parent.entity, parent.action, len(parent.after["events"])) == (
            "image",
            "accept_all",
            len(seen),
        )
    with workspace.session() as session:
        assert {b.status for b in _boxes(session, image_id)} == {"accepted"}


def test_accept_all_with_nothing_pending_still_records_the_decision(workspace, proposals):
    image_id = proposals.image_ids[0]
    with workspace.transaction() as session:
        for box in _boxes(session, image_id):
            review.accept_box(session, box_id=box.id, version=box.version, reviewer="a")
    with workspace.transaction() as session:
        event = review.accept_all(session, image_id=image_id, reviewer="a", box_versions={})
        assert event.after == {"events": []}


def test_nothing_here_makes_a_negative_and_undo_restores_everything(workspace, proposals):
    image_id = proposals.image_ids[3]
    with workspace.transaction() as session:
        boxes = _boxes(session, image_id)
        review.accept_box(session, box_id=boxes[0].id, version=1, reviewer="alice")
        review.add_box(
            session, image_id=image_id, reviewer="alice", class_name="fire", x1=1, y1=1, x2=9, y2=9
        )
        review.add_point(session, image_id=image_id, reviewer="alice", class_name="smoke", x=3, y=4)
        # A reviewer tag saying present, which "nothing here" must flip, not duplicate.
        session.add(Tag(image_id=image_id, class_id=1, present=True, origin=TagOrigin.REVIEWER))
    before = _state(workspace)
    with workspace.session() as session:
        seen = {
            b.id: b.version
            for b in _boxes(session, image_id)
            if b.status in ("pending", "accepted")
        }
    with workspace.transaction() as session:
        review.mark_nothing_here(session, image_id=image_id, reviewer="bob", box_versions=seen)
    with workspace.session() as session:
        for box in _boxes(session, image_id):
            if box.origin == BoxOrigin.HUMAN:
                assert box.status == "deleted"
            else:
                assert (box.status, box.false_positive_note) == ("rejected", "nothing here")
                assert box.false_positive_reason is None
        tags = session.scalars(
            select(Tag).where(Tag.image_id == image_id, Tag.origin == TagOrigin.REVIEWER)
        ).all()
        assert sorted((t.class_id, t.present) for t in tags) == [(1, False), (2, False)]
        assert all(p.deleted for p in session.scalars(select(Point)))

    with workspace.transaction() as session:
        review.undo(session, reviewer="bob")
    assert _state(workspace) == before


def test_nothing_here_refuses_a_point_added_since_the_image_was_loaded(workspace, proposals):
    image_id = proposals.image_ids[2]
    with workspace.session() as session:
        seen = {b.id: b.version for b in _boxes(session, image_id) if b.status == "pending"}
    with workspace.transaction() as session:
        review.add_point(session, image_id=image_id, reviewer="alice", class_name="fire", x=3, y=4)
    before = _state(workspace)
    with pytest.raises(StaleEditError, match=r"point \d+ was added by alice since you loaded"):
        with workspace.transaction() as session:
            review.mark_nothing_here(
                session, image_id=image_id, reviewer="bob", box_versions=seen, point_ids=[]
            )
    assert _state(workspace) == before


@pytest.mark.parametrize("mask_scale", [1.0, 0.5])
def test_add_point_proposes_the_mask_component_in_image_pixels(workspace, proposals, mask_scale):
    image_id = proposals.image_ids[0]
    with workspace.session() as session:
        image = session.get(Box, _boxes(session, image_id)[0].id).image
        width, height = image.width, image.height
    map_w, map_h = int(width * mask_scale), int(height * mask_scale)
    fg_prob = np.zeros((map_h, map_w), np.float32)
    fg_prob[4:10, 6:16] = 0.9  # rows 4..9, cols 6..15 of the map
    fg_prob[20:22, 30:33] = 0.9  # another object, not clicked
    click_x, click_y = 10 / mask_scale, 6 / mask_scale
    with workspace.transaction() as session:
        point, box = review.add_point(
            session,
            image_id=image_id,
            reviewer="alice",
            class_name="fire",
            x=click_x,
            y=click_y,
            fg_prob=fg_prob,
        )
        expected = (6 / mask_scale, 4 / mask_scale, 16 / mask_scale, 10 / mask_scale)
        np.testing.assert_allclose((box.x1, box.y1, box.x2, box.y2), expected)
        assert (box.origin, box.status, box.point_id) == ("human", "pending", point.id)
        assert box.score == pytest.approx(0.9, abs=1e-6)
        assert (point.x, point.y, point.reviewer) == (click_x, click_y, "alice")


def test_add_point_grows_a_colour_region_without_a_mask(workspace, proposals):
    image_id = proposals.image_ids[0]
    with workspace.session() as session:
        image = _boxes(session, image_id)[0].image
        width, height = image.width, image.height
    rgb = np.full((height, width, 3), 20, np.uint8)
    rgb[10:30, 40:70] = (250, 140, 20)
    with workspace.transaction() as session:
        _, box = review.add_point(
            session, image_id=image_id, reviewer="a", class_name="fire", x=50, y=20, image_rgb=rgb
        )
        # Blurring before the fill may shave the region's rim by a pixel or two.
        assert box.x1 == pytest.approx(40, abs=2) and box.x2 == pytest.approx(70, abs=2)
        assert box.y1 == pytest.approx(10, abs=2) and box.y2 == pytest.approx(30, abs=2)
        with pytest.raises(ReviewError, match="outside"):
            review.add_point(
                session, image_id=image_id, reviewer="a", class_name="fire", x=width, y=0
            )
        point, box = review.add_point(
            session, image_id=image_id, reviewer="a", class_name="fire", x=1, y=1
        )
        assert box is None and point.id is not None


def test_undo_walks_back_only_the_reviewers_own_actions(workspace, proposals):
    image_id = proposals.image_ids[1]
    start = _state(workspace)
    with workspace.transaction() as session:
        b1, b2, b3 = _boxes(session, image_id)
        review.accept_box(session, box_id=b1.id, version=1, reviewer="alice")
    after_first = _state(workspace)
    with workspace.transaction() as session:
        review.reject_box(session, box_id=b2.id, version=1, reviewer="alice", reason="sunset")
        review.delete_box(session, box_id=b3.id, version=1, reviewer="bob")
    with workspace.transaction() as session:
        review.undo(session, reviewer="alice")  # the reject, not bob's delete
    with workspace.session() as session:
        assert [b.status for b in _boxes(session, image_id)] == ["accepted", "pending", "deleted"]
    with workspace.transaction() as session:
        review.undo(session, reviewer="bob")
    assert _state(workspace) == after_first
    with workspace.transaction() as session:
        review.undo(session, reviewer="alice")
        assert review.undo(session, reviewer="alice") is None
    assert _state(workspace) == start


def test_undo_refuses_when_someone_changed_the_row_since(workspace, proposals):
    image_id = proposals.image_ids[1]
    with workspace.transaction() as session:
        box = _boxes(session, image_id)[0]
        review.accept_box(session, box_id=box.id, version=1, reviewer="alice")
        review.reject_box(session, box_id=box.id, version=2, reviewer="bob", reason="lamp")
    with pytest.raises(StaleEditError, match="changed by bob"):
        with workspace.transaction() as session:
            review.undo(session, reviewer="alice")
    with workspace.session() as session:
        assert session.get(Box, box.id).status == "rejected"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_actions_then_undo_all_restores_the_start(workspace, proposals, seed):
    rng = np.random.default_rng(seed)
    start = _state(workspace)
    events_before = _event_count(workspace)
    actions = 0
    for _ in range(12):
        image_id = int(rng.choice(proposals.image_ids))
        with workspace.transaction() as session:
            live = [b for b in _boxes(session, image_id) if b.status in ("pending", "accepted")]
            kind = int(rng.integers(0, 6)) if live else int(rng.integers(3, 6))
            if kind == 0:
                box = live[int(rng.integers(len(live)))]
                review.accept_box(session, box_id=box.id, version=box.version, reviewer="r")
            elif kind == 1:
                box = live[int(rng.integers(len(live)))]
                review.reject_box(
                    session, box_id=box.id, version=box.version, reviewer="r", reason="torch"
                )
            elif kind == 2:
                box = live[int(rng.integers(len(live)))]
                review.edit_box(
                    session, box_id=box.id, version=box.version, reviewer="r",
                    x1=1, y1=1, x2=box.x2 + 1, y2=box.y2 + 1,
                )  # fmt: skip
            elif kind == 3:
                pending = {b.id: b.version for b in live if b.status == "pending"}
                review.accept_all(session, image_id=image_id, reviewer="r", box_versions=pending)
            elif kind == 4:
                review.mark_nothing_here(
                    session,
                    image_id=image_id,
                    reviewer="r",
                    box_versions={b.id: b.version for b in live},
                )
            else:
                fg = np.zeros((10, 10), np.float32)
                fg[2:6, 2:6] = 1.0
                review.add_point(
                    session, image_id=image_id, reviewer="r", class_name="fire", x=10, y=10,
                    fg_prob=fg,
                )  # fmt: skip
            actions += 1
    assert _event_count(workspace) > events_before
    for _ in range(actions):
        with workspace.transaction() as session:
            assert review.undo(session, reviewer="r") is not None
    with workspace.transaction() as session:
        assert review.undo(session, reviewer="r") is None
    assert _state(workspace) == start
    # Undo appends; the history of what happened is all still there.
    with workspace.session() as session:
        undos = session.scalar(select(func.count()).where(ReviewEvent.action == "undo"))
        assert undos >= actions
