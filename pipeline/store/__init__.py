"""The feature store: content-addressed stage outputs in immutable HDF5 segments plus a SQLite index.

Layout under the store root::

    index.sqlite                                   # segments, items, failures, views (WAL)
    segments/<stage>/<fingerprint>/<segment>.h5    # immutable once renamed into place
    tmp/                                           # writes in flight: <segment>.lock, <segment>.part
    pending/<owner>/<segment>.h5                   # written by task workers, not yet committed

One index writer: task workers (Dask workers, possibly on other machines sharing the store
folder) never open the index for writing (`mark_worker_process`; SQLite's locking is unreliable
on network file systems). A worker's `pending_writer` writes `tmp/<id>.part`, fsyncs it and
renames it to `pending/<owner>/<id>.h5` (owner: the flow run that claimed the keys), and returns
descriptors (keys, failures, checksum); the flow process verifies each file against its descriptor
and `commit_segment`s it (moved into segments/, indexed in one transaction). Pending files are
never read; those a flow never committed (a killed worker, a raising chunk) are committed by that
flow's end-of-stage sweep (`commit_pending`) or, once their run ended, verified and indexed or
quarantined by `mrhp fsck --repair`.

A writer buffers records and commits them in chunks: write `tmp/<id>.part`, fsync, rename into
`segments/`, fsync the folder, then record the segment, its items and its failures in one SQLite
transaction. A crash loses at most the chunk in flight; whatever it left behind is recognised by
its lock file (held with flock while the writer lives) and cleaned by the next `FeatureStore()`.

Segments are self-describing (stage, fingerprint, schema, keys, failures and a sha256 checksum in
the file), so `rebuild_index()` / `rebuild_index_file()` (`mrhp fsck --rebuild-index`) can recover
the index from the files alone. Nothing is pickled.

Every read is verified: a segment stores, per successful item, a CRC-32C (Castagnoli, hardware
instruction through the `crc32c` package; zlib's CRC-32 was 10x slower, see docs/benchmarks.md)
over its key and the bytes of each of its fields (`row_crc32c`, written at commit); `get()` checks that the row it
read holds the key it was asked for and that the CRC matches. A mismatch is a `StoreError` naming
the segment; the corrupt items of that segment are dropped from the index on the spot, so
`store.missing()` reports them and the next `mrhp extract` recomputes them. (Segments written
before per-item checksums existed, layout version 1, are verified whole, sha256, when first
opened.) Every SQLite error becomes a one-line `StoreError` naming `mrhp fsck --rebuild-index`.
Readers keep the key -> (segment, row) map in memory and read rows with `pread` at the file
offsets of contiguous datasets; they hold no HDF5 handle, so they are safe to use across fork.

The package, each module importing only from those above it (no cycles; tests/pipeline/
test_store_layout.py checks it, and that no SQL lies outside index.py)::

    fs.py | errors.py  lock files, fsync, claim owners, read-only / task-worker modes | one-line
        ^                StoreErrors for SQLite errors, `CorruptItemError`
    index.py           `Index`: every SQL statement (tables, transactions, claims, leases, queries)
        ^
    segment.py         the HDF5 segment format: layout, checksums, verify, `_OpenSegment` reads
        ^
    writer.py | reader.py  `SegmentWriter` and pending segments | `StageReader`, `View`
        ^
    maintenance.py     `clean_tmp`, `gc`, `fsck`, `rebuild_index`, `rebuild_index_file`
        ^
    __init__.py        `FeatureStore`, the facade, and every name imported from `pipeline.store`
"""
from __future__ import annotations

import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.errors import StoreError
from pipeline.stage import FieldSpec
from pipeline.store import maintenance, writer
from pipeline.store.errors import CorruptItemError, _guard_sqlite, _index_error
from pipeline.store.fs import (
    _acquire_lock,
    _lock_is_held,
    _lock_path,
    _makedirs_durable,
    _owner_lock,
    claim_owner,
    is_worker_process,
    mark_worker_process,
    owner_alive,
    read_only,
    writes_allowed,
)
from pipeline.store.index import _LEASE_BEAT_S, _LEASE_TTL_S, INDEX_VERSION, Index, ViewInfo, _Tx
from pipeline.store.maintenance import FsckReport, GcReport, rebuild_index_file
from pipeline.store.reader import StageReader, View, stage_reader
from pipeline.store.segment import (
    READABLE_SCHEMA_VERSIONS,
    SCHEMA_VERSION,
    _checksum,
    _OpenSegment,
    _read_segment_datasets,
)
from pipeline.store.writer import SegmentWriter, pending_writer

__all__ = [
    "INDEX_VERSION", "READABLE_SCHEMA_VERSIONS", "SCHEMA_VERSION", "CorruptItemError", "FeatureStore", "FsckReport",
    "GcReport", "Index", "SegmentWriter", "StageReader", "View", "ViewInfo", "claim_owner", "is_worker_process",
    "mark_worker_process", "pending_writer", "read_only", "rebuild_index_file", "writes_allowed",
    # internals that tests, benchmarks and features/text/vectors.py reach for by their old names:
    "_LEASE_TTL_S", "_OpenSegment", "_Tx", "_acquire_lock", "_checksum", "_index_error", "_owner_lock",
    "_read_segment_datasets",
]

log = logging.getLogger(__name__)
_OWNER_LOCKS: dict[tuple[str, str], int] = {}  # (store root, owner) -> fd holding its flock
_OWNER_LOCKS_MUTEX = threading.Lock()


class FeatureStore:
    """Open (creating if needed) the store at `root`; safe to construct in many processes at once."""

    def __init__(self, root: Path | str, *, allow_unindexed: bool = False) -> None:
        """`allow_unindexed`: open even when the index is empty while segment files exist (only
        for `fsck`, which reports that and points at `--rebuild-index`)."""
        self.root = Path(root).resolve()
        self.segments_dir = self.root / "segments"
        self.tmp_dir = self.root / "tmp"
        self.pending_dir = self.root / "pending"
        # Inside `read_only()` (mrhp status) the store is opened without creating or cleaning
        # anything: the index read-only, or an empty in-memory one when there is no store yet.
        self.read_only = not writes_allowed() or is_worker_process()
        self.index = Index(self.root, read_only=self.read_only)
        try:
            if self.read_only:
                self._refuse_unindexed()  # an absent index is empty too
                return
            try:
                for d in (self.root, self.segments_dir, self.tmp_dir):
                    _makedirs_durable(d)
            except OSError as e:
                raise StoreError(f"cannot create the feature store at {self.root}: {e}") from e
            self.index.ensure_tables()
            self.clean_tmp()
            if not allow_unindexed:
                self._refuse_unindexed()
        except sqlite3.Error as e:
            raise _index_error(self.index.path, e, "opening") from None

    def _refuse_unindexed(self) -> None:
        """An index without segments while segment files exist (deleted, emptied or replaced
        index.sqlite) would make every stage look missing and be recomputed in silence: refuse."""
        if self.index.has_segments():
            return
        files = [
            p for p in self.segments_dir.glob("*/*/*.h5")
            if not _lock_is_held(_lock_path(self.root, p.stem))  # a live writer's first commit
        ]
        if files:
            raise StoreError(
                f"store index {self.root / 'index.sqlite'} lists no segment, but {len(files)} segment files "
                f"exist under {self.segments_dir} (the index was deleted, emptied or replaced): run "
                "`mrhp fsck --rebuild-index` to index them again (or delete segments/ to start over)"
            )

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.root)!r})"

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        # Picklable for task runners (Dask): the receiving process opens its own connection.
        return (FeatureStore, (str(self.root),))

    def _conn(self) -> sqlite3.Connection:
        """This thread's index connection (`Index.conn`)."""
        return self.index.conn()

    def _present(self, stage: str, fingerprint: str, keys: Sequence[str]) -> set[str]:
        """The subset of `keys` with an index row (success or failure) for (stage, fingerprint)."""
        return self.index.present(stage, fingerprint, keys)

    # -- writing -------------------------------------------------------------------------------

    @_guard_sqlite
    def writer(
        self,
        stage: str,
        fingerprint: str,
        schema: Mapping[str, FieldSpec],
        *,
        attrs: Mapping[str, Any] | None = None,
        chunk_size: int = 500,
    ) -> SegmentWriter:
        """A writer committing records of (stage, fingerprint) every `chunk_size` records and on close.

        `attrs` (JSON-able stage parameters) are stored in each segment's `params` attribute."""
        return SegmentWriter(self.index, stage, fingerprint, schema, attrs=attrs, chunk_size=chunk_size)

    @_guard_sqlite
    def commit_segment(self, desc: Mapping[str, Any]) -> list[str]:
        """Verify a pending segment against its descriptor, move it into segments/ and index it
        (`pipeline.store.writer.commit_segment`). Returns the keys recorded."""
        return writer.commit_segment(self.root, self.index, desc)

    def pending_segments(self, owner: str | None = None) -> list[Path]:
        """Segment files written by task workers and not yet committed: those of `owner`, or all."""
        return writer.pending_segments(self.root, owner)

    def commit_pending(self, owner: str | None = None) -> tuple[int, list[str]]:
        """Verify and commit every pending segment of `owner` (or of every owner): the segments of
        chunk attempts whose result never reached the flow (a raising stage, a killed worker).
        Returns (item rows added, one line per file that did not verify)."""
        return writer.commit_pending(self.root, self.index, owner)

    def adopt_abandoned(self) -> tuple[int, list[str]]:
        """`commit_pending` for every owner no longer alive (its run ended or was killed before
        committing what its workers wrote): each file verified, then indexed or quarantined.
        `mrhp extract` calls it before computing; pending files of live runs are left to them."""
        added, problems = 0, []
        owners = sorted(p.name for p in self.pending_dir.iterdir() if p.is_dir()) if self.pending_dir.is_dir() else []
        for owner in owners:
            if self._owner_alive(owner):
                continue
            n, bad = self.commit_pending(owner)
            added += n
            problems += bad
            try:
                (self.pending_dir / owner).rmdir()
            except OSError:
                pass
        return added, problems

    @_guard_sqlite
    def forget(self, stage: str, fingerprint: str, keys: Iterable[str]) -> int:
        """Drop the index rows of `keys` so they count as missing again (--force). Returns rows dropped.

        Their segment rows stay on disk until `gc()` finds them unreferenced."""
        return self.index.forget(stage, fingerprint, list(dict.fromkeys(keys)))

    # -- queries -------------------------------------------------------------------------------

    @_guard_sqlite
    def missing(self, stage: str, fingerprint: str, keys: Iterable[str]) -> list[str]:
        """Keys (deduplicated, in input order) with neither a committed row nor a recorded failure."""
        keys = list(dict.fromkeys(keys))
        present = self._present(stage, fingerprint, keys)
        return [k for k in keys if k not in present]

    @_guard_sqlite
    def done_keys(self, stage: str, fingerprint: str, keys: Iterable[str] | None = None) -> list[str]:
        """Keys with a successful committed row: all of them, or those among `keys` (input order)."""
        return self.index.done_keys(stage, fingerprint, None if keys is None else list(dict.fromkeys(keys)))

    @_guard_sqlite
    def failures(self, stage: str, fingerprint: str) -> dict[str, str]:
        """Recorded failures of (stage, fingerprint): key -> reason."""
        return self.index.failures(stage, fingerprint)

    @_guard_sqlite
    def counts(self, stage: str, fingerprint: str) -> dict[str, int]:
        """{"done": successes, "failed": recorded failures} for (stage, fingerprint)."""
        return self.index.counts(stage, fingerprint)

    @_guard_sqlite
    def stages(self) -> list[str]:
        """Stage names that have at least one committed segment."""
        return self.index.stages()

    @_guard_sqlite
    def fingerprints(self, stage: str) -> list[str]:
        """Fingerprints of `stage` that have at least one committed segment, sorted."""
        return self.index.fingerprints(stage)

    # -- reading -------------------------------------------------------------------------------

    @_guard_sqlite
    def reader(self, stage: str, fingerprint: str) -> StageReader:
        """A reader over everything committed for (stage, fingerprint) at this moment."""
        return self.index.read_stage(
            stage, fingerprint, lambda segments, items: stage_reader(self.root, stage, fingerprint, segments, items)
        )

    # -- views ---------------------------------------------------------------------------------

    @_guard_sqlite
    def write_view(self, dataset: str, stage: str, fingerprint: str, mapping: Mapping[str, str]) -> None:
        """Replace the view of (dataset, stage) by `mapping` (item id -> key), atomically.

        Every key must already be committed (done or failed) for (stage, fingerprint)."""
        if not isinstance(dataset, str) or not dataset:
            raise StoreError(f"view dataset name must be a non-empty string, got {dataset!r}")
        self.index.write_view(dataset, stage, fingerprint, [(str(i), str(k)) for i, k in mapping.items()])

    @_guard_sqlite
    def drop_view(self, dataset: str, stage: str) -> bool:
        """Remove the view of (dataset, stage); True when there was one."""
        return self.index.drop_view(dataset, stage)

    @_guard_sqlite
    def view(self, dataset: str, stage: str) -> View:
        """The current view of (dataset, stage): item id -> stored arrays."""
        fingerprint, pairs, reader = self.index.read_view(
            dataset, stage, lambda fp, segments, items: stage_reader(self.root, stage, fp, segments, items)
        )
        return View(
            dataset=dataset, stage=stage, fingerprint=fingerprint, item_ids=[p[0] for p in pairs],
            keys=[p[1] for p in pairs], reader=reader,
        )

    @_guard_sqlite
    def views(self) -> list[ViewInfo]:
        """Every view: (dataset, stage, fingerprint, n_items)."""
        return self.index.views()

    # -- leases and claims: running flows -------------------------------------------------------

    @contextmanager
    def lease(self, holder: str) -> Iterator[str]:
        """Hold a lease in the index while a flow runs (`mrhp extract`): `gc` then leaves every
        stage fingerprint no view references yet alone (the flow is about to reference it). A
        thread refreshes the heartbeat; a killed holder's lease expires after _LEASE_TTL_S."""
        lease_id = uuid.uuid4().hex
        owner_lock = _owner_lock(self.root, lease_id)
        owner_fd = _acquire_lock(owner_lock, "")  # the lease id also owns the run's chunk claims
        try:
            self.index.add_lease(lease_id, holder, os.getpid(), socket.gethostname(), time.time())
        except BaseException:  # no lease row: the owner lock must not outlive it
            owner_lock.unlink(missing_ok=True)
            os.close(owner_fd)
            raise
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(_LEASE_BEAT_S):
                try:
                    self.index.beat_lease(lease_id)
                except StoreError as e:
                    log.warning("lease %s: heartbeat failed (%s)", lease_id, e)

        thread = threading.Thread(target=beat, name=f"store-lease-{lease_id[:8]}", daemon=True)
        thread.start()
        try:
            yield lease_id
        finally:
            stop.set()
            thread.join()
            try:
                self.index.end_lease(lease_id)
            except StoreError as e:
                log.warning("lease %s: not released (%s); it expires by itself", lease_id, e)
            finally:
                owner_lock.unlink(missing_ok=True)
                os.close(owner_fd)

    @_guard_sqlite
    def claim(self, stage: str, fingerprint: str, keys: Iterable[str], owner: str | None = None) -> list[str]:
        """Claim the still-missing `keys` for `owner` (default `claim_owner()`); returns those it
        may compute (input order): not stored yet and not claimed by another live owner. Two
        extract runs on one store thus split the work instead of both computing everything."""
        owner = owner or claim_owner()
        if owner == claim_owner() and not os.environ.get("MRHP_STORE_OWNER"):
            self._hold_owner_lock(owner)  # a plain process owns its claims while it lives
        return self.index.claim(stage, fingerprint, list(dict.fromkeys(keys)), owner, self._owner_alive)

    @_guard_sqlite
    def release(self, stage: str, fingerprint: str, keys: Iterable[str], owner: str | None = None) -> None:
        """Drop `owner`'s claims on `keys` (after their chunk committed, or failed)."""
        self.index.release(stage, fingerprint, list(dict.fromkeys(keys)), owner or claim_owner())

    @_guard_sqlite
    def claimed_by_others(self, stage: str, fingerprint: str, keys: Iterable[str],
                          owner: str | None = None) -> dict[str, str]:
        """key -> owner for `keys` a live other owner has claimed."""
        out = self.index.claims_of_others(stage, fingerprint, list(dict.fromkeys(keys)), owner or claim_owner())
        alive = {o: self._owner_alive(o) for o in set(out.values())}
        return {k: o for k, o in out.items() if alive[o]}

    def _owner_alive(self, owner: str) -> bool:
        return owner_alive(self.root, owner)

    def _hold_owner_lock(self, owner: str) -> None:
        # Under a process-wide mutex: two task threads taking the same flock through two file
        # descriptors would block each other for good (flock conflicts between descriptors).
        key = (str(self.root), owner)
        with _OWNER_LOCKS_MUTEX:
            if key not in _OWNER_LOCKS:
                _OWNER_LOCKS[key] = _acquire_lock(_owner_lock(self.root, owner), "")

    @_guard_sqlite
    def live_leases(self) -> list[tuple[str, int, str, float]]:
        """(holder, pid, host, started) of every lease refreshed within _LEASE_TTL_S."""
        return self.index.live_leases()

    # -- maintenance (pipeline.store.maintenance) ------------------------------------------------

    @_guard_sqlite
    def clean_tmp(self) -> list[str]:
        """Remove what dead writers left: their tmp files and any segment renamed but never indexed."""
        return maintenance.clean_tmp(self.root, self.index)

    @_guard_sqlite
    def gc(self, dry_run: bool = False) -> GcReport:
        """Delete unreferenced segments and orphan files (`pipeline.store.maintenance.gc`)."""
        return maintenance.gc(self.root, self.index, dry_run)

    @_guard_sqlite
    def fsck(self, repair: bool = False, *, checksums: bool = True) -> FsckReport:
        """Verify (and with `repair`, mend) the store (`pipeline.store.maintenance.fsck`)."""
        return maintenance.fsck(self.root, self.index, repair, checksums=checksums)

    @_guard_sqlite
    def rebuild_index(self) -> FsckReport:
        """Rebuild the segments and items tables from the segment files (views are kept)."""
        return maintenance.rebuild_index(self.root, self.index)
