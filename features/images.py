"""Safe image decoding shared by the ROI stage, the fetcher and the importers.

Every odd file a crawl produces either decodes to an RGB uint8 array or yields a one-line
reason, never an exception: missing and zero-byte files, text or HTML saved as `.jpg`,
truncated data, decompression bombs (the pixel count is checked from the header before any
pixel is decoded), CMYK, grayscale, palette, 1-bit, 16-bit and float images, alpha channels
(composited over white), EXIF orientation (applied, so boxes refer to the upright image).
Truncated files are failures rather than half-grey images: a re-fetch fixes them.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default bomb threshold


@dataclass(frozen=True)
class DecodeResult:
    """An RGB image (H, W, 3) uint8, or the reason it could not be decoded."""

    rgb: np.ndarray | None
    failure: str | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None


def _fail(reason: str) -> DecodeResult:
    return DecodeResult(rgb=None, failure=reason)


def image_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) from the header only, or None if the file is not a readable image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return img.size
    except Exception:
        return None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; alpha is composited over white."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.nan_to_num(np.rint(arr)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode != "RGB":
        return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    return img


def decode_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodeResult:
    """Decode `path` to upright RGB uint8, or a failure reason naming what is wrong."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        return _fail(f"file not found: {p}")
    except OSError as e:
        return _fail(f"cannot stat {p}: {e.strerror or e}")
    if not p.is_file():
        return _fail(f"not a regular file: {p}")
    if size == 0:
        return _fail(f"empty file (0 bytes): {p}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as img:
                w, h = img.size
                if w <= 0 or h <= 0:
                    return _fail(f"image header declares {w}x{h} pixels: {p}")
                if w * h > max_pixels:
                    return _fail(
                        f"image is {w}x{h} = {w * h} pixels, above max_pixels {max_pixels} "
                        f"(decompression-bomb guard): {p}"
                    )
                img.load()
                img = ImageOps.exif_transpose(img)
                rgb = np.asarray(_to_rgb(img), dtype=np.uint8)
    except UnidentifiedImageError:
        return _fail(f"not a recognised image format ({size} bytes): {p}")
    except Image.DecompressionBombError as e:
        return _fail(f"decompression-bomb guard: {e}: {p}")
    except OSError as e:
        return _fail(f"truncated or corrupt image data ({e}): {p}")
    except Exception as e:  # a decoder bug on hostile data must not end the run
        return _fail(f"cannot decode image ({type(e).__name__}: {e}): {p}")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        return _fail(f"decoded to unexpected shape {rgb.shape}: {p}")
    return DecodeResult(rgb=np.ascontiguousarray(rgb))
