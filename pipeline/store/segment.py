"""The HDF5 segment format: layout, checksums, verification, open-segment reads (no SQL).

A segment (layout version 2) holds, per schema field, `fields/<name>/data` (flat along the
ragged axis) and, for ragged fields, `fields/<name>/offsets` (int64, n+1); `keys` (n utf-8
strings), `row_crc32c` (n uint32, see `_row_crc`), `meta`, `failed_keys`, `failed_reasons`;
attributes `schema_version`, `stage`, `fingerprint`, `schema` (JSON, `_schema_to_json`),
`params`, `checksum` (sha256 over every dataset, `_checksum`) and `created`. Segments are
self-describing: `_describe_segment` turns a file into the rows the index records.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import crc32c
import h5py
import numpy as np

from pipeline.errors import StoreError
from pipeline.stage import FieldSpec
from pipeline.store.errors import CorruptItemError
from pipeline.store.index import ItemRow, SegmentRow

SCHEMA_VERSION = 2  # segment file layout version (attribute `schema_version`); 2 adds `row_crc32c`
READABLE_SCHEMA_VERSIONS = (1, 2)  # version 1 segments (no per-item checksums) are verified whole on open
_PRELOAD_BYTES = 1 << 20  # per segment, fields this small are read whole on open (boxes, ids, sizes)
_STR = h5py.string_dtype("utf-8")

# A writer's buffered item: (arrays, None, meta JSON) for a success, (None, reason, meta JSON) for a failure.
BufferedItem = tuple[dict[str, np.ndarray] | None, str | None, str]


def _schema_to_json(schema: Mapping[str, FieldSpec]) -> str:
    return json.dumps(
        {name: {"dtype": s.dtype, "shape": list(s.shape), "ragged": s.ragged} for name, s in schema.items()},
        sort_keys=True,
    )


def _schema_from_json(text: str) -> dict[str, FieldSpec]:
    raw = json.loads(text)
    return {
        name: FieldSpec(dtype=d["dtype"], shape=tuple(int(x) for x in d["shape"]), ragged=bool(d["ragged"]))
        for name, d in raw.items()
    }


def _validate_schema(stage: str, schema: Mapping[str, FieldSpec]) -> None:
    if not schema:
        raise StoreError(f"stage {stage!r}: the schema has no fields")
    for name, spec in schema.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise StoreError(f"stage {stage!r}: field name {name!r} must be a non-empty string without '/'")
        if not isinstance(spec, FieldSpec):
            raise StoreError(f"stage {stage!r} field {name!r}: expected a FieldSpec, got {type(spec).__name__}")
        try:
            dt = np.dtype(spec.dtype)
        except TypeError as e:
            raise StoreError(f"stage {stage!r} field {name!r}: unknown dtype {spec.dtype!r}") from e
        if dt.kind not in "biufc":
            raise StoreError(
                f"stage {stage!r} field {name!r}: dtype {spec.dtype!r} is not numeric or bool "
                "(only fixed-size numeric arrays are stored)"
            )
        if any((not isinstance(d, int)) or d < 0 for d in spec.shape):
            raise StoreError(f"stage {stage!r} field {name!r}: shape {spec.shape!r} must be non-negative ints")


def _hash_strings(h: Any, values: Iterable[str]) -> None:
    for v in values:
        b = v.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)


def _checksum(datasets: Mapping[str, np.ndarray | list[str]]) -> str:
    """sha256 over every dataset of a segment, in name order: name, dtype, shape, bytes.

    String datasets (keys, reasons, meta) are hashed as length-prefixed utf-8 so the value
    computed while writing equals the one recomputed from the file."""
    h = hashlib.sha256()
    for name in sorted(datasets):
        value = datasets[name]
        h.update(name.encode("utf-8") + b"\x00")
        if isinstance(value, list):
            h.update(b"str\x00" + len(value).to_bytes(8, "little"))
            _hash_strings(h, value)
        else:
            arr = np.ascontiguousarray(value)
            h.update(f"{arr.dtype.str}{arr.shape}".encode() + b"\x00")
            if arr.size:
                h.update(memoryview(arr.reshape(-1)).cast("B"))
    return h.hexdigest()


def _row_crc(key: str, fields: Sequence[tuple[np.ndarray, bool]]) -> int:
    """CRC-32C of one item: its key (utf-8), then per field (schema names sorted) the item's row
    count when ragged (8 bytes little-endian) and the bytes of its C-contiguous array. Written at
    commit, checked on every read."""
    crc = crc32c.crc32c(key.encode("utf-8"))
    for arr, ragged in fields:
        if ragged:
            crc = crc32c.crc32c(arr.shape[0].to_bytes(8, "little"), crc)
        # numpy arrays are read through the buffer protocol (no copy when already C-contiguous)
        crc = crc32c.crc32c(arr if arr.flags.c_contiguous else np.ascontiguousarray(arr), crc)
    return crc



def write_segment(
    path: Path, buffer: Mapping[str, BufferedItem], *, stage: str, fingerprint: str,
    schema: Mapping[str, FieldSpec], schema_json: str, params_json: str,
) -> tuple[list[str], int, str, float]:
    """Write the buffered items (key -> `BufferedItem`, insertion order) as one segment file at
    `path`, in the layout above. Returns (keys of the successes, number of failures, checksum,
    created)."""
    ok = [(k, cast("dict[str, np.ndarray]", v[0]), v[2]) for k, v in buffer.items() if v[1] is None]
    failed = [(k, v[1]) for k, v in buffer.items() if v[1] is not None]
    datasets: dict[str, np.ndarray | list[str]] = {}
    for name, spec in schema.items():
        dtype = np.dtype(spec.dtype)
        arrays = [a[name] for _, a, _ in ok]
        if spec.ragged:
            lengths = np.fromiter((a.shape[0] for a in arrays), dtype=np.int64, count=len(arrays))
            offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            data = np.concatenate(arrays, axis=0) if arrays else np.empty((0, *spec.shape), dtype=dtype)
            datasets[f"fields/{name}/data"] = data
            datasets[f"fields/{name}/offsets"] = offsets
        else:
            datasets[f"fields/{name}/data"] = (
                np.stack(arrays) if arrays else np.empty((0, *spec.shape), dtype=dtype)
            )
    ok_keys = [k for k, _, _ in ok]
    names = sorted(schema)
    datasets["row_crc32c"] = np.fromiter(
        (_row_crc(k, [(a[n], schema[n].ragged) for n in names]) for k, a, _ in ok),
        dtype=np.uint32, count=len(ok),
    )
    datasets["keys"] = ok_keys
    datasets["meta"] = [m for _, _, m in ok]
    datasets["failed_keys"] = [k for k, _ in failed]
    datasets["failed_reasons"] = [r for _, r in failed]
    checksum = _checksum(datasets)
    created = time.time()
    with h5py.File(path, "w") as f:
        for name, value in datasets.items():
            if isinstance(value, list):
                f.create_dataset(name, shape=(len(value),), dtype=_STR, data=value if value else None)
            else:
                f.create_dataset(name, data=value)
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["stage"] = stage
        f.attrs["fingerprint"] = fingerprint
        f.attrs["schema"] = schema_json
        f.attrs["params"] = params_json
        f.attrs["checksum"] = checksum
        f.attrs["created"] = created
    return ok_keys, len(failed), checksum, created


def _read_segment_datasets(f: h5py.File) -> dict[str, np.ndarray | list[str]]:
    """Every dataset of an open segment, strings decoded: the input of `_checksum`."""
    out: dict[str, np.ndarray | list[str]] = {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            if h5py.check_string_dtype(obj.dtype) is not None:
                out[name] = [s for s in obj.asstr()[()]] if obj.shape[0] else []
            else:
                out[name] = obj[()]

    f.visititems(visit)
    return out


def _describe_segment(path: Path, root: Path) -> tuple[SegmentRow, list[ItemRow], str]:
    """(segment row, item rows, schema JSON) for the index, from a segment whose checksum verifies."""
    seg_id = path.stem
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
            datasets = _read_segment_datasets(f)
    except (OSError, KeyError, ValueError) as e:
        raise StoreError(f"unreadable HDF5 segment: {e}") from e
    for a in ("schema_version", "stage", "fingerprint", "schema", "checksum", "created"):
        if a not in attrs:
            raise StoreError(f"not a segment: attribute {a!r} missing")
    if int(attrs["schema_version"]) not in READABLE_SCHEMA_VERSIONS:
        raise StoreError(f"segment layout version {attrs['schema_version']}, "
                         f"this code reads {READABLE_SCHEMA_VERSIONS}")
    if _checksum(datasets) != attrs["checksum"]:
        raise StoreError("checksum mismatch (the file is corrupt)")
    stage, fingerprint = str(attrs["stage"]), str(attrs["fingerprint"])
    keys, failed, reasons = datasets["keys"], datasets["failed_keys"], datasets["failed_reasons"]
    seg_row: SegmentRow = (
        seg_id, stage, fingerprint, str(path.relative_to(root)), len(keys), len(failed), str(attrs["checksum"]),
        float(attrs["created"]),
    )
    items: list[ItemRow] = [(stage, fingerprint, k, seg_id, i, None) for i, k in enumerate(keys)]
    items += [(stage, fingerprint, k, seg_id, None, r) for k, r in zip(failed, reasons, strict=True)]
    return seg_row, items, str(attrs["schema"])


def _verify_segment(
    path: Path,
    stage: str,
    fingerprint: str,
    checksum: str,
    items: list[tuple[str, int | None, str | None]],
    checksums: bool = True,
) -> str | None:
    """Why a segment is unusable (checksum, identity, index rows not matching its content), or None.

    Without `checksums` only the attributes and key lists are read (fast, misses flipped bytes)."""
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
            if checksums:
                datasets = _read_segment_datasets(f)
            else:
                datasets = {
                    name: [s for s in f[name].asstr()[()]] if f[name].shape[0] else []
                    for name in ("keys", "failed_keys")
                }
    except (OSError, KeyError, ValueError) as e:
        return f"unreadable HDF5 file ({e})"
    if checksums:
        actual = _checksum(datasets)
        if actual != attrs.get("checksum"):
            return f"checksum mismatch: stored {attrs.get('checksum')}, recomputed {actual} (the file is corrupt)"
    if attrs.get("checksum") != checksum:
        return f"checksum attribute {attrs.get('checksum')} differs from the index's {checksum}"
    if (attrs.get("stage"), attrs.get("fingerprint")) != (stage, fingerprint):
        return (
            f"segment says stage {attrs.get('stage')!r} fingerprint {attrs.get('fingerprint')!r}, "
            f"the index says {stage!r} {fingerprint!r}"
        )
    keys = datasets.get("keys", [])
    failed = set(datasets.get("failed_keys", []))
    for key, row, failure in items:
        if failure is None:
            if row is None or not 0 <= row < len(keys) or keys[row] != key:
                return f"index row for key {key} points at row {row}, which holds another key or does not exist"
        elif key not in failed:
            return f"index records failure of key {key}, which the segment does not list"
    return None


@dataclass
class _Field:
    name: str
    ragged: bool
    shape: tuple[int, ...]  # per-item shape after the ragged axis (or whole shape when fixed)
    dtype: np.dtype
    file_offset: int  # byte offset of the contiguous data in the file (0 when empty)
    row_bytes: int  # bytes per row of the flat data
    offsets: list[int] | None  # n+1 row starts for ragged fields (a list: fast scalar indexing)
    cached: np.ndarray | None  # the whole flat data when small (sliced instead of pread per item)


class _OpenSegment:
    """A segment opened for reading in this process: a file descriptor, each field's layout, the
    keys by row and the per-item CRCs (version 1 segments: verified whole here instead)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1
        fields: list[_Field] = []
        hint = "run `mrhp fsck --repair` (then `mrhp extract` recomputes what it drops)"
        try:
            with h5py.File(path, "r") as f:
                version = int(f.attrs.get("schema_version", -1))
                if version not in READABLE_SCHEMA_VERSIONS:
                    raise StoreError(
                        f"segment {path}: layout version {version}, this code reads "
                        f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))}; {hint}"
                    )
                schema = _schema_from_json(str(f.attrs["schema"]))
                keys = [k for k in f["keys"].asstr()[()]] if f["keys"].shape[0] else []
                n = len(keys)
                for name, spec in schema.items():
                    ds = f[f"fields/{name}/data"]
                    offset = ds.id.get_offset()
                    if offset is None and ds.size:
                        raise StoreError(f"segment {path}: field {name!r} is not stored contiguously; {hint}")
                    dtype = ds.dtype
                    row_bytes = dtype.itemsize * int(np.prod(spec.shape, dtype=np.int64))
                    offsets = None
                    if spec.ragged:
                        off = f[f"fields/{name}/offsets"][()]
                        if (len(off) != n + 1 or (n and (off[0] != 0 or np.any(np.diff(off) < 0)))
                                or off[-1] != ds.shape[0]):
                            raise StoreError(f"segment {path}: field {name!r} has damaged row offsets; {hint}")
                        offsets = off.tolist()
                    elif ds.shape[:1] != (n,):
                        raise StoreError(
                            f"segment {path}: field {name!r} has {ds.shape[:1]} rows for {n} keys; {hint}"
                        )
                    cached = ds[()] if ds.size * dtype.itemsize <= _PRELOAD_BYTES else None
                    fields.append(
                        _Field(name, spec.ragged, spec.shape, dtype, offset or 0, row_bytes, offsets, cached)
                    )
                if version >= 2:
                    crcs = f["row_crc32c"][()]
                    if crcs.shape != (n,):
                        raise StoreError(f"segment {path}: {crcs.shape} row checksums for {n} keys; {hint}")
                    self.crcs: np.ndarray | None = crcs.astype(np.uint32)
                else:
                    self.crcs = None
                    if _checksum(_read_segment_datasets(f)) != f.attrs["checksum"]:
                        raise CorruptItemError(
                            f"segment {path}: checksum mismatch (the file is corrupt)",
                            path=path, rows=[(k, i) for i, k in enumerate(keys)],
                        )
            self.fd = os.open(path, os.O_RDONLY)
        except StoreError:
            raise
        except (OSError, KeyError, ValueError, TypeError) as e:
            msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise StoreError(f"cannot read segment {path}: {msg}; {hint}") from None
        self.keys = keys
        self.fields = sorted(fields, key=lambda fl: fl.name)  # the CRC's field order

    def _read_row(self, row: int) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for f in self.fields:
            if f.cached is not None:
                if f.ragged:
                    out[f.name] = f.cached[f.offsets[row] : f.offsets[row + 1]].copy()
                else:
                    out[f.name] = f.cached[row].copy()
                continue
            if f.ragged:
                a, b = f.offsets[row], f.offsets[row + 1]
                arr = np.empty((b - a, *f.shape), dtype=f.dtype)
                start = f.file_offset + a * f.row_bytes
            else:
                arr = np.empty(f.shape, dtype=f.dtype)
                start = f.file_offset + row * f.row_bytes
            if arr.nbytes:
                self._pread_into(arr, start)
            out[f.name] = arr
        return out

    def _crc_ok(self, key: str, row: int, arrays: Mapping[str, np.ndarray]) -> bool:
        if self.crcs is None:
            return True  # version 1: verified whole on open
        return _row_crc(key, [(arrays[f.name], f.ragged) for f in self.fields]) == int(self.crcs[row])

    def read(self, row: int, key: str) -> dict[str, np.ndarray]:
        """The arrays of `key` at `row`, verified: the row holds `key` and its CRC matches."""
        if not 0 <= row < len(self.keys) or self.keys[row] != key:
            held = self.keys[row] if 0 <= row < len(self.keys) else "nothing"
            raise StoreError(
                f"segment {self.path}: the index maps {key} to row {row}, which holds {held} (the index "
                "is damaged): run `mrhp fsck --rebuild-index`"
            )
        out = self._read_row(row)
        if not self._crc_ok(key, row, out):
            bad = self.scan()
            raise CorruptItemError(
                f"segment {self.path}: {len(bad)} item(s) fail the checksum recorded at commit "
                f"(e.g. {key} at row {row}; the file is corrupt)",
                path=self.path, rows=bad,
            )
        return out

    def scan(self) -> list[tuple[str, int]]:
        """(key, row) of every item whose CRC does not match (reads the whole segment)."""
        bad = []
        for row, key in enumerate(self.keys):
            try:
                ok = self._crc_ok(key, row, self._read_row(row))
            except StoreError:
                ok = False
            if not ok:
                bad.append((key, row))
        return bad

    def _pread_into(self, arr: np.ndarray, start: int) -> None:
        view = memoryview(arr.reshape(-1)).cast("B")
        got = 0
        while got < len(view):
            n = os.preadv(self.fd, [view[got:]], start + got)
            if n == 0:
                raise StoreError(f"segment {self.path} is truncated (reading {len(view)} bytes at {start})")
            got += n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        # Closed when the last reference goes: a thread still reading keeps its descriptor valid.
        self.close()

