"""Feature store: round trips, failures, idempotence, views, gc, fsck, fork safety, recovery."""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import sqlite3
from pathlib import Path

import h5py
import numpy as np
import pytest

from mrhp.cli import main
from pipeline.errors import StoreError
from pipeline.stage import FieldSpec, Record
from pipeline.store import FeatureStore, StageReader, View

ROIS = {
    "features": FieldSpec("float16", (8,), ragged=True),
    "boxes": FieldSpec("float32", (4,), ragged=True),
    "obj_ids": FieldSpec("int32", (), ragged=True),
    "image_hw": FieldSpec("int32", (2,)),
    "score": FieldSpec("float64", ()),
    "flags": FieldSpec("uint8", (3,)),
}


def roi_record(key: str, n: int, seed: int = 0) -> Record:
    rng = np.random.default_rng(seed)
    return Record(
        key,
        {
            "features": rng.standard_normal((n, 8)).astype(np.float32),  # cast to float16 by the store
            "boxes": rng.uniform(0, 100, (n, 4)).astype(np.float32),
            "obj_ids": rng.integers(0, 1600, n),  # int64 -> int32
            "image_hw": np.array([480 + seed, 640]),
            "score": float(seed) / 7,
            "flags": np.array([1, 0, seed % 2], dtype=np.uint8),
        },
        meta={"n": n},
    )


def expected(rec: Record) -> dict[str, np.ndarray]:
    return {k: np.asarray(v).astype(ROIS[k].dtype) for k, v in rec.arrays.items()}


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def write(store: FeatureStore, records, stage="rois", fp="fp1", chunk_size=4, schema=ROIS):
    with store.writer(stage, fp, schema, attrs={"p": 1}, chunk_size=chunk_size) as w:
        for r in records:
            w.add(r)
    return w


def segment_files(root: Path) -> list[Path]:
    return sorted((root / "segments").glob("*/*/*.h5"))


@pytest.fixture
def store(tmp_path: Path) -> FeatureStore:
    return FeatureStore(tmp_path / "store")


@pytest.mark.parametrize("preload_bytes", [0, 1 << 20], ids=["pread", "preloaded"])
def test_round_trip_of_ragged_and_fixed_fields_of_several_dtypes(store, monkeypatch, preload_bytes):
    monkeypatch.setattr("pipeline.store.segment._PRELOAD_BYTES", preload_bytes)
    recs = [roi_record(f"k{i}", n=i % 5, seed=i) for i in range(11)]  # n=0 items included
    w = write(store, recs, chunk_size=4)
    assert (w.n_committed, w.n_segments) == (11, 3)
    reader = store.reader("rois", "fp1")
    assert len(reader) == 11 and "k3" in reader and "nope" not in reader
    for r in recs:
        assert_same(reader.get(r.key), expected(r))
    empty = reader.get("k0")
    assert empty["features"].shape == (0, 8) and empty["obj_ids"].shape == (0,)
    many = reader.get_many(["k9", "k1", "k5", "k1"])
    for got, r in zip(many, [recs[9], recs[1], recs[5], recs[1]], strict=True):
        assert_same(got, expected(r))
    assert reader.meta("k4") == {"n": 4}
    assert reader.get("k2")["features"].flags.writeable


def test_a_truncated_segment_is_reported_not_misread(store, monkeypatch):
    monkeypatch.setattr("pipeline.store.segment._PRELOAD_BYTES", 0)
    write(store, [roi_record("k0", 2), roi_record("k1", 4)], chunk_size=10)
    path = segment_files(store.root)[0]
    with h5py.File(path, "r") as f:
        end = f["fields/features/data"].id.get_offset() + 16 * 2 * 3
    with open(path, "r+b") as fh:
        fh.truncate(end)
    with pytest.raises(StoreError, match="truncated|cannot read segment"):
        store.reader("rois", "fp1").get("k1")
    assert "unreadable HDF5 file" in store.fsck().problems[0]


def test_segment_file_layout_is_self_describing(store):
    write(store, [roi_record("a", 2), roi_record("b", 3), Record("c", failure="bad image")], chunk_size=10)
    (path,) = segment_files(store.root)
    assert path.parent.relative_to(store.root) == Path("segments/rois/fp1")
    with h5py.File(path, "r") as f:
        assert f.attrs["stage"] == "rois" and f.attrs["fingerprint"] == "fp1"
        assert f.attrs["schema_version"] == 2 and len(f.attrs["checksum"]) == 64
        assert f["row_crc32c"].dtype == np.uint32 and f["row_crc32c"].shape == (2,)
        assert '"features"' in f.attrs["schema"] and f.attrs["params"] == '{"p": 1}'
        assert list(f["keys"].asstr()[()]) == ["a", "b"]
        assert list(f["failed_keys"].asstr()[()]) == ["c"]
        assert list(f["failed_reasons"].asstr()[()]) == ["bad image"]
        assert f["fields/features/data"].shape == (5, 8)
        assert list(f["fields/features/offsets"][()]) == [0, 2, 5]
        assert f["fields/image_hw/data"].shape == (2, 2)
        assert f["fields/features/data"].chunks is None  # contiguous


def test_failures_are_recorded_and_reported_by_readers(store):
    write(store, [roi_record("ok", 2), Record("broken", failure="cannot decode JPEG")])
    assert store.counts("rois", "fp1") == {"done": 1, "failed": 1}
    assert store.failures("rois", "fp1") == {"broken": "cannot decode JPEG"}
    assert store.missing("rois", "fp1", ["ok", "broken", "new"]) == ["new"]
    assert store.done_keys("rois", "fp1") == ["ok"]
    reader = store.reader("rois", "fp1")
    assert reader.failure("broken") == "cannot decode JPEG" and reader.failure("ok") is None
    assert "broken" not in reader
    with pytest.raises(StoreError, match="broken failed: cannot decode JPEG"):
        reader.get("broken")
    with pytest.raises(StoreError, match="unknown-key is not in the store"):
        reader.get("unknown-key")


def test_re_adding_committed_keys_is_skipped_and_keeps_the_first_result(store):
    write(store, [roi_record("a", 2, seed=1), Record("f", failure="x")])
    w = write(store, [roi_record("a", 3, seed=2), roi_record("b", 1), roi_record("b", 1), Record("f", failure="y")])
    assert (w.n_committed, w.n_skipped) == (1, 3)
    assert store.counts("rois", "fp1") == {"done": 2, "failed": 1}
    assert_same(store.reader("rois", "fp1").get("a"), expected(roi_record("a", 2, seed=1)))
    assert store.failures("rois", "fp1") == {"f": "x"}
    # a chunk made only of known keys writes no segment
    n_files = len(segment_files(store.root))
    write(store, [roi_record("a", 2)])
    assert len(segment_files(store.root)) == n_files


def test_a_writer_dropped_without_close_warns_about_uncommitted_records(store, caplog):
    w = store.writer("rois", "fp1", ROIS)
    w.add(roi_record("k0", 1))
    del w
    assert "dropped with 1 uncommitted records" in caplog.text
    assert store.missing("rois", "fp1", ["k0"]) == ["k0"]


def test_missing_handles_many_keys_in_input_order(store):
    keys = [f"k{i:05d}" for i in range(3000)]
    schema = {"x": FieldSpec("int32", ())}
    with store.writer("t", "fp", schema, chunk_size=1000) as w:
        for k in keys[::2]:
            w.add(Record(k, {"x": 1}))
    query = list(reversed(keys)) + ["k00001"]
    assert store.missing("t", "fp", query) == list(reversed(keys[1::2]))
    assert store.done_keys("t", "fp", ["k00001", "k00002"]) == ["k00002"]
    assert store.missing("t", "other-fp", ["k00000"]) == ["k00000"]
    assert store.fingerprints("t") == ["fp"] and store.stages() == ["t"]


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"boxes": np.zeros((1, 4)), "image_hw": [1, 2]}, "key k7: field 'features' missing"),
        ({"features": np.zeros((1, 8)), "boxes": np.zeros((1, 5)), "image_hw": [1, 2]},
         r"key k7 field 'boxes': shape \(1, 5\), expected \(n, 4\)"),
        ({"features": np.zeros((1, 8)), "boxes": np.zeros((1, 4)), "image_hw": [1, 2, 3]},
         r"key k7 field 'image_hw': shape \(3,\), expected \(2,\)"),
        ({"features": np.zeros((1, 8)), "boxes": np.zeros((1, 4)), "image_hw": [1.5, 2.0]},
         "key k7 field 'image_hw': dtype float64 cannot be stored as int32"),
        ({"features": np.zeros((1, 8)), "boxes": np.zeros((1, 4)), "image_hw": [1, 2], "extra": 1},
         r"key k7: field\(s\) \['extra'\] are not in the schema"),
        (None, "key k7: a record without failure needs arrays"),
    ],
)
def test_schema_mismatch_names_key_and_field_and_writes_nothing(store, arrays, match):
    schema = {k: ROIS[k] for k in ("features", "boxes", "image_hw")}
    with pytest.raises(StoreError, match=match):
        with store.writer("rois", "fp1", schema) as w:
            w.add(Record("k7", arrays))
    assert store.counts("rois", "fp1") == {"done": 0, "failed": 0}
    assert segment_files(store.root) == []


def test_invalid_schema_and_names_are_rejected(store):
    with pytest.raises(StoreError, match="dtype 'object' is not numeric"):
        store.writer("rois", "fp", {"x": FieldSpec("object")})
    with pytest.raises(StoreError, match="unknown dtype 'float17'"):
        store.writer("rois", "fp", {"x": FieldSpec("float17")})
    with pytest.raises(StoreError, match="stage must be"):
        store.writer("../etc", "fp", ROIS)
    with pytest.raises(StoreError, match="fingerprint must be"):
        store.writer("rois", "", ROIS)


def test_a_different_schema_under_the_same_fingerprint_is_rejected(store):
    write(store, [roi_record("k0", 1)])
    changed = dict(ROIS, boxes=FieldSpec("float32", (5,), ragged=True))
    with pytest.raises(StoreError, match="differs from the one already stored under this fingerprint"):
        store.writer("rois", "fp1", changed)
    store.writer("rois", "fp2", changed).close()


def test_views_write_replace_and_reuse_unchanged_items(store):
    write(store, [roi_record(f"k{i}", 2, seed=i) for i in range(4)] + [Record("kf", failure="truncated")])
    store.write_view("demo", "rois", "fp1",
                     {"img/a.jpg": "k0", "img/b.jpg": "k1", "img/c.jpg": "k0", "img/d.jpg": "kf"})
    view = store.view("demo", "rois")
    assert isinstance(view, View) and view.fingerprint == "fp1" and len(view) == 4
    assert sorted(view.item_ids()) == ["img/a.jpg", "img/b.jpg", "img/c.jpg", "img/d.jpg"]
    assert view.key("img/c.jpg") == "k0"
    assert_same(view.get("img/c.jpg"), expected(roi_record("k0", 2, seed=0)))
    assert view.failure("img/d.jpg") == "truncated" and view.failure("img/a.jpg") is None
    with pytest.raises(StoreError, match=r"view demo/rois item 'img/d.jpg': .*truncated"):
        view.get("img/d.jpg")
    with pytest.raises(StoreError, match=r"view demo/rois has no item 'img/zzz.jpg'"):
        view.get("img/zzz.jpg")

    # The data changes: b's image is new, a and c are unchanged. Only the new item is computed.
    files_before = set(segment_files(store.root))
    write(store, [roi_record("k0", 9), roi_record("k9", 3, seed=9)])  # k0 is skipped
    new_files = set(segment_files(store.root)) - files_before
    assert len(new_files) == 1
    with h5py.File(new_files.pop(), "r") as f:
        assert list(f["keys"].asstr()[()]) == ["k9"]
    store.write_view("demo", "rois", "fp1", {"img/a.jpg": "k0", "img/b.jpg": "k9"})
    old = view  # a view keeps serving what it was created with
    assert len(old) == 4
    view = store.view("demo", "rois")
    assert sorted(view.item_ids()) == ["img/a.jpg", "img/b.jpg"]
    assert_same(view.get("img/a.jpg"), expected(roi_record("k0", 2, seed=0)))
    assert_same(view.get("img/b.jpg"), expected(roi_record("k9", 3, seed=9)))
    assert store.views() == [("demo", "rois", "fp1", 2)]


def test_view_errors_name_dataset_stage_and_missing_items(store):
    write(store, [roi_record("k0", 1)])
    with pytest.raises(StoreError, match=r"view demo/rois: 2 of 3 items are not in the store .*b -> nope1"):
        store.write_view("demo", "rois", "fp1", {"a": "k0", "b": "nope1", "c": "nope2"})
    with pytest.raises(StoreError, match=r"no view for dataset 'demo', stage 'rois'.*views present: \(none\)"):
        store.view("demo", "rois")
    with pytest.raises(StoreError, match="not in the store for fingerprint fp2"):
        store.write_view("demo", "rois", "fp2", {"a": "k0"})
    store.write_view("demo", "rois", "fp1", {"a": "k0"})
    with pytest.raises(StoreError, match="views present: demo/rois"):
        store.view("other", "rois")


def test_gc_removes_only_unreferenced_segments(store):
    write(store, [roi_record(f"a{i}", 1) for i in range(6)], fp="fp1", chunk_size=3)
    write(store, [roi_record(f"b{i}", 1) for i in range(3)], fp="old", chunk_size=3)
    store.write_view("demo", "rois", "fp1", {"x": "a0"})
    stale_reader = store.reader("rois", "old")
    orphan = store.root / "segments" / "rois" / "fp1" / ("0" * 32 + ".h5")
    orphan.write_bytes(b"junk")
    dry = store.gc(dry_run=True)
    assert len(dry.segments_removed) == 1 and dry.orphans_removed == [str(orphan.relative_to(store.root))]
    assert len(segment_files(store.root)) == 4 and store.counts("rois", "old")["done"] == 3
    report = store.gc()
    assert report.segments_removed == dry.segments_removed and report.items_dropped == 3
    assert not orphan.exists() and not (store.root / "segments" / "rois" / "old").exists()
    assert store.counts("rois", "old") == {"done": 0, "failed": 0}
    with pytest.raises(StoreError, match="cannot read segment"):
        stale_reader.get("b0")  # a reader made before gc fails clearly, never reads garbage
    reader = store.reader("rois", "fp1")
    assert all(f"a{i}" in reader for i in range(6)) and len(segment_files(store.root)) == 2
    # after --force forgets a whole chunk, its segment becomes garbage too
    assert store.forget("rois", "fp1", ["a3", "a4", "a5"]) == 3
    assert len(store.gc().segments_removed) == 1
    assert store.missing("rois", "fp1", ["a0", "a3"]) == ["a3"]
    assert store.view("demo", "rois").get("x")["features"].shape == (1, 8)
    assert store.fsck().ok


def flip_byte_in_field(path: Path, field: str) -> None:
    with h5py.File(path, "r") as f:
        offset = f[f"fields/{field}/data"].id.get_offset()
    with open(path, "r+b") as fh:
        fh.seek(offset + 3)
        b = fh.read(1)
        fh.seek(offset + 3)
        fh.write(bytes([b[0] ^ 0x40]))


def test_fsck_detects_a_flipped_byte_and_repair_quarantines_the_segment(store):
    write(store, [roi_record(f"k{i}", 2, seed=i) for i in range(6)], chunk_size=3)
    assert store.fsck().ok
    victim = segment_files(store.root)[0]
    with h5py.File(victim, "r") as f:
        victim_keys = list(f["keys"].asstr()[()])
    flip_byte_in_field(victim, "boxes")
    assert store.fsck(checksums=False).ok  # the quick check reads no arrays
    report = store.fsck()
    assert not report.ok and len(report.problems) == 1
    assert victim.name in report.problems[0] and "checksum mismatch" in report.problems[0]
    assert "problem:" in report.format()
    repaired = store.fsck(repair=True)
    assert repaired.repaired and (store.root / "quarantine" / victim.name).exists()
    assert store.fsck().ok
    assert sorted(store.missing("rois", "fp1", [f"k{i}" for i in range(6)])) == sorted(victim_keys)


def test_fsck_detects_dangling_view_entries_and_orphans(store):
    write(store, [roi_record("k0", 1), roi_record("k1", 1)])
    store.write_view("demo", "rois", "fp1", {"a": "k0", "b": "k1"})
    store.forget("rois", "fp1", ["k1"])
    (store.root / "tmp" / "deadbeef.part").write_bytes(b"x")
    report = store.fsck()
    assert not report.ok
    text = report.format()
    assert "view demo/rois (fp1): 1 of 2 entries do not resolve (e.g. b -> k1)" in text
    assert "tmp/deadbeef.part: left by a writer that died" in text


def test_fsck_finds_missing_segment_files(store):
    write(store, [roi_record("k0", 1)])
    segment_files(store.root)[0].unlink()
    report = store.fsck()
    assert any("segment file missing (1 index rows point at it)" in p for p in report.problems)
    store.fsck(repair=True)
    assert store.fsck().ok and store.missing("rois", "fp1", ["k0"]) == ["k0"]


def _read_in_child(reader: StageReader, keys: list[str], queue) -> None:
    try:
        queue.put([reader.get(k)["features"].astype(np.float64).sum() for k in keys]
                  + [sum(d["boxes"].sum() for d in reader.get_many(keys))])
    except Exception as e:  # pragma: no cover - reported to the parent
        queue.put(repr(e))


def test_reader_used_before_fork_works_in_a_forked_child(store):
    recs = [roi_record(f"k{i}", 3, seed=i) for i in range(8)]
    write(store, recs, chunk_size=3)
    reader = store.reader("rois", "fp1")
    keys = [r.key for r in recs]
    want = [reader.get(k)["features"].astype(np.float64).sum() for k in keys]  # opens files in the parent
    want.append(sum(d["boxes"].sum() for d in reader.get_many(keys)))
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_read_in_child, args=(reader, keys, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert results == [want, want]
    assert [reader.get(k)["features"].astype(np.float64).sum() for k in keys] == want[:-1]


def test_store_reader_and_view_survive_pickling(store):
    write(store, [roi_record("k0", 2)])
    store.write_view("demo", "rois", "fp1", {"a": "k0"})
    assert pickle.loads(pickle.dumps(store)).counts("rois", "fp1") == {"done": 1, "failed": 0}
    view = store.view("demo", "rois")
    view.get("a")
    clone = pickle.loads(pickle.dumps(view))
    assert_same(clone.get("a"), expected(roi_record("k0", 2)))


def test_a_dead_writers_leftovers_are_cleaned_and_a_live_writers_are_not(tmp_path):
    import fcntl

    store = FeatureStore(tmp_path / "s")
    write(store, [roi_record("k0", 1)])
    seg = segment_files(store.root)[0]
    # A dead writer: renamed its segment but never indexed it; its lock is no longer held.
    dead = store.root / "segments" / "rois" / "fp1" / ("d" * 32 + ".h5")
    dead.write_bytes(seg.read_bytes())
    (store.root / "tmp" / ("d" * 32 + ".lock")).write_text(str(dead.relative_to(store.root)))
    (store.root / "tmp" / ("e" * 32 + ".part")).write_bytes(b"partial")
    # A live writer: holds the flock on its lock file.
    live_lock = store.root / "tmp" / ("f" * 32 + ".lock")
    live_part = store.root / "tmp" / ("f" * 32 + ".part")
    live_part.write_bytes(b"in flight")
    fd = os.open(live_lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        problems = "\n".join(store.fsck().problems)
        assert "orphan segment" in problems and "e" * 32 + ".part: left by a writer" in problems
        assert "f" * 32 not in problems
        FeatureStore(store.root)
        assert not dead.exists() and seg.exists()
        assert sorted(p.name for p in (store.root / "tmp").iterdir()) == [live_lock.name, live_part.name]
        assert store.fsck().ok
    finally:
        os.close(fd)
    assert store.reader("rois", "fp1").get("k0")["features"].shape == (1, 8)


def test_rebuild_index_recovers_items_from_segment_files(store):
    recs = [roi_record(f"k{i}", i % 3, seed=i) for i in range(7)] + [Record("bad", failure="oops")]
    write(store, recs, chunk_size=3)
    with sqlite3.connect(store.root / "index.sqlite") as c:
        c.execute("DELETE FROM items")
        c.execute("DELETE FROM segments")
    assert store.counts("rois", "fp1") == {"done": 0, "failed": 0}
    report = store.rebuild_index()
    assert report.ok and report.items_checked == 8
    assert store.counts("rois", "fp1") == {"done": 7, "failed": 1}
    reader = store.reader("rois", "fp1")
    for r in recs[:-1]:
        assert_same(reader.get(r.key), expected(r))
    assert store.fsck().ok


def test_orphan_segments_are_indexed_again_by_fsck_repair(store):
    write(store, [roi_record("k0", 2), roi_record("k1", 1)])
    with sqlite3.connect(store.root / "index.sqlite") as c:
        c.execute("DELETE FROM items")
        c.execute("DELETE FROM segments")
    report = store.fsck(repair=True)
    assert any("orphan segment file" in p for p in report.problems)
    assert any("indexed the orphan segment (2 new item rows)" in r for r in report.repaired)
    assert store.fsck().ok and store.counts("rois", "fp1")["done"] == 2


def _write_keys(root: str, keys: list[str]) -> None:
    store = FeatureStore(root)
    with store.writer("t", "fp", {"x": FieldSpec("int64", (3,), ragged=True)}, chunk_size=7) as w:
        for k in keys:
            w.add(Record(k, {"x": np.full((len(k), 3), len(k))}))


def test_writers_in_several_processes_share_one_store(tmp_path):
    root = str(tmp_path / "s")
    ctx = mp.get_context("fork")
    shared = [f"s{i}" for i in range(20)]
    procs = [
        ctx.Process(target=_write_keys, args=(root, [f"p{j}-{i}" for i in range(30)] + shared)) for j in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    store = FeatureStore(root)
    assert store.counts("t", "fp") == {"done": 110, "failed": 0}
    reader = store.reader("t", "fp")
    assert reader.get("p2-29")["x"].shape == (5, 3)
    assert store.fsck().ok


def _write_with_inherited_store(store: FeatureStore, prefix: str) -> None:
    write(store, [roi_record(f"{prefix}{i}", 1, seed=i) for i in range(5)], chunk_size=2)


def test_a_store_object_inherited_through_fork_works_in_parent_and_children(store):
    write(store, [roi_record("parent0", 1)])
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_write_with_inherited_store, args=(store, f"c{j}-")) for j in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    write(store, [roi_record("parent1", 1)])
    assert store.counts("rois", "fp1") == {"done": 12, "failed": 0}
    assert store.fsck().ok


def _manifest(tmp_path: Path) -> Path:
    m = tmp_path / "data_manifest.yaml"
    m.write_text("version: 1\nroots:\n  store: store\ndatasets: {}\n")
    return m


def test_cli_fsck_and_gc_report_and_exit_codes(tmp_path, capsys):
    manifest = _manifest(tmp_path)
    assert main(["--manifest", str(manifest), "fsck"]) == 4
    assert "no feature store" in capsys.readouterr().err
    store = FeatureStore(tmp_path / "store")
    write(store, [roi_record("k0", 1)], fp="fp1")
    write(store, [roi_record("k0", 1)], fp="fp2")
    store.write_view("demo", "rois", "fp2", {"a": "k0"})
    assert main(["--manifest", str(manifest), "fsck"]) == 0
    assert "checked 2 segments, 2 index rows, 1 view entries: ok" in capsys.readouterr().out
    assert main(["--manifest", str(manifest), "gc", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove segments/rois/fp1/" in out and len(segment_files(store.root)) == 2
    assert main(["--manifest", str(manifest), "gc"]) == 0
    assert len(segment_files(store.root)) == 1
    flip_byte_in_field(segment_files(store.root)[0], "features")
    assert main(["--manifest", str(manifest), "fsck", "--quick"]) == 0
    assert main(["--manifest", str(manifest), "fsck"]) == 4
    assert "checksum mismatch" in capsys.readouterr().out
    assert main(["--manifest", str(manifest), "fsck", "--repair"]) == 4  # the view now dangles
    out = capsys.readouterr().out
    assert "quarantine" in out and "entries do not resolve" in out
