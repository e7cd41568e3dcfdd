"""Issue 13, "silent wrong data" and "a way back from every fault": each scenario damages a store
the test builds and checks that the damage is an error naming the file and the way back, never
wrong or missing arrays served in silence."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import crc32c
import h5py
import numpy as np
import pytest

import pipeline.store as store_mod
from pipeline.errors import StoreError
from pipeline.stage import FieldSpec, Record
from pipeline.store import FeatureStore, rebuild_index_file
from tests.pipeline.test_store import ROIS, assert_same, expected, roi_record, segment_files, write


@pytest.fixture
def store(tmp_path: Path) -> FeatureStore:
    return FeatureStore(tmp_path / "store")


def _data_offset(path: Path, field: str = "features") -> tuple[int, int]:
    with h5py.File(path, "r") as f:
        ds = f[f"fields/{field}/data"]
        return ds.id.get_offset(), ds.size * ds.dtype.itemsize


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def test_row_crc_is_crc32c_of_key_then_fields_in_name_order(store):
    """The recorded checksum, recomputed by hand: CRC-32C over the key bytes, then per field
    (sorted names) the row count (ragged) as 8 little-endian bytes and the raw row bytes."""
    assert crc32c.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    schema = {"b": FieldSpec("int32", (2,)), "a": FieldSpec("uint8", (), ragged=True)}
    write(store, [Record("k", {"b": np.array([1, 2]), "a": np.array([7, 8, 9], dtype=np.uint8)})], schema=schema)
    (path,) = segment_files(store.root)
    stream = (b"k" + (3).to_bytes(8, "little") + bytes([7, 8, 9])  # field "a": 3 rows of one uint8
              + (1).to_bytes(4, "little") + (2).to_bytes(4, "little"))  # field "b": int32 [1, 2]
    with h5py.File(path, "r") as f:
        assert int(f["row_crc32c"][0]) == crc32c.crc32c(stream)


@pytest.mark.parametrize("damage", ["flip", "finite"])
def test_damaged_item_bytes_are_an_error_naming_the_segment_and_extract_recomputes_them(store, damage):
    recs = [roi_record(f"k{i}", 3, seed=i) for i in range(4)]
    write(store, recs)
    (path,) = segment_files(store.root)
    off, size = _data_offset(path)
    row_bytes = 3 * 8 * 2  # 3 boxes x 8 float16
    if damage == "flip":  # flipped bytes in item k1's features
        _patch(path, off + row_bytes + 5, bytes(b ^ 0xFF for b in range(4)))
    else:  # finite wrong values: every feature of k2 set to 16.0 (float16 0x4C00)
        _patch(path, off + 2 * row_bytes, np.full(24, 16.0, np.float16).tobytes())
    bad = "k1" if damage == "flip" else "k2"
    reader = store.reader("rois", "fp1")
    assert_same(reader.get("k0"), expected(recs[0]))  # the other items still read
    with pytest.raises(StoreError) as ei:
        reader.get(bad)
    msg = str(ei.value)
    assert str(path) in msg and "checksum" in msg and "mrhp extract" in msg and "\n" not in msg
    # the corrupt item counts as missing now: the next extract recomputes it, nothing else
    assert store.missing("rois", "fp1", [f"k{i}" for i in range(4)]) == [bad]
    write(store, recs)  # what a rerun of the stage does
    assert_same(store.reader("rois", "fp1").get(bad), expected(recs[int(bad[1])]))


def test_get_many_verifies_too(store):
    recs = [roi_record(f"k{i}", 2, seed=i) for i in range(3)]
    write(store, recs)
    (path,) = segment_files(store.root)
    off, _ = _data_offset(path, "boxes")  # a small field, read whole when the segment opens
    _patch(path, off, b"\x00\x00\x80\x7f")  # +inf in k0's first box
    with pytest.raises(StoreError, match="checksum"):
        store.reader("rois", "fp1").get_many(["k2", "k0"])


def test_swapped_index_rows_are_refused(store):
    recs = [roi_record("a", 2, seed=1), roi_record("b", 2, seed=2)]
    write(store, recs)
    conn = sqlite3.connect(store.root / "index.sqlite")
    with conn:
        conn.execute("UPDATE items SET row = 1 - row WHERE key IN ('a', 'b')")
    conn.close()
    with pytest.raises(StoreError, match=r"maps a to row 1, which holds b .*fsck --rebuild-index"):
        store.reader("rois", "fp1").get("a")


def test_a_version_1_segment_is_verified_whole_when_opened(store):
    """Segments written before per-item checksums still read, and a damaged one is refused."""
    recs = [roi_record("a", 2, seed=1), roi_record("b", 2, seed=2)]
    write(store, recs)
    (path,) = segment_files(store.root)
    with h5py.File(path, "r+") as f:  # turn it into a version 1 segment
        del f["row_crc32c"]
        f.attrs["schema_version"] = 1
        checksum = store_mod._checksum(store_mod._read_segment_datasets(f))
        f.attrs["checksum"] = checksum
    conn = sqlite3.connect(store.root / "index.sqlite")
    with conn:
        conn.execute("UPDATE segments SET checksum=?", (checksum,))
    conn.close()
    assert_same(store.reader("rois", "fp1").get("b"), expected(recs[1]))
    off, _ = _data_offset(path)
    _patch(path, off, b"\x12\x34")
    with pytest.raises(StoreError, match="checksum mismatch"):
        store.reader("rois", "fp1").get("b")


def _scribble_index(root: Path) -> None:
    p = root / "index.sqlite"
    b = bytearray(p.read_bytes())
    b[4096:] = b"\x5a" * (len(b) - 4096)  # every page after the schema page
    p.write_bytes(bytes(b))


def _closed_store_with_view(tmp_path: Path, n: int = 6) -> tuple[Path, list[Record]]:
    root = tmp_path / "store"
    st = FeatureStore(root)
    recs = [roi_record(f"k{i}", 2, seed=i) for i in range(n)]
    write(st, recs)
    st.write_view("ds", "rois", "fp1", {f"img{i}.jpg": f"k{i}" for i in range(n)})
    st._conn().close()
    return root, recs


def test_scribbled_index_is_one_line_naming_the_rebuild_and_rebuild_recovers(tmp_path):
    root, recs = _closed_store_with_view(tmp_path)
    _scribble_index(root)
    with pytest.raises(StoreError) as ei:
        FeatureStore(root).missing("rois", "fp1", ["k0"])
    assert "mrhp fsck --rebuild-index" in str(ei.value) and "\n" not in str(ei.value)
    report = rebuild_index_file(root)
    assert report.ok and "views are unreadable" in report.repaired[0]
    assert list(root.glob("index.sqlite.damaged-*"))  # the old file is kept
    st = FeatureStore(root)
    assert st.missing("rois", "fp1", [f"k{i}" for i in range(6)]) == []
    assert_same(st.reader("rois", "fp1").get("k3"), expected(recs[3]))


def test_query_time_sqlite_errors_are_mapped_too(store, monkeypatch):
    write(store, [roi_record("a", 1)])

    def broken(*a, **k):
        raise sqlite3.DatabaseError("database disk image is malformed")

    monkeypatch.setattr(store_mod.FeatureStore, "_present", broken)
    with pytest.raises(StoreError, match=r"disk image is malformed; .*mrhp fsck --rebuild-index"):
        store.missing("rois", "fp1", ["a"])


@pytest.mark.parametrize("how", ["deleted", "emptied"])
def test_an_emptied_index_with_segments_present_is_reported_not_recomputed(tmp_path, how):
    root, recs = _closed_store_with_view(tmp_path)
    if how == "deleted":
        (root / "index.sqlite").unlink()
    else:
        conn = sqlite3.connect(root / "index.sqlite")
        with conn:
            conn.execute("DELETE FROM items")
            conn.execute("DELETE FROM segments")
        conn.close()
    with pytest.raises(StoreError, match=r"lists no segment, but 2 segment files exist .*--rebuild-index"):
        FeatureStore(root)
    report = rebuild_index_file(root)
    assert report.ok, report.format()
    st = FeatureStore(root)
    assert st.missing("rois", "fp1", [f"k{i}" for i in range(6)]) == []
    if how == "emptied":  # views survive when the old index still reads
        assert_same(st.view("ds", "rois").get("img5.jpg"), expected(recs[5]))
        assert st.fsck().ok


def test_a_failed_commit_leaves_no_orphan_segment(store, monkeypatch):
    """ENOSPC at COMMIT: the segment file renamed into place must go, not stay as an orphan."""
    real_exit = store_mod._Tx.__exit__

    def exit_failing_commit(self, exc_type, exc, tb):
        if exc_type is None and self.immediate:
            sql = [r[0] for r in self.conn.execute("SELECT name FROM sqlite_master")]
            assert sql  # the transaction is open
            self.conn.execute("ROLLBACK")
            raise store_mod._index_error("index.sqlite", sqlite3.OperationalError("database or disk is full"))
        return real_exit(self, exc_type, exc, tb)

    writer = store.writer("rois", "fp1", ROIS, chunk_size=10)  # schema row committed before the patch
    writer.add(roi_record("a", 2))
    monkeypatch.setattr(store_mod._Tx, "__exit__", exit_failing_commit)
    with pytest.raises(StoreError, match="disk is full"):
        writer.commit()
    monkeypatch.undo()
    assert segment_files(store.root) == []
    assert list((store.root / "tmp").iterdir()) == []
    assert store.missing("rois", "fp1", ["a"]) == ["a"]


def test_cli_fsck_rebuild_index(tmp_path, capsys):
    from mrhp.cli import main

    root, _ = _closed_store_with_view(tmp_path)
    manifest = tmp_path / "m.yaml"
    manifest.write_text("version: 1\nroots:\n  store: store\ndatasets: {}\n", encoding="utf-8")
    _scribble_index(root)
    assert main(["--manifest", str(manifest), "status"]) == 4
    assert "mrhp fsck --rebuild-index" in capsys.readouterr().err
    assert main(["--manifest", str(manifest), "fsck", "--rebuild-index"]) == 0
    out = capsys.readouterr().out
    assert "rebuilt index.sqlite from 2 segments (6 items)" in out and "after rebuild: checked 2 segments" in out
