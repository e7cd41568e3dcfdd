"""The extraction request: built and checked once, immutable, recorded by Prefect as it is, and
turned into the manifest once per process however many chunks a worker resolves."""
from __future__ import annotations

import dataclasses

import pytest

from features.registry import STAGES, ExtractRequest, StageEntry
from pipeline.errors import ConfigError, ManifestError
from tests.support.synthetic import ENTRY, REGISTRY, SUM_ENTRY, write_project


def test_build_resolves_defaults_and_dependencies_once(tmp_path):
    manifest = write_project(tmp_path, 3, chunk_size=7)
    req = ExtractRequest.build(manifest, dataset="syn", stages=["synthetic_sum"], registry=REGISTRY,
                               overrides={"stages": {"rois": {"random_init": True}}})
    assert req.manifest_path == str(manifest.resolve())
    assert req.entries == (("synthetic", ENTRY), ("synthetic_sum", SUM_ENTRY))  # dependency first
    assert req.order == ("synthetic", "synthetic_sum") and req.stages == ("synthetic_sum",)
    assert req.chunk_size == 7  # the manifest's flows.chunk_size
    assert req.overrides == ((("stages", "rois", "random_init"), True),)
    assert req.manifest().stage_params("rois").random_init is True
    assert req.datasets(req.manifest()) == ["syn"]
    hash(req)  # it keys the per-process stage caches
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.force = True  # type: ignore[misc]


def test_force_covers_the_named_stages_not_their_dependencies(tmp_path):
    manifest = write_project(tmp_path, 1)
    named = ExtractRequest.build(manifest, stages=["synthetic_sum"], force=True, registry=REGISTRY)
    assert named.forced("synthetic_sum") and not named.forced("synthetic")
    every = ExtractRequest.build(manifest, force=True, registry=REGISTRY)
    assert every.forced("synthetic") and every.forced("synthetic_sum")
    assert not ExtractRequest.build(manifest, registry=REGISTRY).forced("synthetic")


def test_impossible_requests_stop_at_build(tmp_path):
    manifest = write_project(tmp_path, 1)
    with pytest.raises(ConfigError, match="unknown stage"):
        ExtractRequest.build(manifest, stages=["roi"])
    with pytest.raises(ManifestError, match="no dataset 'nope'"):
        ExtractRequest.build(manifest, dataset="nope")
    with pytest.raises(ConfigError, match="chunk_size must be at least 1, got -2"):
        ExtractRequest.build(manifest, chunk_size=-2, registry=REGISTRY)
    req = ExtractRequest.build(manifest, registry=REGISTRY)
    with pytest.raises(ConfigError, match="stage 'rois' is not part of this request"):
        req.entry("rois")


def test_the_flow_records_the_request_and_rebuilds_it_from_that_record(tmp_path):
    from fastapi.encoders import jsonable_encoder

    from flows.extract import extract_flow

    manifest = write_project(tmp_path, 1)
    req = ExtractRequest.build(manifest, dataset="syn", registry=REGISTRY, force=True,
                               overrides={"stages": {"rois": {"random_init": True}}})
    # what Prefect stores for the parameter is plain JSON ...
    recorded = extract_flow.serialize_parameters({"request": req})["request"]
    assert recorded["entries"][0] == ["synthetic", {"module": "tests.support.synthetic", "depends_on": [],
                                                    "gpu": False}]
    assert recorded == jsonable_encoder(req)
    # ... and validating a run's parameters gives the request back, equal and still hashable
    assert extract_flow.validate_parameters({"request": req})["request"] is req
    again = extract_flow.validate_parameters({"request": recorded})["request"]
    assert again == req and hash(again) == hash(req)


def test_a_request_and_its_fields_together_are_refused(tmp_path):
    from flows.extract import extract_flow

    req = ExtractRequest.build(write_project(tmp_path, 1), registry=REGISTRY)
    with pytest.raises(ConfigError, match="not both .*dataset"):
        extract_flow.fn(request=req, dataset="syn")


def test_a_worker_parses_the_manifest_once_for_all_its_chunks(tmp_path):
    import pipeline.manifest as pm
    from flows.extract import StageRef, resolve_stage

    manifest = write_project(tmp_path, 2)
    req = ExtractRequest.build(manifest, dataset="syn", stages=["synthetic"], registry=REGISTRY)
    pm.clear_manifest_memo()  # as in a fresh worker process
    before = pm.parses
    store = str(tmp_path / "store")
    # three flow runs' chunks: the stage is rebuilt for each, the manifest is not parsed again
    stages = [resolve_stage(StageRef(request=req, dataset="syn", stage="synthetic", store_root=store,
                                     run_token=f"run-{i}")) for i in range(3)]
    assert pm.parses == before + 1
    assert len({id(s) for s in stages}) == 3 and stages[0].name == "synthetic"


def test_the_default_registry_entries_travel_in_the_request(tmp_path):
    req = ExtractRequest.build(write_project(tmp_path, 1), stages=["embeddings"])
    assert req.entries == (("tokens", STAGES["tokens"]), ("embeddings", STAGES["embeddings"]))
    assert isinstance(req.entry("embeddings"), StageEntry)


def test_a_recorded_request_with_list_overrides_comes_back_frozen(tmp_path):
    # JSON has no tuples: a list-valued override (datasets.D.splits) is recorded as a list and
    # must come back as the tuple it was, or the request is unhashable (the stage caches and the
    # manifest memo key on it) and unequal to the one recorded
    from flows.extract import extract_flow

    req = ExtractRequest.build(write_project(tmp_path, 1), dataset="syn", registry=REGISTRY,
                               overrides={"datasets": {"syn": {"splits": ["train", "test"]}}})
    recorded = extract_flow.serialize_parameters({"request": req})["request"]
    again = extract_flow.validate_parameters({"request": recorded})["request"]
    assert again == req and hash(again) == hash(req)
    assert again.manifest().dataset("syn").splits == ("train", "test")


def test_the_flow_process_keeps_only_the_current_runs_stages(tmp_path, monkeypatch):
    # The flow process puts the stages it built in the per-process cache (thread tasks reuse
    # them); a process running one flow after another (run_extraction called again, a notebook,
    # a long-lived worker) must drop and close the earlier runs' stages there (a rois stage
    # holds a detector and decoding workers), as a Dask worker's cache already does.
    import flows.extract as fx

    monkeypatch.setattr(fx, "_stage_cache", {})
    req = ExtractRequest.build(write_project(tmp_path, 1), dataset="syn", stages=["synthetic"], registry=REGISTRY)

    class Stage:
        closed = False

        def close(self) -> None:
            self.closed = True

    refs = [fx.StageRef(request=req, dataset="syn", stage="synthetic", store_root=str(tmp_path),
                        run_token=f"run-{i}") for i in range(2)]
    first, second = Stage(), Stage()
    fx.remember_stage(refs[0], first)
    fx.remember_stage(refs[1], second)
    assert first.closed and not second.closed
    assert list(fx._stage_cache) == [refs[1]] and fx.resolve_stage(refs[1]) is second
