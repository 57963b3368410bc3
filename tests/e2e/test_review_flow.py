"""What a reviewer does, in a real browser: keys, a reason, a point on the image, undo."""

from __future__ import annotations

import re
import time

import cv2
import numpy as np
import pytest
from sqlalchemy import select

from db.models import Box, BoxOrigin, Point, ProposalImage

pytestmark = pytest.mark.e2e

# A keystroke is a round trip through Streamlit; generous on a loaded 2-core CI machine.
STEP_TIMEOUT_MS = 30_000


def wait_until(condition, timeout_s: float = STEP_TIMEOUT_MS / 1000, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def wait_idle(page) -> None:
    """Until the app's script run is over: the page holds every button and its shortcut."""
    page.wait_for_function(
        "document.querySelector('[data-testid=stApp]')"
        "?.getAttribute('data-test-script-state') === 'notRunning'",
        timeout=STEP_TIMEOUT_MS,
    )


def press(page, key: str) -> None:
    """A keystroke the way a reviewer makes it: once the page has finished drawing."""
    wait_idle(page)
    page.keyboard.press(key)


def shown_image(page) -> int:
    label = page.locator("strong", has_text=re.compile(r"^Image \d+$")).first
    label.wait_for(timeout=STEP_TIMEOUT_MS)
    return int(label.inner_text().split()[1])


def wait_for_image(page, previous: int | None = None) -> int:
    return wait_until(
        lambda: (lambda shown: shown if shown != previous else None)(shown_image(page)),
        what=f"an image other than {previous}",
    )


def pending_boxes(workspace, image_id: int) -> list[Box]:
    """In the page's order: highest score first."""
    with workspace.session() as session:
        boxes = session.scalars(
            select(Box).where(Box.image_id == image_id, Box.status == "pending")
        ).all()
    return sorted(boxes, key=lambda b: (-(b.score or 0), b.id))


def box_row(workspace, box_id: int) -> Box | None:
    with workspace.session() as session:
        return session.get(Box, box_id)


def fire_centre(workspace, image_id: int) -> tuple[float, float, np.ndarray]:
    """The centre of the fire blob in image pixels, from the mask propose wrote."""
    with workspace.session() as session:
        proposal = session.scalars(
            select(ProposalImage).where(ProposalImage.image_id == image_id)
        ).first()
    mask = cv2.imread(str(workspace.absolute(proposal.mask_dir) / f"{image_id}_fire.png"), 0)
    rows, cols = np.nonzero(mask >= 128)
    return float(cols.mean()) + 0.5, float(rows.mean()) + 0.5, mask


def test_review_by_keyboard_point_and_undo(page, review_server):
    workspace = review_server.workspace
    page.goto(f"{review_server.url}/?reviewer=e2e")
    first = shown_image(page)
    boxes = pending_boxes(workspace, first)
    assert len(boxes) == 2

    # Accept the current box by key, once the first page has drawn its buttons (the script
    # state reads "not running" for a moment before the first run starts, too).
    accept = page.get_by_role("button", name=re.compile(r"^Accept\b")).first
    accept.wait_for(timeout=STEP_TIMEOUT_MS)
    wait_until(accept.is_enabled, what="the Accept button enabled")
    press(page, "a")
    accepted = wait_until(
        lambda: (lambda b: b if b.status == "accepted" else None)(box_row(workspace, boxes[0].id)),
        what="the first box accepted",
    )
    assert accepted.updated_by == "e2e"
    # The next key belongs to the page that shows the decision, not to the one before it.
    page.get_by_text(re.compile(r"· 1 pending")).first.wait_for(timeout=STEP_TIMEOUT_MS)

    # Reject the next one with reason 2 (lamp or glare); nothing is pending, so the next
    # image opens by itself.
    press(page, "2")
    rejected = wait_until(
        lambda: (lambda b: b if b.status == "rejected" else None)(box_row(workspace, boxes[1].id)),
        what="the second box rejected",
    )
    assert (rejected.false_positive_reason, rejected.updated_by) == ("lamp", "e2e")
    second = wait_for_image(page, previous=first)

    # Point mode: click the fire blob; a pending box grown from the mask is proposed.
    press(page, "p")
    frame = page.frame_locator("iframe[title*='image_coordinates']")
    picture = frame.locator("img")
    picture.wait_for(timeout=STEP_TIMEOUT_MS)
    wait_until(lambda: (picture.bounding_box() or {}).get("width", 0) > 50, what="the image")
    cx, cy, mask = fire_centre(workspace, second)
    with workspace.session() as session:
        image_width = session.get(Box, pending_boxes(workspace, second)[0].id).image.width
    shown_width = picture.bounding_box()["width"]
    picture.click(
        position={"x": cx * shown_width / image_width, "y": cy * shown_width / image_width}
    )

    def proposed():
        with workspace.session() as session:
            point = session.scalars(select(Point).where(Point.image_id == second)).first()
            if point is None:
                return None
            box = session.scalars(select(Box).where(Box.point_id == point.id)).first()
            return (point, box) if box is not None else None

    point, box = wait_until(proposed, what="a point and its proposed box")
    assert point.reviewer == "e2e" and point.class_id == box.class_id
    assert (box.origin, box.status) == (BoxOrigin.HUMAN, "pending")
    rows, cols = np.nonzero(mask >= 128)  # the mask is at image size here
    assert abs(point.x - cx) < 3 and abs(point.y - cy) < 3
    assert box.x1 == pytest.approx(cols.min(), abs=2) and box.x2 == pytest.approx(
        cols.max() + 1, abs=2
    )
    assert box.y1 == pytest.approx(rows.min(), abs=2) and box.y2 == pytest.approx(
        rows.max() + 1, abs=2
    )

    # Undo by key, straight after the click: the point and its box go.
    press(page, "u")
    wait_until(lambda: proposed() is None, what="the point undone")
    with workspace.session() as session:
        assert session.get(Box, box.id) is None
        assert session.scalars(select(Point).where(Point.image_id == second)).first() is None

    # Undo again walks back to the rejection on the first image, and shows that image.
    press(page, "u")
    wait_until(
        lambda: box_row(workspace, boxes[1].id).status == "pending", what="the rejection undone"
    )
    assert box_row(workspace, boxes[0].id).status == "accepted"
    assert wait_for_image(page, previous=second) == first


def test_help_overlay_opens_with_question_mark(page, review_server):
    from playwright.sync_api import expect

    page.goto(f"{review_server.url}/?reviewer=helper")
    shown_image(page)
    # The listener comes with a small component iframe that mounts after the page.
    page.wait_for_function("window.__pyrolabelKeys !== undefined", timeout=STEP_TIMEOUT_MS)
    press(page, "?")
    dialog = page.get_by_role("dialog")
    dialog.wait_for(timeout=STEP_TIMEOUT_MS)
    # The dialog opens first and its table streams in after, slowly on a loaded machine.
    expect(dialog).to_contain_text("Keyboard shortcuts", timeout=STEP_TIMEOUT_MS)
    expect(dialog).to_contain_text("undo your last action", timeout=STEP_TIMEOUT_MS)
