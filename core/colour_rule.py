"""A classical fire-pixel rule in YCbCr, the baseline a learnt model has to beat.

After T. Celik and H. Demirel, "Fire detection in video sequences using a generic color model",
Fire Safety Journal 44(2), 2009: a pixel is fire when it is brighter than it is blue
(Y > Cb), redder than blue (Cr > Cb) by a clear margin (|Cb - Cr| >= tau), and brighter, less
blue and redder than the image's average (Y > mean Y, Cb < mean Cb, Cr > mean Cr). The paper
picks tau = 40 from its ROC curve; the other rules have no parameter.
"""

from __future__ import annotations

import cv2
import numpy as np

DEFAULT_TAU = 40.0


def _ycbcr(image_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image_rgb = np.asarray(image_rgb)
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(
            f"image_rgb must be (H, W, 3) uint8, got {image_rgb.shape} {image_rgb.dtype}"
        )
    # OpenCV's YCrCb uses the ITU-R BT.601 8-bit scale the paper works in; note the channel order.
    ycrcb = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2YCrCb).astype(np.float32)
    return ycrcb[..., 0], ycrcb[..., 2], ycrcb[..., 1]


def fire_colour_mask(image_rgb: np.ndarray, *, tau: float = DEFAULT_TAU) -> np.ndarray:
    """Celik and Demirel's fire pixels.

    Args:
        image_rgb: (H, W, 3) uint8 RGB.
        tau: minimum |Cb - Cr| on the 0-255 scale.

    Returns:
        (H, W) bool, True where all six rules hold.
    """
    y, cb, cr = _ycbcr(image_rgb)
    return (
        (y > cb)
        & (cr > cb)
        & (np.abs(cb - cr) >= tau)
        & (y > y.mean())
        & (cb < cb.mean())
        & (cr > cr.mean())
    )


def fire_colour_score(image_rgb: np.ndarray) -> np.ndarray:
    """A graded version of the rule, so it can be thresholded like a CAM.

    The five parameter-free rules gate the pixel; within the gate the score is |Cb - Cr| / 255,
    the chrominance margin the paper thresholds with tau. The margin is a whole number, so
    `fire_colour_score(img) >= (tau - 0.5) / 255` equals `fire_colour_mask(img, tau=tau)`, and a
    threshold grid over the score is a grid over tau.

    Returns:
        (H, W) float32 in [0, 1].
    """
    y, cb, cr = _ycbcr(image_rgb)
    gate = (y > cb) & (cr > cb) & (y > y.mean()) & (cb < cb.mean()) & (cr > cr.mean())
    return np.where(gate, np.abs(cb - cr) / 255.0, 0.0).astype(np.float32)
