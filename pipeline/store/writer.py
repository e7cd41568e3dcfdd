"""Writing segments: `SegmentWriter` (attached to an `Index`, or detached for task workers) and
the handling of pending segments (what detached writers leave under `pending/<owner>/`).

An attached writer buffers records and commits them in chunks: `tmp/<id>.part` (its flock-ed
`tmp/<id>.lock` beside it), fsync, rename into `segments/`, fsync the folder, then one index
transaction (`Index.record_segment`). A detached writer (`pending_writer`) renames into
`pending/<owner>/` instead and keeps a descriptor; the flow process passes it to
`commit_segment`, which verifies the file against it, moves it into `segments/` and indexes it.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import StoreError
from pipeline.stage import FieldSpec, Record
from pipeline.store.errors import _guard_sqlite, _index_error
from pipeline.store.fs import (
    _acquire_lock,
    _check_name,
    _fsync,
    _lock_path,
    _makedirs_durable,
    _part_path,
    _refuse_in_worker,
)
from pipeline.store.index import Index, ItemRow, SegmentRow
from pipeline.store.segment import (
    BufferedItem,
    _describe_segment,
    _schema_to_json,
    _validate_schema,
    write_segment,
)

log = logging.getLogger("pipeline.store")


class SegmentWriter:
    """Buffers records of one (stage, fingerprint) and commits them as segments (a context manager).

    Not thread-safe: use one writer per thread. Keys already in the store are skipped."""

    def __init__(
        self,
        index: Index | None,
        stage: str,
        fingerprint: str,
        schema: Mapping[str, FieldSpec],
        *,
        attrs: Mapping[str, Any] | None = None,
        chunk_size: int = 500,
        root: Path | str | None = None,
        owner: str | None = None,
    ) -> None:
        """`owner` (with `root`, no `index`) makes a detached writer: see `pending_writer`."""
        _check_name("stage", stage)
        if owner is not None:
            _check_name("pending owner", owner)
        _check_name("fingerprint", fingerprint)
        _validate_schema(stage, schema)
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise StoreError(f"chunk_size must be a positive int, got {chunk_size!r}")
        try:
            self._params_json = json.dumps(dict(attrs or {}), sort_keys=True, default=str)
        except (TypeError, ValueError) as e:
            raise StoreError(f"stage {stage!r}: attrs are not JSON-serialisable: {e}") from e
        if index is None and (owner is None or root is None):
            raise StoreError("a segment writer needs a store (or a root and an owner: pending_writer)")
        self.index = index
        self.root = Path(root).resolve() if root is not None else index.root  # type: ignore[union-attr]
        self.owner = owner
        self.descriptors: list[dict[str, Any]] = []  # detached: the segments written, for the flow to commit
        self.stage = stage
        self.fingerprint = fingerprint
        self.schema = dict(schema)
        self.chunk_size = chunk_size
        self._schema_json = _schema_to_json(self.schema)
        self._dtypes = {name: np.dtype(s.dtype) for name, s in self.schema.items()}
        self._buffer: dict[str, BufferedItem] = {}
        self._closed = False
        self.n_committed = 0  # items (successes and failures) this writer recorded
        self.n_skipped = 0  # items skipped because their key was already stored or buffered
        self.n_segments = 0  # segment files this writer committed
        if owner is not None or index is None:  # (no index only when detached: checked above)
            return  # detached: the index is not touched; the schema is checked when the flow commits
        known = index.register_schema(stage, fingerprint, self._schema_json)
        if known != self._schema_json:
            raise StoreError(
                f"stage {stage!r} fingerprint {fingerprint}: schema {self._schema_json} differs from the one "
                f"already stored under this fingerprint, {known} (a schema change must change the fingerprint)"
            )

    def __enter__(self) -> SegmentWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # Records added before an exception are valid results: keep them.
        self.close()

    def add(self, record: Record) -> list[str]:
        """Validate and buffer one record; commits when the buffer reaches chunk_size.

        Returns the keys committed by this call (empty unless a chunk was committed)."""
        if self._closed:
            raise StoreError(f"writer for {self.stage}/{self.fingerprint} is closed")
        if not isinstance(record, Record):
            raise StoreError(f"stage {self.stage!r}: expected a Record, got {type(record).__name__}")
        key = record.key
        if not isinstance(key, str) or not key:
            raise StoreError(f"stage {self.stage!r}: record key must be a non-empty string, got {key!r}")
        try:
            meta = json.dumps(record.meta or {}, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise StoreError(f"stage {self.stage!r} key {key}: meta is not JSON-serialisable: {e}") from e
        if record.failure is not None:
            if not isinstance(record.failure, str):
                raise StoreError(
                    f"stage {self.stage!r} key {key}: failure must be a string reason, got {record.failure!r}"
                )
            entry: BufferedItem = (None, record.failure or "failed", meta)
        else:
            entry = (self._convert(key, record.arrays), None, meta)
        if key in self._buffer:
            self.n_skipped += 1
            return []
        self._buffer[key] = entry
        if len(self._buffer) >= self.chunk_size:
            return self.commit()
        return []

    def _convert(self, key: str, arrays: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
        """Check a record's arrays against the schema and cast them to the schema dtypes (copies)."""
        where = f"stage {self.stage!r} key {key}"
        if not isinstance(arrays, Mapping):
            raise StoreError(f"{where}: a record without failure needs arrays, got {type(arrays).__name__}")
        extra = sorted(set(arrays) - set(self.schema))
        if extra:
            raise StoreError(f"{where}: field(s) {extra} are not in the schema ({sorted(self.schema)})")
        out = {}
        for name, spec in self.schema.items():
            if name not in arrays:
                raise StoreError(f"{where}: field {name!r} missing (schema fields: {sorted(self.schema)})")
            try:
                arr = np.asarray(arrays[name])
            except (TypeError, ValueError, RuntimeError) as e:
                raise StoreError(
                    f"{where} field {name!r}: cannot be turned into a numpy array ({e}); "
                    "pass numpy arrays or CPU tensors"
                ) from e
            dtype = self._dtypes[name]
            if not np.can_cast(arr.dtype, dtype, casting="same_kind"):
                raise StoreError(f"{where} field {name!r}: dtype {arr.dtype} cannot be stored as {dtype}")
            if spec.ragged:
                ok = arr.ndim == 1 + len(spec.shape) and arr.shape[1:] == spec.shape
                expected = f"(n, {', '.join(map(str, spec.shape))})" if spec.shape else "(n,)"
            else:
                ok = arr.shape == spec.shape
                expected = str(spec.shape)
            if not ok:
                raise StoreError(f"{where} field {name!r}: shape {arr.shape}, expected {expected}")
            out[name] = np.array(arr, dtype=dtype, order="C", copy=True)
        return out

    def extend(self, records: Iterable[Record]) -> list[str]:
        """add() each record; returns the keys committed along the way."""
        done: list[str] = []
        for r in records:
            done += self.add(r)
        return done

    @_guard_sqlite
    def commit(self) -> list[str]:
        """Write the buffered records as one segment and index them; returns the keys recorded.

        Detached (`pending_writer`): write the segment under pending/ and keep its descriptor in
        `self.descriptors` instead; the index is not opened."""
        if not self._buffer:
            return []
        if self.owner is not None:
            return self._commit_pending()
        index = self.index
        if index is None:  # only a detached writer (owner set) has no index
            raise StoreError("segment writer: neither attached to a store nor detached (no owner)")
        present = index.present(self.stage, self.fingerprint, list(self._buffer))
        buffer = {k: v for k, v in self._buffer.items() if k not in present}
        self.n_skipped += len(self._buffer) - len(buffer)
        self._buffer = {}
        if not buffer:
            return []
        seg_id = uuid.uuid4().hex
        rel = f"segments/{self.stage}/{self.fingerprint}/{seg_id}.h5"
        target = self.root / rel
        part = _part_path(self.root, seg_id)
        lock = _lock_path(self.root, seg_id)
        lock_fd = -1
        renamed = indexed = False
        try:
            lock_fd = _acquire_lock(lock, rel)
            ok_keys, n_failed, checksum, created = self._write_part(part, buffer)
            _fsync(part)
            _makedirs_durable(target.parent)
            os.rename(part, target)
            renamed = True
            _fsync(target.parent)
            seg_row: SegmentRow = (seg_id, self.stage, self.fingerprint, rel, len(ok_keys), n_failed, checksum,
                                   created)
            items: list[ItemRow] = [(self.stage, self.fingerprint, k, seg_id, i, None) for i, k in enumerate(ok_keys)]
            items += [(self.stage, self.fingerprint, k, seg_id, None, v[1]) for k, v in buffer.items()
                      if v[1] is not None]
            # Another process may have committed some of these keys meanwhile: the first wins.
            rows = index.record_segment(seg_row, items)
            # Only once COMMIT returned does the index own the file: a failed COMMIT (disk full)
            # raises above and the `finally` removes the renamed file instead of leaving an orphan.
            indexed = bool(rows)
            self.n_skipped += len(buffer) - len(rows)
        except OSError as e:
            raise StoreError(f"writing segment {rel} of stage {self.stage!r}: {e}") from e
        finally:
            if not indexed:
                part.unlink(missing_ok=True)
                if renamed:
                    target.unlink(missing_ok=True)
            if lock_fd >= 0:
                lock.unlink(missing_ok=True)
                os.close(lock_fd)
        if not indexed:
            return []
        self.n_committed += len(rows)
        self.n_segments += 1
        return [r[2] for r in rows]

    def _commit_pending(self) -> list[str]:
        """tmp/<id>.part (flock-ed lock beside it), fsync, rename to pending/<owner>/<id>.h5, fsync
        the folder; the descriptor goes to `self.descriptors`. A process killed before the rename
        leaves tmp files the next `FeatureStore()` cleans; after it, a complete segment that the
        flow (or `mrhp fsck --repair`) verifies and indexes."""
        buffer, self._buffer = self._buffer, {}
        root = self.root
        seg_id = uuid.uuid4().hex
        rel = f"pending/{self.owner}/{seg_id}.h5"
        target = root / rel
        part = _part_path(root, seg_id)
        lock = _lock_path(root, seg_id)
        lock_fd = -1
        renamed = False
        try:
            _makedirs_durable(root / "tmp")
            lock_fd = _acquire_lock(lock, "")  # no target: a dead writer's pending file is kept for adoption
            ok_keys, n_failed, checksum, created = self._write_part(part, buffer)
            _fsync(part)
            _makedirs_durable(target.parent)
            os.rename(part, target)
            renamed = True
            _fsync(target.parent)
        except OSError as e:
            raise StoreError(f"writing segment {rel} of stage {self.stage!r}: {e}") from e
        finally:
            if not renamed:
                part.unlink(missing_ok=True)
            if lock_fd >= 0:
                lock.unlink(missing_ok=True)
                os.close(lock_fd)
        self.descriptors.append({
            "id": seg_id, "path": rel, "stage": self.stage, "fingerprint": self.fingerprint,
            "keys": ok_keys, "failures": {k: v[1] for k, v in buffer.items() if v[1] is not None},
            "rows": len(ok_keys), "checksum": checksum, "created": created,
        })
        self.n_committed += len(buffer)
        self.n_segments += 1
        return list(buffer)

    def _write_part(self, part: Path, buffer: Mapping[str, BufferedItem]) -> tuple[list[str], int, str, float]:
        return write_segment(part, buffer, stage=self.stage, fingerprint=self.fingerprint, schema=self.schema,
                             schema_json=self._schema_json, params_json=self._params_json)

    def __del__(self) -> None:
        if getattr(self, "_buffer", None) and not self._closed:
            log.warning(
                "writer for %s/%s dropped with %d uncommitted records: call close() or use `with`",
                self.stage, self.fingerprint, len(self._buffer),
            )

    def close(self) -> list[str]:
        """Commit what is buffered; the writer accepts no more records. Returns the keys recorded."""
        if self._closed:
            return []
        try:
            return self.commit()
        finally:
            self._closed = True


# --------------------------------------------------------------------------------------------
# pending segments: written by task workers, committed by the flow


def pending_writer(
    root: Path | str, stage: str, fingerprint: str, schema: Mapping[str, FieldSpec], *, owner: str,
    attrs: Mapping[str, Any] | None = None, chunk_size: int = 500,
) -> SegmentWriter:
    """A detached writer for task workers: it writes segments under `<root>/pending/<owner>/`
    (temporary name, fsync, rename) every `chunk_size` records and on close, and collects their
    descriptors in `.descriptors` (id, path, stage, fingerprint, keys, failures, rows, checksum,
    created: JSON-able) for the flow to pass to `FeatureStore.commit_segment`. It never opens the
    index (nor checks which keys are stored: the flow claimed them before submitting)."""
    return SegmentWriter(None, stage, fingerprint, schema, attrs=attrs, chunk_size=chunk_size,
                         root=root, owner=owner)


def _pending_descriptor(path: Path, root: Path) -> dict[str, Any] | None:
    """The descriptor of a pending segment, read from the file itself (None when unreadable)."""
    try:
        with h5py.File(path, "r") as f:
            keys = [k for k in f["keys"].asstr()[()]] if f["keys"].shape[0] else []
            fk = [k for k in f["failed_keys"].asstr()[()]] if f["failed_keys"].shape[0] else []
            fr = [k for k in f["failed_reasons"].asstr()[()]] if f["failed_reasons"].shape[0] else []
            return {
                "id": path.stem, "path": str(path.relative_to(root)), "stage": str(f.attrs["stage"]),
                "fingerprint": str(f.attrs["fingerprint"]), "keys": keys, "failures": dict(zip(fk, fr, strict=True)),
                "rows": len(keys), "checksum": str(f.attrs["checksum"]), "created": float(f.attrs["created"]),
            }
    except (OSError, KeyError, ValueError, TypeError):
        return None


def pending_segments(root: Path, owner: str | None = None) -> list[Path]:
    """Segment files written by task workers and not yet committed: those of `owner`, or all."""
    pending_dir = root / "pending"
    base = pending_dir / owner if owner else pending_dir
    pattern = "*.h5" if owner else "*/*.h5"
    return sorted(base.glob(pattern)) if base.is_dir() else []


def quarantine(root: Path, path: Path) -> str:
    """Move `path` into `quarantine/`; returns where it went (relative to the store root)."""
    q = root / "quarantine"
    _makedirs_durable(q)
    os.replace(path, q / path.name)
    return f"quarantine/{path.name}"


def quarantine_reason(root: Path, path: Path) -> str:
    """Quarantine a pending file whose descriptor cannot be read; returns the line to report."""
    try:
        _describe_segment(path, root)
        reason = "not a segment"
    except StoreError as e:
        reason = str(e)
    return f"unusable pending segment ({reason}), moved to {quarantine(root, path)}"


def commit_segment(root: Path, index: Index, desc: Mapping[str, Any]) -> list[str]:
    """Index one segment a detached writer (a task worker) wrote under pending/: verify the
    file against its descriptor (sha256 over every dataset recomputed from the file, stage,
    fingerprint, keys, failures), move it into segments/ and record it and its items in one
    transaction. Keys already stored win (the file is removed when it adds nothing). Returns
    the keys recorded. A segment already indexed (a cached chunk outcome) records nothing; a
    pending file that is gone (and not indexed) is logged and records nothing, so its keys
    stay missing and are recomputed. A file that does not verify moves to quarantine/ and
    is a StoreError naming it; so is any SQLite error (one line)."""
    try:
        return _commit_segment(root, index, desc)
    except sqlite3.Error as e:
        raise _index_error(root / "index.sqlite", e) from None


def _commit_segment(root: Path, index: Index, desc: Mapping[str, Any]) -> list[str]:
    _refuse_in_worker("commit segments into the index")
    try:
        seg_id, rel = str(desc["id"]), str(desc["path"])
        stage, fingerprint = str(desc["stage"]), str(desc["fingerprint"])
        keys = [str(k) for k in desc["keys"]]
        failures = {str(k): str(v) for k, v in dict(desc["failures"]).items()}
        checksum = str(desc["checksum"])
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"segment descriptor {dict(desc)!r:.200}: field {e} missing or malformed") from None
    _check_name("segment id", seg_id)
    _check_name("stage", stage)
    _check_name("fingerprint", fingerprint)
    source = (root / rel).resolve()
    if not source.is_relative_to(root / "pending") or source.name != f"{seg_id}.h5":
        raise StoreError(f"segment descriptor {seg_id}: path {rel!r} is not pending/<owner>/{seg_id}.h5")
    if index.segment_indexed(seg_id):
        return []
    if not source.exists():
        log.warning("segment %s of %s is neither pending nor indexed (its keys are recomputed)", rel, stage)
        return []
    try:
        seg_row, item_rows, schema = _describe_segment(source, root)
        ok_keys = [r[2] for r in item_rows if r[5] is None]
        got_failures = {r[2]: r[5] for r in item_rows if r[5] is not None}
        if (seg_row[1], seg_row[2]) != (stage, fingerprint):
            raise StoreError(f"the file says {seg_row[1]}/{seg_row[2]}, the descriptor {stage}/{fingerprint}")
        if seg_row[6] != checksum:
            raise StoreError(f"checksum {seg_row[6]}, the worker reported {checksum}")
        if ok_keys != keys or got_failures != failures:
            raise StoreError("its keys or failures differ from what the worker reported")
    except StoreError as e:
        moved = quarantine(root, source)
        raise StoreError(f"pending segment {rel} does not verify ({e}); moved to {moved}") from None
    target = root / "segments" / stage / fingerprint / f"{seg_id}.h5"
    new_rel = str(target.relative_to(root))
    lock = _lock_path(root, seg_id)
    # Held while the file sits under segments/ unindexed, so gc and fsck do not take it for an
    # orphan; it names the file: if this process dies here, the next open removes it (as for
    # an attached writer) and its keys, still missing, are recomputed.
    lock_fd = _acquire_lock(lock, new_rel)
    try:
        try:
            _makedirs_durable(target.parent)
            os.rename(source, target)  # one directory operation: the file is in pending/ or in segments/
            _fsync(target.parent)
        except OSError as e:
            raise StoreError(f"moving pending segment {rel} into {new_rel}: {e}") from e
        rows: list[ItemRow] = []
        try:
            rows = index.record_segment((seg_id, stage, fingerprint, new_rel, *seg_row[4:]), item_rows,
                                        schema=schema, what=f"pending segment {rel}")
        except BaseException:
            # Not indexed: back to pending/, where the flow's sweep or `mrhp fsck --repair` finds it
            # (left under segments/ if even that fails: an orphan fsck --repair adopts).
            try:
                os.rename(target, source)
            except OSError:
                pass
            raise
        if not rows:
            target.unlink(missing_ok=True)  # adds nothing: other runs committed these keys first
            return []
        return [r[2] for r in rows]
    finally:
        lock.unlink(missing_ok=True)
        os.close(lock_fd)


def commit_pending(root: Path, index: Index, owner: str | None = None) -> tuple[int, list[str]]:
    """Verify and commit every pending segment of `owner` (or of every owner): the segments of
    chunk attempts whose result never reached the flow (a raising stage, a killed worker).
    Returns (item rows added, one line per file that did not verify)."""
    added, problems = 0, []
    for path in pending_segments(root, owner):
        desc = _pending_descriptor(path, root)
        if desc is None:
            problems.append(f"{path.relative_to(root)}: {quarantine_reason(root, path)}")
            continue
        try:
            n = len(commit_segment(root, index, desc))
        except StoreError as e:
            problems.append(str(e))
            continue
        added += n
        log.info("pending segment %s (%s/%s) verified: %d new item rows%s", path.relative_to(root),
                 desc["stage"], desc["fingerprint"], n, "" if n else ", its keys were already stored: removed")
    return added, problems
