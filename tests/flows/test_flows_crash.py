"""Reliability: SIGKILL of the flow process mid-run, then a rerun, leaves the store exactly as an
uninterrupted run does (committed chunks are reused, the chunk in flight is redone)."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from features.registry import build_stage, stage_order
from pipeline.manifest import load_manifest
from pipeline.runner import run_stage
from pipeline.store import FeatureStore
from tests.support.stores import assert_same_content, store_content
from tests.support.synthetic import REGISTRY, write_project

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import sys
    from features import registry
    from tests.support.synthetic import REGISTRY
    from mrhp.cli import main

    registry.STAGES.update(REGISTRY)
    sys.exit(main(["--manifest", sys.argv[1], "extract", "--stage", "synthetic_sum", "--no-progress"]))
""")


@pytest.fixture(scope="module")
def api_url():
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield str(PREFECT_API_URL.value())


def committed_segments(store_root: Path) -> int:
    """Segments the index records as committed (a file under segments/ may not be indexed yet)."""
    index = store_root / "index.sqlite"
    if not index.is_file():
        return 0
    con = sqlite3.connect(str(index), timeout=30)
    try:
        return int(con.execute("SELECT count(*) FROM segments").fetchone()[0])
    except sqlite3.OperationalError:  # the tables are not created yet
        return 0
    finally:
        con.close()


def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(tmp_path, api_url):
    from flows.extract import run_extraction

    reference = write_project(tmp_path / "ref", 60, chunk_size=5)
    m = load_manifest(reference)
    for name in stage_order(None, REGISTRY):
        run_stage(build_stage(m, "syn", name, REGISTRY), FeatureStore(m.roots.store), "syn", chunk_size=5)

    crashed = write_project(tmp_path / "crash", 60, chunk_size=5)
    store_root = load_manifest(crashed).roots.store
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PREFECT_API_URL": api_url, "MRHP_SYNTH_DELAY": "0.05",
           "PYTHONPATH": str(ROOT), "MRHP_SYNTH_LOG": str(tmp_path / "crash.log")}
    proc = subprocess.Popen([sys.executable, str(script), str(crashed)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while committed_segments(store_root) < 3:  # some chunks committed, most still to do
            assert proc.poll() is None, "the flow finished before it could be killed"
            assert time.monotonic() < deadline, "no chunk was committed in time"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert FeatureStore(store_root).views() == []  # killed before any stage finished

    syn, total = run_extraction(crashed, dataset="syn", registry=REGISTRY, progress=False)
    assert syn.reused >= 3 * 5 and syn.done > 0 and syn.done + syn.reused == 60
    assert total.done == 60 and not syn.errors and not total.errors
    assert_same_content(store_content(reference), store_content(crashed))
    assert FeatureStore(store_root).fsck().ok


def rois_manifest(folder: Path) -> Path:
    """The embedded demo dataset with a tiny random-init ROI configuration and its own store."""
    import yaml

    data = yaml.safe_load((ROOT / "data_manifest.yaml").read_text())
    data["roots"] = {"data": str(ROOT), "resources": str(ROOT), "store": str(folder / "store"),
                     "runs": str(folder / "runs")}
    data["stages"]["rois"] = {"random_init": True, "min_size": 64, "max_size": 96, "rpn_pre_nms_top_n": 100,
                              "rpn_post_nms_top_n": 10, "fixed_k": 4, "batch_size": 2, "num_workers": 0}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "data_manifest.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_sigkill_during_rois_then_rerun_equals_an_uninterrupted_run(tmp_path, api_url):
    from flows.extract import run_extraction

    if not (ROOT / "demo_data" / "pictures").is_dir():
        pytest.skip("embedded demo dataset not found")
    reference = rois_manifest(tmp_path / "ref")
    m = load_manifest(reference)
    ref = run_stage(build_stage(m, "demo", "rois"), FeatureStore(m.roots.store), "demo", chunk_size=3)
    assert ref.view_written and ref.done >= 6

    crashed = rois_manifest(tmp_path / "crash")
    store_root = load_manifest(crashed).roots.store
    env = {**os.environ, "PREFECT_API_URL": api_url, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mrhp", "--manifest", str(crashed), "extract", "--dataset", "demo",
         "--stage", "rois", "--chunk-size", "3", "--no-progress"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while committed_segments(store_root) < 2:
            assert proc.poll() is None, "the rois flow finished before it could be killed"
            assert time.monotonic() < deadline, "no rois chunk was committed in time"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    (again,) = run_extraction(crashed, dataset="demo", stages=["rois"], chunk_size=3, progress=False)
    assert again.reused >= 2 * 3 and again.done + again.reused + again.failed == ref.total
    assert again.random_init and again.fingerprint == ref.fingerprint
    a, b = store_content(reference), store_content(crashed)
    assert sorted(a) == sorted(b)
    for k, (key, arrays) in a.items():
        assert key == b[k][0]
        for name, arr in arrays.items():
            if np.issubdtype(arr.dtype, np.floating):  # same machine, same threads: ~bitwise
                np.testing.assert_allclose(arr, b[k][1][name], rtol=1e-3, atol=1e-3)
            else:
                np.testing.assert_array_equal(arr, b[k][1][name])
    assert FeatureStore(store_root).fsck().ok


def test_extract_random_init_flag_runs_rois_end_to_end_and_status_flags_it(tmp_path, api_url, capsys):
    """`mrhp extract --stage rois --dataset demo --random-init` on a manifest that asks for real
    weights it does not have: the flag gives seeded random weights, and status says so."""
    import yaml

    from mrhp.cli import main

    if not (ROOT / "demo_data" / "pictures").is_dir():
        pytest.skip("embedded demo dataset not found")
    path = rois_manifest(tmp_path / "p")
    data = yaml.safe_load(path.read_text())
    data["stages"]["rois"]["random_init"] = False
    path.write_text(yaml.safe_dump(data))
    m = ["--manifest", str(path)]

    assert main(m + ["extract", "--dataset", "demo", "--stage", "rois", "--no-progress"]) == 5
    assert "bua-r101-c4" in capsys.readouterr().err  # no weights declared: a clear error

    assert main(m + ["extract", "--dataset", "demo", "--stage", "rois", "--no-progress",
                     "--random-init"]) == 0
    out = capsys.readouterr().out
    assert "(random-init)" in out
    assert main(m + ["status", "--dataset", "demo", "--stage", "rois", "--random-init"]) == 0
    row = [ln for ln in capsys.readouterr().out.splitlines() if " rois " in ln][0]
    assert "(random-init)" in row and row.split()[3] == "17"  # 17 images done, 1 missing file
