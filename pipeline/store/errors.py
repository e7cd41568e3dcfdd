"""How the store's failures become one-line StoreErrors: SQLite errors (`_index_error`, and the
`_guard_sqlite` decorator for store methods) and items whose bytes fail their checksum
(`CorruptItemError`, which carries the rows to drop from the index)."""
from __future__ import annotations

import functools
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import StoreError


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
    """Decorator for methods of objects with a store `root`: a stray sqlite3.Error becomes
    `_index_error` (one line)."""

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except sqlite3.Error as e:
            raise _index_error(Path(self.root) / "index.sqlite", e) from None

    return wrapper


class CorruptItemError(StoreError):
    """Items of a segment whose bytes no longer match the checksum recorded at commit."""

    def __init__(self, message: str, *, path: Path, rows: Sequence[tuple[str, int]]) -> None:
        super().__init__(message)
        self.path = path
        self.rows = list(rows)  # (key, row) of every corrupt item found in the segment
