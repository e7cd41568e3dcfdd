"""Scale-out: the extraction flow on a two-process local Dask cluster stores exactly what the
single-process run stores (same views, keys and arrays); workers write their own segments."""
from __future__ import annotations

import os

import pytest

from pipeline.manifest import load_manifest
from pipeline.store import FeatureStore
from tests.support.stores import assert_same_content, store_content
from tests.support.synthetic import REGISTRY, write_project

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_two_dask_worker_processes_store_the_same_as_one_process(tmp_path, monkeypatch):
    from flows.extract import run_extraction

    monkeypatch.setenv("MRHP_SYNTH_DELAY", "0.01")
    single = write_project(tmp_path / "single", 40, chunk_size=8)
    scaled = write_project(tmp_path / "dask", 40, chunk_size=8)
    log = tmp_path / "dask.log"

    run_extraction(single, dataset="syn", registry=REGISTRY, task_runner="thread", progress=False)
    monkeypatch.setenv("MRHP_SYNTH_LOG", str(log))
    summaries = run_extraction(scaled, dataset="syn", registry=REGISTRY, task_runner="dask", progress=False)

    assert [(s.stage, s.done, s.failed, s.view_written) for s in summaries] == [
        ("synthetic", 40, 0, True), ("synthetic_sum", 40, 0, True)]
    a, b = store_content(single), store_content(scaled)
    assert sorted(a) == sorted(b) and len(a) == 80
    assert_same_content(a, b)
    # The work ran in the Dask worker processes, each writing its own segments.
    pids = {int(line.split()[2]) for line in log.read_text().splitlines()}
    assert os.getpid() not in pids
    store = FeatureStore(load_manifest(scaled).roots.store)
    fp = store.fingerprints("synthetic")[0]
    segs = list((store.root / "segments" / "synthetic" / fp).glob("*.h5"))
    assert len(segs) == 5  # one per chunk task
