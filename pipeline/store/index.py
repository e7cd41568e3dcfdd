"""The SQLite index (`index.sqlite`): every SQL statement of the store is in this module.

`Index` owns the connections (one per thread and process, WAL, read-only or in-memory when the
store is opened read-only), the table layout and its version, and one method per question or
change: which keys are present, recording a segment and its items, views, leases, claims, and
the queries `gc`, `fsck` and the index rebuilds run. Methods that change the index run one
`_Tx` (BEGIN IMMEDIATE ... COMMIT, rolled back on error); SQLite errors raised inside one become
a one-line StoreError (`_index_error`), and the store's public methods map any other stray
sqlite3.Error the same way (`_guard_sqlite`). Task workers never write the index
(`pipeline.store.fs.is_worker_process`): they open it read-only and an index write is refused.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from pipeline.errors import StoreError
from pipeline.store.errors import _index_error
from pipeline.store.fs import _log_index_open, _refuse_in_worker

INDEX_VERSION = 1  # index.sqlite table layout version
_SQL_CHUNK = 900  # keys per `IN (...)` query, below SQLite's bound-parameter limit
_BUSY_TIMEOUT_MS = 60_000
_LEASE_BEAT_S = 30.0  # a lease holder refreshes its heartbeat this often ...
_LEASE_TTL_S = 300.0  # ... and a lease not refreshed for this long belongs to a dead process
_CLAIM_TTL_S = 900.0  # a chunk claim lasts this long unless its owner's lease heartbeat renews it
_TABLES = {"meta", "segments", "items", "stage_schemas", "views", "view_items", "leases", "claims"}

_INHERITED_CONNECTIONS: list[sqlite3.Connection] = []  # SQLite handles a forked child must not close
T = TypeVar("T")

# Rows as the index stores them (built from segment files by pipeline.store.segment):
# segments row: id, stage, fingerprint, path, n_rows, n_failed, checksum, created
SegmentRow = tuple[str, str, str, str, int, int, str, float]
ItemRow = tuple[str, str, str, str, int | None, str | None]  # stage, fingerprint, key, segment, row, failure
ItemFields = tuple[str, str, int | None, str | None]  # key, segment, row, failure (as `read_stage` streams them)
ItemState = tuple[str, int | None, str | None]  # key, row, failure (fsck's view of one item)
StageRows = Callable[[list[tuple[str, str]], Iterable[ItemFields]], T]  # see read_stage

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


def _chunked(conn: sqlite3.Connection, sql: str, params: tuple, keys: Sequence[str]) -> Iterator[sqlite3.Cursor]:
    """Run `sql`, which ends in `key IN`, once per chunk of `keys` (SQLite bounds the parameters)."""
    for i in range(0, len(keys), _SQL_CHUNK):
        part = keys[i : i + _SQL_CHUNK]
        yield conn.execute(f"{sql} ({','.join('?' * len(part))})", (*params, *part))


class _IndexConnection(sqlite3.Connection):
    """A connection that knows its file, so SQLite errors can name it."""

    mrhp_path: str = "index.sqlite"


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


class ViewInfo(NamedTuple):
    dataset: str
    stage: str
    fingerprint: str
    n_items: int


def _create_tables(conn: sqlite3.Connection) -> None:
    for stmt in _SCHEMA_SQL.split(";"):
        if stmt.strip():
            conn.execute(stmt)


def _insert_segment(conn: sqlite3.Connection, seg_row: SegmentRow, item_rows: Sequence[ItemRow], schema: str) -> int:
    """Record a described segment (existing keys win); returns the item rows added."""
    conn.execute("INSERT INTO segments VALUES (?, ?, ?, ?, ?, ?, ?, ?)", seg_row)
    conn.execute("INSERT OR IGNORE INTO stage_schemas VALUES (?, ?, ?)", (seg_row[1], seg_row[2], schema))
    before = conn.total_changes
    conn.executemany("INSERT OR IGNORE INTO items VALUES (?, ?, ?, ?, ?, ?)", item_rows)
    return conn.total_changes - before


class Index:
    """The index of the store at `root`; safe to use from many threads (a connection per thread).

    `read_only`: open `index.sqlite` read-only (an empty in-memory index when the file does not
    exist): for `mrhp status` and task workers."""

    def __init__(self, root: Path, *, read_only: bool = False) -> None:
        self.root = root
        self.path = root / "index.sqlite"
        self.read_only = read_only
        self.memory = read_only and not self.path.is_file()
        self._local = threading.local()

    # -- connections and layout ----------------------------------------------------------------

    def conn(self) -> sqlite3.Connection:
        """One SQLite connection per thread and process (connections do not survive fork)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            return conn
        if conn is not None:
            # Inherited through fork: never use or close it here (closing could checkpoint or
            # unlink the parent's WAL); keep it referenced so it is not finalized either.
            _INHERITED_CONNECTIONS.append(conn)
        path, timeout = self.path, _BUSY_TIMEOUT_MS / 1000
        try:
            if self.memory:
                conn = sqlite3.connect(":memory:", isolation_level=None, factory=_IndexConnection)
                conn.executescript(_SCHEMA_SQL)
            elif self.read_only:
                conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout, isolation_level=None,
                                       factory=_IndexConnection)
                conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
                _log_index_open(path, "read")
            else:
                _refuse_in_worker(f"open the store index {path} for writing")
                _log_index_open(path, "write")
                conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, factory=_IndexConnection)
                for pragma in (f"busy_timeout={_BUSY_TIMEOUT_MS}", "journal_mode=WAL", "synchronous=FULL",
                               "temp_store=MEMORY"):
                    conn.execute(f"PRAGMA {pragma}")
            conn.mrhp_path = str(path)
        except sqlite3.Error as e:
            raise _index_error(path, e, "opening") from None
        self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def ensure_tables(self) -> None:
        """Create the tables on first use (or those added since the store was made) and check the
        layout version. Raises sqlite3.Error as is (the caller names what it was opening)."""
        conn = self.conn()
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not _TABLES <= tables:
            with _Tx(conn):  # first use (or a store from before a table was added): create tables
                _create_tables(conn)
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('index_version', ?)", (str(INDEX_VERSION),))
        row = conn.execute("SELECT value FROM meta WHERE name='index_version'").fetchone()
        version = row[0] if row else "(missing)"
        if version != str(INDEX_VERSION):
            raise StoreError(f"{self.path}: index version {version}, this code reads version {INDEX_VERSION}")

    def has_segments(self) -> bool:
        return self.conn().execute("SELECT 1 FROM segments LIMIT 1").fetchone() is not None

    def segment_indexed(self, seg_id: str) -> bool:
        return self.conn().execute("SELECT 1 FROM segments WHERE id=?", (seg_id,)).fetchone() is not None

    # -- items ---------------------------------------------------------------------------------

    @staticmethod
    def _present(conn: sqlite3.Connection, stage: str, fingerprint: str, keys: Sequence[str]) -> set[str]:
        sql = "SELECT key FROM items WHERE stage=? AND fingerprint=? AND key IN"
        return {r[0] for cur in _chunked(conn, sql, (stage, fingerprint), keys) for r in cur}

    def present(self, stage: str, fingerprint: str, keys: Sequence[str]) -> set[str]:
        """The subset of `keys` with an index row (success or failure) for (stage, fingerprint)."""
        return self._present(self.conn(), stage, fingerprint, keys)

    @staticmethod
    def _schema(conn: sqlite3.Connection, stage: str, fingerprint: str, schema: str) -> str:
        conn.execute("INSERT OR IGNORE INTO stage_schemas VALUES (?, ?, ?)", (stage, fingerprint, schema))
        (known,) = conn.execute(
            "SELECT schema FROM stage_schemas WHERE stage=? AND fingerprint=?", (stage, fingerprint)
        ).fetchone()
        return str(known)

    def register_schema(self, stage: str, fingerprint: str, schema: str) -> str:
        """Record `schema` (JSON) for (stage, fingerprint) unless one is; returns the one stored."""
        with _Tx(self.conn()) as conn:
            return self._schema(conn, stage, fingerprint, schema)

    def record_segment(self, seg_row: SegmentRow, item_rows: Sequence[ItemRow], *, schema: str | None = None,
                       what: str = "") -> list[ItemRow]:
        """One transaction: the item rows whose keys are not stored yet (another run may have
        committed some meanwhile: the first wins) and, when there are any, the segment row.
        Returns the item rows recorded. With `schema`, it is recorded too and must equal the one
        already stored for (stage, fingerprint) (else a StoreError starting with `what`)."""
        stage, fingerprint = seg_row[1], seg_row[2]
        with _Tx(self.conn()) as conn:
            if schema is not None:
                known = self._schema(conn, stage, fingerprint, schema)
                if known != schema:
                    raise StoreError(
                        f"{what}: schema {schema} differs from the one stored for {stage}/"
                        f"{fingerprint}, {known} (a schema change must change the fingerprint)"
                    )
            present = self._present(conn, stage, fingerprint, [r[2] for r in item_rows])
            rows = [r for r in item_rows if r[2] not in present]
            if rows:
                conn.execute("INSERT INTO segments VALUES (?, ?, ?, ?, ?, ?, ?, ?)", seg_row)
                conn.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?)", rows)
        return rows

    def forget(self, stage: str, fingerprint: str, keys: Sequence[str]) -> int:
        with _Tx(self.conn()) as conn:
            sql = "DELETE FROM items WHERE stage=? AND fingerprint=? AND key IN"
            return sum(cur.rowcount for cur in _chunked(conn, sql, (stage, fingerprint), keys))

    def done_keys(self, stage: str, fingerprint: str, keys: Sequence[str] | None) -> list[str]:
        conn = self.conn()
        if keys is None:
            rows = conn.execute(
                "SELECT key FROM items WHERE stage=? AND fingerprint=? AND failure IS NULL", (stage, fingerprint)
            )
            return [r[0] for r in rows]
        sql = "SELECT key FROM items WHERE stage=? AND fingerprint=? AND failure IS NULL AND key IN"
        done = {r[0] for cur in _chunked(conn, sql, (stage, fingerprint), keys) for r in cur}
        return [k for k in keys if k in done]

    def failures(self, stage: str, fingerprint: str) -> dict[str, str]:
        rows = self.conn().execute(
            "SELECT key, failure FROM items WHERE stage=? AND fingerprint=? AND failure IS NOT NULL",
            (stage, fingerprint),
        )
        return dict(rows.fetchall())

    def counts(self, stage: str, fingerprint: str) -> dict[str, int]:
        done, failed = self.conn().execute(
            "SELECT COALESCE(SUM(failure IS NULL), 0), COALESCE(SUM(failure IS NOT NULL), 0) "
            "FROM items WHERE stage=? AND fingerprint=?",
            (stage, fingerprint),
        ).fetchone()
        return {"done": int(done), "failed": int(failed)}

    def stages(self) -> list[str]:
        return [r[0] for r in self.conn().execute("SELECT DISTINCT stage FROM segments ORDER BY stage")]

    def fingerprints(self, stage: str) -> list[str]:
        rows = self.conn().execute(
            "SELECT DISTINCT fingerprint FROM segments WHERE stage=? ORDER BY fingerprint", (stage,)
        )
        return [r[0] for r in rows]

    # -- reading -------------------------------------------------------------------------------

    @staticmethod
    def _read_stage(conn: sqlite3.Connection, stage: str, fingerprint: str, build: StageRows[T]) -> T:
        segments = conn.execute(
            "SELECT id, path FROM segments WHERE stage=? AND fingerprint=?", (stage, fingerprint)
        ).fetchall()
        items = conn.execute(
            "SELECT key, segment, row, failure FROM items WHERE stage=? AND fingerprint=?", (stage, fingerprint)
        )
        return build(segments, items)

    def read_stage(self, stage: str, fingerprint: str, build: StageRows[T]) -> T:
        """`build(segments, items)` in one read transaction: segments as (id, path), items streamed
        as (key, segment, row, failure) of everything committed for (stage, fingerprint)."""
        conn = self.conn()
        with _Tx(conn, immediate=False):
            return self._read_stage(conn, stage, fingerprint, build)

    def read_view(self, dataset: str, stage: str, build: Callable[[str, list[tuple[str, str]], Iterable[ItemFields]], T]
                  ) -> tuple[str, list[tuple[str, str]], T]:
        """(fingerprint, (item id, key) pairs, `build(fingerprint, segments, items)` as in
        `read_stage`) of the view of (dataset, stage), in one read transaction; a StoreError
        listing the views present when it has none."""
        conn = self.conn()
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
            built = self._read_stage(conn, stage, fingerprint, lambda s, i: build(fingerprint, s, i))
        return fingerprint, pairs, built

    @staticmethod
    def drop_corrupt(path: Path, stage: str, fingerprint: str, seg_id: str, rows: Iterable[tuple[str, int]]) -> int:
        """Drop the index rows of corrupt items (key, row) of segment `seg_id`, through a connection
        of its own (a reader holds no store); returns the rows dropped. Raises sqlite3.Error."""
        conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            n = 0
            for key, row in rows:
                n += conn.execute(
                    "DELETE FROM items WHERE stage=? AND fingerprint=? AND key=? AND segment=? AND row=?",
                    (stage, fingerprint, key, seg_id, row),
                ).rowcount
            conn.execute("COMMIT")
        finally:
            conn.close()
        return n

    # -- views ---------------------------------------------------------------------------------

    def write_view(self, dataset: str, stage: str, fingerprint: str, pairs: Sequence[tuple[str, str]]) -> None:
        """Replace the view of (dataset, stage) by `pairs` (item id, key), atomically; every key
        must be recorded (done or failed) for (stage, fingerprint), else a StoreError."""
        with _Tx(self.conn()) as conn:
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

    def drop_view(self, dataset: str, stage: str) -> bool:
        with _Tx(self.conn()) as conn:
            conn.execute("DELETE FROM view_items WHERE dataset=? AND stage=?", (dataset, stage))
            return conn.execute("DELETE FROM views WHERE dataset=? AND stage=?", (dataset, stage)).rowcount > 0

    def views(self) -> list[ViewInfo]:
        rows = self.conn().execute("SELECT dataset, stage, fingerprint, n_items FROM views ORDER BY 1, 2")
        return [ViewInfo(*r) for r in rows]

    # -- leases and claims ---------------------------------------------------------------------

    def add_lease(self, lease_id: str, holder: str, pid: int, host: str, now: float) -> None:
        with _Tx(self.conn()) as conn:
            conn.execute("INSERT INTO leases VALUES (?, ?, ?, ?, ?, ?)", (lease_id, holder, pid, host, now, now))

    def beat_lease(self, lease_id: str) -> None:
        """Refresh the lease's heartbeat and extend its owner's claims by _CLAIM_TTL_S."""
        with _Tx(self.conn()) as c:
            c.execute("UPDATE leases SET heartbeat=? WHERE id=?", (time.time(), lease_id))
            c.execute("UPDATE claims SET expires=? WHERE owner=?", (time.time() + _CLAIM_TTL_S, lease_id))

    def end_lease(self, lease_id: str) -> None:
        with _Tx(self.conn()) as conn:
            conn.execute("DELETE FROM leases WHERE id=?", (lease_id,))
            conn.execute("DELETE FROM claims WHERE owner=?", (lease_id,))

    @staticmethod
    def _live_leases(conn: sqlite3.Connection) -> list[tuple[str, int, str, float]]:
        return conn.execute(
            "SELECT holder, pid, host, started FROM leases WHERE heartbeat >= ? ORDER BY started",
            (time.time() - _LEASE_TTL_S,),
        ).fetchall()

    def live_leases(self) -> list[tuple[str, int, str, float]]:
        """(holder, pid, host, started) of every lease refreshed within _LEASE_TTL_S."""
        return self._live_leases(self.conn())

    def claim(self, stage: str, fingerprint: str, keys: Sequence[str], owner: str,
              alive: Callable[[str], bool]) -> list[str]:
        """One transaction: drop expired claims, then claim for `owner` the `keys` not stored and
        not claimed by another owner for whom `alive(owner)` holds; returns them (input order)."""
        now = time.time()
        with _Tx(self.conn()) as conn:
            conn.execute("DELETE FROM claims WHERE expires < ?", (now,))
            present = self._present(conn, stage, fingerprint, keys)
            sql = "SELECT key, owner FROM claims WHERE stage=? AND fingerprint=? AND key IN"
            held: dict[str, str] = {k: o for cur in _chunked(conn, sql, (stage, fingerprint), keys) for k, o in cur}
            live = {o: alive(o) for o in set(held.values()) if o != owner}
            mine = [k for k in keys if k not in present
                    and (k not in held or held[k] == owner or not live[held[k]])]
            conn.executemany(
                "INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, ?)",
                [(stage, fingerprint, k, owner, now + _CLAIM_TTL_S) for k in mine],
            )
        return mine

    def release(self, stage: str, fingerprint: str, keys: Sequence[str], owner: str) -> None:
        with _Tx(self.conn()) as conn:
            sql = "DELETE FROM claims WHERE stage=? AND fingerprint=? AND owner=? AND key IN"
            for _ in _chunked(conn, sql, (stage, fingerprint, owner), keys):
                pass  # each chunk's DELETE runs as the generator advances

    def claims_of_others(self, stage: str, fingerprint: str, keys: Sequence[str], owner: str) -> dict[str, str]:
        """key -> owner of the unexpired claims on `keys` of owners other than `owner`."""
        sql = "SELECT key, owner FROM claims WHERE stage=? AND fingerprint=? AND owner != ? AND expires >= ? AND key IN"
        params = (stage, fingerprint, owner, time.time())
        return {k: o for cur in _chunked(self.conn(), sql, params, keys) for k, o in cur}

    # -- maintenance (gc, fsck, rebuilds) ------------------------------------------------------

    def collect_garbage(self, dry_run: bool) -> tuple[list[tuple[str, int, str, float]], list[tuple[str, str]], int]:
        """One transaction: (live leases, (id, path) of the garbage segments, item rows dropped).

        Without a live lease: segments of (stage, fingerprint)s no view references and segments
        with no indexed item, plus the items and schemas of unreferenced fingerprints. With one:
        only segments with no indexed item created before the oldest lease began. `dry_run`
        changes nothing."""
        referenced = "(SELECT DISTINCT stage, fingerprint FROM views)"
        items_dropped = 0
        with _Tx(self.conn()) as conn:
            leases = self._live_leases(conn)
            if leases:
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
                items_dropped = conn.execute(
                    f"SELECT COUNT(*) FROM items WHERE (stage, fingerprint) NOT IN {referenced}"
                ).fetchone()[0]
                if not dry_run:
                    conn.execute(f"DELETE FROM items WHERE (stage, fingerprint) NOT IN {referenced}")
                    conn.execute(f"DELETE FROM stage_schemas WHERE (stage, fingerprint) NOT IN {referenced}")
                    conn.executemany("DELETE FROM segments WHERE id=?", [(g[0],) for g in garbage])
        return leases, garbage, items_dropped

    def snapshot(self) -> tuple[list[tuple[str, str, str, str, str]], dict[str, list[ItemState]]]:
        """One read transaction: every segment (id, stage, fingerprint, path, checksum) and every
        item as segment -> [(key, row, failure)]."""
        conn = self.conn()
        with _Tx(conn, immediate=False):
            segments = conn.execute("SELECT id, stage, fingerprint, path, checksum FROM segments").fetchall()
            rows_by_seg: dict[str, list[ItemState]] = {}
            for key, seg, row, failure in conn.execute("SELECT key, segment, row, failure FROM items"):
                rows_by_seg.setdefault(seg, []).append((key, row, failure))
        return segments, rows_by_seg

    def drop_items_of(self, seg_id: str) -> int:
        """Drop the item rows naming segment `seg_id`; returns how many."""
        with _Tx(self.conn()) as conn:
            return conn.execute("DELETE FROM items WHERE segment=?", (seg_id,)).rowcount

    def drop_segment(self, seg_id: str) -> int:
        """Drop segment `seg_id` and its item rows; returns the item rows dropped."""
        with _Tx(self.conn()) as conn:
            n = conn.execute("DELETE FROM items WHERE segment=?", (seg_id,)).rowcount
            conn.execute("DELETE FROM segments WHERE id=?", (seg_id,))
        return n

    def check_views(self) -> list[tuple[str, str, str, int, list[tuple[str, str]]]]:
        """Per view (dataset, stage, fingerprint, entries, (item id, key) of the entries that do
        not resolve to an item row), in one read transaction."""
        out = []
        conn = self.conn()
        with _Tx(conn, immediate=False):
            for dataset, stage, fingerprint in conn.execute("SELECT dataset, stage, fingerprint FROM views").fetchall():
                n = conn.execute(
                    "SELECT COUNT(*) FROM view_items WHERE dataset=? AND stage=?", (dataset, stage)
                ).fetchone()[0]
                dangling = conn.execute(
                    "SELECT v.item_id, v.key FROM view_items v LEFT JOIN items i "
                    "ON i.stage=v.stage AND i.fingerprint=? AND i.key=v.key "
                    "WHERE v.dataset=? AND v.stage=? AND i.key IS NULL",
                    (fingerprint, dataset, stage),
                ).fetchall()
                out.append((dataset, stage, fingerprint, n, dangling))
        return out

    def adopt(self, seg_row: SegmentRow, item_rows: Sequence[ItemRow], schema: str) -> int:
        """Index a described segment unless it is; returns the item rows added (existing keys win)."""
        with _Tx(self.conn()) as conn:
            if conn.execute("SELECT 1 FROM segments WHERE id=?", (seg_row[0],)).fetchone():
                return 0
            return _insert_segment(conn, seg_row, item_rows, schema)

    def replace_segments(self, described: Sequence[tuple[SegmentRow, Sequence[ItemRow], str]]) -> int:
        """Replace the segments and items tables by the described segments, in their order (the
        first wins for a key found twice); views are kept. Returns the item rows added."""
        added = 0
        with _Tx(self.conn()) as conn:
            conn.execute("DELETE FROM items")
            conn.execute("DELETE FROM segments")
            for seg_row, item_rows, schema in described:
                added += _insert_segment(conn, seg_row, item_rows, schema)
        return added

    @staticmethod
    def read_views(path: Path) -> tuple[list[tuple], list[tuple]]:
        """(views rows, view_items rows) of the index file at `path`, opened read-only. Raises sqlite3.Error."""
        old = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=_BUSY_TIMEOUT_MS / 1000)
        try:
            views = old.execute("SELECT dataset, stage, fingerprint, n_items, created FROM views").fetchall()
            view_items = old.execute("SELECT dataset, stage, item_id, key FROM view_items").fetchall()
        finally:
            old.close()
        return views, view_items

    @staticmethod
    def write_new(path: Path, described: Sequence[tuple[SegmentRow, Sequence[ItemRow], str]],
                  views: Sequence[tuple], view_items: Sequence[tuple]) -> int:
        """A new index file at `path` holding the described segments (the first wins for a key
        found twice) and the given views, in one transaction. Returns the item rows added.
        Raises sqlite3.Error."""
        added = 0
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("BEGIN")
            _create_tables(conn)
            conn.execute("INSERT INTO meta VALUES ('index_version', ?)", (str(INDEX_VERSION),))
            for seg_row, item_rows, schema in described:
                added += _insert_segment(conn, seg_row, item_rows, schema)
            conn.executemany("INSERT OR REPLACE INTO views VALUES (?, ?, ?, ?, ?)", views)
            conn.executemany("INSERT OR REPLACE INTO view_items VALUES (?, ?, ?, ?)", view_items)
            conn.execute("COMMIT")
        finally:
            conn.close()
        return added

