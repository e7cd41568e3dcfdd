"""Process and file-system plumbing shared by the store modules (no SQL, no HDF5).

- durability: `_fsync` (a file or a folder), `_makedirs_durable`;
- lock files: `_acquire_lock` / `_lock_is_held` tell a live writer's files (flock held) from a
  dead writer's leftovers; `_lock_path`, `_part_path`, `_owner_lock` name them under `tmp/`;
- claim owners: `claim_owner()`, `owner_alive()`;
- process modes: `read_only()` / `writes_allowed()` (commands that only look), and
  `mark_worker_process()` / `is_worker_process()` / `_refuse_in_worker()` (task workers never
  write the index) and `_log_index_open` (who opened an index how, for tests);
- `_check_name`: stage names and fingerprints become folder names.
"""
from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from pipeline.errors import StoreError


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


def owner_alive(root: Path, owner: str) -> bool:
    """True while the claim owner `owner` (a flow run or a process) holds its owner lock."""
    return _lock_is_held(_owner_lock(root, owner))


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
# durability and names


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
