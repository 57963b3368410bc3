"""The review page through Streamlit's AppTest: buttons reach the database, the queue advances."""

from __future__ import annotations

import re

from sqlalchemy import func, select

from db import review
from db.models import Box, ImageLease, ReviewEvent, Tag


def shown_image(at) -> int | None:
    for block in at.markdown:
        found = re.match(r"\*\*Image (\d+)\*\*", block.value)
        if found:
            return int(found.group(1))
    return None


def button(at, label: str):
    (found,) = [b for b in at.button if b.label == label]
    return found


def pending(workspace, image_id: int) -> list[Box]:
    with workspace.session() as session:
        boxes = session.scalars(
            select(Box).where(Box.image_id == image_id, Box.status == "pending")
        ).all()
    return sorted(boxes, key=lambda b: (-(b.score or 0), b.id))


def test_reviewer_names_themself_first(app_for):
    at = app_for(reviewer=None)
    assert shown_image(at) is None
    at.text_input[0].input("Dana")
    at.button[0].click().run()
    assert shown_image(at) is not None
    assert at.query_params["reviewer"] == ["Dana"] or at.query_params["reviewer"] == "Dana"
    assert any("Dana" in c.value for c in at.sidebar.caption)


def test_first_image_is_the_most_uncertain_and_leased(app_for, workspace, proposals):
    at = app_for()
    assert not at.exception
    with workspace.session() as session:
        from db.models import ProposalImage

        top = session.scalars(
            select(ProposalImage.image_id).order_by(ProposalImage.uncertainty.desc()).limit(1)
        ).first()
        lease = session.get(ImageLease, top)
    assert shown_image(at) == top
    assert lease is not None and lease.reviewer == "alice"


def test_accept_then_reason_rejects_and_advances(app_for, workspace):
    at = app_for()
    first = shown_image(at)
    boxes = pending(workspace, first)
    button(at, "Accept").click().run()
    button(at, "Lamp or glare").click().run()
    with workspace.session() as session:
        statuses = [session.get(Box, b.id) for b in boxes]
        assert [(b.status, b.false_positive_reason, b.updated_by) for b in statuses] == [
            ("accepted", None, "alice"),
            ("rejected", "lamp", "alice"),
        ]
        events = session.scalar(select(func.count()).select_from(ReviewEvent))
    assert events == 2
    second = shown_image(at)
    assert second is not None and second != first
    with workspace.session() as session:
        # The image left behind is free for others; the new one is alice's.
        assert session.get(ImageLease, first) is None
        assert session.get(ImageLease, second).reviewer == "alice"


def test_other_needs_a_note(app_for, workspace):
    at = app_for()
    image_id = shown_image(at)
    button(at, "Other (free text)").click().run()
    assert any("needs a note" in e.value for e in at.error)
    assert len(pending(workspace, image_id)) == 2
    at.text_input(key="rv_note").input("a reflective sign")
    button(at, "Other (free text)").click().run()
    with workspace.session() as session:
        box = session.scalars(
            select(Box).where(Box.image_id == image_id, Box.status == "rejected")
        ).one()
    assert (box.false_positive_reason, box.false_positive_note) == ("other", "a reflective sign")


def test_stale_edit_is_refused_with_a_reload_message(app_for, workspace):
    at = app_for()
    image_id = shown_image(at)
    current = pending(workspace, image_id)[0]
    # Bob changes the box behind alice's back (say from a second tab past the lease).
    with workspace.transaction() as session:
        review.reject_box(
            session, box_id=current.id, version=current.version, reviewer="bob", reason="torch"
        )
    button(at, "Accept").click().run()
    messages = [e.value for e in at.error]
    assert any(re.search(r"changed by bob at .* UTC, reload", m) for m in messages), messages
    with workspace.session() as session:
        box = session.get(Box, current.id)
    assert (box.status, box.updated_by) == ("rejected", "bob")


def test_undo_button_walks_back_and_returns_to_the_image(app_for, workspace):
    at = app_for()
    first = shown_image(at)
    button(at, "Accept all").click().run()
    assert shown_image(at) != first
    assert pending(workspace, first) == []
    button(at, "Undo").click().run()
    assert len(pending(workspace, first)) == 2
    assert shown_image(at) == first
    button(at, "Undo").click().run()
    assert any("Nothing of yours left to undo" in t.value for t in at.toast)


def test_nothing_here_tags_the_image_negative(app_for, workspace):
    at = app_for()
    image_id = shown_image(at)
    button(at, "Nothing here").click().run()
    with workspace.session() as session:
        tags = session.scalars(select(Tag).where(Tag.image_id == image_id)).all()
        statuses = {b.status for b in session.scalars(select(Box).where(Box.image_id == image_id))}
    assert sorted((t.origin, t.present) for t in tags) == [("reviewer", False)] * 2
    assert statuses == {"rejected"}
    assert shown_image(at) != image_id


def test_queue_runs_empty_with_a_message(app_for, workspace, proposals):
    with workspace.transaction() as session:
        for image_id in proposals.image_ids:
            versions = {b.id: b.version for b in pending(workspace, image_id)}
            review.accept_all(session, image_id=image_id, reviewer="bob", box_versions=versions)
    at = app_for()
    assert shown_image(at) is None
    assert any("Nothing left in this queue" in i.value for i in at.info)
    # The reviewed filter brings them back.
    at.selectbox(key="rv_state").set_value("reviewed").run()
    assert shown_image(at) in proposals.image_ids


def test_two_reviewers_get_different_images(app_for):
    alice, bob = app_for("alice"), app_for("bob")
    assert shown_image(alice) != shown_image(bob)


def test_layers_and_modes_render(app_for):
    at = app_for()
    at.selectbox(key="rv_l_cam").set_value("fire")
    at.selectbox(key="rv_l_mask").set_value("smoke")
    at.slider(key="rv_l_threshold").set_value(0.3)
    at.slider(key="rv_l_opacity").set_value(0.8).run()
    assert not at.exception
    button(at, "Point mode").click().run()
    assert not at.exception
    assert any("Point mode" in c.value for c in at.caption)
    assert at.selectbox(key="rv_point_class").value in ("fire", "smoke")
    button(at, "Leave point mode").click().run()
    button(at, "Box ↓").click().run()
    assert not at.exception


def test_correction_panel_draws_its_inputs_only_when_open(app_for):
    at = app_for()
    assert not at.number_input
    at.session_state["rv_edit_open"] = True
    at.run()
    assert len(at.number_input) == 4


def test_corrected_box_replaces_the_current_one(app_for, workspace):
    at = app_for()
    at.session_state["rv_edit_open"] = True
    at.run()
    image_id = shown_image(at)
    current = pending(workspace, image_id)[0]
    tag = f"{current.id}_{current.version}_{hash(None)}"
    for k, value in enumerate((2.0, 3.0, 40.0, 30.0)):
        at.number_input(key=f"rv_c{k}_{tag}").set_value(value)
    at.run()
    button(at, "Replace current box").click().run()
    with workspace.session() as session:
        old = session.get(Box, current.id)
        new = session.get(Box, old.replaced_by_id)
    assert old.status == "edited"
    assert (new.x1, new.y1, new.x2, new.y2, new.origin, new.status) == (
        2.0, 3.0, 40.0, 30.0, "human", "accepted"
    )  # fmt: skip
