import cv2
import numpy as np
import pytest
import torch

from core.cam import InferenceConfig
from core.propose import iter_proposals, proposal_boxes, rank_slice, save_proposal_pngs
from core.rsepm import build_rsepm

CLASSES = ["fire", "smoke"]
FAST = InferenceConfig(scales=(1.0,), flip=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_rsepm("resnet10", 2, seg_channels=8).eval()


@pytest.fixture
def images(tmp_path, make_image):
    return [
        make_image(tmp_path / "a.png", (40, 30)),
        make_image(tmp_path / "b.jpg", (64, 48)),
        make_image(tmp_path / "c.png", (30, 50)),
    ]


def test_proposals_stream_in_order_at_working_size(tiny_model, images):
    proposals = iter_proposals(tiny_model, images, image_size=32, batch_size=2, inference=FAST)
    assert not isinstance(proposals, list)  # a generator: nothing is held for all images
    results = list(proposals)
    assert [p.index for p in results] == [0, 1, 2]
    assert [(p.width, p.height) for p in results] == [(40, 30), (64, 48), (30, 50)]
    for p in results:
        assert p.probs.shape == (2,) and p.cams.shape == (2, 32, 32)
        assert p.fg_probs.shape == (2, 32, 32) and p.labels.shape == (32, 32)
        assert 0 <= p.cams.min() and p.cams.max() <= 1


def test_batching_does_not_change_results(tiny_model, images):
    one = list(iter_proposals(tiny_model, images, image_size=32, batch_size=1, inference=FAST))
    three = list(iter_proposals(tiny_model, images, image_size=32, batch_size=3, inference=FAST))
    for a, b in zip(one, three, strict=True):
        np.testing.assert_allclose(a.probs, b.probs, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(a.fg_probs, b.fg_probs, atol=2e-3)


def test_pngs_are_written_at_the_original_size(tiny_model, images, tmp_path):
    proposal = next(iter_proposals(tiny_model, images, image_size=32, inference=FAST))
    written = save_proposal_pngs(
        proposal, CLASSES, image_id=7, cams_dir=tmp_path / "cams", masks_dir=tmp_path / "masks"
    )
    names = sorted(p.relative_to(tmp_path).as_posix() for p in written)
    assert names == ["cams/7_fire.png", "cams/7_smoke.png", "masks/7_fire.png", "masks/7_smoke.png"]
    mask = cv2.imread(str(tmp_path / "masks" / "7_fire.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (30, 40) and mask.dtype == np.uint8
    # The PNG is the probability map resized: its mean matches the map's mean.
    assert abs(mask.mean() / 255 - proposal.fg_probs[0].astype(np.float32).mean()) < 0.02


def test_boxes_are_in_original_pixels(tiny_model, images):
    for proposal in iter_proposals(tiny_model, images, image_size=32, inference=FAST):
        # Paint a known blob so the boxes are predictable: rows 8..15, cols 16..23 at 32 px.
        proposal.fg_probs[:] = 0
        proposal.fg_probs[0, 8:16, 16:24] = 1
        proposal.probs[0] = 0.8
        boxes = proposal_boxes(proposal, threshold=0.5)
        assert list(boxes) == [0]
        (box,) = boxes[0]
        sx, sy = proposal.width / 32, proposal.height / 32
        assert (box.x1, box.y1, box.x2, box.y2) == pytest.approx(
            (16 * sx, 8 * sy, 24 * sx, 16 * sy)
        )
        assert box.score == pytest.approx(0.8, rel=1e-3)


def test_a_bad_image_is_reported_and_the_rest_go_on(tiny_model, images, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    results = list(
        iter_proposals(tiny_model, [images[0], bad, images[1]], image_size=32, inference=FAST)
    )
    assert [p.error is None for p in results] == [True, False, True]
    assert "broken.jpg" in results[1].error
    assert (
        proposal_boxes(results[1]) == {}
        and save_proposal_pngs(
            results[1], CLASSES, image_id=1, cams_dir=tmp_path, masks_dir=tmp_path
        )
        == []
    )


def test_each_rank_takes_its_own_slice(tiny_model, images, monkeypatch):
    assert list(rank_slice(7, 1, 3)) == [1, 4]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert list(rank_slice(5)) == [1, 3]
    results = list(iter_proposals(tiny_model, images, image_size=32, inference=FAST))
    assert [p.index for p in results] == [1]
    with pytest.raises(ValueError):
        rank_slice(3, 2, 2)
