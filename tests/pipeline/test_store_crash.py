"""The store survives SIGKILL of a writer at random points: nothing committed is lost, nothing
partial is visible, fsck is clean, and a rerun completes the rest."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.stage import FieldSpec
from pipeline.store import FeatureStore

ROOT = Path(__file__).resolve().parents[2]
N_ITEMS = 5000
CHUNK = 20
SCHEMA = {"features": FieldSpec("float16", (64,), ragged=True), "hw": FieldSpec("int32", (2,))}

# The child writes items k00000.. in order (every 13th a failure), skipping what the store holds,
# and after each commit appends the committed keys to the report file.
CHILD = r"""
import sys
import numpy as np
from pipeline.stage import FieldSpec, Record
from pipeline.store import FeatureStore

root, report, n_items, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
schema = {"features": FieldSpec("float16", (64,), ragged=True), "hw": FieldSpec("int32", (2,))}
store = FeatureStore(root)
keys = store.missing("crash", "fp", [f"k{i:05d}" for i in range(n_items)])
out = open(report, "a")
print("ready", flush=True)
def note(done):
    if done:
        out.write("\n".join(done) + "\n")
        out.flush()
with store.writer("crash", "fp", schema, chunk_size=chunk) as w:
    for k in keys:
        i = int(k[1:])
        if i % 13 == 0:
            note(w.add(Record(k, failure=f"bad input {i}")))
        else:
            n = i % 40
            feats = (np.arange(n * 64, dtype=np.float32).reshape(n, 64) + i) % 1000
            note(w.add(Record(k, {"features": feats, "hw": [i, n]})))
    note(w.close())
"""


def expected(i: int) -> dict[str, np.ndarray]:
    n = i % 40
    feats = ((np.arange(n * 64, dtype=np.float32).reshape(n, 64) + i) % 1000).astype(np.float16)
    return {"features": feats, "hw": np.array([i, n], dtype=np.int32)}


def run_child(root: Path, report: Path, kill_after: float | None) -> int:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root), str(report), str(N_ITEMS), str(CHUNK)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT,
    )
    assert proc.stdout.readline().strip() == b"ready", proc.stderr.read().decode()
    if kill_after is None:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        return proc.returncode
    time.sleep(kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    return proc.returncode


def check_consistent(root: Path, report: Path) -> int:
    """Every reported key is stored; every stored item is whole and correct; fsck is clean."""
    store = FeatureStore(root)  # cleans what the killed writer left in tmp/
    reported = set(report.read_text().split()) if report.exists() else set()
    reader = store.reader("crash", "fp")
    failures = store.failures("crash", "fp")
    stored = set(reader.keys()) | set(failures)
    assert reported <= stored, f"committed keys lost: {sorted(reported - stored)[:5]}"
    for key in reader.keys():
        i = int(key[1:])
        got = reader.get(key)
        want = expected(i)
        assert got["features"].shape == want["features"].shape, key
        np.testing.assert_array_equal(got["features"], want["features"], err_msg=key)
        np.testing.assert_array_equal(got["hw"], want["hw"], err_msg=key)
    for key, reason in failures.items():
        assert reason == f"bad input {int(key[1:])}"
    report_fsck = store.fsck()
    assert report_fsck.ok, report_fsck.format()
    assert not list((root / "tmp").iterdir())
    return len(stored)


@pytest.mark.timeout(120)
def test_writer_killed_at_random_points_loses_nothing_committed(tmp_path):
    root, report = tmp_path / "store", tmp_path / "committed.txt"
    rng = random.Random(1234)
    progress = []
    for _ in range(6):
        rc = run_child(root, report, kill_after=rng.uniform(0.05, 0.3))
        progress.append(check_consistent(root, report))
        if rc == 0:  # a fast machine finished before the kill: enough kills landed already?
            break
        assert rc == -signal.SIGKILL
    killed_mid_run = [p for p in progress if p < N_ITEMS]
    assert len(killed_mid_run) >= 3 and killed_mid_run == sorted(killed_mid_run), progress
    run_child(root, report, kill_after=None)  # the rerun completes the rest
    assert check_consistent(root, report) == N_ITEMS
    store = FeatureStore(root)
    n_failed = len(range(0, N_ITEMS, 13))
    assert store.counts("crash", "fp") == {"done": N_ITEMS - n_failed, "failed": n_failed}
    assert store.missing("crash", "fp", [f"k{i:05d}" for i in range(N_ITEMS)]) == []


# The child dies by SIGKILL at one precise point of its third segment commit.
CHILD_AT = r"""
import os, signal, sys
import numpy as np
import pipeline.store as st
from pipeline.stage import FieldSpec, Record

root, point = sys.argv[1], sys.argv[2]
calls = {"rename": 0}
real_rename, real_exit = os.rename, st._Tx.__exit__

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def rename(src, dst):
    calls["rename"] += 1
    if calls["rename"] == 3 and point == "before_rename":
        die()
    real_rename(src, dst)
    if calls["rename"] == 3 and point == "after_rename":
        die()

def tx_exit(self, *exc):
    real_exit(self, *exc)
    if calls["rename"] == 3 and point == "after_index":  # the index transaction of that commit
        die()

st.os.rename = rename
st._Tx.__exit__ = tx_exit
store = st.FeatureStore(root)
schema = {"features": FieldSpec("float16", (64,), ragged=True), "hw": FieldSpec("int32", (2,))}
with store.writer("crash", "fp", schema, chunk_size=10) as w:
    for i in range(1, 50):
        n = i % 40
        feats = (np.arange(n * 64, dtype=np.float32).reshape(n, 64) + i) % 1000
        w.add(Record(f"k{i:05d}", {"features": feats, "hw": [i, n]}))
"""


@pytest.mark.parametrize("point, chunks_kept", [("before_rename", 2), ("after_rename", 2), ("after_index", 3)])
def test_writer_killed_inside_a_commit_leaves_a_consistent_store(tmp_path, point, chunks_kept):
    root = tmp_path / "store"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", CHILD_AT, str(root), point], env=env, cwd=ROOT,
                          capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    leftovers = sorted(p.suffix for p in (root / "tmp").iterdir())
    assert leftovers == ([".lock", ".part"] if point == "before_rename" else [".lock"])
    n_files = len(list((root / "segments").glob("*/*/*.h5")))
    assert n_files == (2 if point == "before_rename" else 3)
    stored = check_consistent(root, tmp_path / "none.txt")  # reopening cleans the dead writer's files
    assert stored == 10 * chunks_kept
    assert len(list((root / "segments").glob("*/*/*.h5"))) == chunks_kept
