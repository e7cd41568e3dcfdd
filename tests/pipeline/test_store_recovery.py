"""Issue 13, "a way back from every fault": killed word-vector conversions are cleaned, the hash
cache cannot be fooled by a restored mtime, a full disk is one line (exit 4), and `mrhp status`
writes nothing into the store."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from features.text import vectors as vectors_mod
from features.text.vectors import load_vectors, source_sha256
from pipeline.errors import StoreError
from pipeline.hashing import sha256_file
from pipeline.store import FeatureStore, _acquire_lock, read_only
from tests.features.test_vectors import Spec, write_text_vectors
from tests.pipeline.test_store import roi_record, write


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_killed_conversion_leaves_a_folder_the_next_open_removes(tmp_path):
    root = tmp_path / "store"
    store = FeatureStore(root)
    dead = root / "tmp" / "vectors-abc-1-2"  # a conversion killed midway: folder, lock not held
    dead.mkdir()
    (dead / "vectors.npy").write_bytes(b"\0" * 1000)
    (root / "tmp" / "vectors-abc-1-2.lock").write_text("")
    live = root / "tmp" / "vectors-def-3-4"  # a conversion in progress: its lock is held
    fd = _acquire_lock(root / "tmp" / "vectors-def-3-4.lock", "")
    live.mkdir()
    try:
        report = store.gc(dry_run=True)
        assert "tmp/vectors-abc-1-2" in report.orphans_removed
        assert "tmp/vectors-def-3-4" not in report.orphans_removed
        FeatureStore(root)  # opening cleans
        assert not dead.exists() and not (root / "tmp" / "vectors-abc-1-2.lock").exists()
        assert live.is_dir()
    finally:
        os.close(fd)


def test_conversion_writes_under_the_store_tmp_and_leaves_nothing_there(tmp_path, monkeypatch):
    src = write_text_vectors(tmp_path / "glove.txt", header=False)
    root = tmp_path / "store"
    seen = []
    real = vectors_mod._write_converted

    def spy(kv, tmp, folder, **kw):
        seen.append(tmp)
        assert tmp.parent == root / "tmp" and (root / "tmp" / f"{tmp.name}.lock").exists()
        return real(kv, tmp, folder, **kw)

    monkeypatch.setattr(vectors_mod, "_write_converted", spy)
    lv = load_vectors(Spec("glove", src), cache_root=root)
    assert seen and lv.cache_dir == root / "vectors" / sha256_file(src)
    assert list((root / "tmp").iterdir()) == []


def test_a_full_disk_during_conversion_is_one_line_and_keeps_nothing(tmp_path, monkeypatch):
    src = write_text_vectors(tmp_path / "glove.txt", header=False)
    root = tmp_path / "store"

    def full(path, arr, allow_pickle=False):
        Path(path).write_bytes(b"\0" * 10)  # half-written
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(vectors_mod.np, "save", full)
    with pytest.raises(StoreError) as ei:
        load_vectors(Spec("glove", src), cache_root=root)
    assert "no space left on device" in str(ei.value) and "\n" not in str(ei.value)
    assert StoreError.exit_code == 4
    assert not any((root / "vectors").glob("*/meta.json")) and list((root / "tmp").iterdir()) == []


def test_a_full_disk_while_saving_the_hash_cache_is_one_line(tmp_path, monkeypatch):
    src = write_text_vectors(tmp_path / "glove.txt", header=False)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(vectors_mod.tempfile, "mkstemp", full)
    with pytest.raises(StoreError, match="hash cache .*no space left on device"):
        source_sha256(Spec("glove", src), cache_root=tmp_path / "store")


def test_the_hash_cache_sees_a_same_size_edit_with_the_mtime_restored(tmp_path):
    src = write_text_vectors(tmp_path / "glove.txt", header=False)
    cache_root = tmp_path / "store"
    first = source_sha256(Spec("glove", src), cache_root=cache_root)
    st = src.stat()
    data = bytearray(src.read_bytes())
    data[0:3] = b"PAN"  # same size
    src.write_bytes(bytes(data))
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime restored; the ctime moves on
    assert src.stat().st_size == st.st_size and src.stat().st_mtime_ns == st.st_mtime_ns
    second = source_sha256(Spec("glove", src), cache_root=cache_root)
    assert second != first and second == sha256_file(src)


def test_read_only_opens_create_and_write_nothing(tmp_path):
    absent = tmp_path / "nothing-here"
    with read_only():
        st = FeatureStore(absent)
        assert st.missing("rois", "fp1", ["a"]) == ["a"] and st.views() == []
    assert not absent.exists()

    root = tmp_path / "store"
    store = FeatureStore(root)
    write(store, [roi_record("a", 2)])
    store.write_view("ds", "rois", "fp1", {"img.jpg": "a"})
    store._conn().close()
    (root / "tmp" / "x.part").write_bytes(b"left by a dead writer")  # open must not clean it here
    before = _tree(root)
    with read_only():
        st = FeatureStore(root)
        assert st.missing("rois", "fp1", ["a", "b"]) == ["b"]
        assert st.view("ds", "rois").get("img.jpg")["features"].shape == (2, 8)
        src = write_text_vectors(tmp_path / "glove.txt", header=False)
        source_sha256(Spec("glove", src), cache_root=root)  # hashes, saves no cache
    after = {k: v for k, v in _tree(root).items() if not k.startswith("index.sqlite-")}
    assert after == before


def test_read_only_status_still_refuses_an_emptied_index(tmp_path):
    root = tmp_path / "store"
    store = FeatureStore(root)
    write(store, [roi_record("a", 2)])
    store._conn().close()
    (root / "index.sqlite").unlink()
    with read_only(), pytest.raises(StoreError, match="--rebuild-index"):
        FeatureStore(root)
    with read_only():  # and a store never built reads as empty
        assert FeatureStore(tmp_path / "none").stages() == []


def test_enospc_writing_a_segment_is_one_line_and_leaves_no_file(tmp_path, monkeypatch):
    import h5py

    store = FeatureStore(tmp_path / "store")
    real_file = h5py.File

    def full(path, mode="r", *a, **k):
        if mode == "w":
            Path(path).write_bytes(b"\0" * 64)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_file(path, mode, *a, **k)

    monkeypatch.setattr(h5py, "File", full)
    with pytest.raises(StoreError) as ei:
        write(store, [roi_record("a", 2)])
    assert "No space left on device" in str(ei.value) and "\n" not in str(ei.value)
    monkeypatch.undo()
    assert list((tmp_path / "store" / "tmp").iterdir()) == []
    assert not list((tmp_path / "store" / "segments").rglob("*.h5"))
    assert np.array_equal(FeatureStore(tmp_path / "store").missing("rois", "fp1", ["a"]), ["a"])


def test_enospc_reaching_extract_and_status_is_one_line_exit_4(tmp_path, monkeypatch, capsys):
    import flows.extract as flows_extract
    from mrhp.cli import main

    manifest = tmp_path / "m.yaml"
    manifest.write_text("version: 1\nroots:\n  store: store\ndatasets: {}\n", encoding="utf-8")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "store" / "vocab" / "x"))

    monkeypatch.setattr(flows_extract, "run_request", full)
    assert main(["--manifest", str(manifest), "extract"]) == 4
    err = capsys.readouterr().err.strip()
    assert "mrhp extract: no space left on device" in err and len(err.splitlines()) == 1
    other = tmp_path / "m2.yaml"
    other.write_text("version: 1\nroots:\n  store: store2\ndatasets: {}\n", encoding="utf-8")
    assert main(["--manifest", str(other), "status"]) == 0  # nothing declared, nothing to plan
    assert not (tmp_path / "store2").exists()  # and status created no store


def test_gc_leaves_a_running_flows_work_alone_while_it_holds_a_lease(tmp_path):
    """A flow (here a thread holding the lease, as `mrhp extract` does) commits segments of a
    stage whose view it has not written yet; a gc meanwhile keeps them, and removes them once
    the flow is gone and nothing references them."""
    import threading


    root = tmp_path / "store"
    store = FeatureStore(root)
    write(store, [roi_record("old", 1)], fp="old-fp")  # unreferenced before the flow started
    committed, release = threading.Event(), threading.Event()

    def flow():
        st = FeatureStore(root)
        with st.lease("mrhp extract demo"):
            write(st, [roi_record("new", 1)], fp="new-fp")
            committed.set()
            release.wait(30)

    t = threading.Thread(target=flow)
    t.start()
    try:
        assert committed.wait(30)
        report = FeatureStore(root).gc()
        assert report.segments_removed == [] and report.items_dropped == 0
        assert "flows are running (mrhp extract demo" in report.format()
        assert FeatureStore(root).missing("rois", "new-fp", ["new"]) == []
    finally:
        release.set()
        t.join()
    assert FeatureStore(root).live_leases() == []
    report = FeatureStore(root).gc()
    assert len(report.segments_removed) == 2 and report.items_dropped == 2


def test_a_dead_holders_lease_expires(tmp_path, monkeypatch):
    import sqlite3
    import time as time_mod

    import pipeline.store as store_mod

    root = tmp_path / "store"
    store = FeatureStore(root)
    write(store, [roi_record("x", 1)], fp="fp")
    conn = sqlite3.connect(root / "index.sqlite")
    with conn:  # a lease whose holder was killed long ago
        stale = time_mod.time() - store_mod._LEASE_TTL_S - 5
        conn.execute("INSERT INTO leases VALUES ('dead', 'mrhp extract', 1, 'h', ?, ?)", (stale, stale))
    conn.close()
    assert store.live_leases() == []
    assert len(store.gc().segments_removed) == 1


def test_summaries_count_from_the_index_not_from_the_chunks(tmp_path):
    """A key a concurrent run recorded as a failure while this run's chunk skipped it is
    reported as failed, not done."""
    from types import SimpleNamespace

    from pipeline.runner import ChunkOutcome, StageWork, finish_stage
    from pipeline.stage import FieldSpec, Record

    store = FeatureStore(tmp_path / "store")
    schema = {"v": FieldSpec("int32", ())}
    with store.writer("s", "fp", schema) as w:  # what the other run committed meanwhile
        w.add(Record("a", {"v": 1}))
        w.add(Record("b", failure="unreadable input"))
    plan = SimpleNamespace(items={"a": None, "b": None}, view={"item-a": "a", "item-b": "b"})
    work = StageWork(stage=SimpleNamespace(name="s"), fingerprint="fp", plan=plan, todo=["a", "b"])
    # this run's chunk found both keys already stored and skipped them
    outcome = ChunkOutcome(stage="s", fingerprint="fp", keys=2, skipped=2)
    summary = finish_stage(work, store, "ds", [outcome], {})
    assert summary.done == 1 and summary.failures == {"b": "unreadable input"} and summary.view_written


def _extract_in_child(root: str, barrier, queue) -> None:
    from features.registry import build_stage
    from pipeline.manifest import load_manifest
    from pipeline.runner import run_stage
    from tests.support.synthetic import REGISTRY

    manifest = load_manifest(Path(root) / "data_manifest.yaml")
    stage = build_stage(manifest, "syn", "synthetic", REGISTRY)
    store = FeatureStore(manifest.roots.store)
    barrier.wait(30)
    s = run_stage(stage, store, "syn", chunk_size=3)
    queue.put((s.done, s.failed, s.view_written))


def test_two_concurrent_extracts_split_the_chunks_instead_of_both_computing_everything(tmp_path, monkeypatch):
    import multiprocessing as mp
    from collections import Counter

    from tests.support.synthetic import write_project

    log = tmp_path / "calls.log"
    monkeypatch.setenv("MRHP_SYNTH_LOG", str(log))
    monkeypatch.setenv("MRHP_SYNTH_DELAY", "0.03")
    monkeypatch.delenv("MRHP_SYNTH_SALT", raising=False)
    monkeypatch.delenv("MRHP_STORE_OWNER", raising=False)
    manifest_path = write_project(tmp_path, 24, chunk_size=3)
    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_extract_in_child, args=(str(manifest_path.parent), barrier, queue))
             for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    computed = Counter(line.split()[1] for line in log.read_text().splitlines()
                       if line.split()[0] == "synthetic")
    assert sum(computed.values()) == 24 and max(computed.values()) == 1  # every item once
    assert all(view for _, _, view in results)  # each run waited for the other's keys
    assert all(failed == 0 for _, failed, _ in results)


def test_claims_of_a_live_owner_are_respected_and_a_dead_owners_are_taken_over(tmp_path):
    import pipeline.store as store_mod

    store = FeatureStore(tmp_path / "store")
    write(store, [roi_record("done", 1)])
    live_fd = _acquire_lock(store_mod._owner_lock(store.root, "other-run"), "")  # a live extract
    try:
        assert store.claim("rois", "fp1", ["a", "b", "done"], owner="other-run") == ["a", "b"]
        assert store.claim("rois", "fp1", ["a", "b", "c"], owner="me") == ["c"]
        assert store.claimed_by_others("rois", "fp1", ["a", "b", "c"], owner="me") == {
            "a": "other-run", "b": "other-run"}
    finally:
        os.close(live_fd)  # the other run is SIGKILLed: its flock goes with it
    assert store.claimed_by_others("rois", "fp1", ["a", "b"], owner="me") == {}
    assert store.claim("rois", "fp1", ["a", "b", "c"], owner="me") == ["a", "b", "c"]
    store.release("rois", "fp1", ["a", "b", "c"], owner="me")
    assert store.claim("rois", "fp1", ["a"], owner="third") == ["a"]


def test_many_threads_claiming_at_once_do_not_block_each_other(tmp_path, monkeypatch):
    """Task threads of one run claim concurrently: the owner lock is taken once per process
    (two descriptors flock-ing the same file in one process would wait on each other forever)."""
    import threading
    import time as time_mod

    import pipeline.store as store_mod

    monkeypatch.delenv("MRHP_STORE_OWNER", raising=False)
    real_acquire = store_mod._acquire_lock

    def slow_acquire(path, content):  # widen the window between "not held yet" and "take it"
        time_mod.sleep(0.05)
        return real_acquire(path, content)

    monkeypatch.setattr(store_mod, "_acquire_lock", slow_acquire)
    store = FeatureStore(tmp_path / "store")
    got: list[str] = []
    start = threading.Barrier(8)

    def claim(i: int) -> None:
        start.wait(10)
        got.extend(store.claim("s", "fp", [f"k{i}"]))

    threads = [threading.Thread(target=claim, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads), "claiming threads deadlocked on the owner lock"
    assert sorted(got) == [f"k{i}" for i in range(8)]


def test_a_lease_that_cannot_be_recorded_leaves_no_owner_lock_behind(tmp_path, monkeypatch):
    """The lease's owner lock is taken before its index row: when recording the row fails
    (a locked or full index), the lock file must go and its flock be let go, else this
    process (a served flow lives long) owns a run id that never ran, alive to every claim."""
    from pipeline.store.index import Index

    store = FeatureStore(tmp_path / "store")

    def refuse(self, *args, **kwargs):
        raise StoreError("index.sqlite: database or disk is full")

    monkeypatch.setattr(Index, "add_lease", refuse)
    with pytest.raises(StoreError, match="disk is full"):
        with store.lease("mrhp extract demo"):
            pass
    assert sorted(p.name for p in store.tmp_dir.glob("claims-*.lock")) == []
