"""Safe image decoding for the ROI stage (the fetcher in pipeline/ingest/ does its own PIL check).

Every odd file a crawl produces either decodes to an RGB uint8 array or yields a one-line
reason, never an exception: missing and zero-byte files, text or HTML saved as `.jpg`,
truncated data, decompression bombs (the pixel count is checked from the header before any
pixel is decoded), CMYK, grayscale, palette, 1-bit, 16-bit and float images, alpha channels
(composited over white), EXIF orientation (applied, so boxes refer to the upright image).
Truncated files are failures rather than half-grey images: a re-fetch fixes them.
"""
from __future__ import annotations

import stat
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


# --------------------------------------------------------------------------- hash cache


_HEX = frozenset("0123456789abcdef")


class ImageHashCache:
    """sha256 of image files, re-hashed only when a file changed, as git's index does.

    A row per absolute path holds (size, mtime_ns, inode, ctime_ns) and the digest. A file whose
    stat signature matches its row reuses the digest; anything else (new, resized, touched,
    replaced by rename, ctime moved by a chmod or a copy-back) is hashed again. ctime cannot be
    set by a user, so an edit that restores size and mtime is still caught. A file modified
    within the same timestamp tick as its hashing could be missed ("racy git"): rows are only
    written for files whose mtime is older than the hashing by `racy_s` seconds; the others are
    hashed on every run until they settle.

    The cache is a cache: an unreadable or damaged database is discarded (and rebuilt), a row
    whose digest is not 64 hex digits counts as absent; neither can change a key.
    """

    def __init__(self, path: str | Path, *, threads: int = 8, racy_s: float = 2.0):
        self.path = Path(path)
        self.threads = threads
        self.racy_s = racy_s
        self.hashed = 0  # files hashed by the last keys() call
        self.reused = 0  # files answered from the cache by the last keys() call

    def _connect(self):
        import sqlite3

        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.path, timeout=30)
        con.execute("CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
                    "ino INTEGER, ctime_ns INTEGER, sha256 TEXT)")
        return con

    def _rows(self) -> dict[str, tuple]:
        import sqlite3

        try:
            con = self._connect()
            try:
                return {
                    r[0]: r[1:] for r in con.execute("SELECT path, size, mtime_ns, ino, ctime_ns, sha256 FROM hashes")
                }
            finally:
                con.close()
        except sqlite3.DatabaseError:  # damaged cache: start over (it only ever saves work)
            for suffix in ("", "-journal", "-wal", "-shm"):
                Path(str(self.path) + suffix).unlink(missing_ok=True)
            return {}

    def keys(self, paths: list[Path]) -> dict[Path, str | None]:
        """{path: sha256 hex, or None when the path is not a regular file}."""
        import os
        import sqlite3
        import time
        from concurrent.futures import ThreadPoolExecutor

        from pipeline.hashing import sha256_file

        rows = self._rows()
        out: dict[Path, str | None] = {}
        todo: list[tuple[Path, os.stat_result]] = []
        for p in paths:
            try:
                st = os.stat(p)
            except OSError:
                out[p] = None
                continue
            if not stat.S_ISREG(st.st_mode):
                out[p] = None
                continue
            row = rows.get(str(p))
            sig = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
            if row is not None and tuple(row[:4]) == sig and isinstance(row[4], str) and len(row[4]) == 64 \
                    and set(row[4]) <= _HEX:
                out[p] = row[4]
            else:
                todo.append((p, st))
        self.reused = len(out) - sum(v is None for v in out.values())
        started = time.time_ns()
        with ThreadPoolExecutor(max_workers=self.threads) as pool:  # hashing is I/O bound
            digests = list(pool.map(lambda ps: sha256_file(ps[0]), todo))
        self.hashed = len(todo)
        settled = started - int(self.racy_s * 1e9)
        new = []
        for (p, st), digest in zip(todo, digests, strict=True):
            out[p] = digest
            if st.st_mtime_ns < settled and st.st_ctime_ns < settled:
                new.append((str(p), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, digest))
        if new:
            try:
                con = self._connect()
                try:
                    with con:
                        con.executemany("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?, ?)", new)
                finally:
                    con.close()
            except sqlite3.Error:
                pass  # an unwritable cache only costs the next run its hashing
        return out
