"""The bad-image corpus: every odd file decodes to upright RGB uint8 or yields a reason, never raises."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from features.images import decode_image, image_size


def _jpeg_bytes(w=64, h=48, color=(200, 30, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header declares w x h pixels (no pixel data follows)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


@pytest.fixture()
def corpus(tmp_path):
    d = tmp_path
    (d / "zero.jpg").write_bytes(b"")
    full = _jpeg_bytes(128, 96)
    (d / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (d / "text.jpg").write_text("<html><body>404 Not Found</body></html>\n")
    Image.new("CMYK", (20, 10), (255, 0, 0, 0)).save(d / "cmyk.jpg", "JPEG", quality=95)
    Image.new("L", (30, 20), 77).save(d / "gray.png")
    arr16 = np.array([[0, 32768], [65535, 257]], dtype=np.uint16)
    Image.fromarray(arr16).save(d / "gray16.png")
    rgba = Image.new("RGBA", (10, 10), (0, 0, 255, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 5, 10))  # left half fully transparent black
    rgba.save(d / "alpha.png")
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.save(d / "palette_transparent.png", transparency=0)
    Image.new("1", (9, 9), 1).save(d / "bilevel.png")
    Image.new("RGB", (1, 1), (5, 6, 7)).save(d / "one_pixel.png")
    (d / "bomb.png").write_bytes(_png_header_only(12_000, 12_000))  # 144 Mpx: above our default guard
    (d / "huge_bomb.png").write_bytes(_png_header_only(100_000, 100_000))  # Pillow refuses it itself
    Image.new("RGB", (200, 200), (1, 2, 3)).save(d / "big.png")
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 10, 20))  # red stripe on the left edge
    exif = img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    img.save(d / "exif_rot.jpg", "JPEG", exif=exif, quality=95)
    (d / "folder.jpg").mkdir()
    return d


def _fail(corpus, name, **kw) -> str:
    res = decode_image(corpus / name, **kw)
    assert not res.ok and res.rgb is None
    assert name in res.failure  # every reason names the file
    return res.failure


def _ok(corpus, name, **kw) -> np.ndarray:
    res = decode_image(corpus / name, **kw)
    assert res.ok, res.failure
    assert res.rgb.dtype == np.uint8 and res.rgb.ndim == 3 and res.rgb.shape[2] == 3
    return res.rgb


def test_missing_zero_byte_text_and_directory_files_are_failures(corpus):
    assert "file not found" in _fail(corpus, "absent.jpg")
    assert "empty file (0 bytes)" in _fail(corpus, "zero.jpg")
    assert "not a recognised image format" in _fail(corpus, "text.jpg")
    assert "not a regular file" in _fail(corpus, "folder.jpg")


def test_truncated_jpeg_is_a_failure_not_a_half_grey_image(corpus):
    assert "truncated or corrupt" in _fail(corpus, "truncated.jpg")


def test_decompression_bomb_is_refused_from_the_header_alone(corpus):
    assert image_size(corpus / "bomb.png") == (12_000, 12_000)
    reason = _fail(corpus, "bomb.png")
    assert "decompression-bomb guard" in reason and "12000x12000" in reason
    reason = _fail(corpus, "huge_bomb.png")
    assert "decompression-bomb guard" in reason and "10000000000 pixels" in reason
    assert "above max_pixels 1000" in _fail(corpus, "big.png", max_pixels=1000)
    assert _ok(corpus, "big.png", max_pixels=40_000).shape == (200, 200, 3)


def test_cmyk_becomes_rgb(corpus):
    rgb = _ok(corpus, "cmyk.jpg")
    assert rgb.shape == (10, 20, 3)
    r, g, b = rgb[5, 10].astype(int)
    assert r < 40 and g > 215 and b > 215  # pure cyan


def test_grayscale_bilevel_and_one_pixel_images_become_three_channels(corpus):
    gray = _ok(corpus, "gray.png")
    assert gray.shape == (20, 30, 3) and (gray == 77).all()
    assert (_ok(corpus, "bilevel.png") == 255).all()
    assert _ok(corpus, "one_pixel.png").tolist() == [[[5, 6, 7]]]


def test_sixteen_bit_png_is_scaled_not_clipped(corpus):
    rgb = _ok(corpus, "gray16.png")
    assert rgb[..., 0].tolist() == [[0, 128], [255, 1]]


def test_alpha_is_composited_over_white(corpus):
    rgb = _ok(corpus, "alpha.png")
    assert rgb[5, 1].tolist() == [255, 255, 255]  # transparent -> white, not black
    assert rgb[5, 8].tolist() == [0, 0, 255]
    pal = _ok(corpus, "palette_transparent.png")
    assert pal[0, 0].tolist() == [10, 200, 30]


def test_exif_orientation_is_applied(corpus):
    rgb = _ok(corpus, "exif_rot.jpg")
    assert rgb.shape == (40, 20, 3)  # stored 40 wide x 20 high, displayed rotated upright
    top = rgb[:8, :, 0].astype(int).mean()
    bottom = rgb[-8:, :, 0].astype(int).mean()
    assert top > 150 and bottom < 60  # the left-edge red stripe is now at the top
