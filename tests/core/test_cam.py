import pytest
import torch
import torch.nn.functional as F

from core.cam import InferenceConfig, compute_cams, gate_cams, infer_masks
from core.rsepm import build_rsepm

SEEDS = (0, 1, 2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_rsepm("resnet10", 2, seg_channels=16).eval()


@pytest.mark.parametrize("seed", SEEDS)
def test_gate_cams_matches_a_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    cams = torch.rand(2, 3, 4, 5, generator=gen)
    probs = torch.rand(2, 3, generator=gen)
    got = gate_cams(cams, probs)
    for n in range(2):
        for c in range(3):
            expected = cams[n, c] / (cams[n, c].max() + 1e-5) * probs[n, c]
            torch.testing.assert_close(got[n, c], expected)


def test_an_absent_class_is_gated_to_near_zero_not_stretched():
    # A faint, flat CAM of a class the classifier rejects must not become full heat.
    cams = torch.full((1, 2, 4, 4), 1e-3)
    cams[0, 0, 1, 1] = 5.0
    probs = torch.tensor([[0.95, 1e-4]])
    gated = gate_cams(cams, probs)
    assert gated[0, 0].max() == pytest.approx(0.95, abs=1e-4)
    assert gated[0, 1].max() < 1e-3


@pytest.mark.parametrize("seed", SEEDS)
def test_single_view_cams_equal_one_forward(tiny_model, seed):
    torch.manual_seed(seed)
    images = torch.randn(2, 3, 32, 48)
    result = compute_cams(tiny_model, images, scales=(1.0,), flip=False)
    with torch.no_grad():
        out = tiny_model(images, with_seg=False)
    probs = torch.sigmoid(out.logits)
    # Maps are combined at stride 4 (8 x 12 here), then brought to the input size.
    cams = F.interpolate(out.cams.clamp(min=0), size=(8, 12), mode="bilinear", align_corners=False)
    expected = F.interpolate(
        gate_cams(cams, probs), size=(32, 48), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(result.probs, probs)
    torch.testing.assert_close(result.cams, expected)
    assert result.cams.min() >= 0 and result.cams.max() <= 1
    assert not result.cams.requires_grad  # inference builds no graph


@pytest.mark.parametrize("seed", SEEDS)
def test_flip_inference_is_mirror_symmetric(tiny_model, seed):
    torch.manual_seed(seed)
    images = torch.randn(1, 3, 32, 32)
    config = InferenceConfig(scales=(0.5, 1.0), flip=True)
    plain = infer_masks(tiny_model, images, config)
    mirrored = infer_masks(tiny_model, images.flip(-1), config)
    torch.testing.assert_close(mirrored.cams, plain.cams.flip(-1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mirrored.fg_probs, plain.fg_probs.flip(-1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mirrored.probs, plain.probs, rtol=1e-5, atol=1e-6)


def test_masks_follow_the_released_rule(tiny_model):
    torch.manual_seed(3)
    images = torch.randn(2, 3, 32, 32)
    # Threshold 0 keeps both classes; threshold above 1 keeps none.
    kept = infer_masks(tiny_model, images, InferenceConfig(scales=(1.0,), class_threshold=0.0))
    none = infer_masks(tiny_model, images, InferenceConfig(scales=(1.0,), class_threshold=1.01))
    assert kept.fg_probs.shape == (2, 2, 32, 32) and kept.labels.shape == (2, 32, 32)
    assert none.fg_probs.abs().max() == 0 and none.labels.eq(0).all()
    assert kept.fg_probs.min() >= 0 and kept.fg_probs.max() <= 1
    assert not kept.fg_probs.requires_grad and not kept.cams.requires_grad
    # f = s / (s + (1 - s)^2) is increasing in the normalised score s, and the label is the
    # argmax over [(1 - max s)^2, s_1, ..., s_C]; so both can be checked through f alone.
    best_fg = kept.fg_probs.max(dim=1).values
    is_fg = kept.labels > 0
    # A pixel is foreground exactly where the best class beats (1 - s)^2, i.e. f >= 0.5.
    agree = (best_fg >= 0.5) == is_fg
    near_tie = (best_fg - 0.5).abs() < 1e-3
    assert (agree | near_tie).all()
    # The labelled class is the one with the highest foreground probability.
    fg_pixels = is_fg & ~near_tie
    assert torch.equal(kept.labels[fg_pixels] - 1, kept.fg_probs.argmax(dim=1)[fg_pixels])


def test_pamr_and_plain_mean_options_run(tiny_model):
    images = torch.randn(1, 3, 32, 32)
    config = InferenceConfig(scales=(1.0,), flip=True, epm=False, pamr_iterations=2)
    result = infer_masks(tiny_model, images, config)
    assert result.fg_probs.shape == (1, 2, 32, 32)
    assert torch.isfinite(result.fg_probs).all()
