"""The orchestrator-free runner and the stage registry, on the cheap synthetic stages."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from features.registry import STAGES, StageEntry, build_stage, stage_order
from pipeline.errors import ConfigError, StageError
from pipeline.manifest import load_manifest
from pipeline.runner import plan_stage, run_chunk, run_stage, summary_table
from pipeline.store import FeatureStore
from tests.support.synthetic import REGISTRY, text_file, vec_of, write_project


def calls(log: Path) -> Counter:
    """How many items each stage computed, from the synthetic stages' call log."""
    if not log.exists():
        return Counter()
    return Counter(line.split()[0] for line in log.read_text().splitlines())


@pytest.fixture
def project(tmp_path, monkeypatch):
    log = tmp_path / "calls.log"
    monkeypatch.setenv("MRHP_SYNTH_LOG", str(log))
    monkeypatch.delenv("MRHP_SYNTH_DELAY", raising=False)
    monkeypatch.delenv("MRHP_SYNTH_SALT", raising=False)
    manifest = load_manifest(write_project(tmp_path, 23, chunk_size=5))
    return tmp_path, manifest, FeatureStore(manifest.roots.store), log


def run_both(manifest, store, **kw):
    out = []
    for name in stage_order(None, REGISTRY):
        out.append(run_stage(build_stage(manifest, "syn", name, REGISTRY), store, "syn", chunk_size=5, **kw))
    return out


def test_first_run_computes_every_item_and_writes_the_view(project):
    root, manifest, store, log = project
    syn, total = run_both(manifest, store)
    assert (syn.total, syn.done, syn.reused, syn.failed, syn.chunks) == (23, 23, 0, 0, 5)
    assert (total.done, total.view_written) == (23, True)
    view = store.view("syn", "synthetic")
    data = text_file(root, 7).read_bytes()
    np.testing.assert_array_equal(view.get("000/t000007.txt")["vec"], vec_of(data))
    assert int(store.view("syn", "synthetic_sum").get("000/t000007.txt")["total"]) == sum(data)
    assert calls(log) == {"synthetic": 23, "synthetic_sum": 23}
    assert "synthetic_sum" in summary_table([syn, total])


def test_rerun_without_changes_computes_nothing(project):
    _, manifest, store, log = project
    run_both(manifest, store)
    syn, total = run_both(manifest, store)
    assert (syn.done, syn.reused, syn.chunks, total.done, total.reused) == (0, 23, 0, 0, 23)
    assert calls(log) == {"synthetic": 23, "synthetic_sum": 23}


def test_changing_k_files_recomputes_those_items_in_the_stage_and_its_dependents(project):
    root, manifest, store, log = project
    run_both(manifest, store)
    for i in (2, 11, 19):
        text_file(root, i).write_text(f"changed {i}", encoding="utf-8")
    syn, total = run_both(manifest, store)
    assert (syn.done, syn.reused, total.done, total.reused) == (3, 20, 3, 20)
    assert calls(log) == {"synthetic": 26, "synthetic_sum": 26}
    assert int(store.view("syn", "synthetic_sum").get("000/t000011.txt")["total"]) == sum(b"changed 11")


def test_bad_input_is_a_stored_failure_not_retried_on_rerun(project):
    root, manifest, store, log = project
    text_file(root, 4).write_text("BAD row", encoding="utf-8")
    syn, total = run_both(manifest, store)
    assert (syn.done, syn.failed) == (22, 1)
    (key,) = syn.failures
    assert syn.failed_items[key] == ["000/t000004.txt"] and "bad input" in syn.failures[key]
    assert syn.view_written and store.view("syn", "synthetic").failure("000/t000004.txt")
    assert total.failed == 1 and "upstream failed" in next(iter(total.failures.values()))
    again, _ = run_both(manifest, store)
    # Not recomputed, but still reported: a rerun's summary agrees with `mrhp status`.
    assert (again.done, again.reused, again.failed) == (0, 22, 1)
    assert again.failed_items == syn.failed_items
    assert calls(log)["synthetic"] == 23


def test_a_chunk_that_raises_keeps_other_chunks_and_reports_its_item_ids(project):
    root, manifest, store, log = project
    text_file(root, 12).write_text("RAISE now", encoding="utf-8")  # sorted by key: lands in some chunk
    stage = build_stage(manifest, "syn", "synthetic", REGISTRY)
    s = run_stage(stage, store, "syn", chunk_size=5)
    assert not s.view_written and s.errors
    assert 1 <= len(s.errors) <= 5 and s.done == 23 - len(s.errors)
    bad_key = next(k for k, ids in s.failed_items.items() if ids == ["000/t000012.txt"])
    assert "synthetic error" in s.errors[bad_key]
    assert len(store.missing("synthetic", s.fingerprint, list(s.errors))) == len(s.errors)
    text_file(root, 12).write_text("fixed", encoding="utf-8")
    again = run_stage(build_stage(manifest, "syn", "synthetic", REGISTRY), store, "syn", chunk_size=5)
    assert again.view_written and again.failed == 0
    assert again.done == len(s.errors)  # only the erroring chunk's lost items (new key for item 12)


def test_run_chunk_skips_keys_already_stored(project):
    _, manifest, store, log = project
    stage = build_stage(manifest, "syn", "synthetic", REGISTRY)
    work = plan_stage(stage, store)
    first = work.chunks(5)[0]
    assert run_chunk(stage, store, first).done == 5
    again = run_chunk(stage, store, first)
    assert (again.done, again.skipped) == (0, 5)


def test_force_recomputes_the_stage_and_a_salt_change_recomputes_everything(project, monkeypatch):
    _, manifest, store, log = project
    run_both(manifest, store)
    forced = run_stage(build_stage(manifest, "syn", "synthetic", REGISTRY), store, "syn", chunk_size=5, force=True)
    assert (forced.done, forced.reused) == (23, 0)
    monkeypatch.setenv("MRHP_SYNTH_SALT", "v2")
    syn, total = run_both(manifest, store)
    assert (syn.done, total.done) == (23, 23) and syn.fingerprint != forced.fingerprint


def test_stage_order_puts_dependencies_first_and_names_valid_stages():
    assert stage_order(["embeddings"]) == ["tokens", "embeddings"]
    assert stage_order(["embeddings"], with_dependencies=False) == ["embeddings"]
    assert stage_order(None) == list(STAGES)
    assert stage_order(["synthetic_sum"], REGISTRY) == ["synthetic", "synthetic_sum"]
    with pytest.raises(ConfigError, match="valid: rois, tokens, embeddings, probes, bert"):
        stage_order(["roi"])
    with pytest.raises(ConfigError, match="cycle"):
        stage_order(None, {"a": StageEntry("x", ("b",)), "b": StageEntry("x", ("a",))})


def test_build_stage_reports_a_missing_module(project):
    _, manifest, _, _ = project
    with pytest.raises(StageError, match="cannot import no_such_module"):
        build_stage(manifest, "syn", "x", {"x": StageEntry("no_such_module")})


def broken_stage(manifest, dataset_name):
    """A stage builder failing like a stage without its resources (used by the status test)."""
    raise StageError("detector weights not found: /nowhere/bua.pth")


def test_status_counts_done_failed_missing_stale_and_reports_planning_errors(project):
    from mrhp.commands.status import stage_status, status_table

    root, manifest, store, _ = project
    text_file(root, 1).write_text("BAD input", encoding="utf-8")
    run_stage(build_stage(manifest, "syn", "synthetic", REGISTRY), store, "syn", chunk_size=5)
    text_file(root, 2).write_text("edited", encoding="utf-8")
    row = stage_status(manifest, store, "syn", "synthetic", REGISTRY)
    assert (row.total, row.done, row.failed, row.missing, row.stale) == (23, 21, 1, 1, 1)
    broken = {"broken": StageEntry("tests.pipeline.test_runner:broken_stage")}
    bad = stage_status(manifest, store, "syn", "broken", broken)
    assert bad.error and "detector weights not found" in status_table([row, bad])


def test_finish_stage_rereads_missing_keys_when_the_other_runs_claims_are_gone(monkeypatch):
    """A concurrent run commits its keys and releases its claims between finish_stage's first
    `missing()` and its claim check: the keys are stored, so the view is written and nothing is
    reported as not computed."""
    from types import SimpleNamespace

    import pipeline.runner as runner

    class Store:
        def __init__(self):
            self.calls, self.views = 0, []

        def missing(self, stage, fp, keys):
            self.calls += 1
            return ["k2"] if self.calls == 1 else []  # k2 committed by the other run meanwhile

        def claimed_by_others(self, stage, fp, keys):
            return {}  # ... which has released its claims

        def write_view(self, dataset, stage, fp, view):
            self.views.append((dataset, stage, fp))

    monkeypatch.setattr(runner, "prior_failures", lambda work, store: {})
    monkeypatch.setattr(runner, "stage_note", lambda stage: "")
    monkeypatch.setattr(runner, "stage_state", lambda *a, **k: SimpleNamespace(failures={}))
    work = SimpleNamespace(stage=SimpleNamespace(name="s"), fingerprint="fp", total=2, reused=0,
                           todo=["k1", "k2"], plan=SimpleNamespace(items={"k1": 1, "k2": 2}, view={"a": "k1"}))
    store = Store()
    summary = runner.finish_stage(work, store, "d", [], {}, random_init=False, chunks=1)
    assert not summary.errors and summary.done == 2
    assert summary.view_written and store.views == [("d", "s", "fp")]
