"""Issue 16, section 1 at the store level: task workers write pending segments without touching
the index; the flow verifies and commits them; what a killed worker leaves is cleaned, adopted
or quarantined, never read."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import StoreError
from pipeline.stage import FieldSpec, Record
from pipeline.store import FeatureStore, _acquire_lock, _owner_lock, pending_writer

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = {"v": FieldSpec("float32", (2,)), "codes": FieldSpec("int32", (), ragged=True)}


def rec(i: int) -> Record:
    if i == 3:
        return Record(key="k3", failure="bad input")
    return Record(key=f"k{i}", arrays={"v": np.array([i, -i], np.float32), "codes": np.arange(i, dtype=np.int32)})


def write_pending(root: Path, owner: str = "run-a", n: int = 5, every: int = 3):
    w = pending_writer(root, "s", "fp", SCHEMA, owner=owner, chunk_size=every)
    for i in range(n):
        w.add(rec(i))
    w.close()
    return w.descriptors


KEYS = [f"k{i}" for i in range(5)]


def test_a_detached_writer_never_opens_the_index_and_its_segments_are_invisible_until_committed(
    tmp_path, monkeypatch
):
    opens = tmp_path / "opens.log"
    store = FeatureStore(tmp_path / "st")
    monkeypatch.setenv("MRHP_STORE_OPEN_LOG", str(opens))
    descs = write_pending(store.root)
    assert not opens.exists()  # no index open of any kind while writing
    assert [d["keys"] for d in descs] == [["k0", "k1", "k2"], ["k4"]]  # k3 failed: a failure, no row
    assert [d["failures"] for d in descs] == [{}, {"k3": "bad input"}]
    assert all(d["path"].startswith("pending/run-a/") for d in descs)
    assert store.missing("s", "fp", KEYS) == KEYS and store.stages() == []

    assert store.commit_segment(descs[0]) == ["k0", "k1", "k2"]
    assert store.commit_segment(descs[0]) == []  # already indexed (a cached chunk outcome): nothing
    assert store.commit_segment(descs[1]) == ["k4", "k3"]
    r = store.reader("s", "fp")
    np.testing.assert_array_equal(r.get("k2")["v"], [2.0, -2.0])
    np.testing.assert_array_equal(r.get("k4")["codes"], [0, 1, 2, 3])
    assert r.failure("k3") == "bad input"
    assert store.pending_segments() == []
    assert store.fsck().ok


def test_a_worker_process_opens_the_index_read_only_and_refuses_every_write(tmp_path, monkeypatch):
    FeatureStore(tmp_path / "st")  # the flow created the store
    descs = write_pending(tmp_path / "st")
    monkeypatch.setenv("MRHP_STORE_WORKER", "1")
    worker_view = FeatureStore(tmp_path / "st")
    assert worker_view.missing("s", "fp", ["k0"]) == ["k0"]  # reading works
    with pytest.raises(StoreError, match="task worker"):
        worker_view.commit_segment(descs[0])
    with pytest.raises(StoreError, match="task worker"):
        worker_view.forget("s", "fp", ["k0"])
    with pytest.raises(StoreError, match="task worker"):
        worker_view.claim("s", "fp", ["k0"], owner="x")


def test_commit_verifies_the_file_a_flipped_byte_or_a_false_descriptor_is_quarantined(tmp_path):
    store = FeatureStore(tmp_path / "st")
    descs = write_pending(store.root)
    path = store.root / descs[0]["path"]
    data = bytearray(path.read_bytes())
    # Flip a byte inside the `v` data of the first segment (k0..k2 -> 0, 0, 1, -1, 2, -2 floats).
    needle = np.array([1, -1], np.float32).tobytes()
    at = bytes(data).index(needle)
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="does not verify.*quarantine"):
        store.commit_segment(descs[0])
    assert not path.exists() and (store.root / "quarantine" / path.name).exists()
    assert store.missing("s", "fp", ["k0", "k1", "k2"]) == ["k0", "k1", "k2"]  # recomputed next run

    lying = dict(descs[1], keys=["k4", "k9"])
    with pytest.raises(StoreError, match="keys or failures differ"):
        store.commit_segment(lying)
    assert store.missing("s", "fp", ["k4"]) == ["k4"]


def test_fsck_repair_adopts_what_a_dead_runs_workers_left_pending_and_leaves_a_live_runs_alone(tmp_path):
    store = FeatureStore(tmp_path / "st")
    write_pending(store.root, owner="dead-run")
    fd = _acquire_lock(_owner_lock(store.root, "live-run"), "")  # a running flow holds its owner lock
    write_pending(store.root, owner="live-run", n=2)
    try:
        report = store.fsck()
        assert not report.ok
        assert len(report.problems) == 2 and all("pending/dead-run/" in p for p in report.problems)
        repaired = store.fsck(repair=True)
        assert len(repaired.repaired) == 2
        assert store.missing("s", "fp", KEYS) == []
        assert store.reader("s", "fp").get("k1")["codes"].tolist() == [0]
        assert store.fsck().ok  # the live run's pending files are in flight, not problems
        assert len(store.pending_segments("live-run")) == 1
    finally:
        import os

        os.close(fd)


def test_the_next_run_adopts_a_dead_runs_pending_segments_keys_already_stored_win(tmp_path):
    store = FeatureStore(tmp_path / "st")
    first = write_pending(store.root, owner="dead-a")
    write_pending(store.root, owner="dead-b")  # the same keys computed twice (a retried chunk)
    store.commit_segment(first[0])
    added, problems = store.adopt_abandoned()
    assert problems == [] and added == 2  # k4 and k3 from dead-a; dead-b adds nothing
    assert store.pending_segments() == [] and not (store.root / "pending" / "dead-b").exists()
    assert len(list((store.root / "segments").rglob("*.h5"))) == 2  # duplicates removed, not indexed
    assert store.fsck().ok


KILL_SCRIPT = """
import os, sys
import numpy as np
from pipeline.stage import FieldSpec, Record
from pipeline.store import pending_writer, mark_worker_process
mark_worker_process()
w = pending_writer(sys.argv[1], "s", "fp", {"v": FieldSpec("float32", (2,))}, owner="run-k", chunk_size=2)
w.add(Record(key="a", arrays={"v": np.zeros(2, np.float32)}))
w.add(Record(key="b", arrays={"v": np.ones(2, np.float32)}))  # first segment: renamed into pending/
real_rename = os.rename
os.rename = lambda src, dst: os._exit(9)  # killed after the .part was written and fsynced
w.add(Record(key="c", arrays={"v": np.zeros(2, np.float32)}))
w.add(Record(key="d", arrays={"v": np.zeros(2, np.float32)}))
"""


def test_a_worker_killed_mid_write_leaves_tmp_files_the_next_open_cleans(tmp_path):
    root = tmp_path / "st"
    FeatureStore(root)
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(root)], cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 9
    left = sorted(p.suffix for p in (root / "tmp").iterdir())
    assert left == [".lock", ".part"]  # the second segment, in flight when the worker died
    assert len(list((root / "pending" / "run-k").glob("*.h5"))) == 1
    store = FeatureStore(root)  # the next run's open cleans the dead writer's tmp files
    assert list(store.tmp_dir.iterdir()) == []
    assert store.missing("s", "fp", ["a", "b", "c", "d"]) == ["a", "b", "c", "d"]  # pending: never read
    report = store.fsck(repair=True)
    assert any("pending/run-k/" in p for p in report.problems)
    assert store.missing("s", "fp", ["a", "b", "c", "d"]) == ["c", "d"]
    assert store.fsck().ok
