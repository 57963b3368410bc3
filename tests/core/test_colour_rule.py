import numpy as np
import pytest

from core.colour_rule import fire_colour_mask, fire_colour_score


def _reference_mask(image_rgb: np.ndarray, tau: float) -> np.ndarray:
    """The six rules written out from the BT.601 formulas, pixel by pixel."""
    rgb = image_rgb.astype(np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = np.round(0.299 * r + 0.587 * g + 0.114 * b)
    cb = np.round(128 + (b - y) * 0.564)
    cr = np.round(128 + (r - y) * 0.713)
    height, width = y.shape
    mask = np.zeros((height, width), bool)
    for i in range(height):
        for j in range(width):
            mask[i, j] = (
                y[i, j] > cb[i, j]
                and cr[i, j] > cb[i, j]
                and abs(cb[i, j] - cr[i, j]) >= tau
                and y[i, j] > y.mean()
                and cb[i, j] < cb.mean()
                and cr[i, j] > cr.mean()
            )
    return mask


def _scene() -> np.ndarray:
    image = np.zeros((20, 30, 3), np.uint8)
    image[:] = (40, 60, 90)  # dusk sky, bluish
    image[5:15, 5:12] = (255, 160, 30)  # flame orange
    image[5:15, 15:22] = (250, 250, 250)  # white wall: bright but colourless
    image[5:15, 24:28] = (120, 50, 40)  # dark brick red: red but darker than average
    return image


def test_flame_pixels_pass_and_others_fail():
    mask = fire_colour_mask(_scene())
    assert mask[5:15, 5:12].all()
    assert mask.sum() == 70


def test_tau_controls_the_chrominance_margin():
    image = _scene()
    image[0:2, 0:30] = (230, 200, 150)  # pale warm light, |Cb - Cr| about 50
    assert fire_colour_mask(image, tau=40)[0:2].all()
    assert not fire_colour_mask(image, tau=80)[0:2].any()


def test_wrong_input_is_refused():
    with pytest.raises(ValueError, match="uint8"):
        fire_colour_mask(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="H, W, 3"):
        fire_colour_mask(np.zeros((4, 4), np.uint8))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_slow_reference(seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    got = fire_colour_mask(image, tau=40)
    want = _reference_mask(image, tau=40)
    # OpenCV's fixed-point conversion can round a channel one step apart from the float
    # formula; that flips at most the odd pixel sitting exactly on a rule's boundary.
    assert want.sum() > 20
    assert (got != want).mean() <= 0.01


@pytest.mark.parametrize("tau", [20, 40, 60])
def test_score_threshold_equals_rule(tau):
    rng = np.random.default_rng(tau)
    image = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    score = fire_colour_score(image)
    assert score.dtype == np.float32 and 0.0 <= score.min() and score.max() <= 1.0
    # |Cb - Cr| is an integer, so any threshold between (tau - 1) / 255 and tau / 255 is tau.
    np.testing.assert_array_equal(score >= (tau - 0.5) / 255, fire_colour_mask(image, tau=tau))
