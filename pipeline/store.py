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
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import crc32c
import h5py
import numpy as np

from pipeline.errors import StoreError
from pipeline.stage import FieldSpec, Record

SCHEMA_VERSION = 2  # segment file layout version (attribute `schema_version`); 2 adds `row_crc32c`
READABLE_SCHEMA_VERSIONS = (1, 2)  # version 1 segments (no per-item checksums) are verified whole on open
INDEX_VERSION = 1  # index.sqlite table layout version
_SQL_CHUNK = 900  # keys per `IN (...)` query, below SQLite's bound-parameter limit
_BUSY_TIMEOUT_MS = 60_000
_PRELOAD_BYTES = 1 << 20  # per segment, fields this small are read whole on open (boxes, ids, sizes)
_MAX_OPEN_FILES = 128  # per reader: segment file descriptors kept open (LRU)
_LEASE_BEAT_S = 30.0  # a lease holder refreshes its heartbeat this often ...
_LEASE_TTL_S = 300.0  # ... and a lease not refreshed for this long belongs to a dead process
_CLAIM_TTL_S = 900.0  # a chunk claim lasts this long unless its owner's lease heartbeat renews it


_OWNER_LOCKS: dict[tuple[str, str], int] = {}  # (store root, owner) -> fd holding its flock
_OWNER_LOCKS_MUTEX = threading.Lock()


def claim_owner() -> str:
    """Who claims chunks: the running `mrhp extract` (MRHP_STORE_OWNER, its lease id, inherited
    by its task workers), else this process (host-pid)."""
    env = os.environ.get("MRHP_STORE_OWNER")
    if env:
        return env
    host = "".join(c if c.isalnum() or c in "-." else "-" for c in os.uname().nodename)
    return f"{host}-{os.getpid()}"


def _owner_lock(root: Path, owner: str) -> Path:
    """Held (flock) by a live claim owner: its claims die with it, whatever their expiry says."""
    return root / "tmp" / f"claims-{owner}.lock"

_STR = h5py.string_dtype("utf-8")
log = logging.getLogger(__name__)
_INHERITED_CONNECTIONS: list[sqlite3.Connection] = []  # SQLite handles a forked child must not close

_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS segments (
    id TEXT PRIMARY KEY,              -- uuid4 hex, also the file name
    stage TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    path TEXT NOT NULL UNIQUE,        -- relative to the store root
    n_rows INTEGER NOT NULL,          -- successful items (rows of the field arrays)
    n_failed INTEGER NOT NULL,
    checksum TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS segments_by_stage ON segments (stage, fingerprint);
CREATE TABLE IF NOT EXISTS items (
    stage TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    key TEXT NOT NULL,
    segment TEXT NOT NULL,
    row INTEGER,                      -- NULL for a failure
    failure TEXT,                     -- NULL for a success
    PRIMARY KEY (stage, fingerprint, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS items_by_segment ON items (segment);
CREATE TABLE IF NOT EXISTS stage_schemas (
    stage TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    schema TEXT NOT NULL,             -- JSON, as in the segments' `schema` attribute
    PRIMARY KEY (stage, fingerprint)
);
CREATE TABLE IF NOT EXISTS views (
    dataset TEXT NOT NULL,
    stage TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    n_items INTEGER NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (dataset, stage)
);
CREATE TABLE IF NOT EXISTS leases (
    id TEXT PRIMARY KEY,              -- a running flow (mrhp extract): gc leaves its work alone
    holder TEXT NOT NULL,             -- what holds it, for messages
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    started REAL NOT NULL,
    heartbeat REAL NOT NULL           -- refreshed every _LEASE_BEAT_S, stale after _LEASE_TTL_S
);
CREATE TABLE IF NOT EXISTS claims (
    stage TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    key TEXT NOT NULL,
    owner TEXT NOT NULL,              -- claim_owner() of the run computing it
    expires REAL NOT NULL,            -- renewed by the owner's lease heartbeat
    PRIMARY KEY (stage, fingerprint, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS claims_by_owner ON claims (owner);
CREATE TABLE IF NOT EXISTS view_items (
    dataset TEXT NOT NULL,
    stage TEXT NOT NULL,
    item_id TEXT NOT NULL,
    key TEXT NOT NULL,
    PRIMARY KEY (dataset, stage, item_id)
) WITHOUT ROWID;
"""


# --------------------------------------------------------------------------------------------
# read-only mode: commands that only look (`mrhp status`) must not write into the store

_READ_ONLY: ContextVar[bool] = ContextVar("mrhp_store_read_only", default=False)


@contextmanager
def read_only() -> Iterator[None]:
    """Within this block nothing may be written under a store root: caches beside the store
    (word-vector hashes, vocabulary fits) are computed but not saved; see `writes_allowed`."""
    token = _READ_ONLY.set(True)
    try:
        yield
    finally:
        _READ_ONLY.reset(token)


def writes_allowed() -> bool:
    """False inside `read_only()`: code that would save a cache under the store skips it."""
    return not _READ_ONLY.get()


# --------------------------------------------------------------------------------------------
# task workers: they write segment files, never the index (the flow process is its only writer)

_WORKER_ENV = "MRHP_STORE_WORKER"  # "1" in a task-worker process (set by the flow for its Dask workers)
_OPEN_LOG_ENV = "MRHP_STORE_OPEN_LOG"  # a file: one line "<pid> <read|write> <index path>" per index open


def mark_worker_process() -> None:
    """Flag this process as a task worker: from now on it opens store indexes read-only and any
    index write is a StoreError. Its results reach the index through the flow (`commit_segment`)."""
    os.environ[_WORKER_ENV] = "1"


def is_worker_process() -> bool:
    """True in a process flagged by `mark_worker_process` (or started with MRHP_STORE_WORKER=1)."""
    return os.environ.get(_WORKER_ENV) == "1"


def _log_index_open(path: Path, mode: str) -> None:
    """Append `<pid> <mode> <path>` to $MRHP_STORE_OPEN_LOG when set (tests: who opened the index how)."""
    target = os.environ.get(_OPEN_LOG_ENV)
    if not target:
        return
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{os.getpid()} {mode} {path}\n".encode())
    finally:
        os.close(fd)


def _refuse_in_worker(doing: str) -> None:
    if is_worker_process():
        raise StoreError(
            f"this process is a task worker: it may not {doing} (workers only write segment files; "
            "the flow commits them into the index)"
        )


# --------------------------------------------------------------------------------------------
# small helpers


def _chunks(seq: Sequence[Any], n: int = _SQL_CHUNK) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def _fsync(path: Path) -> None:
    """fsync a file or a folder (a folder: the entries renamed into it survive a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durable(path: Path) -> None:
    """mkdir -p, fsyncing each parent whose entry was created, so a new folder survives a crash."""
    if path.is_dir():
        return
    missing = []
    p = path
    while not p.is_dir():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        _fsync(d.parent)


def _check_name(what: str, value: str) -> None:
    """Stage names and fingerprints become folder names: keep them to a safe alphabet."""
    if not isinstance(value, str) or not value or not all(c.isalnum() or c in "-_." for c in value):
        raise StoreError(f"{what} must be a non-empty string of letters, digits, '-', '_' or '.'; got {value!r}")
    if value in (".", ".."):
        raise StoreError(f"{what} may not be {value!r}")


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


class _IndexConnection(sqlite3.Connection):
    """A connection that knows its file, so SQLite errors can name it."""

    mrhp_path: str = "index.sqlite"


def _index_error(path: Any, e: BaseException, doing: str = "") -> StoreError:
    """One line for an SQLite error: a busy index says so; anything else points at the rebuild."""
    msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
    where = f"store index {path}" + (f" ({doing})" if doing else "")
    if isinstance(e, sqlite3.OperationalError) and ("locked" in msg or "busy" in msg):
        return StoreError(f"{where}: {msg}; another process holds the index, retry when it is done")
    if "disk is full" in msg or "SQLITE_FULL" in msg:
        return StoreError(f"{where}: {msg}; free some space and rerun (nothing was half-written)")
    return StoreError(
        f"{where}: {msg}; the index is damaged: run `mrhp fsck --rebuild-index` to rebuild it from the "
        "segment files"
    )


def _guard_sqlite(fn: Any) -> Any:
    """Decorator for store methods: a stray sqlite3.Error becomes `_index_error` (one line)."""
    import functools

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except sqlite3.Error as e:
            store = getattr(self, "store", self)
            raise _index_error(store.root / "index.sqlite", e) from None

    return wrapper


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


# --------------------------------------------------------------------------------------------
# lock files: tell a live writer's files from a dead writer's leftovers


def _lock_path(root: Path, seg_id: str) -> Path:
    return root / "tmp" / f"{seg_id}.lock"


def _part_path(root: Path, seg_id: str) -> Path:
    return root / "tmp" / f"{seg_id}.part"


def _acquire_lock(path: Path, content: str) -> int:
    """Create and flock `path` (retrying if a cleaner unlinked it between open and flock)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.write(fd, content.encode("utf-8"))
            return fd
        os.close(fd)


def _lock_is_held(path: Path) -> bool:
    """True when a live process holds the flock on `path` (False when absent or abandoned)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return True
        raise
    finally:
        os.close(fd)
    return False


# --------------------------------------------------------------------------------------------
# reports


@dataclass
class FsckReport:
    """What `FeatureStore.fsck` found; `ok` when nothing is wrong."""

    segments_checked: int = 0  # segment files whose checksum was recomputed
    items_checked: int = 0  # index rows (successes and failures) resolved to a segment row
    view_entries_checked: int = 0
    problems: list[str] = field(default_factory=list)  # one line each, naming the file/key/view
    repaired: list[str] = field(default_factory=list)  # what --repair changed

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [
            f"checked {self.segments_checked} segments, {self.items_checked} index rows, "
            f"{self.view_entries_checked} view entries: "
            + ("ok" if self.ok else f"{len(self.problems)} problem(s)")
        ]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  repaired: {r}" for r in self.repaired]
        return "\n".join(lines)


@dataclass
class GcReport:
    """What `FeatureStore.gc` removed (or would remove with dry_run)."""

    dry_run: bool = False
    segments_removed: list[str] = field(default_factory=list)  # relative paths
    orphans_removed: list[str] = field(default_factory=list)  # files not in the index
    items_dropped: int = 0  # index rows (successes and failures) dropped
    bytes_freed: int = 0
    held_by: list[str] = field(default_factory=list)  # live leases: unreferenced work left alone

    def format(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        line = (
            f"{verb} {len(self.segments_removed)} unreferenced segments and "
            f"{len(self.orphans_removed)} orphan files ({self.bytes_freed / 1e6:.1f} MB), "
            f"{'would drop' if self.dry_run else 'dropped'} {self.items_dropped} index rows"
        )
        if self.held_by:
            line += (f"\n  flows are running ({'; '.join(self.held_by)}): stage outputs no view references "
                     "yet were kept; rerun gc when they are done")
        return line


class ViewInfo(NamedTuple):
    dataset: str
    stage: str
    fingerprint: str
    n_items: int


# --------------------------------------------------------------------------------------------
# the store


class FeatureStore:
    """Open (creating if needed) the store at `root`; safe to construct in many processes at once."""

    def __init__(self, root: Path | str, *, allow_unindexed: bool = False) -> None:
        """`allow_unindexed`: open even when the index is empty while segment files exist (only
        for `fsck`, which reports that and points at `--rebuild-index`)."""
        self.root = Path(root).resolve()
        self.segments_dir = self.root / "segments"
        self.tmp_dir = self.root / "tmp"
        self.pending_dir = self.root / "pending"
        index = self.root / "index.sqlite"
        # Inside `read_only()` (mrhp status) the store is opened without creating or cleaning
        # anything: the index read-only, or an empty in-memory one when there is no store yet.
        self.read_only = not writes_allowed() or is_worker_process()
        self._memory = self.read_only and not index.is_file()
        self._local = threading.local()
        if self.read_only:
            conn = self._conn()
            try:
                self._refuse_unindexed(conn)  # an absent index is empty too
            except sqlite3.Error as e:
                raise _index_error(index, e, "opening") from None
            return
        try:
            for d in (self.root, self.segments_dir, self.tmp_dir):
                _makedirs_durable(d)
        except OSError as e:
            raise StoreError(f"cannot create the feature store at {self.root}: {e}") from e
        conn = self._conn()
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not {"meta", "segments", "items", "stage_schemas", "views", "view_items", "leases", "claims"} <= tables:
                with _Tx(conn):  # first use (or a store from before a table was added): create tables
                    for stmt in _SCHEMA_SQL.split(";"):
                        if stmt.strip():
                            conn.execute(stmt)
                    conn.execute("INSERT OR IGNORE INTO meta VALUES ('index_version', ?)", (str(INDEX_VERSION),))
            row = conn.execute("SELECT value FROM meta WHERE name='index_version'").fetchone()
            version = row[0] if row else "(missing)"
            if version != str(INDEX_VERSION):
                raise StoreError(f"{index}: index version {version}, this code reads version {INDEX_VERSION}")
            self.clean_tmp()
            if not allow_unindexed:
                self._refuse_unindexed(conn)
        except sqlite3.Error as e:
            raise _index_error(index, e, "opening") from None

    def _refuse_unindexed(self, conn: sqlite3.Connection) -> None:
        """An index without segments while segment files exist (deleted, emptied or replaced
        index.sqlite) would make every stage look missing and be recomputed in silence: refuse."""
        if conn.execute("SELECT 1 FROM segments LIMIT 1").fetchone() is not None:
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

    # -- connections ---------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        """One SQLite connection per thread and process (connections do not survive fork)."""
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            if conn is not None:
                # Inherited through fork: never use or close it here (closing could checkpoint or
                # unlink the parent's WAL); keep it referenced so it is not finalized either.
                _INHERITED_CONNECTIONS.append(conn)
            path = self.root / "index.sqlite"
            try:
                if getattr(self, "_memory", False):
                    conn = sqlite3.connect(":memory:", isolation_level=None, factory=_IndexConnection)
                    conn.executescript(_SCHEMA_SQL)
                    conn.mrhp_path = str(path)
                    self._local.conn, self._local.pid = conn, os.getpid()
                    return conn
                if getattr(self, "read_only", False):
                    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=_BUSY_TIMEOUT_MS / 1000,
                                           isolation_level=None, factory=_IndexConnection)
                    conn.mrhp_path = str(path)
                    conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
                    _log_index_open(path, "read")
                    self._local.conn, self._local.pid = conn, os.getpid()
                    return conn
                _refuse_in_worker(f"open the store index {path} for writing")
                _log_index_open(path, "write")
                conn = sqlite3.connect(
                    path, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None, factory=_IndexConnection
                )
                conn.mrhp_path = str(path)
                conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA temp_store=MEMORY")
            except sqlite3.Error as e:
                raise _index_error(path, e, "opening") from None
            self._local.conn = conn
            self._local.pid = os.getpid()
        return conn

    def _present(self, conn: sqlite3.Connection, stage: str, fingerprint: str, keys: Sequence[str]) -> set[str]:
        """The subset of `keys` with an index row (success or failure) for (stage, fingerprint)."""
        present: set[str] = set()
        for part in _chunks(keys):
            q = (
                "SELECT key FROM items WHERE stage=? AND fingerprint=? AND key IN "
                f"({','.join('?' * len(part))})"
            )
            present.update(r[0] for r in conn.execute(q, (stage, fingerprint, *part)))
        return present

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
        return SegmentWriter(self, stage, fingerprint, schema, attrs=attrs, chunk_size=chunk_size)

    @_guard_sqlite
    def commit_segment(self, desc: Mapping[str, Any]) -> list[str]:
        """Index one segment a detached writer (a task worker) wrote under pending/: verify the
        file against its descriptor (sha256 over every dataset recomputed from the file, stage,
        fingerprint, keys, failures), move it into segments/ and record it and its items in one
        transaction. Keys already stored win (the file is removed when it adds nothing). Returns
        the keys recorded. A segment already indexed (a cached chunk outcome) records nothing; a
        pending file that is gone (and not indexed) is logged and records nothing, so its keys
        stay missing and are recomputed. A file that does not verify moves to quarantine/ and
        is a StoreError naming it."""
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
        source = (self.root / rel).resolve()
        if not source.is_relative_to(self.pending_dir) or source.name != f"{seg_id}.h5":
            raise StoreError(f"segment descriptor {seg_id}: path {rel!r} is not pending/<owner>/{seg_id}.h5")
        conn = self._conn()
        if conn.execute("SELECT 1 FROM segments WHERE id=?", (seg_id,)).fetchone():
            return []
        if not source.exists():
            log.warning("segment %s of %s is neither pending nor indexed (its keys are recomputed)", rel, stage)
            return []
        try:
            seg_row, item_rows, schema = _describe_segment(source, self.root)
            ok_keys = [r[2] for r in item_rows if r[5] is None]
            got_failures = {r[2]: r[5] for r in item_rows if r[5] is not None}
            if (seg_row[1], seg_row[2]) != (stage, fingerprint):
                raise StoreError(f"the file says {seg_row[1]}/{seg_row[2]}, the descriptor {stage}/{fingerprint}")
            if seg_row[6] != checksum:
                raise StoreError(f"checksum {seg_row[6]}, the worker reported {checksum}")
            if ok_keys != keys or got_failures != failures:
                raise StoreError("its keys or failures differ from what the worker reported")
        except StoreError as e:
            moved = self._quarantine(source)
            raise StoreError(f"pending segment {rel} does not verify ({e}); moved to {moved}") from None
        target = self.segments_dir / stage / fingerprint / f"{seg_id}.h5"
        new_rel = str(target.relative_to(self.root))
        lock = _lock_path(self.root, seg_id)
        # Held while the file sits under segments/ unindexed, so gc and fsck do not take it for an
        # orphan; it names the file: if this process dies here, the next open removes it (as for
        # an attached writer) and its keys, still missing, are recomputed.
        lock_fd = _acquire_lock(lock, new_rel)
        try:
            return self._move_and_index(source, target, rel, new_rel, seg_id, stage, fingerprint,
                                        seg_row, item_rows, schema, conn)
        finally:
            lock.unlink(missing_ok=True)
            os.close(lock_fd)

    def _move_and_index(self, source: Path, target: Path, rel: str, new_rel: str, seg_id: str, stage: str,
                        fingerprint: str, seg_row: tuple, item_rows: list[tuple], schema: str,
                        conn: sqlite3.Connection) -> list[str]:
        try:
            _makedirs_durable(target.parent)
            os.rename(source, target)  # one directory operation: the file is in pending/ or in segments/
            _fsync(target.parent)
        except OSError as e:
            raise StoreError(f"moving pending segment {rel} into {new_rel}: {e}") from e
        rows: list[tuple] = []
        try:
            with _Tx(conn):
                conn.execute("INSERT OR IGNORE INTO stage_schemas VALUES (?, ?, ?)", (stage, fingerprint, schema))
                (known,) = conn.execute(
                    "SELECT schema FROM stage_schemas WHERE stage=? AND fingerprint=?", (stage, fingerprint)
                ).fetchone()
                if known != schema:
                    raise StoreError(
                        f"pending segment {rel}: schema {schema} differs from the one stored for {stage}/"
                        f"{fingerprint}, {known} (a schema change must change the fingerprint)"
                    )
                present = self._present(conn, stage, fingerprint, [r[2] for r in item_rows])
                rows = [r for r in item_rows if r[2] not in present]
                if rows:
                    conn.execute("INSERT INTO segments VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                 (seg_id, stage, fingerprint, new_rel, *seg_row[4:]))
                    conn.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?)", rows)
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

    def _quarantine(self, path: Path) -> str:
        q = self.root / "quarantine"
        _makedirs_durable(q)
        os.replace(path, q / path.name)
        return f"quarantine/{path.name}"

    def pending_segments(self, owner: str | None = None) -> list[Path]:
        """Segment files written by task workers and not yet committed: those of `owner`, or all."""
        base = self.pending_dir / owner if owner else self.pending_dir
        pattern = "*.h5" if owner else "*/*.h5"
        return sorted(base.glob(pattern)) if base.is_dir() else []

    def commit_pending(self, owner: str | None = None) -> tuple[int, list[str]]:
        """Verify and commit every pending segment of `owner` (or of every owner): the segments of
        chunk attempts whose result never reached the flow (a raising stage, a killed worker).
        Returns (item rows added, one line per file that did not verify)."""
        added, problems = 0, []
        for path in self.pending_segments(owner):
            desc = _pending_descriptor(path, self.root)
            if desc is None:
                problems.append(f"{path.relative_to(self.root)}: {self._quarantine_reason(path)}")
                continue
            try:
                n = len(self.commit_segment(desc))
            except StoreError as e:
                problems.append(str(e))
                continue
            added += n
            log.info("pending segment %s (%s/%s) verified: %d new item rows%s", path.relative_to(self.root),
                     desc["stage"], desc["fingerprint"], n, "" if n else ", its keys were already stored: removed")
        return added, problems

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

    def _quarantine_reason(self, path: Path) -> str:
        try:
            _describe_segment(path, self.root)
            reason = "not a segment"
        except StoreError as e:
            reason = str(e)
        return f"unusable pending segment ({reason}), moved to {self._quarantine(path)}"

    @_guard_sqlite
    def forget(self, stage: str, fingerprint: str, keys: Iterable[str]) -> int:
        """Drop the index rows of `keys` so they count as missing again (--force). Returns rows dropped.

        Their segment rows stay on disk until `gc()` finds them unreferenced."""
        keys = list(dict.fromkeys(keys))
        conn = self._conn()
        dropped = 0
        with _Tx(conn):
            for part in _chunks(keys):
                cur = conn.execute(
                    "DELETE FROM items WHERE stage=? AND fingerprint=? AND key IN "
                    f"({','.join('?' * len(part))})",
                    (stage, fingerprint, *part),
                )
                dropped += cur.rowcount
        return dropped

    # -- queries -------------------------------------------------------------------------------

    @_guard_sqlite
    def missing(self, stage: str, fingerprint: str, keys: Iterable[str]) -> list[str]:
        """Keys (deduplicated, in input order) with neither a committed row nor a recorded failure."""
        keys = list(dict.fromkeys(keys))
        present = self._present(self._conn(), stage, fingerprint, keys)
        return [k for k in keys if k not in present]

    @_guard_sqlite
    def done_keys(self, stage: str, fingerprint: str, keys: Iterable[str] | None = None) -> list[str]:
        """Keys with a successful committed row: all of them, or those among `keys` (input order)."""
        conn = self._conn()
        if keys is None:
            rows = conn.execute(
                "SELECT key FROM items WHERE stage=? AND fingerprint=? AND failure IS NULL", (stage, fingerprint)
            )
            return [r[0] for r in rows]
        keys = list(dict.fromkeys(keys))
        done: set[str] = set()
        for part in _chunks(keys):
            q = (
                "SELECT key FROM items WHERE stage=? AND fingerprint=? AND failure IS NULL AND key IN "
                f"({','.join('?' * len(part))})"
            )
            done.update(r[0] for r in conn.execute(q, (stage, fingerprint, *part)))
        return [k for k in keys if k in done]

    @_guard_sqlite
    def failures(self, stage: str, fingerprint: str) -> dict[str, str]:
        """Recorded failures of (stage, fingerprint): key -> reason."""
        rows = self._conn().execute(
            "SELECT key, failure FROM items WHERE stage=? AND fingerprint=? AND failure IS NOT NULL",
            (stage, fingerprint),
        )
        return dict(rows.fetchall())

    @_guard_sqlite
    def counts(self, stage: str, fingerprint: str) -> dict[str, int]:
        """{"done": successes, "failed": recorded failures} for (stage, fingerprint)."""
        done, failed = self._conn().execute(
            "SELECT COALESCE(SUM(failure IS NULL), 0), COALESCE(SUM(failure IS NOT NULL), 0) "
            "FROM items WHERE stage=? AND fingerprint=?",
            (stage, fingerprint),
        ).fetchone()
        return {"done": int(done), "failed": int(failed)}

    @_guard_sqlite
    def stages(self) -> list[str]:
        """Stage names that have at least one committed segment."""
        return [r[0] for r in self._conn().execute("SELECT DISTINCT stage FROM segments ORDER BY stage")]

    @_guard_sqlite
    def fingerprints(self, stage: str) -> list[str]:
        """Fingerprints of `stage` that have at least one committed segment, sorted."""
        rows = self._conn().execute(
            "SELECT DISTINCT fingerprint FROM segments WHERE stage=? ORDER BY fingerprint", (stage,)
        )
        return [r[0] for r in rows]

    # -- reading -------------------------------------------------------------------------------

    @_guard_sqlite
    def reader(self, stage: str, fingerprint: str) -> StageReader:
        """A reader over everything committed for (stage, fingerprint) at this moment."""
        conn = self._conn()
        with _Tx(conn, immediate=False):
            return self._reader_in_tx(conn, stage, fingerprint)

    def _reader_in_tx(self, conn: sqlite3.Connection, stage: str, fingerprint: str) -> StageReader:
        seg_index: dict[str, int] = {}
        seg_paths: list[str] = []
        for seg_id, path in conn.execute(
            "SELECT id, path FROM segments WHERE stage=? AND fingerprint=?", (stage, fingerprint)
        ):
            seg_index[seg_id] = len(seg_paths)
            seg_paths.append(path)
        keys: list[str] = []
        segs: list[int] = []
        rows: list[int] = []
        failures: dict[str, str] = {}
        for key, seg, row, failure in conn.execute(
            "SELECT key, segment, row, failure FROM items WHERE stage=? AND fingerprint=?", (stage, fingerprint)
        ):
            if failure is not None:
                failures[key] = failure
            elif seg in seg_index:
                keys.append(key)
                segs.append(seg_index[seg])
                rows.append(row)
            else:
                raise StoreError(
                    f"store index {self.root / 'index.sqlite'}: item {key} of {stage}/{fingerprint} names "
                    f"segment {seg}, which is not in the index; run `mrhp fsck --repair`"
                )
        return StageReader(
            root=self.root, stage=stage, fingerprint=fingerprint, segment_paths=seg_paths, keys=keys,
            segments=np.asarray(segs, dtype=np.int32), rows=np.asarray(rows, dtype=np.int64), failures=failures,
        )

    # -- views ---------------------------------------------------------------------------------

    @_guard_sqlite
    def write_view(self, dataset: str, stage: str, fingerprint: str, mapping: Mapping[str, str]) -> None:
        """Replace the view of (dataset, stage) by `mapping` (item id -> key), atomically.

        Every key must already be committed (done or failed) for (stage, fingerprint)."""
        if not isinstance(dataset, str) or not dataset:
            raise StoreError(f"view dataset name must be a non-empty string, got {dataset!r}")
        pairs = [(str(i), str(k)) for i, k in mapping.items()]
        conn = self._conn()
        with _Tx(conn):
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS new_view (item_id TEXT PRIMARY KEY, key TEXT NOT NULL)")
            conn.execute("DELETE FROM new_view")
            conn.executemany("INSERT INTO new_view VALUES (?, ?)", pairs)
            absent = conn.execute(
                "SELECT n.item_id, n.key FROM new_view n LEFT JOIN items i "
                "ON i.stage=? AND i.fingerprint=? AND i.key=n.key WHERE i.key IS NULL",
                (stage, fingerprint),
            ).fetchall()
            if absent:
                conn.execute("DELETE FROM new_view")
                examples = ", ".join(f"{i} -> {k}" for i, k in absent[:5])
                raise StoreError(
                    f"cannot write view {dataset}/{stage}: {len(absent)} of {len(pairs)} items are not in the "
                    f"store for fingerprint {fingerprint} (neither done nor failed), e.g. {examples}"
                )
            conn.execute("DELETE FROM view_items WHERE dataset=? AND stage=?", (dataset, stage))
            conn.execute(
                "INSERT INTO view_items SELECT ?, ?, item_id, key FROM new_view", (dataset, stage)
            )
            conn.execute(
                "INSERT OR REPLACE INTO views VALUES (?, ?, ?, ?, ?)",
                (dataset, stage, fingerprint, len(pairs), time.time()),
            )
            conn.execute("DELETE FROM new_view")

    @_guard_sqlite
    def drop_view(self, dataset: str, stage: str) -> bool:
        """Remove the view of (dataset, stage); True when there was one."""
        conn = self._conn()
        with _Tx(conn):
            conn.execute("DELETE FROM view_items WHERE dataset=? AND stage=?", (dataset, stage))
            return conn.execute("DELETE FROM views WHERE dataset=? AND stage=?", (dataset, stage)).rowcount > 0

    @_guard_sqlite
    def view(self, dataset: str, stage: str) -> View:
        """The current view of (dataset, stage): item id -> stored arrays."""
        conn = self._conn()
        with _Tx(conn, immediate=False):
            row = conn.execute(
                "SELECT fingerprint FROM views WHERE dataset=? AND stage=?", (dataset, stage)
            ).fetchone()
            if row is None:
                have = [f"{d}/{s}" for d, s in conn.execute("SELECT dataset, stage FROM views ORDER BY 1, 2")]
                raise StoreError(
                    f"feature store {self.root} has no view for dataset {dataset!r}, stage {stage!r} "
                    f"(run the stage for that dataset first); views present: {', '.join(have) or '(none)'}"
                )
            fingerprint = row[0]
            pairs = conn.execute(
                "SELECT item_id, key FROM view_items WHERE dataset=? AND stage=?", (dataset, stage)
            ).fetchall()
            reader = self._reader_in_tx(conn, stage, fingerprint)
        return View(
            dataset=dataset, stage=stage, fingerprint=fingerprint, item_ids=[p[0] for p in pairs],
            keys=[p[1] for p in pairs], reader=reader,
        )

    @_guard_sqlite
    def views(self) -> list[ViewInfo]:
        """Every view: (dataset, stage, fingerprint, n_items)."""
        rows = self._conn().execute("SELECT dataset, stage, fingerprint, n_items FROM views ORDER BY 1, 2")
        return [ViewInfo(*r) for r in rows]

    # -- leases: running flows ------------------------------------------------------------------

    @contextmanager
    def lease(self, holder: str) -> Iterator[str]:
        """Hold a lease in the index while a flow runs (`mrhp extract`): `gc` then leaves every
        stage fingerprint no view references yet alone (the flow is about to reference it). A
        thread refreshes the heartbeat; a killed holder's lease expires after _LEASE_TTL_S."""
        import socket

        lease_id = uuid.uuid4().hex
        now = time.time()
        owner_lock = _owner_lock(self.root, lease_id)
        owner_fd = _acquire_lock(owner_lock, "")  # the lease id also owns the run's chunk claims
        with _Tx(self._conn()) as conn:
            conn.execute("INSERT INTO leases VALUES (?, ?, ?, ?, ?, ?)",
                         (lease_id, holder, os.getpid(), socket.gethostname(), now, now))
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(_LEASE_BEAT_S):
                try:
                    with _Tx(self._conn()) as c:
                        c.execute("UPDATE leases SET heartbeat=? WHERE id=?", (time.time(), lease_id))
                        c.execute("UPDATE claims SET expires=? WHERE owner=?", (time.time() + _CLAIM_TTL_S, lease_id))
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
                with _Tx(self._conn()) as conn:
                    conn.execute("DELETE FROM leases WHERE id=?", (lease_id,))
                    conn.execute("DELETE FROM claims WHERE owner=?", (lease_id,))
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
        keys = list(dict.fromkeys(keys))
        now = time.time()
        conn = self._conn()
        with _Tx(conn):
            conn.execute("DELETE FROM claims WHERE expires < ?", (now,))
            present = self._present(conn, stage, fingerprint, keys)
            held: dict[str, str] = {}
            for part in _chunks(keys):
                held.update(conn.execute(
                    "SELECT key, owner FROM claims WHERE stage=? AND fingerprint=? AND key IN "
                    f"({','.join('?' * len(part))})", (stage, fingerprint, *part),
                ).fetchall())
            alive = {o: self._owner_alive(o) for o in set(held.values()) if o != owner}
            mine = [k for k in keys if k not in present
                    and (k not in held or held[k] == owner or not alive[held[k]])]
            conn.executemany(
                "INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, ?)",
                [(stage, fingerprint, k, owner, now + _CLAIM_TTL_S) for k in mine],
            )
        return mine

    @_guard_sqlite
    def release(self, stage: str, fingerprint: str, keys: Iterable[str], owner: str | None = None) -> None:
        """Drop `owner`'s claims on `keys` (after their chunk committed, or failed)."""
        owner = owner or claim_owner()
        keys = list(dict.fromkeys(keys))
        conn = self._conn()
        with _Tx(conn):
            for part in _chunks(keys):
                conn.execute(
                    "DELETE FROM claims WHERE stage=? AND fingerprint=? AND owner=? AND key IN "
                    f"({','.join('?' * len(part))})", (stage, fingerprint, owner, *part),
                )

    @_guard_sqlite
    def claimed_by_others(self, stage: str, fingerprint: str, keys: Iterable[str],
                          owner: str | None = None) -> dict[str, str]:
        """key -> owner for `keys` a live other owner has claimed."""
        owner = owner or claim_owner()
        keys = list(dict.fromkeys(keys))
        out: dict[str, str] = {}
        conn = self._conn()
        for part in _chunks(keys):
            out.update(conn.execute(
                "SELECT key, owner FROM claims WHERE stage=? AND fingerprint=? AND owner != ? AND expires >= ? "
                f"AND key IN ({','.join('?' * len(part))})", (stage, fingerprint, owner, time.time(), *part),
            ).fetchall())
        alive = {o: self._owner_alive(o) for o in set(out.values())}
        return {k: o for k, o in out.items() if alive[o]}

    def _owner_alive(self, owner: str) -> bool:
        return _lock_is_held(_owner_lock(self.root, owner))

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
        return self._conn().execute(
            "SELECT holder, pid, host, started FROM leases WHERE heartbeat >= ? ORDER BY started",
            (time.time() - _LEASE_TTL_S,),
        ).fetchall()

    # -- maintenance ---------------------------------------------------------------------------

    @_guard_sqlite
    def clean_tmp(self) -> list[str]:
        """Remove what dead writers left: their tmp files and any segment renamed but never indexed.

        A live writer holds the flock on its `tmp/<id>.lock` and is left alone. Returns paths removed."""
        removed: list[str] = []
        try:
            entries = sorted(self.tmp_dir.iterdir())
        except FileNotFoundError:
            return removed
        for p in entries:
            if p.suffix == ".lock":
                removed += self._clean_abandoned(p.stem)
        for p in entries:
            if p.suffix == ".part" and not _lock_path(self.root, p.stem).exists():
                try:
                    p.unlink()
                    removed.append(str(p.relative_to(self.root)))
                except FileNotFoundError:
                    pass
        for p in entries:
            # Work folders (word-vector conversion): owned while their `<name>.lock` is flock-ed.
            if p.is_dir() and not _lock_is_held(self.tmp_dir / f"{p.name}.lock"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(str(p.relative_to(self.root)))
        return removed

    def _clean_abandoned(self, seg_id: str) -> list[str]:
        lock = _lock_path(self.root, seg_id)
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            return []
        removed: list[str] = []
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    return []  # a live writer
                raise
            target = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            part = _part_path(self.root, seg_id)
            if part.exists():
                part.unlink()
                removed.append(str(part.relative_to(self.root)))
            if target:
                indexed = self._conn().execute("SELECT 1 FROM segments WHERE id=?", (seg_id,)).fetchone()
                tpath = self.root / target
                if indexed is None and tpath.exists() and tpath.resolve().is_relative_to(self.segments_dir):
                    tpath.unlink()
                    removed.append(target)
            lock.unlink(missing_ok=True)
            removed.append(str(lock.relative_to(self.root)))
        finally:
            os.close(fd)
        return removed

    def _segment_files(self) -> dict[str, Path]:
        """Every *.h5 under segments/ by segment id (file stem)."""
        return {p.stem: p for p in self.segments_dir.glob("*/*/*.h5")}

    def _is_orphan(self, seg_id: str) -> bool:
        """A segment file no index row names and no live writer is about to commit."""
        if _lock_is_held(_lock_path(self.root, seg_id)):
            return False
        return self._conn().execute("SELECT 1 FROM segments WHERE id=?", (seg_id,)).fetchone() is None

    @_guard_sqlite
    def gc(self, dry_run: bool = False) -> GcReport:
        """Delete segments of (stage, fingerprint)s no view references, segments none of whose rows
        are indexed any more (after `forget` or a lost race), and orphan files.

        While a flow holds a lease (`lease()`, taken by `mrhp extract`), stage fingerprints no view
        references yet are the flow's work in progress: gc leaves them alone, removes only
        segments whose items were all forgotten before the oldest lease began, and says so."""
        report = GcReport(dry_run=dry_run)
        conn = self._conn()
        with _Tx(conn):
            referenced = "(SELECT DISTINCT stage, fingerprint FROM views)"
            leases = conn.execute(
                "SELECT holder, pid, host, started FROM leases WHERE heartbeat >= ? ORDER BY started",
                (time.time() - _LEASE_TTL_S,),
            ).fetchall()
            if leases:
                report.held_by = [f"{h} (pid {p} on {host}, since {time.strftime('%H:%M:%S', time.localtime(t))})"
                                  for h, p, host, t in leases]
                garbage = conn.execute(
                    "SELECT id, path FROM segments s WHERE created < ? "
                    "AND NOT EXISTS (SELECT 1 FROM items i WHERE i.segment = s.id)",
                    (leases[0][3],),
                ).fetchall()
                if not dry_run:
                    conn.executemany("DELETE FROM segments WHERE id=?", [(g[0],) for g in garbage])
            else:
                garbage = conn.execute(
                    f"SELECT id, path FROM segments s WHERE (stage, fingerprint) NOT IN {referenced} "
                    "OR NOT EXISTS (SELECT 1 FROM items i WHERE i.segment = s.id)"
                ).fetchall()
                report.items_dropped = conn.execute(
                    f"SELECT COUNT(*) FROM items WHERE (stage, fingerprint) NOT IN {referenced}"
                ).fetchone()[0]
                if not dry_run:
                    conn.execute(f"DELETE FROM items WHERE (stage, fingerprint) NOT IN {referenced}")
                    conn.execute(f"DELETE FROM stage_schemas WHERE (stage, fingerprint) NOT IN {referenced}")
                    conn.executemany("DELETE FROM segments WHERE id=?", [(g[0],) for g in garbage])
        for _, rel in garbage:
            path = self.root / rel
            report.segments_removed.append(rel)
            report.bytes_freed += path.stat().st_size if path.exists() else 0
            if not dry_run:
                path.unlink(missing_ok=True)
        removed = set(report.segments_removed)
        for seg_id, path in sorted(self._segment_files().items()):
            rel = str(path.relative_to(self.root))
            if rel in removed or not self._is_orphan(seg_id):
                continue
            report.orphans_removed.append(rel)
            report.bytes_freed += path.stat().st_size
            if not dry_run:
                path.unlink(missing_ok=True)
        if dry_run:
            report.orphans_removed += self._stale_tmp()
        else:
            report.orphans_removed += self.clean_tmp()
            self._remove_empty_dirs()
        return report

    def _stale_tmp(self) -> list[str]:
        """tmp/ files no live writer owns (what `clean_tmp` would remove), without removing them."""
        out = []
        for p in sorted(self.tmp_dir.iterdir()):
            if p.suffix in (".lock", ".part") and not _lock_is_held(_lock_path(self.root, p.stem)):
                out.append(str(p.relative_to(self.root)))
            elif p.is_dir() and not _lock_is_held(self.tmp_dir / f"{p.name}.lock"):
                out.append(str(p.relative_to(self.root)))
        return out

    def _remove_empty_dirs(self) -> None:
        for d in sorted(self.segments_dir.glob("*/*"), reverse=True) + sorted(self.segments_dir.glob("*")):
            try:
                d.rmdir()
            except OSError:
                pass

    @_guard_sqlite
    def fsck(self, repair: bool = False, *, checksums: bool = True) -> FsckReport:
        """Verify every segment's checksum, that every index row names an existing segment row,
        that every view entry resolves, and that no file lies outside the index.

        With `repair`: corrupt or missing segments lose their index rows (their items count as
        missing and are recomputed by the next run; corrupt files move to quarantine/), valid
        orphan segments are indexed again, pending segments of runs that ended (written by a task
        worker, never committed by its flow) are verified and indexed or quarantined, stale tmp
        files are removed. Dangling view entries
        cannot be repaired here: rerun the stage for that dataset. `checksums=False` skips reading
        the arrays (quick structural check)."""
        report = FsckReport()
        conn = self._conn()
        with _Tx(conn, immediate=False):
            segments = conn.execute("SELECT id, stage, fingerprint, path, checksum FROM segments").fetchall()
            rows_by_seg: dict[str, list[tuple[str, int | None, str | None]]] = {}
            for key, seg, row, failure in conn.execute("SELECT key, segment, row, failure FROM items"):
                rows_by_seg.setdefault(seg, []).append((key, row, failure))
        known = {s[0] for s in segments}
        bad_segments: list[tuple[str, str, bool]] = []  # (id, path, file exists)
        for seg_id, stage, fingerprint, rel, checksum in segments:
            path = self.root / rel
            items = rows_by_seg.get(seg_id, [])
            report.items_checked += len(items)
            if not path.exists():
                report.problems.append(f"{rel}: segment file missing ({len(items)} index rows point at it)")
                bad_segments.append((seg_id, rel, False))
                continue
            report.segments_checked += 1
            problem = _verify_segment(path, stage, fingerprint, checksum, items, checksums)
            if problem:
                report.problems.append(f"{rel}: {problem}")
                bad_segments.append((seg_id, rel, True))
        for seg, items in rows_by_seg.items():
            if seg not in known:
                report.items_checked += len(items)
                report.problems.append(
                    f"index: {len(items)} item rows name segment {seg}, which is not in the index "
                    f"(e.g. key {items[0][0]})"
                )
                if repair:
                    with _Tx(conn):
                        conn.execute("DELETE FROM items WHERE segment=?", (seg,))
                    report.repaired.append(f"dropped {len(items)} item rows naming unknown segment {seg}")
        if repair:
            for seg_id, rel, exists in bad_segments:
                with _Tx(conn):
                    n = conn.execute("DELETE FROM items WHERE segment=?", (seg_id,)).rowcount
                    conn.execute("DELETE FROM segments WHERE id=?", (seg_id,))
                moved = ""
                if exists:
                    q = self.root / "quarantine"
                    _makedirs_durable(q)
                    os.replace(self.root / rel, q / Path(rel).name)
                    moved = f", moved the file to quarantine/{Path(rel).name}"
                report.repaired.append(f"{rel}: dropped {n} index rows (recomputed by the next run){moved}")
        for seg_id, path in sorted(self._segment_files().items()):
            if seg_id in known or not self._is_orphan(seg_id):
                continue
            rel = str(path.relative_to(self.root))
            report.problems.append(f"{rel}: orphan segment file (not in the index)")
            if repair:
                try:
                    n = self._adopt(path)
                    report.repaired.append(f"{rel}: indexed the orphan segment ({n} new item rows)")
                except StoreError as e:
                    q = self.root / "quarantine"
                    _makedirs_durable(q)
                    os.replace(path, q / path.name)
                    report.repaired.append(f"{rel}: unusable orphan ({e}), moved to quarantine/{path.name}")
        for path in self.pending_segments():
            owner = path.parent.name
            if self._owner_alive(owner):
                continue  # a running flow's worker wrote it; that flow commits it
            rel = str(path.relative_to(self.root))
            report.problems.append(f"{rel}: segment written by a task worker, never committed (its run ended)")
            if repair:
                desc = _pending_descriptor(path, self.root)
                if desc is None:
                    report.repaired.append(f"{rel}: {self._quarantine_reason(path)}")
                    continue
                try:
                    n = len(self.commit_segment(desc))
                    report.repaired.append(f"{rel}: verified and indexed ({n} new item rows)")
                except StoreError as e:
                    if path.exists():
                        report.repaired.append(f"{rel}: not adopted ({e}), moved to {self._quarantine(path)}")
                    else:
                        report.repaired.append(f"{rel}: not adopted ({e})")
        for rel in self._stale_tmp():
            report.problems.append(f"{rel}: left by a writer that died")
        if repair:
            report.repaired += [f"{r}: removed" for r in self.clean_tmp()]
        with _Tx(conn, immediate=False):
            for dataset, stage, fingerprint in conn.execute("SELECT dataset, stage, fingerprint FROM views").fetchall():
                n = conn.execute(
                    "SELECT COUNT(*) FROM view_items WHERE dataset=? AND stage=?", (dataset, stage)
                ).fetchone()[0]
                report.view_entries_checked += n
                dangling = conn.execute(
                    "SELECT v.item_id, v.key FROM view_items v LEFT JOIN items i "
                    "ON i.stage=v.stage AND i.fingerprint=? AND i.key=v.key "
                    "WHERE v.dataset=? AND v.stage=? AND i.key IS NULL",
                    (fingerprint, dataset, stage),
                ).fetchall()
                if dangling:
                    ex = ", ".join(f"{i} -> {k}" for i, k in dangling[:3])
                    report.problems.append(
                        f"view {dataset}/{stage} ({fingerprint}): {len(dangling)} of {n} entries do not resolve "
                        f"(e.g. {ex}); rerun the {stage} stage for {dataset}"
                    )
        return report

    def _adopt(self, path: Path) -> int:
        """Index a self-describing segment file; returns the item rows added (existing keys win)."""
        seg_row, item_rows, schema = _describe_segment(path, self.root)
        conn = self._conn()
        with _Tx(conn):
            if conn.execute("SELECT 1 FROM segments WHERE id=?", (seg_row[0],)).fetchone():
                return 0
            conn.execute("INSERT INTO segments VALUES (?, ?, ?, ?, ?, ?, ?, ?)", seg_row)
            conn.execute("INSERT OR IGNORE INTO stage_schemas VALUES (?, ?, ?)", (seg_row[1], seg_row[2], schema))
            before = conn.total_changes
            conn.executemany("INSERT OR IGNORE INTO items VALUES (?, ?, ?, ?, ?, ?)", item_rows)
            return conn.total_changes - before

    @_guard_sqlite
    def rebuild_index(self) -> FsckReport:
        """Disaster recovery: rebuild the segments and items tables from the segment files alone
        (oldest segment wins for a key found twice). Views are kept; fsck then shows whether they resolve."""
        report = FsckReport()
        described = []
        for _, path in sorted(self._segment_files().items()):
            report.segments_checked += 1
            try:
                described.append(_describe_segment(path, self.root))
            except StoreError as e:
                report.problems.append(f"{path.relative_to(self.root)}: skipped, {e}")
        described.sort(key=lambda d: d[0][7])  # created
        conn = self._conn()
        with _Tx(conn):
            conn.execute("DELETE FROM items")
            conn.execute("DELETE FROM segments")
            for seg_row, item_rows, schema in described:
                conn.execute("INSERT INTO segments VALUES (?, ?, ?, ?, ?, ?, ?, ?)", seg_row)
                conn.execute(
                    "INSERT OR IGNORE INTO stage_schemas VALUES (?, ?, ?)", (seg_row[1], seg_row[2], schema)
                )
                before = conn.total_changes
                conn.executemany("INSERT OR IGNORE INTO items VALUES (?, ?, ?, ?, ?, ?)", item_rows)
                report.items_checked += conn.total_changes - before
        report.repaired.append(f"rebuilt the index from {len(described)} segments ({report.items_checked} items)")
        return report


def rebuild_index_file(root: Path | str) -> FsckReport:
    """`mrhp fsck --rebuild-index`: a new index.sqlite built from the segment files alone.

    Works when the old index is unreadable, emptied or deleted. The new index is written beside
    the old one and renamed into place; the old file (with its -wal/-shm) is kept as
    `index.sqlite.damaged-<time>`. Views are copied from the old index when it still reads; else
    they are lost and the report says to rerun `mrhp extract` (which then only rewrites them).
    Items found in two segments: the oldest segment wins. Run it while nothing uses the store."""
    root = Path(root).resolve()
    index = root / "index.sqlite"
    report = FsckReport()
    described = []
    for path in sorted((root / "segments").glob("*/*/*.h5")):
        report.segments_checked += 1
        try:
            described.append(_describe_segment(path, root))
        except StoreError as e:
            report.problems.append(f"{path.relative_to(root)}: skipped, {e}")
    described.sort(key=lambda d: d[0][7])  # created
    views: list[tuple] = []
    view_items: list[tuple] = []
    view_note = "no index to take views from"
    if index.exists():
        try:
            old = sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=_BUSY_TIMEOUT_MS / 1000)
            try:
                views = old.execute("SELECT dataset, stage, fingerprint, n_items, created FROM views").fetchall()
                view_items = old.execute("SELECT dataset, stage, item_id, key FROM view_items").fetchall()
                view_note = f"kept {len(views)} views from the old index"
            finally:
                old.close()
        except sqlite3.Error as e:
            views, view_items = [], []
            view_note = f"the old index's views are unreadable ({str(e)[:120]}): rerun `mrhp extract` to rewrite them"
    new = root / "tmp" / f"index-rebuild-{uuid.uuid4().hex}.sqlite"
    _makedirs_durable(new.parent)
    try:
        conn = sqlite3.connect(new, isolation_level=None)
        try:
            conn.execute("BEGIN")
            for stmt in _SCHEMA_SQL.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            conn.execute("INSERT INTO meta VALUES ('index_version', ?)", (str(INDEX_VERSION),))
            for seg_row, item_rows, schema in described:
                conn.execute("INSERT INTO segments VALUES (?, ?, ?, ?, ?, ?, ?, ?)", seg_row)
                conn.execute("INSERT OR IGNORE INTO stage_schemas VALUES (?, ?, ?)", (seg_row[1], seg_row[2], schema))
                before = conn.total_changes
                conn.executemany("INSERT OR IGNORE INTO items VALUES (?, ?, ?, ?, ?, ?)", item_rows)
                report.items_checked += conn.total_changes - before
            conn.executemany("INSERT OR REPLACE INTO views VALUES (?, ?, ?, ?, ?)", views)
            conn.executemany("INSERT OR REPLACE INTO view_items VALUES (?, ?, ?, ?)", view_items)
            conn.execute("COMMIT")
        finally:
            conn.close()
        _fsync(new)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for suffix in ("", "-wal", "-shm"):
            old_file = root / f"index.sqlite{suffix}"
            if old_file.exists():
                os.replace(old_file, root / f"index.sqlite.damaged-{stamp}{suffix}")
        os.replace(new, index)
        _fsync(root)
    except (OSError, sqlite3.Error) as e:
        new.unlink(missing_ok=True)
        raise StoreError(f"rebuilding the store index {index}: {e}") from None
    report.repaired.append(
        f"rebuilt {index.name} from {len(described)} segments ({report.items_checked} items); {view_note}"
    )
    return report


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


class _Tx:
    """BEGIN [IMMEDIATE] ... COMMIT, rolling back on error; SQLite errors become StoreError."""

    def __init__(self, conn: sqlite3.Connection, immediate: bool = True) -> None:
        self.conn = conn
        self.immediate = immediate

    def __enter__(self) -> sqlite3.Connection:
        if self.immediate:  # every index write runs in an immediate transaction
            _refuse_in_worker(f"write the store index {self._path()}")
        try:
            self.conn.execute("BEGIN IMMEDIATE" if self.immediate else "BEGIN")
        except sqlite3.Error as e:
            raise _index_error(self._path(), e, "starting a transaction") from None
        return self.conn

    def _path(self) -> str:
        return getattr(self.conn, "mrhp_path", "index.sqlite")

    def _rollback(self) -> None:
        try:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the original error is the one to report

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
            except sqlite3.Error as e:
                self._rollback()
                raise _index_error(self._path(), e, "commit failed") from None
        else:
            self._rollback()
            if isinstance(exc, sqlite3.Error):
                raise _index_error(self._path(), exc) from None


# --------------------------------------------------------------------------------------------
# segment files


def _describe_segment(path: Path, root: Path) -> tuple[tuple, list[tuple], str]:
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
    seg_row = (
        seg_id, stage, fingerprint, str(path.relative_to(root)), len(keys), len(failed), str(attrs["checksum"]),
        float(attrs["created"]),
    )
    items = [(stage, fingerprint, k, seg_id, i, None) for i, k in enumerate(keys)]
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


class CorruptItemError(StoreError):
    """Items of a segment whose bytes no longer match the checksum recorded at commit."""

    def __init__(self, message: str, *, path: Path, rows: Sequence[tuple[str, int]]) -> None:
        super().__init__(message)
        self.path = path
        self.rows = list(rows)  # (key, row) of every corrupt item found in the segment


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


# --------------------------------------------------------------------------------------------
# writer


class SegmentWriter:
    """Buffers records of one (stage, fingerprint) and commits them as segments (a context manager).

    Not thread-safe: use one writer per thread. Keys already in the store are skipped."""

    def __init__(
        self,
        store: FeatureStore | None,
        stage: str,
        fingerprint: str,
        schema: Mapping[str, FieldSpec],
        *,
        attrs: Mapping[str, Any] | None = None,
        chunk_size: int = 500,
        root: Path | str | None = None,
        owner: str | None = None,
    ) -> None:
        """`owner` (with `root`, no `store`) makes a detached writer: see `pending_writer`."""
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
        self.store = store
        self.root = Path(root).resolve() if root is not None else store.root  # type: ignore[union-attr]
        self.owner = owner
        self.descriptors: list[dict[str, Any]] = []  # detached: the segments written, for the flow to commit
        self.stage = stage
        self.fingerprint = fingerprint
        self.schema = dict(schema)
        self.chunk_size = chunk_size
        self._schema_json = _schema_to_json(self.schema)
        self._dtypes = {name: np.dtype(s.dtype) for name, s in self.schema.items()}
        self._buffer: dict[str, tuple[dict[str, np.ndarray] | None, str | None, str]] = {}
        self._closed = False
        self.n_committed = 0  # items (successes and failures) this writer recorded
        self.n_skipped = 0  # items skipped because their key was already stored or buffered
        self.n_segments = 0  # segment files this writer committed
        if owner is not None:
            return  # detached: the index is not touched; the schema is checked when the flow commits
        if store is None:
            raise StoreError("a segment writer needs a store (or a root and an owner: pending_writer)")
        conn = store._conn()
        with _Tx(conn):
            conn.execute("INSERT OR IGNORE INTO stage_schemas VALUES (?, ?, ?)",
                         (stage, fingerprint, self._schema_json))
            (known,) = conn.execute(
                "SELECT schema FROM stage_schemas WHERE stage=? AND fingerprint=?", (stage, fingerprint)
            ).fetchone()
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
            entry: tuple[dict[str, np.ndarray] | None, str | None, str] = (None, record.failure or "failed", meta)
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
        store = self.store
        if store is None:  # only a detached writer (owner set) has no store
            raise StoreError("segment writer: neither attached to a store nor detached (no owner)")
        conn = store._conn()
        present = store._present(conn, self.stage, self.fingerprint, list(self._buffer))
        buffer = {k: v for k, v in self._buffer.items() if k not in present}
        self.n_skipped += len(self._buffer) - len(buffer)
        self._buffer = {}
        if not buffer:
            return []
        seg_id = uuid.uuid4().hex
        rel = f"segments/{self.stage}/{self.fingerprint}/{seg_id}.h5"
        target = store.root / rel
        part = _part_path(store.root, seg_id)
        lock = _lock_path(store.root, seg_id)
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
            rows = []
            with _Tx(conn):
                # Another process may have committed some of these keys meanwhile: the first wins.
                again = store._present(conn, self.stage, self.fingerprint, list(buffer))
                rows = [
                    (self.stage, self.fingerprint, k, seg_id, i, None)
                    for i, k in enumerate(ok_keys)
                    if k not in again
                ]
                rows += [
                    (self.stage, self.fingerprint, k, seg_id, None, v[1])
                    for k, v in buffer.items()
                    if v[1] is not None and k not in again
                ]
                if rows:
                    conn.execute(
                        "INSERT INTO segments VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (seg_id, self.stage, self.fingerprint, rel, len(ok_keys), n_failed, checksum, created),
                    )
                    conn.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?)", rows)
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

    def _write_part(
        self, part: Path, buffer: Mapping[str, tuple[dict[str, np.ndarray] | None, str | None, str]]
    ) -> tuple[list[str], int, str, float]:
        ok = [(k, v[0], v[2]) for k, v in buffer.items() if v[1] is None]
        failed = [(k, v[1]) for k, v in buffer.items() if v[1] is not None]
        datasets: dict[str, np.ndarray | list[str]] = {}
        for name, spec in self.schema.items():
            dtype = self._dtypes[name]
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
        names = sorted(self.schema)
        datasets["row_crc32c"] = np.fromiter(
            (_row_crc(k, [(a[n], self.schema[n].ragged) for n in names]) for k, a, _ in ok),
            dtype=np.uint32, count=len(ok),
        )
        datasets["keys"] = ok_keys
        datasets["meta"] = [m for _, _, m in ok]
        datasets["failed_keys"] = [k for k, _ in failed]
        datasets["failed_reasons"] = [r for _, r in failed]
        checksum = _checksum(datasets)
        created = time.time()
        with h5py.File(part, "w") as f:
            for name, value in datasets.items():
                if isinstance(value, list):
                    f.create_dataset(name, shape=(len(value),), dtype=_STR, data=value if value else None)
                else:
                    f.create_dataset(name, data=value)
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["stage"] = self.stage
            f.attrs["fingerprint"] = self.fingerprint
            f.attrs["schema"] = self._schema_json
            f.attrs["params"] = self._params_json
            f.attrs["checksum"] = checksum
            f.attrs["created"] = created
        return ok_keys, len(failed), checksum, created

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
# readers


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
        index = self.root / "index.sqlite"
        if not writes_allowed() or is_worker_process():
            return "run `mrhp fsck --repair`, then `mrhp extract`, to recompute them"
        try:
            conn = sqlite3.connect(index, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            try:
                conn.execute("BEGIN IMMEDIATE")
                n = 0
                for key, row in err.rows:
                    n += conn.execute(
                        "DELETE FROM items WHERE stage=? AND fingerprint=? AND key=? AND segment=? AND row=?",
                        (self.stage, self.fingerprint, key, seg_id, row),
                    ).rowcount
                conn.execute("COMMIT")
            finally:
                conn.close()
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
