"""flows.extract.open_store: the per-process store cache notices a store folder deleted (and
recreated) under it, so a write after the wipe lands in the new index, not the deleted one."""
from __future__ import annotations

import shutil
import sqlite3

from flows.extract import open_store
from tests.pipeline.test_store import roi_record, write


def _keys(index) -> set[str]:
    with sqlite3.connect(index) as conn:
        return {r[0] for r in conn.execute("SELECT key FROM items")}


def test_a_store_deleted_and_recreated_between_two_calls_is_reopened(tmp_path):
    root = tmp_path / "store"
    first = open_store(root)
    assert open_store(root) is first  # unchanged folder: the cached store
    write(first, [roi_record("a", 2)])
    assert first.done_keys("rois", "fp1") == ["a"]
    shutil.rmtree(root)  # a user wipes the scratch store ...
    root.mkdir()  # ... and it is made again (e.g. by another process)
    second = open_store(root)
    assert second is not first
    write(second, [roi_record("b", 2)])
    # the new index holds the write (before: it went into the deleted index file, lost)
    assert _keys(root / "index.sqlite") == {"b"}
    assert second.done_keys("rois", "fp1") == ["b"]
    assert open_store(root) is second


def test_a_store_deleted_and_not_recreated_is_opened_afresh(tmp_path):
    root = tmp_path / "store"
    first = open_store(root)
    shutil.rmtree(root)
    second = open_store(root)  # a fresh store, not the one whose files are gone
    assert second is not first and (root / "index.sqlite").is_file()
    write(second, [roi_record("c", 1)])
    assert _keys(root / "index.sqlite") == {"c"}
