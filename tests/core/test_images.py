import hashlib
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from core.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    content_hash,
    is_image_file,
    read_header,
    read_rgb,
)


def png_claiming_size(path, width, height):
    """A tiny valid PNG whose IHDR is rewritten to claim width x height (a decompression bomb
    as far as the header goes; its pixel data is far too short)."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    # Signature (8) + chunk length (4) + "IHDR" (4), then width, height, and 5 more bytes.
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    "name,mode,color",
    [
        ("rgb.jpg", "RGB", (200, 30, 10)),
        ("grey.png", "L", 90),
        ("cmyk.jpg", "CMYK", (0, 255, 255, 0)),
        ("rgba.png", "RGBA", (255, 0, 0, 128)),
        ("palette.png", "P", 3),
        ("rgb.bmp", "RGB", (1, 2, 3)),
        ("rgb.webp", "RGB", (10, 200, 30)),
        ("bits.png", "1", 1),
    ],
)
def test_modes_are_read_as_rgb(tmp_path, make_image, name, mode, color):
    path = make_image(tmp_path / name, (30, 20), color, mode=mode)
    header = read_header(path, verify=True)
    assert (header.width, header.height) == (30, 20)
    rgb = read_rgb(path)
    assert rgb.shape == (20, 30, 3) and rgb.dtype == np.uint8


def test_rgba_is_composited_on_black(tmp_path, make_image):
    path = make_image(tmp_path / "a.png", (4, 4), (255, 100, 0, 128), mode="RGBA")
    rgb = read_rgb(path)
    expected = np.round(np.array([255, 100, 0]) * 128 / 255)
    np.testing.assert_allclose(rgb[0, 0], expected, atol=1)


def test_sixteen_bit_is_scaled_to_eight(tmp_path):
    path = tmp_path / "deep.png"
    values = np.array([[0, 1000], [30000, 65535]], dtype="<u2")
    Image.fromarray(values).save(path)  # uint16 -> mode I;16
    rgb = read_rgb(path)
    assert rgb.shape == (2, 2, 3)
    # The used range [0, 65535] maps onto [0, 255].
    np.testing.assert_allclose(rgb[..., 0], np.clip(values / 65535 * 255, 0, 255), atol=1)


@pytest.mark.parametrize("orientation,shown", [(1, (40, 20)), (3, (40, 20)), (6, (20, 40))])
def test_exif_orientation_gives_displayed_size(tmp_path, make_image, orientation, shown):
    path = make_image(tmp_path / "r.jpg", (40, 20), exif_orientation=orientation)
    header = read_header(path)
    assert (header.width, header.height) == shown
    assert header.orientation == orientation
    assert read_rgb(path).shape[:2] == (shown[1], shown[0])


def test_exif_rotation_moves_pixels_as_a_viewer_shows(tmp_path):
    # Stored 40x20 with a white left half; orientation 6 shows it rotated 90 degrees clockwise,
    # so the white half becomes the top half of a 20x40 image.
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "r.png"
    Image.fromarray(stored).save(path, exif=exif.tobytes())
    rgb = read_rgb(path)
    assert rgb.shape == (40, 20, 3)
    assert rgb[:20].min() == 255 and rgb[20:].max() == 0


def test_bad_files_raise_image_error_naming_the_file(tmp_path, make_image):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    good = make_image(tmp_path / "good.jpg", (64, 64))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for path, reason in [(empty, "empty"), (text, "not a readable image")]:
        with pytest.raises(ImageError, match=reason) as info:
            read_header(path)
        assert str(path) in str(info.value)
    png = make_image(tmp_path / "good.png", (64, 64)).read_bytes()
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(png[:60] + bytes(200) + png[260:])
    # A truncated JPEG or a PNG with damaged image data keeps a valid header: only decoding
    # finds it (Pillow's PNG EXIF reader once swallowed this decode error).
    for broken in (truncated, corrupt):
        assert read_header(broken).width == 64
        with pytest.raises(ImageError, match="cannot decode"):
            read_header(broken, verify=True)
        with pytest.raises(ImageError, match="cannot decode"):
            read_rgb(broken)


def test_pixel_limit(tmp_path):
    bomb = png_claiming_size(tmp_path / "bomb.png", 20_000, 20_000)
    with pytest.raises(ImageError, match="decompression bomb"):
        read_header(bomb)
    with pytest.raises(ImageError, match="above the limit of 1000"):
        read_header(png_claiming_size(tmp_path / "small.png", 40, 40), max_pixels=1000)
    # Raising the limit past Pillow's own (about 179 megapixels) lets the header through.
    header = read_header(bomb, max_pixels=500_000_000)
    assert (header.width, header.height) == (20_000, 20_000)
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's global limit is restored
    assert DEFAULT_MAX_PIXELS < 20_000 * 20_000


@pytest.mark.parametrize("chunk_size", [1, 7, 1 << 20])
def test_content_hash_matches_hashlib(tmp_path, chunk_size):
    data = np.random.default_rng(chunk_size).bytes(5000)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert content_hash(path, chunk_size=chunk_size) == hashlib.sha256(data).hexdigest()


def test_is_image_file():
    assert is_image_file("a/b.JPG") and is_image_file("x.webp") and is_image_file("y.jpeg")
    assert not is_image_file("a.txt") and not is_image_file("a.gif")
