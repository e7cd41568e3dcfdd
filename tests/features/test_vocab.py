"""Vocabularies (REFERENCE.md section 3) and the tokens stage that stores ids per text field."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from features.text import vocab as vocab_mod
from features.text.tokens import build_stage, encode_texts, load_vocabularies
from features.text.vocab import OOV, OOV_ID, PAD, Vocabulary, fit_vocabularies, fit_vocabulary, read_vocabularies
from pipeline.errors import StageError, StoreError
from pipeline.manifest import manifest_from_mapping
from pipeline.params import TokensParams
from pipeline.records import DatasetRecords, Product, Review


def manifest(tmp_path: Path, tokens: dict | None = None, language: str = "en"):
    data = {
        "version": 1,
        "roots": {"data": ".", "resources": ".", "store": "store"},
        "datasets": {"toy": {
            "raw_root": "raw", "image_root": "pics", "categories": ["home"], "language": language,
            "word_vectors": "glove",
        }},
        "resources": {
            "word_vectors": {"glove": {"format": "glove", "path": "glove.txt"}},
            "detectors": {"bua-r101-c4": {}},
        },
        "stages": {"tokens": tokens or {"mode": "mcr", "min_freq": 2, "max_len": 128}},
    }
    return manifest_from_mapping(data, tmp_path / "data_manifest.yaml")


def records(extra_review: str = "") -> DatasetRecords:
    prd = {
        "p1": Product(
            id="p1", name="Steel Pan", description="a steel pan", text="Steel Pan a steel pan", split="train"
        ),
        "p2": Product(id="p2", name="Steel Pot", description="steel", text="Steel Pot steel", split="train"),
        "p3": Product(id="p3", name="Wok", description="unseen words", text="Wok unseen words", split="test"),
    }
    rv = [
        Review(id="r1", product_id="p1", text="great pan , great price", label=1, split="train"),
        Review(id="r2", product_id="p1", text="great pan", label=0, split="train"),
        Review(id="r3", product_id="p2", text="pan pot " + extra_review, label=2, split="train"),
        Review(id="r4", product_id="p3", text="great wok wok wok wok", label=1, split="test"),
        Review(id="r5", product_id="p3", text="great pan", label=0, split="test"),  # same text as r2
    ]
    return DatasetRecords(name="toy", products=prd, reviews=rv)


def test_mcr_vocabulary_keeps_train_terms_at_min_freq_sorted_after_pad_and_oov():
    v = fit_vocabulary([["b", "a", "b", "c"], ["a", "b", "d"]], mode="mcr", min_freq=2)
    assert v.words == (PAD, OOV, "a", "b")


def test_mcr_mode_deletes_rare_and_unknown_tokens_instead_of_mapping_them_to_oov():
    v = Vocabulary(words=(PAD, OOV, "a", "b"), drop_unknown=True)
    ids, pos = v.encode(["x", "a", "y", "b", "a"], max_len=128)
    assert ids.tolist() == [2, 3, 2] and pos.tolist() == [1, 3, 4]
    assert OOV_ID not in ids and ids.dtype == np.int32 and pos.dtype == np.int32


def test_max_len_counts_kept_tokens_after_deletion():
    v = Vocabulary(words=(PAD, OOV, "a"), drop_unknown=True)
    ids, pos = v.encode(["x", "a"] * 200, max_len=128)
    assert len(ids) == 128 and pos[-1] == 2 * 128 - 1


def test_standard_mode_maps_unknown_to_oov_and_limits_by_frequency():
    v = fit_vocabulary([["a", "b", "b", "c", "c", "c", "d"]], mode="standard", min_freq=1, max_vocab=4)
    assert v.words == (PAD, OOV, "c", "b")  # most frequent first; 4 ids in all
    ids, pos = v.encode(["c", "z", "b"], max_len=2)
    assert ids.tolist() == [2, OOV_ID] and pos.tolist() == [0, 1]


def test_unknown_mode_is_rejected():
    with pytest.raises(StageError, match="'bpe'"):
        fit_vocabulary([], mode="bpe", min_freq=1)


def test_product_and_review_vocabularies_are_fit_separately_on_train_only(tmp_path):
    m = manifest(tmp_path)
    stage = build_stage(m, "toy", records=records())
    stage.plan()
    v = stage.vocabularies
    assert v.prd.words == (PAD, OOV, "pan", "steel")  # "wok"/"unseen" are test-only
    assert v.rvw.words == (PAD, OOV, "great", "pan")  # "wok" x4 in test does not count
    assert v.prd is not v.rvw


def test_standard_mode_shares_one_vocabulary_between_fields(tmp_path):
    m = manifest(tmp_path, {"mode": "standard", "min_freq": 2})
    stage = build_stage(m, "toy", records=records())
    stage.plan()
    assert stage.vocabularies.prd is stage.vocabularies.rvw
    assert set(stage.vocabularies.prd.words[2:]) == {"great", "pan", "pot", "steel"}


def test_stage_run_writes_ids_pos_and_raw_count_per_view_item(tmp_path):
    m = manifest(tmp_path)
    stage = build_stage(m, "toy", records=records())
    plan = stage.plan()
    assert set(plan.view) == {"prd:p1", "prd:p2", "prd:p3", "rvw:r1", "rvw:r2", "rvw:r3", "rvw:r4", "rvw:r5"}
    assert plan.view["rvw:r2"] == plan.view["rvw:r5"]  # one text, one item
    assert len(plan.items) == 7
    out = {r.key: r for r in stage.run(list(plan.items.values()))}
    r4 = out[plan.view["rvw:r4"]].arrays
    assert r4["ids"].tolist() == [2] and r4["pos"].tolist() == [0] and int(r4["n_raw"]) == 5
    p3 = out[plan.view["prd:p3"]]
    assert p3.arrays["ids"].size == 0 and int(p3.arrays["n_raw"]) == 3
    assert p3.meta["reason"] == "no token of the text is in the vocabulary"
    for rec in out.values():
        assert set(rec.arrays) == set(stage.schema) and rec.ok


def test_unchanged_texts_keep_their_keys_and_a_changed_vocabulary_changes_them(tmp_path):
    m = manifest(tmp_path)
    first = build_stage(m, "toy", records=records()).plan()
    assert build_stage(m, "toy", records=records()).plan().view == first.view
    # A train text changes but the vocabulary does not: every other item keeps its key.
    same_vocab = build_stage(m, "toy", records=records(extra_review="great great")).plan()
    assert same_vocab.view["rvw:r1"] == first.view["rvw:r1"]
    assert same_vocab.view["rvw:r3"] != first.view["rvw:r3"]
    # "pot" reaches min_freq: new review vocabulary, so review ids are recomputed.
    new_vocab = build_stage(m, "toy", records=records(extra_review="pot")).plan()
    assert new_vocab.view["rvw:r1"] != first.view["rvw:r1"]
    assert new_vocab.view["prd:p1"] == first.view["prd:p1"]  # product vocabulary unchanged
    # The vocabulary is in the keys, not in the stage fingerprint.
    assert build_stage(m, "toy", records=records()).fingerprint() == build_stage(
        m, "toy", records=records(extra_review="pot")).fingerprint()


def test_rerun_reuses_the_cached_fit_without_tokenizing_train_texts(tmp_path, monkeypatch):
    m = manifest(tmp_path)
    build_stage(m, "toy", records=records()).plan()

    def boom(*a, **k):
        raise AssertionError("refit")

    monkeypatch.setattr(vocab_mod, "tokenize", boom)
    stage = build_stage(m, "toy", records=records())
    stage.plan()
    assert stage.vocabularies.path == tmp_path / "store" / "vocab" / stage.vocabularies.fingerprint
    assert (stage.vocabularies.path / "prd.txt").read_text().split("\n")[:3] == [PAD, OOV, "pan"]


def test_saved_vocabularies_load_by_fingerprint_and_detect_edits(tmp_path):
    m = manifest(tmp_path)
    stage = build_stage(m, "toy", records=records())
    stage.plan()
    fp = stage.vocabularies.fingerprint
    prd, rvw = load_vocabularies(m, "toy", fingerprint=fp)
    assert prd.words == stage.vocabularies.prd.words and rvw.words == stage.vocabularies.rvw.words
    (stage.vocabularies.path / "rvw.txt").write_text(f"{PAD}\n{OOV}\nzzz\n")
    with pytest.raises(StoreError, match="altered"):
        read_vocabularies(tmp_path / "store", fp)
    with pytest.raises(StoreError, match="not readable"):
        read_vocabularies(tmp_path / "store", "0" * 16)


def test_run_in_a_fresh_stage_reads_the_planned_vocabulary_from_the_store(tmp_path):
    m = manifest(tmp_path)
    plan = build_stage(m, "toy", records=records()).plan()
    fresh = build_stage(m, "toy", records=records())  # as in another worker process: no plan()
    recs = list(fresh.run([plan.items[plan.view["rvw:r1"]]]))
    assert recs[0].arrays["ids"].tolist() == [2, 3, 2]


def test_encode_texts_matches_the_stage_for_new_texts(tmp_path):
    m = manifest(tmp_path)
    stage = build_stage(m, "toy", records=records())
    stage.plan()
    enc = encode_texts(["Great PAN, great!", ""], stage.vocabularies.rvw, language="en")
    assert enc[0].ids.tolist() == [2, 3, 2] and enc[0].pos.tolist() == [0, 1, 3] and enc[0].n_raw == 5
    assert enc[1].ids.size == 0 and enc[1].n_raw == 0


def test_bad_texts_still_get_token_records(tmp_path):
    m = manifest(tmp_path)
    recs = records()
    bad = ["", "   ", "😀 !!!", "x" * 100_000, b"caf\xff".decode("utf-8", "surrogateescape"), "pan 很好 great"]
    for i, t in enumerate(bad):
        recs.reviews.append(Review(id=f"b{i}", product_id="p3", text=t, label=0, split="test"))
    stage = build_stage(m, "toy", records=recs)
    plan = stage.plan()
    out = {r.key: r for r in stage.run(list(plan.items.values()))}
    assert all(r.ok for r in out.values())
    assert out[plan.view["rvw:b0"]].meta["reason"].startswith("empty text")
    assert out[plan.view["rvw:b5"]].arrays["ids"].tolist() == [3, 2]


def test_no_train_texts_is_a_stage_error(tmp_path):
    with pytest.raises(StageError, match="no train texts"):
        fit_vocabularies([], [], language="en", params=TokensParams(), dataset="toy")


def test_invalid_params_are_stage_errors(tmp_path):
    with pytest.raises(StageError, match="max_len"):
        build_stage(manifest(tmp_path, {"max_len": 0}), "toy", records=records())


def test_indonesian_dataset_tokenizes_with_the_blank_pipeline(tmp_path):
    m = manifest(tmp_path, language="id")
    recs = records()
    stage = build_stage(m, "toy", records=recs)
    plan = stage.plan()
    assert stage.vocabularies.rvw.words == (PAD, OOV, "great", "pan")
    assert len(list(stage.run(list(plan.items.values())))) == len(plan.items)
