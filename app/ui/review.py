"""The review page: one image at a time, its proposals drawn over it, one keystroke per decision.

Every action is a button with a keyboard shortcut whose on_click callback writes to the
database (db.review, committed at once) before Streamlit reruns the page, so the rerun that
follows a keystroke already shows the result, or the next image when the decision left
nothing pending on this one. The next queue item's image and overlays are rendered in the
background while the reviewer looks at the current one (app.ui.overlays.OverlayCache).

Session state (prefix rv_): the queue walk (db.queue.QueueState), the images visited (for
"previous"), the current box, the mode (review, point, draw) and messages for the next run.
"""

from __future__ import annotations

import base64
import logging
import random
import time
from dataclasses import dataclass, field

import streamlit as st
from sqlalchemy import select

from app.ui import common
from app.ui.overlays import (
    CLASS_COLOURS,
    DrawBox,
    ImageSource,
    Layers,
    display_scale,
    display_size,
    draw_boxes,
    encode_jpeg,
)
from core.images import ImageError, read_rgb
from db import queue, review
from db.models import Box, BoxOrigin, BoxStatus, Image, LabelClass, Point, ProposalImage
from db.review import ReviewError, StaleEditError
from db.workspace import Workspace

log = logging.getLogger(__name__)

MODES = ("review", "point", "draw")
# Renewing the lease on every rerun would write once per keystroke; once a minute is plenty
# against a ten-minute expiry.
LEASE_RENEW_S = 60.0
# Statuses a reviewer can still act on; edited and deleted boxes are history.
ACTIONABLE = (BoxStatus.PENDING, BoxStatus.ACCEPTED, BoxStatus.REJECTED)
# Whether the "Correct or add a box" panel is open (its widgets are drawn only then).
EDIT_PANEL_KEY = "rv_edit_open"

SHORTCUTS = (
    ("A", "accept the current box"),
    ("Shift+A", "accept all pending boxes of the image"),
    ("X", "reject the current box with the reason chosen below"),
    ("1 ... 9", "reject the current box with that reason"),
    ("D", "delete the current box (a duplicate, not a false positive)"),
    ("E", "nothing here: the image becomes a negative for every class"),
    ("N / B", "next / previous image"),
    ("J / K", "next / previous box"),
    ("U", "undo your last action (again: further back)"),
    ("P", "point mode: click a missed object, its box is proposed"),
    ("W", "draw mode: drag a box, then add it or replace the current box"),
    ("S / Shift+W", "with the box panel open: replace the current box / add it as a new box"),
    ("H or ?", "this help"),
)


# ---------------------------------------------------------------------------------------------
# What the page shows about one image


@dataclass(frozen=True)
class BoxRow:
    id: int
    class_name: str
    x1: float
    y1: float
    x2: float
    y2: float
    origin: str
    status: str
    score: float | None
    reason: str | None
    note: str | None
    version: int
    point_id: int | None
    updated_by: str | None


@dataclass
class ImageView:
    """The current image with its latest proposal, boxes and points."""

    source: ImageSource
    split: str
    probs: dict[str, float] = field(default_factory=dict)
    uncertainty: float | None = None
    disagreement: float | None = None
    boxes: list[BoxRow] = field(default_factory=list)
    points: list[tuple[float, float, str]] = field(default_factory=list)
    point_ids: list[int] = field(default_factory=list)  # the same points' ids, in order

    @property
    def image_id(self) -> int:
        return self.source.image_id

    @property
    def actionable(self) -> list[BoxRow]:
        """Boxes a reviewer can act on: pending first (highest score first), then decided."""
        live = [b for b in self.boxes if b.origin != BoxOrigin.REFERENCE and b.status in ACTIONABLE]
        return sorted(live, key=lambda b: (b.status != BoxStatus.PENDING, -(b.score or 0), b.id))

    @property
    def pending(self) -> list[BoxRow]:
        return [b for b in self.actionable if b.status == BoxStatus.PENDING]


def image_source(ws: Workspace, session, image_id: int) -> tuple[ImageSource, Image, ProposalImage]:
    image = session.get(Image, image_id)
    proposal = session.scalars(
        select(ProposalImage)
        .where(ProposalImage.image_id == image_id)
        .order_by(ProposalImage.id.desc())
        .limit(1)
    ).first()
    cam_dir = mask_dir = None
    if proposal is not None:
        cam_dir = str(ws.absolute(proposal.cam_dir)) if proposal.cam_dir else None
        mask_dir = str(ws.absolute(proposal.mask_dir)) if proposal.mask_dir else None
    source = ImageSource(
        image_id=image.id,
        path=str(ws.absolute(image.path)),
        width=image.width,
        height=image.height,
        cam_dir=cam_dir,
        mask_dir=mask_dir,
    )
    return source, image, proposal


def load_view(ws: Workspace, image_id: int) -> ImageView | None:
    with ws.session() as session:
        if session.get(Image, image_id) is None:
            return None
        source, image, proposal = image_source(ws, session, image_id)
        view = ImageView(source=source, split=image.split)
        if proposal is not None:
            view.probs = {k: float(v) for k, v in (proposal.probs or {}).items()}
            view.uncertainty, view.disagreement = proposal.uncertainty, proposal.disagreement
        rows = session.execute(
            select(Box, LabelClass.name)
            .join(LabelClass, LabelClass.id == Box.class_id)
            .where(Box.image_id == image_id)
            .order_by(Box.id)
        )
        view.boxes = [
            BoxRow(
                id=box.id,
                class_name=name,
                x1=box.x1,
                y1=box.y1,
                x2=box.x2,
                y2=box.y2,
                origin=box.origin,
                status=box.status,
                score=box.score,
                reason=box.false_positive_reason,
                note=box.false_positive_note,
                version=box.version,
                point_id=box.point_id,
                updated_by=box.updated_by,
            )
            for box, name in rows
        ]
        points = session.execute(
            select(Point, LabelClass.name)
            .join(LabelClass, LabelClass.id == Point.class_id)
            .where(Point.image_id == image_id, Point.deleted.is_(False))
        ).all()
        view.points = [(point.x, point.y, name) for point, name in points]
        view.point_ids = [point.id for point, _ in points]
    return view


# ---------------------------------------------------------------------------------------------
# Cached workspace lists


@st.cache_data(ttl=60, show_spinner=False)
def _classes(db_url: str) -> list[str]:
    with common.workspace().session() as session:
        return list(session.scalars(select(LabelClass.name).order_by(LabelClass.index)))


@st.cache_data(ttl=30, show_spinner=False)
def _reasons(db_url: str) -> list[tuple[str, str]]:
    """(key, label) of the active false-positive reasons; the settings page clears this."""
    with common.workspace().session() as session:
        return [(r.key, r.label) for r in review.false_positive_reasons(session)]


@st.cache_data(ttl=30, show_spinner=False)
def _queue_size(db_url: str, reviewer: str, filters: queue.QueueFilter) -> int:
    with common.workspace().session() as session:
        return queue.queue_size(session, reviewer=reviewer, filters=filters)


# ---------------------------------------------------------------------------------------------
# Messages carried to the next run


def _flash(kind: str, message: str) -> None:
    st.session_state.setdefault("rv_flash", []).append((kind, message))


def _show_flash() -> None:
    for kind, message in st.session_state.pop("rv_flash", []):
        if kind == "error":
            st.error(message, icon=":material/error:")
        elif kind == "warning":
            st.warning(message, icon=":material/warning:")
        else:
            st.toast(message)


# ---------------------------------------------------------------------------------------------
# The queue walk and navigation


def _state() -> queue.QueueState:
    return st.session_state["rv_queue"]


def _current_image() -> int | None:
    history = st.session_state.get("rv_history", [])
    pos = st.session_state.get("rv_pos", -1)
    return history[pos] if 0 <= pos < len(history) else None


def _reset_queue(ws: Workspace, reviewer: str, order: str, filters: queue.QueueFilter) -> None:
    current = _current_image()
    if current is not None:
        with ws.transaction() as session:
            queue.release_lease(session, image_id=current, reviewer=reviewer)
    seed = st.session_state.setdefault("rv_seed", random.randrange(1 << 30))
    st.session_state["rv_queue"] = queue.QueueState(
        order=queue.QueueOrder(order), filters=filters, seed=seed
    )
    st.session_state["rv_history"] = []
    st.session_state["rv_pos"] = -1
    st.session_state.pop("rv_box", None)
    _go_next(ws, reviewer)


def _go_next(ws: Workspace, reviewer: str) -> None:
    """Forward in the images already visited, else claim the next one from the queue."""
    history = st.session_state["rv_history"]
    pos = st.session_state["rv_pos"]
    left = history[pos] if 0 <= pos < len(history) else None
    with ws.transaction() as session:
        if pos + 1 < len(history):
            target = history[pos + 1]
            _lease_or_warn(session, target, reviewer)
            st.session_state["rv_pos"] = pos + 1
        else:
            item = queue.claim_next(session, reviewer=reviewer, state=_state())
            if item is None:
                st.session_state["rv_pos"] = len(history)  # past the end: "queue empty"
            else:
                # Revisiting an image leaves it once in the history, at the end.
                if item.image_id in history:
                    history.remove(item.image_id)
                history.append(item.image_id)
                st.session_state["rv_pos"] = len(history) - 1
        if left is not None and left != _current_image():
            queue.release_lease(session, image_id=left, reviewer=reviewer)
    st.session_state["rv_lease_at"] = time.monotonic()
    st.session_state.pop("rv_box", None)
    st.session_state.pop("rv_drawn", None)


def _go_previous(ws: Workspace, reviewer: str) -> None:
    pos = st.session_state["rv_pos"]
    if pos <= 0:
        _flash("info", "This is the first image you reviewed in this queue.")
        return
    left = _current_image()
    with ws.transaction() as session:
        target = st.session_state["rv_history"][pos - 1]
        _lease_or_warn(session, target, reviewer)
        if left is not None:
            queue.release_lease(session, image_id=left, reviewer=reviewer)
    st.session_state["rv_pos"] = pos - 1
    st.session_state["rv_lease_at"] = time.monotonic()
    st.session_state.pop("rv_box", None)
    st.session_state.pop("rv_drawn", None)


def _go_to(ws: Workspace, reviewer: str, image_id: int) -> None:
    """Show a given image (after undo), as the newest entry of the history."""
    history = st.session_state["rv_history"]
    left = _current_image()
    if left == image_id:
        return
    with ws.transaction() as session:
        _lease_or_warn(session, image_id, reviewer)
        if left is not None:
            queue.release_lease(session, image_id=left, reviewer=reviewer)
    pos = st.session_state["rv_pos"]
    history.insert(min(pos + 1, len(history)), image_id)
    st.session_state["rv_pos"] = min(pos + 1, len(history) - 1)
    st.session_state.pop("rv_box", None)


def _lease_or_warn(session, image_id: int, reviewer: str) -> None:
    # Going back (or forward) through one's own history to an image someone else has leased
    # since warns rather than locks: the queue never hands out a leased image, and every write
    # carries the version it read, so a clash is refused as a stale edit, never applied.
    if not queue.acquire_lease(session, image_id=image_id, reviewer=reviewer):
        holder = queue.lease_holder(session, image_id=image_id)
        who = holder[0] if holder else "another reviewer"
        _flash("warning", f"{who} is reviewing image {image_id} now; your changes may clash.")


def _renew_lease(ws: Workspace, reviewer: str, image_id: int) -> None:
    if time.monotonic() - st.session_state.get("rv_lease_at", 0.0) < LEASE_RENEW_S:
        return
    with ws.transaction() as session:
        _lease_or_warn(session, image_id, reviewer)
    st.session_state["rv_lease_at"] = time.monotonic()


# ---------------------------------------------------------------------------------------------
# Actions (button callbacks: they run before the rerun that shows their result)


def _act(ws: Workspace, reviewer: str, action, *, advance_when_done: bool = True) -> bool:
    """Run a db.review action in one transaction; show its error; advance when nothing's left."""
    try:
        with ws.transaction() as session:
            action(session)
    except StaleEditError as err:
        _flash("error", f"{err}. The image below shows the current state.")
        return False
    except ReviewError as err:
        _flash("error", str(err))
        return False
    # The decided box stops being current: the next pending one (or one the caller names) is.
    st.session_state.pop("rv_box", None)
    image_id = _current_image()
    if advance_when_done and st.session_state.get("rv_mode", "review") == "review":
        view = load_view(ws, image_id) if image_id is not None else None
        if view is not None and not view.pending and st.session_state.get("rv_auto", True):
            _go_next(ws, reviewer)
    return True


def on_accept(ws, reviewer, box: BoxRow | None) -> None:
    if box is None:
        return _flash("info", "No box to accept on this image.")
    if _act(
        ws,
        reviewer,
        lambda s: review.accept_box(s, box_id=box.id, version=box.version, reviewer=reviewer),
    ):
        _flash("info", f"Accepted box {box.id}")


def on_reject(ws, reviewer, box: BoxRow | None, reason: str | None) -> None:
    if box is None:
        return _flash("info", "No box to reject on this image.")
    reason = reason or st.session_state.get("rv_reason")
    note = st.session_state.get("rv_note", "")
    if _act(
        ws,
        reviewer,
        lambda s: review.reject_box(
            s, box_id=box.id, version=box.version, reviewer=reviewer, reason=reason, note=note
        ),
    ):
        st.session_state["rv_note"] = ""
        _flash("info", f"Rejected box {box.id}: {reason}")


def on_delete(ws, reviewer, box: BoxRow | None) -> None:
    if box is None:
        return
    if _act(
        ws,
        reviewer,
        lambda s: review.delete_box(s, box_id=box.id, version=box.version, reviewer=reviewer),
    ):
        _flash("info", f"Deleted box {box.id}")


def on_accept_all(ws, reviewer, view: ImageView) -> None:
    versions = {b.id: b.version for b in view.pending}
    if _act(
        ws,
        reviewer,
        lambda s: review.accept_all(
            s, image_id=view.image_id, reviewer=reviewer, box_versions=versions
        ),
    ):
        _flash("info", f"Accepted {len(versions)} boxes")


def on_nothing_here(ws, reviewer, view: ImageView) -> None:
    versions = {
        b.id: b.version
        for b in view.boxes
        if b.origin != BoxOrigin.REFERENCE and b.status in (BoxStatus.PENDING, BoxStatus.ACCEPTED)
    }
    if _act(
        ws,
        reviewer,
        lambda s: review.mark_nothing_here(
            s,
            image_id=view.image_id,
            reviewer=reviewer,
            box_versions=versions,
            point_ids=view.point_ids,
        ),
    ):
        _flash("info", f"Image {view.image_id} marked as showing nothing")
        if st.session_state.get("rv_mode", "review") != "review":
            _go_next(ws, reviewer)


def on_edit(ws, reviewer, box: BoxRow | None, corners, class_name: str) -> None:
    if box is None:
        return
    x1, y1, x2, y2 = corners
    result = {}

    def action(session):
        result["box"] = review.edit_box(
            session,
            box_id=box.id,
            version=box.version,
            reviewer=reviewer,
            x1=x1,
            y1=y1,
            x2=x2,
            y2=y2,
            class_name=class_name,
        ).id

    if _act(ws, reviewer, action, advance_when_done=False):
        st.session_state["rv_box"] = result["box"]
        st.session_state.pop("rv_drawn", None)
        _flash("info", f"Box {box.id} replaced by box {result['box']}")


def on_add_box(ws, reviewer, image_id: int, corners, class_name: str) -> None:
    x1, y1, x2, y2 = corners
    result = {}

    def action(session):
        result["box"] = review.add_box(
            session,
            image_id=image_id,
            reviewer=reviewer,
            class_name=class_name,
            x1=x1,
            y1=y1,
            x2=x2,
            y2=y2,
        ).id

    if _act(ws, reviewer, action, advance_when_done=False):
        st.session_state["rv_box"] = result["box"]
        st.session_state.pop("rv_drawn", None)
        _flash("info", f"Added box {result['box']}")


def on_undo(ws, reviewer) -> None:
    result = {}

    def action(session):
        event = review.undo(session, reviewer=reviewer)
        result["event"] = event
        result["image"] = event.image_id if event is not None else None

    if not _act(ws, reviewer, action, advance_when_done=False):
        return
    if result["event"] is None:
        _flash("info", "Nothing of yours left to undo.")
        return
    if result["image"] is not None:
        _go_to(ws, reviewer, result["image"])
    _flash("info", f"Undone on image {result['image']}")


def on_next_box(view: ImageView, step: int) -> None:
    boxes = view.actionable
    if not boxes:
        return
    ids = [b.id for b in boxes]
    current = st.session_state.get("rv_box")
    index = ids.index(current) if current in ids else 0
    st.session_state["rv_box"] = ids[(index + step) % len(ids)]


def on_mode(mode: str) -> None:
    current = st.session_state.get("rv_mode", "review")
    st.session_state["rv_mode"] = "review" if current == mode else mode
    st.session_state.pop("rv_drawn", None)


def on_click_image(ws, reviewer, view: ImageView, key: str, scale: float, threshold: float):
    """A click (point mode) or a drag (draw mode) on the displayed image."""
    value = st.session_state.get(key)
    if not value or value.get("unix_time") == st.session_state.get("rv_click_time"):
        return
    st.session_state["rv_click_time"] = value.get("unix_time")
    # The component reports pixels of the element as shown; map them to the original image.
    shown_w = value.get("width") or 0
    factor = view.source.width / shown_w if shown_w else 1.0 / scale
    mode = st.session_state.get("rv_mode")
    if mode == "draw" and "x1" in value:
        corners = [value["x1"], value["y1"], value["x2"], value["y2"]]
        corners = [c * factor for c in corners]
        st.session_state["rv_drawn"] = tuple(corners)
        st.session_state[EDIT_PANEL_KEY] = True  # where the drawing is added or used
        return
    if mode != "point" or "x" not in value:
        return
    x = min(max(value["x"] * factor, 0.0), view.source.width - 1e-3)
    y = min(max(value["y"] * factor, 0.0), view.source.height - 1e-3)
    class_name = st.session_state.get("rv_point_class")
    cache = common.overlay_cache()
    fg = cache.map(view.source.mask_path(class_name))
    try:
        rgb = read_rgb(view.source.path)
    except ImageError:
        rgb = None
    result = {}

    def action(session):
        result["point"], result["box"] = review.add_point(
            session,
            image_id=view.image_id,
            reviewer=reviewer,
            class_name=class_name,
            x=x,
            y=y,
            fg_prob=fg.astype("float32") / 255.0 if fg is not None else None,
            image_rgb=rgb,
            threshold=threshold,
            class_score=view.probs.get(class_name, 1.0),
        )
        result["box_id"] = result["box"].id if result["box"] is not None else None

    if _act(ws, reviewer, action, advance_when_done=False):
        if result["box_id"] is not None:
            st.session_state["rv_box"] = result["box_id"]
            _flash("info", f"Point at ({x:.0f}, {y:.0f}): proposed box {result['box_id']}")
        else:
            _flash("warning", f"Point at ({x:.0f}, {y:.0f}) saved; no region found to box.")


# ---------------------------------------------------------------------------------------------
# Sidebar: queue and layers


def queue_ui(classes: list[str], reasons: list[tuple[str, str]]) -> tuple[str, queue.QueueFilter]:
    """The queue order and filters the reviewer chose."""
    with st.sidebar:
        st.subheader("Queue")
        order = st.selectbox(
            "Order",
            [o.value for o in queue.QueueOrder],
            format_func=lambda o: {
                "uncertainty": "Most uncertain first",
                "disagreement": "Most disagreement first",
                "newest": "Newest first",
                "random": "Random",
            }[o],
            key="rv_order",
        )
        state = st.selectbox(
            "Show",
            [s.value for s in queue.ReviewState],
            format_func=lambda s: {
                "to_review": "To review",
                "reviewed": "Reviewed",
                "accepted": "With accepted boxes",
                "rejected": "With rejected boxes",
                "edited": "With corrected boxes",
                "deleted": "With deleted boxes",
                "all": "All proposed images",
            }[s],
            key="rv_state",
        )
        with st.expander("Filters"):
            picked = st.multiselect("Class", classes, key="rv_f_classes")
            split = st.text_input("Split", key="rv_f_split", placeholder="any")
            reason_keys = [""] + [k for k, _ in reasons]
            labels = dict(reasons)
            fp_reason = st.selectbox(
                "False-positive reason",
                reason_keys,
                format_func=lambda k: labels.get(k, "any"),
                key="rv_f_reason",
            )
            by = st.text_input("Reviewed by", key="rv_f_reviewer", placeholder="anyone")
    filters = queue.QueueFilter(
        classes=tuple(picked),
        state=queue.ReviewState(state),
        split=split.strip() or None,
        fp_reason=fp_reason or None,
        reviewer=by.strip() or None,
    )
    return order, filters


def layers_ui(classes: list[str], current_class: str | None) -> tuple[Layers, dict[str, bool]]:
    """Layer toggles, opacity and threshold; also which box layers to draw."""
    with st.sidebar:
        st.subheader("Layers")
        show_image = st.toggle("Image", value=True, key="rv_l_image")
        cam = st.selectbox("CAM heatmap", ["off", *classes], key="rv_l_cam")
        mask = st.selectbox(
            "RS+EPM mask",
            ["current box's class", "off", *classes],
            key="rv_l_mask",
        )
        show = {
            "boxes": st.toggle("Proposed and reviewed boxes", value=True, key="rv_l_boxes"),
            "reference": st.toggle("Reference boxes", value=True, key="rv_l_ref"),
            "derived": st.toggle("Boxes from the mask at this threshold", True, key="rv_l_derived"),
            "decided": st.toggle("Show rejected / replaced boxes", value=False, key="rv_l_decided"),
        }
        opacity = st.slider("Overlay opacity", 0.0, 1.0, 0.45, 0.05, key="rv_l_opacity")
        threshold = st.slider("Mask threshold", 0.05, 0.95, 0.5, 0.05, key="rv_l_threshold")
        st.toggle("Next image when none is left pending", value=True, key="rv_auto")
    if mask == "current box's class":
        mask_class = current_class or (classes[0] if classes else None)
    else:
        mask_class = None if mask == "off" else mask
    colour = CLASS_COLOURS[classes.index(mask_class) % len(CLASS_COLOURS)] if mask_class else None
    layers = Layers(
        show_image=show_image,
        cam_class=None if cam == "off" else cam,
        mask_class=mask_class,
        opacity=float(opacity),
        threshold=float(threshold),
        mask_colour=colour or CLASS_COLOURS[0],
    )
    return layers, show


# ---------------------------------------------------------------------------------------------
# The image


def _draw_list(view: ImageView, current: BoxRow | None, layers: Layers, show: dict[str, bool]):
    boxes = []
    index = {b.id: k + 1 for k, b in enumerate(view.actionable)}
    for b in view.boxes:
        if b.origin == BoxOrigin.REFERENCE:
            if show["reference"]:
                boxes.append(DrawBox(b.x1, b.y1, b.x2, b.y2, "reference", f"ref {b.class_name}"))
            continue
        if b.status in (BoxStatus.EDITED, BoxStatus.DELETED, BoxStatus.REJECTED):
            if not show["decided"] and not (current and b.id == current.id):
                continue
        elif not show["boxes"]:
            continue
        score = f" {b.score:.2f}" if b.score is not None else ""
        label = f"{index.get(b.id, '-')} {b.class_name}{score}"
        boxes.append(
            DrawBox(
                b.x1,
                b.y1,
                b.x2,
                b.y2,
                b.status,
                label,
                current=bool(current and b.id == current.id),
            )
        )
    if show["derived"] and layers.mask_class:
        for pb in common.overlay_cache().derived(
            view.source.mask_path(layers.mask_class),
            threshold=layers.threshold,
            image_size=(view.source.width, view.source.height),
            class_score=view.probs.get(layers.mask_class, 1.0),
        ):
            boxes.append(DrawBox(pb.x1, pb.y1, pb.x2, pb.y2, "derived", f"t {pb.score:.2f}"))
    drawn = st.session_state.get("rv_drawn")
    if drawn:
        boxes.append(DrawBox(*drawn, state="derived", label="drawn", current=True))
    return boxes


def image_ui(ws, reviewer, view: ImageView, current: BoxRow | None, layers: Layers, show) -> None:
    size = display_size(view.source.width, view.source.height)
    scale = display_scale(view.source.width, view.source.height)
    base = common.overlay_cache().base(view.source, layers, size)
    picture = draw_boxes(base, _draw_list(view, current, layers, show), scale)
    for x, y, _name in view.points:
        px, py = int(x * scale), int(y * scale)
        picture[max(py - 3, 0) : py + 4, max(px - 3, 0) : px + 4] = (0, 255, 255)
    mode = st.session_state.get("rv_mode", "review")
    if mode == "review":
        # Inline as a data URL (~60 kB), so the picture arrives with the rerun's message:
        # served as a media file, the browser asked for it only once the page was drawn,
        # a second round trip on every keystroke.
        jpeg = base64.b64encode(encode_jpeg(picture)).decode("ascii")
        st.image(f"data:image/jpeg;base64,{jpeg}", width=size[0])
        return

    from streamlit_image_coordinates import streamlit_image_coordinates

    key = f"rv_click_{view.image_id}_{mode}"
    streamlit_image_coordinates(
        picture,
        width=size[0],
        key=key,
        click_and_drag=mode == "draw",
        image_format="JPEG",
        jpeg_quality=88,
        cursor="crosshair",
        on_click=lambda: on_click_image(ws, reviewer, view, key, scale, layers.threshold),
    )
    hint = {
        "point": "Point mode: click a missed object; its box is proposed for you to accept.",
        "draw": "Draw mode: drag a box on the image, then add it or replace the current box.",
    }[mode]
    st.caption(hint)


# ---------------------------------------------------------------------------------------------
# The action panel


def _box_label(b: BoxRow, number: int) -> str:
    score = f" · {b.score:.2f}" if b.score is not None else ""
    origin = "point" if b.point_id else b.origin
    state = b.status if not b.reason else f"{b.status} ({b.reason})"
    return f"{number}. {b.class_name}{score} · {origin} · {state}"


def actions_ui(
    ws: Workspace,
    reviewer: str,
    view: ImageView,
    current: BoxRow | None,
    classes: list[str],
    reasons: list[tuple[str, str]],
) -> None:
    args = (ws, reviewer)
    pending = len(view.pending)
    probs = ", ".join(f"{k} {v:.2f}" for k, v in view.probs.items())
    st.markdown(f"**Image {view.image_id}** · {view.split} · {pending} pending")
    if probs:
        st.caption(f"classifier: {probs}")

    # Current box and its decisions.
    boxes = view.actionable
    if boxes:
        ids = [b.id for b in boxes]
        numbers = {b.id: k + 1 for k, b in enumerate(boxes)}
        by_id = {b.id: b for b in boxes}
        st.radio(
            "Current box",
            ids,
            format_func=lambda i: _box_label(by_id[i], numbers[i]),
            key="rv_box",
        )
    else:
        st.caption("No boxes on this image: add one, click a point, or mark nothing here.")

    cols = st.columns(3)
    cols[0].button(
        "Accept",
        shortcut="A",
        type="primary",
        on_click=on_accept,
        args=(*args, current),
        disabled=current is None,
        width="stretch",
    )
    cols[1].button(
        "Reject",
        shortcut="X",
        on_click=on_reject,
        args=(*args, current, None),
        disabled=current is None,
        width="stretch",
    )
    cols[2].button(
        "Delete",
        shortcut="D",
        on_click=on_delete,
        args=(*args, current),
        disabled=current is None,
        width="stretch",
    )

    # Reasons: one button each, digits as shortcuts, in the workspace's order.
    keys = [k for k, _ in reasons]
    labels = dict(reasons)
    st.selectbox("Reason for Reject (X)", keys, format_func=lambda k: labels[k], key="rv_reason")
    st.text_input("Note (required for Other)", key="rv_note")
    reason_cols = st.columns(2)
    for k, (key, label) in enumerate(reasons[:9]):
        reason_cols[k % 2].button(
            label,
            key=f"rv_reason_{key}",
            shortcut=str(k + 1),
            on_click=on_reject,
            args=(*args, current, key),
            disabled=current is None,
            width="stretch",
        )

    # Image-level decisions.
    st.divider()
    cols = st.columns(2)
    cols[0].button(
        "Accept all",
        shortcut="Shift+A",
        on_click=on_accept_all,
        args=(*args, view),
        width="stretch",
    )
    cols[1].button(
        "Nothing here",
        shortcut="E",
        on_click=on_nothing_here,
        args=(*args, view),
        width="stretch",
    )
    mode = st.session_state.get("rv_mode", "review")
    cols = st.columns(2)
    cols[0].button(
        "Point mode" if mode != "point" else "Leave point mode",
        shortcut="P",
        on_click=on_mode,
        args=("point",),
        width="stretch",
    )
    cols[1].button(
        "Draw mode" if mode != "draw" else "Leave draw mode",
        shortcut="W",
        on_click=on_mode,
        args=("draw",),
        width="stretch",
    )
    if mode == "point":
        default = current.class_name if current else classes[0]
        st.selectbox(
            "Class of the point",
            classes,
            index=classes.index(default) if default in classes else 0,
            key="rv_point_class",
        )
    _edit_ui(ws, reviewer, view, current, classes)


def _edit_ui(ws, reviewer, view: ImageView, current: BoxRow | None, classes: list[str]) -> None:
    """Corrected or new boxes: from a drag in draw mode, or typed corners."""
    drawn = st.session_state.get("rv_drawn")
    if drawn:
        x1, y1, x2, y2 = drawn
        st.caption(f"Drawn: ({x1:.0f}, {y1:.0f}) - ({x2:.0f}, {y2:.0f})")
    # Its inputs are keyed by box, so they are new widgets on every image: drawn only while the
    # panel is open (a drawing opens it). Closed, it saves about a fifth of the page's widgets.
    panel = st.expander("Correct or add a box", key=EDIT_PANEL_KEY, on_change="rerun")
    if not panel.open:
        return
    with panel:
        start = drawn or (current and (current.x1, current.y1, current.x2, current.y2))
        start = start or (0.0, 0.0, view.source.width / 4, view.source.height / 4)
        # Keys carry the box and the drawing, so the inputs refill when either changes.
        tag = f"{current.id if current else 0}_{current.version if current else 0}_{hash(drawn)}"
        cols = st.columns(4)
        corners = [
            cols[k].number_input(name, value=float(start[k]), step=1.0, key=f"rv_c{k}_{tag}")
            for k, name in enumerate(("x1", "y1", "x2", "y2"))
        ]
        default = current.class_name if current else classes[0]
        class_name = st.selectbox(
            "Class", classes, index=classes.index(default), key=f"rv_edit_class_{tag}"
        )
        cols = st.columns(2)
        cols[0].button(
            "Replace current box",
            shortcut="S",
            on_click=on_edit,
            args=(ws, reviewer, current, tuple(corners), class_name),
            disabled=current is None,
            width="stretch",
        )
        cols[1].button(
            "Add as new box",
            shortcut="Shift+W",
            on_click=on_add_box,
            args=(ws, reviewer, view.image_id, tuple(corners), class_name),
            width="stretch",
        )


def navigation_ui(ws: Workspace, reviewer: str, view: ImageView | None) -> None:
    cols = st.columns(6)
    cols[0].button(
        "Previous", shortcut="B", on_click=_go_previous, args=(ws, reviewer), width="stretch"
    )
    cols[1].button("Next", shortcut="N", on_click=_go_next, args=(ws, reviewer), width="stretch")
    cols[2].button("Undo", shortcut="U", on_click=on_undo, args=(ws, reviewer), width="stretch")
    cols[3].button(
        "Box ↓",
        shortcut="J",
        on_click=on_next_box,
        args=(view, 1),
        disabled=view is None,
        width="stretch",
    )
    cols[4].button(
        "Box ↑",
        shortcut="K",
        on_click=on_next_box,
        args=(view, -1),
        disabled=view is None,
        width="stretch",
    )
    if cols[5].button("Help", shortcut="H", width="stretch"):
        help_dialog()


@st.dialog("Keyboard shortcuts")
def help_dialog() -> None:
    rows = "\n".join(f"| `{key}` | {does} |" for key, does in SHORTCUTS)
    st.markdown("| key | does |\n|---|---|\n" + rows)
    st.caption(
        "Keys act on the current box (white frame). After a decision that leaves nothing "
        "pending, the next image opens. Shortcuts do nothing while a text field has focus."
    )


# Two gaps in Streamlit's own shortcuts, closed by a script in a one-pixel
# iframe that listens on the page around it (same origin):
# - "?" is Shift+/ and shortcuts take no punctuation: it clicks the Help button;
# - a click on the image (point and draw modes) lands in the click component's iframe, which
#   then holds keyboard focus and would swallow the next shortcut: focus returns to the page.
# Each mount first removes the listeners an earlier iframe left, so reruns never stack them.
# (st.html with unsafe_allow_javascript ran its script only on some page loads here.)
_KEYBOARD_JS = """
<script>
const page = window.parent;
const doc = page.document;
if (page.__pyrolabelKeys) {
  doc.removeEventListener("keydown", page.__pyrolabelKeys.keydown);
  page.removeEventListener("blur", page.__pyrolabelKeys.blur);
}
const keydown = (event) => {
  const target = event.target;
  const typing = target && (target.isContentEditable ||
    ["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName));
  if (event.key !== "?" || typing) return;
  const help = [...doc.querySelectorAll("button")].find(
    (b) => b.innerText.trim().startsWith("Help"));
  if (help) { event.preventDefault(); help.click(); }
};
const blur = () => {
  page.setTimeout(() => {
    const frame = doc.activeElement;
    if (frame && frame.tagName === "IFRAME" &&
        (frame.title || "").includes("image_coordinates")) {
      frame.blur();
      page.focus();
    }
  }, 0);
};
doc.addEventListener("keydown", keydown);
page.addEventListener("blur", blur);
page.__pyrolabelKeys = {keydown, blur};
</script>
"""


# ---------------------------------------------------------------------------------------------
# Prefetch


def prefetch_next(ws: Workspace, reviewer: str, layers: Layers) -> None:
    """Render the next image's base layer and mask boxes in the background, ahead of time."""
    history = st.session_state["rv_history"]
    pos = st.session_state["rv_pos"]
    state = _state()
    if pos + 1 < len(history):
        next_id = history[pos + 1]
    else:
        if not state.ahead and not state.exhausted:
            with ws.session() as session:
                state.ahead = queue.queue_page(
                    session,
                    reviewer=reviewer,
                    order=state.order,
                    filters=state.filters,
                    after=state.cursor,
                    seed=state.seed,
                )
            state.exhausted = not state.ahead
        if not state.ahead:
            return
        next_id = state.ahead[0].image_id
    with ws.session() as session:
        source, _, proposal = image_source(ws, session, next_id)
        classes = _classes(ws.db_url)
        # Guess the mask class the next image will show: its top pseudo box's, as the
        # "current box's class" default would pick.
        top = session.scalars(
            select(LabelClass.name)
            .join(Box, Box.class_id == LabelClass.id)
            .where(Box.image_id == next_id, Box.status == BoxStatus.PENDING)
            .order_by(Box.score.desc())
            .limit(1)
        ).first()
    mask_class = layers.mask_class
    if st.session_state.get("rv_l_mask") == "current box's class":
        mask_class = top or (classes[0] if classes else None)
    colour = CLASS_COLOURS[classes.index(mask_class) % len(CLASS_COLOURS)] if mask_class else None
    next_layers = Layers(
        show_image=layers.show_image,
        cam_class=layers.cam_class,
        mask_class=mask_class,
        opacity=layers.opacity,
        threshold=layers.threshold,
        mask_colour=colour or layers.mask_colour,
    )
    cache = common.overlay_cache()
    cache.prefetch(source, next_layers, display_size(source.width, source.height))
    if mask_class:
        probs = (proposal.probs or {}) if proposal is not None else {}
        cache.prefetch_derived(
            source.mask_path(mask_class),
            threshold=layers.threshold,
            image_size=(source.width, source.height),
            class_score=float(probs.get(mask_class, 1.0)),
        )


# ---------------------------------------------------------------------------------------------
# The page


def _current_box(view: ImageView) -> BoxRow | None:
    boxes = view.actionable
    chosen = st.session_state.get("rv_box")
    by_id = {b.id: b for b in boxes}
    if chosen in by_id:
        return by_id[chosen]
    current = view.pending[0] if view.pending else (boxes[0] if boxes else None)
    st.session_state["rv_box"] = current.id if current else None
    return current


def review_page() -> None:
    ws = common.workspace()
    reviewer = common.reviewer_ui()
    common.reviewer_sidebar(reviewer)
    classes = _classes(ws.db_url)
    reasons = _reasons(ws.db_url)

    # Queue: a changed order or filter starts a new walk.
    order, filters = queue_ui(classes, reasons)
    signature = (order, filters)
    if st.session_state.get("rv_signature") != signature or "rv_queue" not in st.session_state:
        st.session_state["rv_signature"] = signature
        _reset_queue(ws, reviewer, order, filters)

    image_id = _current_image()
    view = load_view(ws, image_id) if image_id is not None else None
    current = _current_box(view) if view is not None else None
    layers, show = layers_ui(classes, current.class_name if current else None)
    with st.sidebar:
        remaining = _queue_size(ws.db_url, reviewer, filters)
        st.caption(f"{remaining} images in this queue (refreshed every 30 s)")

    st.iframe(_KEYBOARD_JS, height=1, width=1)
    _show_flash()
    navigation_ui(ws, reviewer, view)
    if view is None:
        st.info(
            "Nothing left in this queue. Change the order or filters in the sidebar, or run "
            "`pyrolabel propose` for more images."
        )
        return

    _renew_lease(ws, reviewer, view.image_id)
    left, right = st.columns([3, 2], gap="medium")
    with left:
        image_ui(ws, reviewer, view, current, layers, show)
    with right:
        actions_ui(ws, reviewer, view, current, classes, reasons)
    prefetch_next(ws, reviewer, layers)
