"""Dataset, export and settings pages; overlay rendering; the serve command line."""

from __future__ import annotations

import argparse
import io
import os
import stat
import zipfile

import numpy as np
import pytest
from sqlalchemy import select

from app.commands import serve
from app.ui.overlays import (
    DrawBox,
    ImageSource,
    Layers,
    OverlayCache,
    compose_base,
    derive_boxes,
    display_size,
    draw_boxes,
)
from db import review
from db.models import Box, FalsePositiveReason, Setting, Tag
from db.review import ReviewError
from db.stats import overview


def _review_some(workspace, proposals):
    with workspace.transaction() as session:
        boxes = session.scalars(
            select(Box).where(Box.image_id == proposals.image_ids[0]).order_by(Box.id)
        ).all()
        review.accept_box(session, box_id=boxes[0].id, version=1, reviewer="alice")
        review.reject_box(session, box_id=boxes[1].id, version=1, reviewer="bob", reason="sunset")


def test_overview_counts(workspace, proposals):
    _review_some(workspace, proposals)
    with workspace.session() as session:
        numbers = overview(session)
    assert numbers.images == 5
    assert numbers.proposed_images == 5 and numbers.reviewed_images == 1
    assert numbers.pending_images == 4
    assert sum(count for *_, count in numbers.boxes) == 10
    statuses = {}
    for _cls, status, _origin, count in numbers.boxes:
        statuses[status] = statuses.get(status, 0) + count
    assert statuses == {"pending": 8, "accepted": 1, "rejected": 1}
    assert numbers.fp_by_reason == {"sunset": 1}
    assert sorted((r, n) for r, _day, n in numbers.throughput) == [("alice", 1), ("bob", 1)]


def test_dataset_page_shows_charts(app_for, workspace, proposals):
    _review_some(workspace, proposals)
    with workspace.transaction() as session:
        session.add(Tag(image_id=proposals.image_ids[1], class_id=1, present=True, origin="given"))
    at = app_for(page="dataset")
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Images"] == "5" and metrics["Reviewed"] == "1"
    # Boxes by class and status, by origin; images by split; false positives by reason;
    # reviewer throughput; images by class from the tags.
    assert len(at.get("vega_lite_chart")) == 6


def test_export_page_offers_a_zip(app_for, workspace, proposals):
    _review_some(workspace, proposals)
    at = app_for(page="export")
    assert not at.exception
    at.selectbox[0].set_value("coco")
    (prepare,) = [b for b in at.button if b.label == "Prepare download"]
    prepare.click().run()
    assert any("exported" in s.value for s in at.success), [e.value for e in at.error]
    (download,) = at.get("download_button")
    assert "COCO" in download.proto.label


def test_settings_save_reasons(workspace):
    with workspace.transaction() as session:
        box = session.scalars(select(Box)).first()
    with workspace.transaction() as session:
        review.save_false_positive_reasons(
            session,
            reasons=[("lamp", "Street lamp", True), ("welding", "Welding arc", True)],
        )
        keys = [(r.key, r.label) for r in review.false_positive_reasons(session)]
    assert keys == [("lamp", "Street lamp"), ("welding", "Welding arc")]
    assert box is None  # no proposals here: every left-out reason could be deleted
    with workspace.session() as session:
        assert (
            session.scalar(select(FalsePositiveReason).where(FalsePositiveReason.key == "torch"))
            is None
        )
    with pytest.raises(ReviewError, match="once"):
        with workspace.transaction() as session:
            review.save_false_positive_reasons(
                session, reasons=[("a", "A", True), ("a", "B", True)]
            )


def test_reasons_in_use_are_deactivated_not_deleted(workspace, proposals):
    _review_some(workspace, proposals)  # a box rejected for "sunset"
    with workspace.transaction() as session:
        review.save_false_positive_reasons(session, reasons=[("torch", "Torch", True)])
    with workspace.session() as session:
        sunset = session.scalar(
            select(FalsePositiveReason).where(FalsePositiveReason.key == "sunset")
        )
        assert sunset is not None and not sunset.active
        assert [r.key for r in review.false_positive_reasons(session)] == ["torch"]


def test_settings_page_renders(app_for):
    at = app_for(page="settings")
    assert not at.exception
    assert any("OIDC" in m.value for m in at.markdown)


# ---------------------------------------------------------------------------------------------
# Overlays


def _source(tmp_path, image_rgb, cam=None, mask=None):
    import cv2

    path = tmp_path / "image.png"
    cv2.imwrite(str(path), cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    for folder, plane in (("cams", cam), ("masks", mask)):
        if plane is not None:
            (tmp_path / folder).mkdir(exist_ok=True)
            cv2.imwrite(str(tmp_path / folder / "7_fire.png"), plane)
    height, width = image_rgb.shape[:2]
    return ImageSource(
        image_id=7,
        path=str(path),
        width=width,
        height=height,
        cam_dir=str(tmp_path / "cams"),
        mask_dir=str(tmp_path / "masks"),
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cam_blend_matches_per_pixel_reference(tmp_path, seed):
    import cv2

    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    heat = rng.integers(0, 256, (24, 32), dtype=np.uint8)
    source = _source(tmp_path, image, cam=heat)
    layers = Layers(cam_class="fire", opacity=0.6)
    got = compose_base(source, layers, (32, 24))

    colour = cv2.cvtColor(cv2.applyColorMap(heat, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    expected = np.empty_like(image)
    for r in range(24):
        for c in range(32):
            alpha = 0.6 * heat[r, c] / 255.0
            mixed = image[r, c] * (1 - alpha) + colour[r, c] * alpha
            expected[r, c] = np.clip(mixed, 0, 255).astype(np.uint8)
    np.testing.assert_allclose(got.astype(int), expected.astype(int), atol=1)


def test_mask_tint_follows_the_threshold_and_boxes_come_back_in_image_pixels(tmp_path):
    image = np.zeros((40, 80, 3), np.uint8)
    mask = np.zeros((20, 40), np.uint8)  # half the image's resolution
    mask[2:6, 4:10] = 200  # 0.78
    mask[10:14, 20:30] = 100  # 0.39
    source = _source(tmp_path, image, mask=mask)
    tinted_high = compose_base(source, Layers(mask_class="fire", threshold=0.5), (80, 40))
    tinted_low = compose_base(source, Layers(mask_class="fire", threshold=0.3), (80, 40))
    assert tinted_high[24, 50].sum() == 0 and tinted_low[24, 50].sum() > 0

    high = derive_boxes(mask, threshold=0.5, image_size=(80, 40))
    low = derive_boxes(mask, threshold=0.3, image_size=(80, 40))
    assert [(b.x1, b.y1, b.x2, b.y2) for b in high] == [(8, 4, 20, 12)]
    assert sorted((b.x1, b.y1, b.x2, b.y2) for b in low) == [(8, 4, 20, 12), (40, 20, 60, 28)]


def test_missing_image_and_maps_still_render(tmp_path):
    source = ImageSource(image_id=1, path=str(tmp_path / "gone.jpg"), width=64, height=32)
    out = compose_base(source, Layers(cam_class="fire", mask_class="fire"), display_size(64, 32))
    assert out.shape == (360, 720, 3)


def test_draw_boxes_marks_the_current_box():
    base = np.zeros((50, 100, 3), np.uint8)
    out = draw_boxes(base, [DrawBox(10, 10, 20, 20, "pending", current=True)], scale=2.0)
    assert (out[20, 30] == (255, 215, 0)).all()  # the box's edge, in displayed pixels
    assert (out[18, 30] == (255, 255, 255)).all()  # the current-box frame outside it
    assert base.sum() == 0  # drawn on a copy


def test_overlay_cache_prefetches_once(tmp_path, monkeypatch):
    from app.ui import overlays

    calls = []
    monkeypatch.setattr(
        overlays, "compose_base", lambda *args: calls.append(args) or np.zeros((2, 2, 3))
    )
    cache = OverlayCache(max_items=2)
    source = ImageSource(image_id=1, path="x", width=2, height=2)
    cache.prefetch(source, Layers(), (2, 2))
    cache.base(source, Layers(), (2, 2))
    cache.base(source, Layers(), (2, 2))
    assert len(calls) == 1
    for image_id in (2, 3):
        cache.base(ImageSource(image_id=image_id, path="x", width=2, height=2), Layers(), (2, 2))
    cache.base(source, Layers(), (2, 2))  # evicted by the two newer ones
    assert len(calls) == 4


def test_overlay_cache_derives_mask_boxes_once(tmp_path, monkeypatch):
    from app.ui import overlays

    mask = np.zeros((20, 40), np.uint8)
    mask[2:6, 4:10] = 200
    source = _source(tmp_path, np.zeros((40, 80, 3), np.uint8), mask=mask)
    path = source.mask_path("fire")
    calls = []
    real = overlays.derive_boxes
    monkeypatch.setattr(overlays, "derive_boxes", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = OverlayCache()
    cache.prefetch_derived(path, threshold=0.5, image_size=(80, 40), class_score=0.9)
    got = cache.derived(path, threshold=0.5, image_size=(80, 40), class_score=0.9)
    assert got == real(mask, threshold=0.5, image_size=(80, 40), class_score=0.9)
    assert cache.derived(path, threshold=0.5, image_size=(80, 40), class_score=0.9) == got
    assert len(calls) == 1
    assert cache.derived(None, threshold=0.5, image_size=(80, 40), class_score=0.9) == []


# ---------------------------------------------------------------------------------------------
# pyrolabel serve


def test_serve_command_line(workspace):
    command = serve.streamlit_command("127.0.0.1", 8765)
    text = " ".join(command)
    assert command[1:4] == ["-m", "streamlit", "run"]
    assert command[4].endswith("app/streamlit_app.py")
    for option in (
        "--server.address 127.0.0.1",
        "--server.port 8765",
        "--server.headless true",
        "--browser.gatherUsageStats false",
        "--server.fileWatcherType none",
    ):
        assert option in text
    env = serve.app_environment(workspace)
    assert env["PYROLABEL_WORKSPACE"] == str(workspace.root)
    assert "PYROLABEL_DB_URL" not in env


def test_serve_writes_private_oidc_secrets(workspace, tmp_path):
    assert serve._oidc_settings(workspace, 8501) is None
    with workspace.transaction() as session:
        session.add(
            Setting(
                key="oidc",
                value={
                    "client_id": "pyrolabel",
                    "client_secret": 'se"cret',
                    "server_metadata_url": "https://id.example/.well-known/openid-configuration",
                },
            )
        )
    auth = serve._oidc_settings(workspace, 8600)
    assert auth["redirect_uri"] == "http://localhost:8600/oauth2callback"
    assert len(auth["cookie_secret"]) > 20
    assert serve._oidc_settings(workspace, 8600)["cookie_secret"] == auth["cookie_secret"]
    path = serve._write_secrets(tmp_path, auth)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    import tomllib

    assert tomllib.loads(path.read_text())["auth"]["client_secret"] == 'se"cret'


def test_serve_refuses_a_busy_port(workspace, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = argparse.Namespace(host="127.0.0.1", port=port)
        assert serve.run(args, workspace) == 2
    assert "in use" in capsys.readouterr().err


def test_serve_stopped_by_sigterm_takes_the_app_down(tmp_path):
    """A service manager's stop must not leave Streamlit orphaned on the port."""
    import socket
    import subprocess
    import sys
    import time

    from db.workspace import Workspace

    root = tmp_path / "workspace"
    Workspace(root).init(["fire", "smoke"])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "app.cli", "--workspace", str(root), "serve", "--port"]
    process = subprocess.Popen(
        [*command, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        serve.wait_until_ready(url, process, timeout_s=120)
        process.terminate()
        assert process.wait(timeout=30) == 0
        deadline = time.monotonic() + 10
        while not serve._port_free("127.0.0.1", port):
            assert time.monotonic() < deadline, f"the app still listens on port {port}"
            time.sleep(0.2)
    finally:
        if process.poll() is None:
            process.kill()


def test_zip_folder_keeps_relative_paths(tmp_path):
    from app.ui.export import _zip_folder

    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    names = zipfile.ZipFile(io.BytesIO(_zip_folder(tmp_path))).namelist()
    assert names == ["labels/a.txt"]
