"""The review queue: orders and filters against a plain Python reference, keyset pages, leases."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import select

from db import review
from db.models import Box, Image, ImageLease, ProposalImage, ProposalRun, ReviewEvent, utcnow
from db.queue import (
    QueueFilter,
    QueueOrder,
    QueueState,
    ReviewState,
    acquire_lease,
    claim_next,
    lease_holder,
    queue_page,
    queue_size,
    release_lease,
)
from db.synthetic import SyntheticConfig, build_proposals


@pytest.fixture
def proposals(workspace):
    return build_proposals(workspace, SyntheticConfig(n_images=14, boxes_per_image=2, seed=3))


def _walk(session, *, page=4, **kwargs):
    """Every item of the queue, read page by page through the keyset cursor."""
    items, cursor = [], None
    while True:
        batch = queue_page(session, after=cursor, limit=page, **kwargs)
        items += batch
        if len(batch) < page:
            return items
        cursor = batch[-1].cursor


def _reference_order(session, order, seed=0):
    """Latest proposal per image, sorted in Python: the slow, obviously right queue."""
    rows = session.execute(select(ProposalImage).order_by(ProposalImage.id)).scalars().all()
    latest = {}
    for row in rows:
        latest[row.image_id] = row
    key = {
        QueueOrder.UNCERTAINTY: lambda r: r.uncertainty,
        QueueOrder.DISAGREEMENT: lambda r: r.disagreement,
        QueueOrder.NEWEST: lambda r: r.id,
        QueueOrder.RANDOM: lambda r: (r.id * 48271 + seed) % 2_147_483_647,
    }[order]
    return [r.image_id for r in sorted(latest.values(), key=lambda r: (key(r), r.id), reverse=True)]


@pytest.mark.parametrize("order", list(QueueOrder))
def test_order_matches_reference_across_pages(workspace, proposals, order):
    with workspace.session() as session:
        expected = _reference_order(session, order, seed=7)
        got = _walk(
            session, reviewer="a", order=order, filters=QueueFilter(state=ReviewState.ALL), seed=7
        )
        assert [item.image_id for item in got] == expected
        assert sorted(expected) == sorted(proposals.image_ids)


def test_only_the_latest_proposal_of_an_image_counts(workspace, proposals):
    again = proposals.image_ids[:3]
    with workspace.transaction() as session:
        run = ProposalRun(state="done")
        session.add(run)
        session.flush()
        for image_id in again:
            session.add(ProposalImage(run_id=run.id, image_id=image_id, probs={}, uncertainty=2.0))
    with workspace.session() as session:
        got = _walk(session, reviewer="a", filters=QueueFilter(state=ReviewState.ALL))
        assert len(got) == len(proposals.image_ids)
        assert [item.image_id for item in got[:3]] == sorted(again, reverse=True)
        assert [item.image_id for item in got] == _reference_order(session, QueueOrder.UNCERTAINTY)


def test_filters_match_reference(workspace, proposals):
    ids = proposals.image_ids
    with workspace.transaction() as session:
        # Image 0: all decided; image 1: a rejection for "torch"; image 2: no boxes, untouched.
        for box in session.scalars(select(Box).where(Box.image_id == ids[0])):
            review.accept_box(session, box_id=box.id, version=box.version, reviewer="alice")
        box = session.scalars(select(Box).where(Box.image_id == ids[1])).first()
        review.reject_box(session, box_id=box.id, version=1, reviewer="bob", reason="torch")
        for box in session.scalars(select(Box).where(Box.image_id == ids[2])):
            session.delete(box)
    with workspace.session() as session:
        splits = dict(session.execute(select(Image.id, Image.split)).all())
        boxes = session.execute(select(Box.image_id, Box.class_id, Box.status)).all()
        touched = set(session.scalars(select(ReviewEvent.image_id)))
        order = _reference_order(session, QueueOrder.UNCERTAINTY)

        def run(filters):
            return [item.image_id for item in _walk(session, reviewer="carol", filters=filters)]

        pending = {b.image_id for b in boxes if b.status == "pending"}
        to_review = [i for i in order if i in pending or i not in touched]
        assert run(QueueFilter()) == to_review
        assert ids[0] not in to_review and ids[1] in to_review and ids[2] in to_review

        fire_pending = {b.image_id for b in boxes if b.status == "pending" and b.class_id == 1}
        assert run(QueueFilter(classes=("fire",))) == [i for i in order if i in fire_pending]

        reviewed = [i for i in order if i in touched and i not in pending]
        assert run(QueueFilter(state=ReviewState.REVIEWED)) == reviewed == [ids[0]]
        assert run(QueueFilter(state=ReviewState.REJECTED)) == [ids[1]]
        assert run(QueueFilter(state=ReviewState.ALL, fp_reason="torch")) == [ids[1]]
        assert run(QueueFilter(state=ReviewState.ALL, fp_reason="lamp")) == []
        assert run(QueueFilter(state=ReviewState.ALL, reviewer="alice")) == [ids[0]]
        val = [i for i in to_review if splits[i] == "val"]
        assert val and run(QueueFilter(split="val")) == val
        assert queue_size(session, reviewer="carol", filters=QueueFilter(split="val")) == len(val)


def test_lease_keeps_reviewers_apart_and_expires(workspace, proposals):
    image_id = proposals.image_ids[0]
    now = utcnow()
    with workspace.transaction() as session:
        assert acquire_lease(session, image_id=image_id, reviewer="alice", now=now)
        assert not acquire_lease(session, image_id=image_id, reviewer="bob", now=now)
        assert acquire_lease(session, image_id=image_id, reviewer="alice", now=now)  # renew
        assert lease_holder(session, image_id=image_id, now=now)[0] == "alice"
    with workspace.session() as session:
        bob_sees = [i.image_id for i in _walk(session, reviewer="bob", now=now)]
        alice_sees = [i.image_id for i in _walk(session, reviewer="alice", now=now)]
        assert image_id not in bob_sees and image_id in alice_sees
    later = now + timedelta(minutes=11)
    with workspace.transaction() as session:
        assert acquire_lease(session, image_id=image_id, reviewer="bob", now=later)
        release_lease(session, image_id=image_id, reviewer="alice")  # not alice's any more
        assert lease_holder(session, image_id=image_id, now=later)[0] == "bob"
        release_lease(session, image_id=image_id, reviewer="bob")
        assert session.get(ImageLease, image_id) is None


def test_claim_next_never_hands_one_image_to_two_reviewers(workspace, proposals):
    states = {name: QueueState() for name in ("alice", "bob")}
    claimed = {name: [] for name in states}
    for _ in range(len(proposals.image_ids)):
        for name, state in states.items():
            with workspace.transaction() as session:
                item = claim_next(session, reviewer=name, state=state, page_size=3)
            if item is not None:
                claimed[name].append(item.image_id)
    assert not set(claimed["alice"]) & set(claimed["bob"])
    assert sorted(claimed["alice"] + claimed["bob"]) == sorted(proposals.image_ids)


def test_racing_claims_from_threads_get_distinct_images(workspace, proposals):
    results: dict[str, int | None] = {}
    barrier = threading.Barrier(4)

    def claim(name):
        state = QueueState()
        barrier.wait()
        with workspace.transaction() as session:
            item = claim_next(session, reviewer=name, state=state, page_size=2)
        results[name] = item.image_id if item else None

    threads = [threading.Thread(target=claim, args=(f"r{k}",)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    got = [image_id for image_id in results.values() if image_id is not None]
    assert len(got) == 4 and len(set(got)) == 4
    with workspace.session() as session:
        holders = dict(session.execute(select(ImageLease.image_id, ImageLease.reviewer)).all())
    assert {holders[image_id] for image_id in got} == set(results)


def test_claim_next_skips_items_reviewed_since_they_were_prefetched(workspace, proposals):
    state = QueueState()
    with workspace.transaction() as session:
        first = claim_next(session, reviewer="alice", state=state, page_size=5)
    upcoming = state.ahead[0].image_id
    with workspace.transaction() as session:
        seen = {
            b.id: b.version for b in session.scalars(select(Box).where(Box.image_id == upcoming))
        }
        review.accept_all(session, image_id=upcoming, reviewer="bob", box_versions=seen)
    with workspace.transaction() as session:
        second = claim_next(session, reviewer="alice", state=state, page_size=5)
    assert second.image_id not in (first.image_id, upcoming)
