"""Reading: `StageReader` (everything committed for one stage fingerprint) and `View` (a
dataset's item ids mapped onto a stage's keys).

Readers keep the key -> (segment, row) map in memory as numpy arrays and read rows with `pread`
at the file offsets of contiguous datasets (`pipeline.store.segment._OpenSegment`); they hold
no HDF5 handle, so they are safe to use across fork. Every read is verified (the row holds the
key asked for, its CRC-32C matches); corrupt items are dropped from the index on the spot.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import StoreError
from pipeline.store.errors import CorruptItemError
from pipeline.store.fs import is_worker_process, writes_allowed
from pipeline.store.index import Index
from pipeline.store.segment import _OpenSegment

_MAX_OPEN_FILES = 128  # per reader: segment file descriptors kept open (LRU)
log = logging.getLogger("pipeline.store")


def stage_reader(root: Path, stage: str, fingerprint: str, segments: Sequence[tuple[str, str]],
                 items: Iterable[tuple[str, str, int | None, str | None]]) -> StageReader:
    """A `StageReader` from the index rows of (stage, fingerprint): segments as (id, path), items
    as (key, segment, row, failure) (`Index.read_stage`). An item naming a segment the index
    does not list is a StoreError."""
    seg_index: dict[str, int] = {}
    seg_paths: list[str] = []
    for seg_id, path in segments:
        seg_index[seg_id] = len(seg_paths)
        seg_paths.append(path)
    keys: list[str] = []
    segs: list[int] = []
    rows: list[int | None] = []
    failures: dict[str, str] = {}
    for key, seg, row, failure in items:
        if failure is not None:
            failures[key] = failure
        elif seg in seg_index:
            keys.append(key)
            segs.append(seg_index[seg])
            rows.append(row)
        else:
            raise StoreError(
                f"store index {root / 'index.sqlite'}: item {key} of {stage}/{fingerprint} names "
                f"segment {seg}, which is not in the index; run `mrhp fsck --repair`"
            )
    return StageReader(
        root=root, stage=stage, fingerprint=fingerprint, segment_paths=seg_paths, keys=keys,
        segments=np.asarray(segs, dtype=np.int32), rows=np.asarray(rows, dtype=np.int64), failures=failures,
    )


class _SortedKeys:
    """String -> position lookups over one sorted numpy bytes array.

    Compact (no Python object per key) and untouched by reference counting, so the pages stay
    shared copy-on-write between DataLoader workers even for millions of keys."""

    def __init__(self, keys: Sequence[str]) -> None:
        encoded = np.array([k.encode("utf-8") for k in keys], dtype=bytes) if keys else np.array([], dtype="S1")
        self.order = np.argsort(encoded, kind="stable")  # sorted position -> input position
        self.sorted = encoded[self.order]

    def __len__(self) -> int:
        return len(self.sorted)

    def find(self, key: str) -> int:
        """Input position of `key`, or -1."""
        if not isinstance(key, str):
            return -1
        b = key.encode("utf-8")
        i = int(self.sorted.searchsorted(b))
        if i < len(self.sorted) and self.sorted[i] == b:
            return int(self.order[i])
        return -1

    def decoded(self) -> list[str]:
        """All keys in input order."""
        out = [""] * len(self.sorted)
        for pos, b in zip(self.order.tolist(), self.sorted.tolist(), strict=True):
            out[pos] = b.decode("utf-8")
        return out


class StageReader:
    """Reads the committed items of one (stage, fingerprint) as of its creation.

    Holds the key -> (segment, row) map in memory as numpy arrays; segment files open lazily,
    per process (a reader made before a DataLoader forks works in the workers), at most
    `_MAX_OPEN_FILES` at a time. Picklable (for spawn-started workers): open files are not
    carried over. Safe to share between threads."""

    def __init__(
        self,
        *,
        root: Path,
        stage: str,
        fingerprint: str,
        segment_paths: Sequence[str],
        keys: Sequence[str],
        segments: np.ndarray,
        rows: np.ndarray,
        failures: Mapping[str, str],
    ) -> None:
        self.root = Path(root)
        self.stage = stage
        self.fingerprint = fingerprint
        self._paths = list(segment_paths)
        self._keys = _SortedKeys(keys)
        self._segs = np.asarray(segments, dtype=np.int32)  # per key (input order): segment index
        self._rows = np.asarray(rows, dtype=np.int64)  # per key: row in that segment
        self._failures = dict(failures)
        self._open: dict[int, _OpenSegment] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        """True when `get(key)` returns arrays (the key was committed without failure)."""
        return isinstance(key, str) and self._keys.find(key) >= 0

    def keys(self) -> list[str]:
        """Keys with stored arrays (failures excluded)."""
        return self._keys.decoded()

    def failure(self, key: str) -> str | None:
        """The recorded failure reason of `key`, or None."""
        return self._failures.get(key)

    def _segment(self, index: int) -> _OpenSegment:
        if self._pid != os.getpid():
            # Forked: the descriptors are the parent's; start a fresh set in this process.
            self._open = {}
            self._pid = os.getpid()
        seg = self._open.get(index)
        if seg is None:
            seg = _OpenSegment(self.root / self._paths[index])
            while len(self._open) >= _MAX_OPEN_FILES:
                # Oldest first; it closes when no thread is reading from it any more.
                self._open.pop(next(iter(self._open)), None)
            self._open[index] = seg
        return seg

    def _locate(self, key: str) -> tuple[int, int]:
        i = self._keys.find(key)
        if i < 0:
            reason = self._failures.get(key)
            if reason is not None:
                raise StoreError(f"{self.stage} item {key} failed: {reason}")
            raise StoreError(f"{self.stage} item {key} is not in the store for fingerprint {self.fingerprint}")
        return int(self._segs[i]), int(self._rows[i])

    def _read(self, seg: int, row: int, key: str) -> dict[str, np.ndarray]:
        try:
            return self._segment(seg).read(row, key)
        except CorruptItemError as e:
            self._open.pop(seg, None)
            raise StoreError(f"{e}; {self._drop_corrupt(e)}") from None

    def _drop_corrupt(self, err: CorruptItemError) -> str:
        """Drop the corrupt items' index rows so `missing()` reports them and `mrhp extract`
        recomputes them; returns what to tell the user."""
        seg_id = Path(err.path).stem
        if not writes_allowed() or is_worker_process():
            return "run `mrhp fsck --repair`, then `mrhp extract`, to recompute them"
        try:
            n = Index.drop_corrupt(self.root / "index.sqlite", self.stage, self.fingerprint, seg_id, err.rows)
        except sqlite3.Error as e:
            return f"they could not be dropped from the index ({e}): run `mrhp fsck --repair`, then `mrhp extract`"
        log.error("dropped %d corrupt %s item(s) of %s from the index", n, self.stage, err.path)
        return (
            f"dropped {n} of them from the index: rerun `mrhp extract` (stage {self.stage}) to recompute "
            "them"
        )

    def get(self, key: str) -> dict[str, np.ndarray]:
        """The arrays of `key` (field -> array), verified against the CRC recorded at commit;
        StoreError if unknown, failed (with its reason) or corrupt (naming the segment)."""
        seg, row = self._locate(key)
        return self._read(seg, row, key)

    def get_many(self, keys: Sequence[str]) -> list[dict[str, np.ndarray]]:
        """`get` for several keys, read in file order; results in the order of `keys`."""
        locs = [self._locate(k) for k in keys]
        out: list[dict[str, np.ndarray] | None] = [None] * len(locs)
        for i in sorted(range(len(locs)), key=locs.__getitem__):
            seg, row = locs[i]
            out[i] = self._read(seg, row, keys[i])
        return out  # type: ignore[return-value]

    def meta(self, key: str) -> dict[str, Any]:
        """The `Record.meta` stored with `key` (read from the file on demand; small)."""
        seg, row = self._locate(key)
        path = self.root / self._paths[seg]
        try:
            with h5py.File(path, "r") as f:
                return json.loads(f["meta"].asstr()[row])
        except (OSError, KeyError) as e:
            raise StoreError(f"cannot read meta of {key} from {path}: {e}") from e

    def close(self) -> None:
        """Release the open segment files (they reopen on the next read)."""
        self._open = {}


class View:
    """A dataset's items for one stage: item id -> key -> arrays, as of its creation."""

    def __init__(
        self,
        *,
        dataset: str,
        stage: str,
        fingerprint: str,
        item_ids: Sequence[str],
        keys: Sequence[str],
        reader: StageReader,
    ) -> None:
        self.dataset = dataset
        self.stage = stage
        self.fingerprint = fingerprint
        self.reader = reader
        self._ids = _SortedKeys(item_ids)
        self._item_keys = np.array([k.encode("utf-8") for k in keys], dtype=bytes) if keys else np.array([], "S1")

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, str) and self._ids.find(item_id) >= 0

    def item_ids(self) -> list[str]:
        return self._ids.decoded()

    def key(self, item_id: str) -> str:
        """The content key holding `item_id`'s result."""
        i = self._ids.find(item_id)
        if i < 0:
            raise StoreError(f"view {self.dataset}/{self.stage} has no item {item_id!r} ({len(self)} items)")
        return self._item_keys[i].decode("utf-8")

    def failure(self, item_id: str) -> str | None:
        """Why `item_id` failed in this stage, or None."""
        return self.reader.failure(self.key(item_id))

    def get(self, item_id: str) -> dict[str, np.ndarray]:
        """The arrays of `item_id`; StoreError naming dataset, stage and item when absent or failed."""
        key = self.key(item_id)
        try:
            return self.reader.get(key)
        except StoreError as e:
            raise StoreError(f"view {self.dataset}/{self.stage} item {item_id!r}: {e}") from None

    def get_many(self, item_ids: Sequence[str]) -> list[dict[str, np.ndarray]]:
        """`get` for several item ids, results in their order."""
        keys = [self.key(i) for i in item_ids]
        try:
            return self.reader.get_many(keys)
        except StoreError as e:
            raise StoreError(f"view {self.dataset}/{self.stage}: {e}") from None
