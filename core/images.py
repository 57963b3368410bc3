"""Reading images safely: sizes from headers, pixels as RGB, clear errors for bad files.

Every function here raises `ImageError` (with the path in its message) for a file that is not
a usable image, so callers can report one line per bad file and go on with the rest.
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# A 20000 x 20000 CCTV mosaic is 400 megapixels; anything above this is refused as a likely
# decompression bomb. Callers can raise it (ingest --max-pixels).
DEFAULT_MAX_PIXELS = 100_000_000

# Pillow refuses to open anything above twice its own MAX_IMAGE_PIXELS (about 179 megapixels)
# before we see the size; a caller who raises max_pixels past that lifts Pillow's limit for the
# open call, under this lock because the limit is a module global.
_PIL_LIMIT_LOCK = threading.Lock()

# EXIF orientations 5-8 swap width and height when a viewer shows the image.
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112


class ImageError(ValueError):
    """A file that cannot be used as an image; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class ImageHeader:
    """What ingest needs of an image without decoding its pixels.

    width, height: as a viewer shows the image (EXIF orientation applied).
    """

    width: int
    height: int
    format: str
    mode: str
    orientation: int


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def read_header(
    path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, *, verify: bool = False
) -> ImageHeader:
    """Size, format and orientation of an image from its header; pixels are not decoded.

    Args:
        verify: also decode the pixel data once, so a truncated or corrupt file fails here
            rather than in training (a truncated JPEG keeps a valid header). JPEGs decode at
            1/8 scale (Pillow's draft mode), which still walks the whole entropy-coded stream
            but skips most of the inverse DCT: about 0.7 ms instead of 1.3 ms for a 608x608
            frame, against 0.15 ms for the header alone (measured on fire-boxes). What passes
            with verify=True, read_rgb decodes.

    Raises:
        ImageError: empty file, not an image, more than `max_pixels` pixels, or (verify)
            pixel data that cannot be decoded.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(path, "empty file (0 bytes)")
    except OSError as err:
        raise ImageError(path, f"cannot read: {err.strerror}") from err
    try:
        with _open(path, max_pixels) as img:
            width, height = img.size
            fmt, mode = img.format or "", img.mode
            decoded = verify and width * height <= max_pixels
            if decoded:
                _decode_once(img, path)
            orientation = _orientation(img, decoded)
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageError(path, f"too many pixels ({err})") from err
    except Exception as err:
        raise ImageError(path, f"not a readable image ({type(err).__name__}: {err})") from err
    if width <= 0 or height <= 0:
        raise ImageError(path, f"invalid size {width}x{height}")
    if width * height > max_pixels:
        raise ImageError(
            path,
            f"{width}x{height} is {width * height} pixels, above the limit of {max_pixels} "
            "(a likely decompression bomb; raise --max-pixels if the image is real)",
        )
    if orientation in _TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    return ImageHeader(width=width, height=height, format=fmt, mode=mode, orientation=orientation)


def read_rgb(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image as it is shown: EXIF rotation applied, converted to 8-bit RGB.

    Grayscale, palette, RGBA (composited on black), CMYK and 16-bit images are converted.

    Returns:
        (H, W, 3) uint8 array.

    Raises:
        ImageError: the file is not a decodable image (truncated, corrupt, too large).
    """
    header = read_header(path, max_pixels=max_pixels)
    try:
        with _open(path, max_pixels) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb = _to_rgb(img)
    except Exception as err:
        raise ImageError(path, f"cannot decode pixels ({type(err).__name__}: {err})") from err
    if rgb.shape[:2] != (header.height, header.width):
        raise ImageError(path, f"decoded size {rgb.shape[1]}x{rgb.shape[0]} disagrees with header")
    return rgb


def _orientation(img: Image.Image, decoded: bool) -> int:
    """The EXIF orientation tag (1 when absent or unreadable)."""
    try:
        if img.format == "PNG" and not decoded:
            # Pillow's PNG getexif() decodes every pixel to reach an eXIf chunk placed after
            # the image data (and swallows decode errors on the way); a header read takes
            # only a chunk before it, which is where writers put it.
            raw = img.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = img.getexif()
        return int(exif.get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # a broken EXIF block does not make the pixels unusable
        return 1


def _decode_once(img: Image.Image, path: Path) -> None:
    try:
        if img.format == "JPEG":
            img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
        img.load()
    except Exception as err:
        raise ImageError(path, f"cannot decode pixels ({type(err).__name__}: {err})") from err


@contextmanager
def _open(path: str | Path, max_pixels: int) -> Iterator[Image.Image]:
    """Image.open without Pillow's bomb warning; our own max_pixels check is the guard."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        pil_limit = Image.MAX_IMAGE_PIXELS
        if pil_limit is not None and max_pixels > 2 * pil_limit:
            with _PIL_LIMIT_LOCK:
                Image.MAX_IMAGE_PIXELS = None
                try:
                    img = Image.open(path)
                finally:
                    Image.MAX_IMAGE_PIXELS = pil_limit
        else:
            img = Image.open(path)
        with img:
            yield img


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit (or 32-bit integer) grey: scale the used range into 8 bits.
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max() if arr.size else 0.0
        scale = 255.0 / top if top > 255 else 1.0
        grey = np.clip(arr * scale, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def content_hash(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in a stream (hex string)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
