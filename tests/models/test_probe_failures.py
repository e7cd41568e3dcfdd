"""A review whose probes record is a failure never falls back to plain attention in silence.

SANCL multiplies attention by each review's probe mask (Algorithm 1); a review the probes stage
could not process (coref/parse failure) has no mask. `data.probe_failures: ones` (default) keeps
it with a mask of ones, counted per split in run.json and said in one warning line at load;
`refuse` stops the load naming the review and its reason. A tiny synthetic store gets two
failed probes records by rewriting its probes view."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from models.config import DataConfig, train_config
from models.data import bundle_from_records, probe_fallback
from models.synthetic import make_synthetic
from models.trainer import Trainer
from pipeline.errors import ConfigError, DataError
from pipeline.stage import FieldSpec, Record
from pipeline.store import FeatureStore

REASON = "probe mask failed: ValueError: parse broke"
PROBES = frozenset({"tokens", "rois", "probes"})


@pytest.fixture
def synth(tmp_path: Path):
    return make_synthetic(tmp_path / "store", "synth", n_products=6, reviews_per_product=(3, 4),
                          vocab_size=40, embed_dim=8, roi_dim=8, max_boxes=2, image_prob=1.0, seed=5)


def _train_reviews(data) -> list[str]:
    return [r.id for r in data.records.reviews if r.split == "train"]


def _fail(data, rids, reason=REASON) -> None:
    """Point the probes view's items of `rids` at records committed as failures."""
    store = FeatureStore(data.store_root)
    view = store.view(data.dataset, "probes")
    mapping = {i: view.key(i) for i in view.item_ids()}
    writer = store.writer("probes", view.fingerprint, {"mask": FieldSpec("uint8", (), True)})
    for rid in rids:
        writer.add(Record(key=f"failed-{rid}", failure=reason))
        mapping[f"rvw:{rid}"] = f"failed-{rid}"
    writer.close()
    store.write_view(data.dataset, "probes", view.fingerprint, mapping)


def _bundle(data, cfg: DataConfig | None = None, **kw):
    return bundle_from_records(data.records, store_root=data.store_root, dataset=data.dataset,
                               cfg=cfg or data.data_cfg, threshold=1.0, **kw)


def _probes(bundle, split) -> dict[str, np.ndarray]:
    src = bundle.splits[split]
    return {r.id: r.probe for i in range(len(src.product_ids)) for r in src.load(i).reviews}


def test_failed_probes_are_counted_warned_and_recorded_in_run_json(synth, tmp_path):
    rids = _train_reviews(synth)
    failed = [rids[1], rids[4]]
    _fail(synth, failed)
    lines: list[str] = []
    bundle = _bundle(synth, required=PROBES, say=lines.append)
    # 2 of the train split's reviews fall back; dev and test have none (recorded as 0, said nothing)
    assert bundle.probe_fallback["train"] == {"reviews": len(rids), "probes_failed": 2, "no_probes_record": 0,
                                              "first_failed": [[failed[0], REASON], [failed[1], REASON]]}
    assert bundle.probe_fallback["dev"]["probes_failed"] == 0 and bundle.probe_fallback["test"]["probes_failed"] == 0
    assert len(lines) == 1 and "\n" not in lines[0]
    assert f"2 of {len(rids)} reviews in split 'train' have no probe mask" in lines[0]
    assert f"probes failed: 2, first {failed[0]!r}: 2 x {REASON}" in lines[0]
    assert "mask of ones, i.e. plain attention" in lines[0]
    # the two reviews read a mask of ones (plain attention), the others their stored masks
    probes = _probes(bundle, "train")
    for rid in failed:
        assert probes[rid].dtype == np.float32 and (probes[rid] == 1).all()
    # the run record carries the count beside dropped_reviews
    cfg = train_config({"model": "length", "epochs": 1, "data": {"roi_dim": 8}})
    Trainer(cfg, bundle, tmp_path / "run").run()
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert "dropped_reviews" in meta
    assert meta["probe_fallback"]["train"]["probes_failed"] == 2
    assert meta["probe_fallback"]["train"]["first_failed"][0] == [failed[0], REASON]


def test_refuse_names_the_first_failed_review_and_its_reason(synth):
    rids = _train_reviews(synth)
    _fail(synth, [rids[1], rids[4]])
    with pytest.raises(DataError) as ei:
        _bundle(synth, dataclasses.replace(synth.data_cfg, probe_failures="refuse"), required=PROBES)
    msg = str(ei.value)
    assert "\n" not in msg and f"review {rids[1]!r}" in msg and REASON in msg and "split 'train'" in msg
    assert "data.probe_failures: ones" in msg and "mrhp extract --dataset synth --stage probes" in msg


def test_refuse_also_guards_a_review_loaded_directly(synth):
    """A source built before a view changed (or by another caller) refuses at load too."""
    rids = _train_reviews(synth)
    bundle = _bundle(synth, dataclasses.replace(synth.data_cfg, probe_failures="refuse"), required=PROBES)
    _fail(synth, [rids[0]])
    src = bundle.splits["train"]
    src._views = None  # reopen: the view now holds the failure
    with pytest.raises(DataError, match=f"review {rids[0]!r} has no probe mask"):
        src.load(0)


def test_without_failures_the_result_is_unchanged_and_nothing_is_said(synth):
    lines: list[str] = []
    default = _bundle(synth, required=PROBES, say=lines.append)
    refused = _bundle(synth, dataclasses.replace(synth.data_cfg, probe_failures="refuse"), required=PROBES,
                      say=lines.append)
    assert lines == []
    assert all(rec["probes_failed"] == 0 and rec["no_probes_record"] == 0 for rec in default.probe_fallback.values())
    for split in default.splits:
        a, b = _probes(default, split), _probes(refused, split)
        mem = {r.id: r.probe for p in synth.bundle.splits[split].products for r in p.reviews}
        assert set(a) == set(mem) and all(np.array_equal(a[k], mem[k]) and np.array_equal(b[k], mem[k]) for k in a)
    # a model that reads no probe masks gets no record
    assert _bundle(synth, required=frozenset({"tokens"})).probe_fallback == {}


def test_a_probes_view_allowed_missing_is_counted_separately(synth):
    FeatureStore(synth.store_root).drop_view("synth", "probes")
    lines: list[str] = []
    bundle = _bundle(synth, required=PROBES, allow_missing=("probes",), say=lines.append)
    n = len(_train_reviews(synth))
    assert bundle.probe_fallback["train"] == {"reviews": n, "probes_failed": 0, "no_probes_record": n,
                                              "first_failed": []}
    assert any(f"{n} of {n} reviews in split 'train'" in line and "no probes record (view allowed missing)" in line
               for line in lines)


def test_probe_fallback_counts_by_hand():
    # 3 failed of 10 (two reasons), 0 without record: the record and one line
    lines: list[str] = []
    rec = probe_fallback("dev", 10, [("a", "r1"), ("b", "r2"), ("c", "r1")], say=lines.append, use="are scored")
    assert rec == {"reviews": 10, "probes_failed": 3, "no_probes_record": 0,
                   "first_failed": [["a", "r1"], ["b", "r2"], ["c", "r1"]]}
    assert lines == ["warning: 3 of 10 reviews in split 'dev' have no probe mask (probes failed: 3, first 'a': "
                     "2 x r1; 1 x r2); they are scored with a mask of ones, i.e. plain attention "
                     "(data.probe_failures: refuse stops instead)"]
    with pytest.raises(DataError, match="review 'a' has no probe mask \\(probes failed: r1\\)"):
        probe_fallback("dev", 10, [("a", "r1")], policy="refuse")
    # refuse with nothing failed passes, and says nothing
    assert probe_fallback("dev", 4, [], policy="refuse", say=lines.append)["probes_failed"] == 0 and len(lines) == 1


def test_probe_failures_is_validated_at_load():
    assert train_config({}).data.probe_failures == "ones"
    assert train_config({"data": {"probe_failures": "refuse"}}).data.probe_failures == "refuse"
    with pytest.raises(ConfigError, match="probe_failures"):
        train_config({"data": {"probe_failures": "zeros"}})


def test_a_multi_line_failure_reason_is_said_on_one_line():
    lines: list[str] = []
    rec = probe_fallback("train", 2, [("a", "ValueError: bad\n  token")], say=lines.append)
    assert rec["first_failed"] == [["a", "ValueError: bad token"]] and "\n" not in lines[0]
    with pytest.raises(DataError) as ei:
        probe_fallback("train", 2, [("a", "ValueError: bad\n  token")], policy="refuse")
    assert "\n" not in str(ei.value) and "probes failed: ValueError: bad token" in str(ei.value)
