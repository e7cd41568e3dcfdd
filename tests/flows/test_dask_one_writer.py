"""Issue 16, section 1: on Dask the flow process is the store index's only writer.

A cluster of two worker processes (each its own working folder and PREFECT_HOME, reached through
a scheduler address like a multi-machine cluster) computes into one store; one worker is killed
mid-chunk (after it wrote a pending segment); the run completes, the store equals a
single-process run item by item, `fsck` is clean, a rerun is a no-op, and no worker process ever
opened the index for writing (the store's open log, MRHP_STORE_OPEN_LOG)."""
from __future__ import annotations

import os
from collections import Counter
from contextlib import contextmanager

import pytest

from pipeline.manifest import load_manifest
from pipeline.store import FeatureStore
from tests.support.stores import assert_same_content, store_content
from tests.support.synthetic import REGISTRY, write_project

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@contextmanager
def two_worker_cluster(tmp_path):
    """A scheduler and two nanny-managed worker processes, each with its own folder and
    PREFECT_HOME; a killed worker is restarted by its nanny. Yields the scheduler address."""
    from distributed import Nanny, Scheduler, SpecCluster
    from prefect.settings import PREFECT_API_URL

    api = str(PREFECT_API_URL.value())
    workers = {}
    for name in ("w1", "w2"):
        home = tmp_path / name
        (home / "prefect").mkdir(parents=True)
        workers[name] = {"cls": Nanny, "options": {
            "nthreads": 1, "local_directory": str(home / "dask"),
            "env": {"PREFECT_HOME": str(home / "prefect"), "PREFECT_API_URL": api, "OMP_NUM_THREADS": "1"},
        }}
    cluster = SpecCluster(workers=workers, scheduler={"cls": Scheduler, "options": {"dashboard_address": None}},
                          asynchronous=False)
    try:
        yield cluster.scheduler_address
    finally:
        cluster.close()


def test_workers_write_pending_segments_the_flow_commits_them_a_killed_worker_loses_nothing(
    tmp_path, monkeypatch
):
    from flows.extract import run_extraction

    swept: list[str] = []  # the pending files the flow's end-of-stage sweeps found
    real_commit_pending = FeatureStore.commit_pending

    def commit_pending(self, owner=None):
        swept.extend(p.name for p in self.pending_segments(owner))
        return real_commit_pending(self, owner)

    monkeypatch.setattr(FeatureStore, "commit_pending", commit_pending)
    single = write_project(tmp_path / "single", 40, chunk_size=8)
    scaled = write_project(tmp_path / "dask", 40, chunk_size=8)
    run_extraction(single, dataset="syn", registry=REGISTRY, task_runner="thread", progress=False)

    opens, computed, marker = tmp_path / "opens.log", tmp_path / "computed.log", tmp_path / "killed"
    monkeypatch.setenv("MRHP_STORE_OPEN_LOG", str(opens))
    monkeypatch.setenv("MRHP_SYNTH_LOG", str(computed))
    monkeypatch.setenv("MRHP_SYNTH_DELAY", "0.02")
    monkeypatch.setenv("MRHP_COMMIT_EVERY", "3")  # a segment every 3 records: the kill at item 5 ...
    monkeypatch.setenv("MRHP_SYNTH_EXIT", f"{marker}:5")  # ... leaves one written, never reported
    with two_worker_cluster(tmp_path) as address:  # started after the environment is set
        summaries = run_extraction(scaled, dataset="syn", registry=REGISTRY, task_runner="dask",
                                   dask_address=address, progress=False)

    assert marker.exists(), "no worker was killed"
    # The killed attempt had written one segment (3 records) it never reported: the flow's sweep
    # found it and verified it (its keys, recomputed by the rescheduled chunk, were already
    # stored, so it was removed: `pending_segments()` is empty below and fsck is clean).
    assert len(swept) == 1, swept
    assert [(s.stage, s.done, s.failed, s.view_written) for s in summaries] == [
        ("synthetic", 40, 0, True), ("synthetic_sum", 40, 0, True)]
    a, b = store_content(single), store_content(scaled)
    assert sorted(a) == sorted(b) and len(a) == 80
    assert_same_content(a, b)

    # The killed worker had computed 5 items of its chunk; they were computed again elsewhere.
    lines = [line.split() for line in computed.read_text().splitlines()]
    by_pid = Counter(int(pid) for stage, _, pid in lines if stage == "synthetic")
    assert os.getpid() not in by_pid and len(by_pid) >= 2  # the killed process and a survivor
    assert max(Counter(key for stage, key, _ in lines if stage == "synthetic").values()) >= 2
    per_key = Counter(key for stage, key, _ in lines if stage == "synthetic")
    assert sum(per_key.values()) >= 40 and set(per_key) == {k for (s, _), (k, _) in b.items() if s == "synthetic"}

    # Only the flow (this process) opened the index for writing; workers opened it read-only
    # (synthetic_sum reads its upstream from the store).
    entries = [line.split() for line in opens.read_text().splitlines()]
    writers = {int(pid) for pid, mode, _ in entries if mode == "write"}
    readers = {int(pid) for pid, mode, _ in entries if mode == "read"}
    assert writers == {os.getpid()}
    assert readers - {os.getpid()}, "no worker read the index (the open log is not working)"

    store = FeatureStore(load_manifest(scaled).roots.store)
    report = store.fsck()
    assert report.ok, report.format()
    assert store.pending_segments() == []
    assert not [p for p in store.tmp_dir.iterdir() if p.suffix == ".part"]

    # A rerun has nothing to do and the store stays clean.
    again = run_extraction(scaled, dataset="syn", registry=REGISTRY, task_runner="dask",
                           dask_address="tcp://127.0.0.1:9", progress=False)  # answered without a cluster
    assert [(s.stage, s.done, s.reused, s.failed) for s in again] == [
        ("synthetic", 0, 40, 0), ("synthetic_sum", 0, 40, 0)]
    assert store.fsck().ok
