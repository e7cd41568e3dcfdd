"""The Prefect extraction flows, caching, the extract/status commands and deployments.

One Prefect test server for the whole module (starting one costs ~15 s); few flow runs per test.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from features import registry as stage_registry
from flows.caching import chunk_cache_key, results_dir
from mrhp.cli import main
from pipeline.manifest import load_manifest
from pipeline.store import FeatureStore
from tests.support.synthetic import REGISTRY, text_file, write_project

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", autouse=True)
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def calls(log: Path) -> Counter:
    if not log.exists():
        return Counter()
    return Counter(line.split()[0] for line in log.read_text().splitlines())


@pytest.fixture
def project(tmp_path, monkeypatch):
    log = tmp_path / "calls.log"
    monkeypatch.setenv("MRHP_SYNTH_LOG", str(log))
    monkeypatch.delenv("MRHP_SYNTH_SALT", raising=False)
    monkeypatch.delenv("MRHP_SYNTH_DELAY", raising=False)
    # The synthetic stages join the registry, so the CLI and the flows run them like real ones.
    for name, entry in REGISTRY.items():
        monkeypatch.setitem(stage_registry.STAGES, name, entry)
    return tmp_path, write_project(tmp_path, 30, chunk_size=7), log


def flow_run_count() -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return len(client.read_flow_runs(limit=200))


def extract(manifest: Path, *args: str) -> int:
    return main(["--manifest", str(manifest), "extract", "--dataset", "syn", "--stage", "synthetic_sum",
                 "--no-progress", *args])


def test_chunk_cache_key_follows_content_not_paths():
    a = chunk_cache_key("rois", "fp1", ["k2", "k1"])
    assert a == chunk_cache_key("rois", "fp1", ["k1", "k2"])  # order-free
    assert a != chunk_cache_key("rois", "fp1", ["k1", "k3"])  # one item's content changed
    assert a != chunk_cache_key("rois", "fp2", ["k1", "k2"])  # stage parameters/code changed
    assert a.startswith("rois-fp1-")


def test_extract_reruns_only_changed_items_and_prints_a_summary(project, capsys):
    root, manifest, log = project
    assert extract(manifest) == 0
    out = capsys.readouterr().out
    assert "synthetic_sum" in out and "reused" in out
    assert calls(log) == {"synthetic": 30, "synthetic_sum": 30}
    stored = sorted(p.name for p in results_dir(root / "store").iterdir())
    assert len([n for n in stored if n.startswith("synthetic-")]) == 5  # one JSON result per chunk

    # No change: nothing computed, and planning alone answers (no flow run is created).
    runs_before = flow_run_count()
    assert extract(manifest) == 0
    assert calls(log) == {"synthetic": 30, "synthetic_sum": 30}
    assert flow_run_count() == runs_before
    capsys.readouterr()

    # Two files change: exactly those two items, in the stage and in the stage depending on it.
    for i in (3, 17):
        text_file(root, i).write_text(f"new text {i}", encoding="utf-8")
    assert extract(manifest) == 0
    assert calls(log) == {"synthetic": 32, "synthetic_sum": 32}
    table = capsys.readouterr().out.splitlines()
    row = next(line.split() for line in table if line.split()[:2] == ["syn", "synthetic"])
    assert row[-4:] == ["30", "2", "28", "0"]  # total, done, reused, failed

    status = main(["--manifest", str(manifest), "status", "--stage", "synthetic", "synthetic_sum"])
    assert status == 0
    lines = capsys.readouterr().out.splitlines()
    syn = next(line.split() for line in lines if line.split()[:2] == ["syn", "synthetic"])
    assert syn[2:7] == ["30", "30", "0", "0", "0"]  # total, done, stale, failed, missing

    # Status sees a data change before the rerun: the changed item is missing and its view entry stale.
    text_file(root, 5).write_text("changed again", encoding="utf-8")
    main(["--manifest", str(manifest), "status", "--stage", "synthetic"])
    syn = next(line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("syn"))
    assert syn[2:7] == ["30", "29", "1", "0", "1"]


def test_a_failing_chunk_is_retried_then_reported_with_its_item_ids(project, capsys):
    root, manifest, log = project
    text_file(root, 8).write_text("RAISE please", encoding="utf-8")
    text_file(root, 9).write_text("BAD row", encoding="utf-8")
    code = main(["--manifest", str(manifest), "extract", "--stage", "synthetic", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 5 and "could not be computed" in captured.err
    assert "error: 000/t000008.txt: RuntimeError: synthetic error" in captured.out
    assert "failed: 000/t000009.txt:" in captured.out and "bad input" in captured.out
    m = load_manifest(manifest)
    store = FeatureStore(m.roots.store)
    fp = next(iter(store.fingerprints("synthetic")))
    done = store.done_keys("synthetic", fp)
    assert 30 - 7 <= len(done) <= 28  # every other chunk's results kept
    assert not any(v.stage == "synthetic" for v in store.views())  # incomplete: no view yet


def test_forgotten_results_are_recomputed_despite_a_cached_chunk(project):
    from flows.extract import run_extraction

    root, manifest, log = project
    (first,) = run_extraction(manifest, dataset="syn", stages=["synthetic"], progress=False)
    m = load_manifest(manifest)
    store = FeatureStore(m.roots.store)
    lost = sorted(store.done_keys("synthetic", first.fingerprint))[:7]  # exactly the first chunk
    store.forget("synthetic", first.fingerprint, lost)
    (again,) = run_extraction(manifest, dataset="syn", stages=["synthetic"], progress=False)
    # The chunk's cached outcome claimed success; the store check recomputed it regardless.
    assert again.view_written and again.done == 7 and again.chunks == 2
    assert not store.missing("synthetic", first.fingerprint, lost)
    (forced,) = run_extraction(manifest, dataset="syn", stages=["synthetic"], force=True, progress=False)
    assert forced.done == 30 and forced.reused == 0 and forced.chunks == 5
    assert calls(log)["synthetic"] == 30 + 7 + 30


def test_extract_rejects_an_unknown_stage_without_a_traceback(project, capsys):
    _, manifest, _ = project
    assert main(["--manifest", str(manifest), "extract", "--stage", "roi"]) == 2
    assert "unknown stage(s) roi; valid:" in capsys.readouterr().err


def test_deploy_registers_flows_on_the_work_pool_with_a_gpu_limit(tmp_path):
    from prefect.client.orchestration import get_client

    from flows.deploy import apply_deployments, build_deployments, deploy_spec, release_from_work_pool

    manifest = load_manifest(write_project(tmp_path, 1))
    spec = deploy_spec(manifest, work_pool="gpu-box", cron="0 3 * * *")
    deps = build_deployments(spec)
    assert [d.name for d in deps] == ["all", "rois", "tokens", "embeddings", "probes", "bert", "train"]
    assert deps[0].parameters["gpu_limit"] == "gpu-box-gpu" and deps[0].parameters["on_dask"] is False
    # By module, and run in the project folder: a process worker would otherwise look for a
    # file path relative to wherever `mrhp deploy` ran, inside an empty temporary folder.
    assert deps[0].entrypoint == "flows.extract.extract_flow"
    assert deps[1].job_variables == {"working_dir": str(Path(__file__).resolve().parents[2])}
    names = apply_deployments(spec)
    assert names[0] == "mrhp-extract/all" and "mrhp-extract-rois/rois" in names and names[-1] == "mrhp-train/train"
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("mrhp-extract/all")
        assert dep.work_pool_name == "gpu-box"
        assert dep.schedules[0].schedule.cron == "0 3 * * *"
        limit = client.read_global_concurrency_limit_by_name("gpu-box-gpu")
        assert limit.limit == manifest.flows.gpu_concurrency == 1
        assert client.read_work_pool("gpu-box").type == "process"
    # `mrhp serve` takes the deployments off the work pool (else the pool's worker takes their runs).
    served = build_deployments(spec, for_work_pool=False)
    assert release_from_work_pool(served) == names
    assert release_from_work_pool(served) == []


def test_deploy_builds_the_training_deployment_on_the_gpu_pool_and_limit(tmp_path):
    """mrhp-train/train: by module, in the project folder, on the extraction's work pool with its
    GPU limit as a fixed parameter; dataset and model required at run time, no schedule."""
    from flows.deploy import build_deployments, deploy_spec

    manifest = load_manifest(write_project(tmp_path, 1))
    spec = deploy_spec(manifest, work_pool="gpu-box", cron="0 3 * * *")
    deps = build_deployments(spec)
    train, rois = deps[-1], deps[1]
    assert train.flow_name == "mrhp-train" and train.name == "train"
    assert train.entrypoint == "flows.training.train_flow"
    assert train.work_pool_name == rois.work_pool_name == "gpu-box"
    assert train.job_variables == rois.job_variables == {"working_dir": str(Path(__file__).resolve().parents[2])}
    assert train.parameters == {"manifest_path": str(manifest.path), "gpu_limit": "gpu-box-gpu"}
    assert rois.parameters["gpu_limit"] == train.parameters["gpu_limit"]
    assert train.tags == ["mrhp", "mrhp-train"] and not train.schedules
    schema = train._parameter_openapi_schema
    assert schema.required == ["dataset", "model"]
    props = schema.properties
    assert {"dataset", "model", "seeds", "name", "config", "overrides", "preset", "resume", "overwrite",
            "manifest_path", "gpu_limit"} <= set(props)
    assert props["seeds"]["type"] == "integer" and props["seeds"]["default"] == 1
    assert props["overrides"]["type"] == "array" and props["overrides"]["items"] == {"type": "string"}
    assert props["resume"]["type"] == props["overwrite"]["type"] == "boolean"
    served = build_deployments(spec, for_work_pool=False)[-1]
    assert served.name == "train" and served.work_pool_name is None


def test_deploy_command_prints_the_training_deployment_and_how_to_run_it(tmp_path, capsys):
    manifest = write_project(tmp_path, 1)
    assert main(["--manifest", str(manifest), "deploy", "--work-pool", "cli-box"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "deployed mrhp-extract/all on work pool cli-box" in out
    assert "deployed mrhp-train/train on work pool cli-box" in out
    assert any(ln.startswith("train on it: prefect deployment run 'mrhp-train/train' -p dataset=DATASET -p model=MODEL")
               for ln in out)
    # what `prefect deployment run mrhp-train/train -p ...` sends: the server checks it against the schema
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("mrhp-train/train")
        run = client.create_flow_run_from_deployment(
            dep.id, parameters={"dataset": "syn", "model": "text-gru", "seeds": 2, "overrides": ["epochs=3"]})
        assert run.parameters["gpu_limit"] == "cli-box-gpu" and run.parameters["overrides"] == ["epochs=3"]
        client.delete_flow_run(run.id)
        with pytest.raises(Exception, match="(?i)validation|schema|required"):
            client.create_flow_run_from_deployment(dep.id, parameters={"dataset": "syn"})  # no model


def test_deploy_training_run_holds_a_slot_of_the_gpu_limit_unless_on_cpu():
    """A GPU training run holds one slot of the limit the ROI chunks hold (so the two never
    share the GPU); a CPU run holds none; a missing limit stops a deployed run in one line."""
    from prefect.client.orchestration import get_client

    from flows.training import gpu_slot
    from models.config import train_config
    from pipeline.errors import ConfigError

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name("train-box-gpu", 1)

        def active() -> int:
            return client.read_global_concurrency_limit_by_name("train-box-gpu").active_slots

        for device, held in (("cuda", 1), ("auto", 1), ("cpu", 0)):
            with gpu_slot(train_config({"device": device}), "train-box-gpu"):
                assert active() == held, device
            assert active() == 0
        with gpu_slot(train_config({"device": "cuda"}), None):  # in-process runs: no limit
            assert active() == 0
    missing = "gpu_limit: cannot take a slot of the global concurrency limit 'no-such-gpu'"
    with pytest.raises(ConfigError, match=missing), gpu_slot(train_config({"device": "cuda"}), "no-such-gpu"):
        pass


def test_deploy_rejects_a_bad_cron_expression(tmp_path, capsys, monkeypatch):
    manifest = write_project(tmp_path, 1)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    code = main(["--manifest", str(manifest), "deploy", "--cron", "every night"])
    assert code == 2 and "not a valid cron expression" in capsys.readouterr().err


def _child_exits(q) -> None:
    q.put("ok")


def test_a_process_forked_after_a_flow_run_exits_cleanly():
    """Prefect 3.8 leaves its services' exit hooks in forked children, which then exit with
    code 1 (DataLoader workers report 'exited unexpectedly'); flows/__init__ drops them."""
    import multiprocessing as mp

    from prefect import flow

    import flows  # noqa: F401  (installs the fork fix)

    @flow
    def trivial() -> int:
        return 1

    assert trivial() == 1
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_exits, args=(q,))
    p.start()
    assert q.get(timeout=30) == "ok"
    p.join(timeout=30)
    assert p.exitcode == 0


def test_a_deterministic_error_is_not_retried(tmp_path, monkeypatch, capsys):
    log = tmp_path / "calls.log"
    monkeypatch.setenv("MRHP_SYNTH_LOG", str(log))
    for name, entry in REGISTRY.items():
        monkeypatch.setitem(stage_registry.STAGES, name, entry)
    manifest = write_project(tmp_path, 6, chunk_size=3, retries=2)
    text_file(tmp_path, 1).write_text("CONFIG error", encoding="utf-8")
    text_file(tmp_path, 4).write_text("RAISE please", encoding="utf-8")
    code = main(["--manifest", str(manifest), "extract", "--stage", "synthetic", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 5 and "ConfigError: synthetic configuration error" in out
    attempts = calls(log)
    assert attempts["synthetic-config-attempt"] == 1  # a ConfigError is final: no retry
    # the transient one keeps its retries: 1 + 2 attempts, each computing the item before it (t3)
    assert "RuntimeError: synthetic error" in out
    assert attempts["synthetic-raise-attempt"] == 3  # a transient error keeps its 2 retries


def test_deterministic_errors_are_classified():
    from flows.extract import is_deterministic
    from pipeline.errors import ConfigError, DataError, ResourceError, StageError, StoreError

    assert is_deterministic(ConfigError("x")) and is_deterministic(DataError("x"))
    assert is_deterministic(ResourceError("weights missing"))
    assert is_deterministic(StageError("stage rois: this worker computes fingerprint a, the flow planned b"))
    assert not is_deterministic(StoreError("database is locked"))
    assert not is_deterministic(RuntimeError("CUDA out of memory"))
    assert not is_deterministic(None)


def test_flow_runs_are_named_and_publish_their_summary(project):
    from prefect.client.orchestration import get_client

    root, manifest, log = project
    assert extract(manifest) == 0
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(limit=200)
        assert any(r.name == "syn-synthetic_sum" for r in runs), [r.name for r in runs]
        latest = client.read_latest_artifacts(limit=50) if hasattr(client, "read_latest_artifacts") else []
        keys = {a.key for a in latest} or {a.key for a in client.read_artifacts(limit=200)}
    assert "mrhp-extract-summary" in keys
