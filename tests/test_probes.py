"""SANCL probe masks (REFERENCE.md section 7): keywords, cluster choice, sentence masks, the stage."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from features.text import probes as probes_mod
from features.text.probes import NO_ID_COREF, ProbeMasker, build_stage
from features.text.tokens import encode_texts
from features.text.vocab import OOV, PAD, Vocabulary
from pipeline.errors import StageError
from pipeline.manifest import manifest_from_mapping
from pipeline.records import DatasetRecords, Product, Review

PAN = "Stainless Steel Frying Pan"
PAN_REVIEW = "I bought this pan in Japan. It heats evenly. The handle broke."
#             i bought this pan in japan . | it heats evenly . | the handle broke .
PAN_MASK = [1] * 7 + [1] * 4 + [0] * 4


@pytest.fixture(scope="module")
def script():
    return ProbeMasker(language="en", mode="script", coref="rules")


@pytest.fixture(scope="module")
def paper(script):
    m = ProbeMasker(language="en", mode="paper", coref="rules", near_root=1)
    m._nlp = script.nlp  # one spaCy load per module
    return m


def one(masker, review, name=PAN):
    return masker.masks([review], [name])[0]


@pytest.mark.parametrize("mode", ["script", "paper"])
def test_keyword_sentence_and_its_coreferent_sentence_are_masked(request, mode):
    res = one(request.getfixturevalue(mode), PAN_REVIEW)
    assert res.mask.dtype == np.uint8 and res.mask.tolist() == PAN_MASK
    assert res.meta["keywords"] == ["pan"] and res.meta["cluster_rule"] == "keyword"
    assert res.meta["cluster"] == ["this pan", "It"] and res.meta["masked_sentences"] == [0, 1]


@pytest.mark.parametrize("mode", ["script", "paper"])
def test_keyword_match_is_word_level_so_japan_is_not_pan(request, mode):
    res = one(request.getfixturevalue(mode), "We toured Japan in May. The weather was nice.")
    assert not res.mask.any() and "no sentence mentions the keyword" in res.meta["reason"]


def test_keyword_matches_by_lemma_and_plural(script):
    res = one(script, "Nice shoes overall. Great value. One shoe squeaks.", "Running Shoes for Women")
    assert res.meta["keywords"] == ["shoes"]
    assert res.meta["masked_sentences"] == [0, 2]


def test_script_keyword_is_the_root_lemma_only(script):
    assert script.keywords([PAN])[0].words == ("pan",)
    assert script.keywords(["Levi's Men's 505 Regular Fit Jeans"])[0].words == ("jeans",)
    assert script.keywords(["Folding Camping Chair"])[0].words == ("chair",)  # gerund read as the verb
    # attributes after a comma are not parsed (the parser would take "Quart" as the root)
    assert script.keywords(["Stainless Steel Saucepan with Lid, 2 Quart"])[0].words == ("saucepan",)


def test_paper_keywords_are_the_nouns_near_the_root(script):
    near2 = ProbeMasker(mode="paper", near_root=2)
    near2._nlp = script.nlp
    assert near2.keywords([PAN])[0].words == ("steel", "pan")
    assert near2.keywords(["Levi's Men's 505 Regular Fit Jeans"])[0].words == ("regular", "fit", "jeans")


def test_script_falls_back_to_the_first_cluster_when_none_holds_the_keyword(script):
    res = one(script, "My husband wanted one. He loves it. Shipping was slow.")
    assert res.meta["cluster_rule"] == "first" and res.meta["cluster"] == ["My husband", "He"]
    assert res.meta["masked_sentences"] == [0, 1]


def test_cluster_holding_the_keyword_wins_over_earlier_clusters(script):
    res = one(script, "I love my wife. She bought this pan. It is great.")
    assert res.meta["cluster"] == ["this pan", "It"] and res.meta["masked_sentences"] == [1, 2]


def test_product_name_without_a_noun_gives_script_a_root_and_paper_nothing(script, paper):
    assert one(script, "Very soft and very warm. Love it.", "super soft and warm").mask.any()
    res = one(paper, "Very soft and very warm. Love it.", "super soft and warm")
    assert not res.mask.any() and res.meta["reason"].startswith("no noun within 1 arc")


@pytest.mark.parametrize("review", [
    "", "   \n\t ", "😀😀😀 !!! ...", "Great pan. " + "a" * 100_000 + " It broke.",
    b"Bad \xff\xfe bytes in this pan".decode("utf-8", "surrogateescape"),
    "This pan es muy bueno. 这个锅很好. It works.",
])
@pytest.mark.parametrize("name", [PAN, "", "!!!", "12345"])
def test_bad_input_yields_a_mask_over_every_raw_token(script, review, name):
    res = one(script, review, name)
    n_raw = encode_texts([review], Vocabulary(words=(PAD, OOV), drop_unknown=True), language="en")[0].n_raw
    assert res.mask.shape == (n_raw,) and res.mask.dtype == np.uint8
    if not res.mask.any():
        assert res.meta["reason"]


@pytest.mark.slow
def test_a_100k_character_review_of_real_sentences_is_masked_whole(script):
    res = one(script, "The pan is great. " * 5600)
    assert res.mask.shape == (28000,) and res.mask.all()


def test_mask_aligns_with_token_positions(script):
    review = "Love this pan!  Heats   evenly.\nIt was cheap."
    res = one(script, review)
    assert len(res.mask) == encode_texts([review], Vocabulary(words=(PAD, OOV), drop_unknown=False), language="en")[0].n_raw


class FlakyNlp:
    """The real pipeline, except that it raises on any text containing BOOM."""

    def __init__(self, nlp):
        self.nlp = nlp
        self.pipe_names = nlp.pipe_names

    def get_pipe(self, name):
        return self.nlp.get_pipe(name)

    def make_doc(self, text):
        return self.nlp.make_doc(text)

    def __call__(self, text):
        if "BOOM" in text:
            raise ValueError("cannot parse this text")
        return self.nlp(text)

    def pipe(self, texts, **kw):
        for t in texts:
            yield self(t)


def test_a_text_the_parser_fails_on_fails_alone_and_the_stage_records_it(tmp_path, script):
    m = ProbeMasker()
    m._nlp = FlakyNlp(script.nlp)
    out = m.masks(["Good pan.", "BOOM it went.", PAN_REVIEW], [PAN] * 3)
    assert isinstance(out[1], ValueError)
    assert out[0].mask.tolist() == [1, 1, 1] and out[2].mask.tolist() == PAN_MASK
    recs = records()
    recs.reviews.append(Review(id="boom", product_id="p1", text="BOOM it went.", label=0, split="test"))
    stage = build_stage(manifest(tmp_path), "toy", records=recs)
    stage.masker._nlp = FlakyNlp(script.nlp)
    plan = stage.plan()
    got = {r.key: r for r in stage.run(list(plan.items.values()))}
    assert got[plan.view["rvw:boom"]].failure == "probe mask failed: ValueError: cannot parse this text"
    assert sum(r.ok for r in got.values()) == len(got) - 1


def test_indonesian_masks_keyword_sentences_and_records_why_no_coreference():
    m = ProbeMasker(language="id", mode="script", coref="rules")
    res = m.masks(["Wajan ini bagus sekali. Pengiriman cepat. Wajannya tidak lengket."], ["Wajan Anti Lengket 24cm"])[0]
    assert res.meta["keywords"] == ["wajan"] and res.meta["coref"] == NO_ID_COREF
    assert res.meta["masked_sentences"] == [0]
    assert res.mask.tolist() == [1] * 5 + [0] * 3 + [0] * 4


def test_coref_none_uses_keyword_sentences_only(script):
    m = ProbeMasker(coref="none")
    m._nlp = script.nlp
    res = one(m, PAN_REVIEW)
    assert res.mask.tolist() == [1] * 7 + [0] * 8 and "disabled" in res.meta["coref"]


def test_invalid_settings_are_stage_errors():
    with pytest.raises(StageError, match="'both'"):
        ProbeMasker(mode="both")
    with pytest.raises(StageError, match="near_root"):
        ProbeMasker(near_root=-1)


# -- the stage -----------------------------------------------------------------------------------


def manifest(tmp_path: Path, probes: dict | None = None, language: str = "en"):
    data = {
        "version": 1,
        "roots": {"data": ".", "resources": ".", "store": "store"},
        "datasets": {"toy": {
            "raw_root": "raw", "image_root": "pics", "categories": ["home"], "language": language,
            "word_vectors": "wv",
        }},
        "resources": {"word_vectors": {"wv": {"format": "kumo"}}, "detectors": {"bua-r101-c4": {}}},
        "stages": {"probes": probes or {"mode": "script", "coref": "rules"}},
    }
    return manifest_from_mapping(data, tmp_path / "data_manifest.yaml")


def records() -> DatasetRecords:
    prd = {"p1": Product(id="p1", name=PAN, description="", text=PAN, split="train"),
           "p2": Product(id="p2", name="Cast Iron Skillet", description="", text="Cast Iron Skillet", split="test")}
    rv = [Review(id=f"r{i}", product_id="p1", text=PAN_REVIEW if i == 0 else f"Review {i} of this pan.", label=0, split="train")
          for i in range(5)]
    rv.append(Review(id="s1", product_id="p2", text=PAN_REVIEW, label=0, split="test"))  # same text, other product
    rv.append(Review(id="x1", product_id="gone", text="Orphan review.", label=0, split="test"))
    return DatasetRecords(name="toy", products=prd, reviews=rv)


def test_stage_plans_one_item_per_review_and_product_pair_and_writes_masks(tmp_path, script, monkeypatch):
    stage = build_stage(manifest(tmp_path), "toy", records=records())
    stage.masker._nlp = script.nlp
    plan = stage.plan()
    assert set(plan.view) == {"rvw:r0", "rvw:r1", "rvw:r2", "rvw:r3", "rvw:r4", "rvw:s1", "rvw:x1"}
    assert plan.view["rvw:s1"] != plan.view["rvw:r0"]  # the product name is part of the key
    parsed = []
    real = probes_mod.english_keywords
    monkeypatch.setattr(probes_mod, "english_keywords", lambda doc, *a, **k: parsed.append(doc.text) or real(doc, *a, **k))
    items = list(plan.items.values())
    recs = {r.key: r for r in stage.run(items[:4])} | {r.key: r for r in stage.run(items[4:])}
    assert sorted(parsed) == ["", "Cast Iron Skillet.", f"{PAN}."]  # each distinct name parsed once
    assert recs[plan.view["rvw:r0"]].arrays["mask"].tolist() == PAN_MASK
    skillet = recs[plan.view["rvw:s1"]]
    assert skillet.meta["keywords"] == ["skillet"] and skillet.meta["cluster_rule"] == "first"
    orphan = recs[plan.view["rvw:x1"]]
    assert orphan.ok and not orphan.arrays["mask"].any() and orphan.meta["reason"] == "empty product name"


def test_fingerprint_and_keys_follow_mode_but_not_batching(tmp_path):
    fp = lambda probes: build_stage(manifest(tmp_path, probes), "toy", records=records()).fingerprint()  # noqa: E731
    base = fp({"mode": "script"})
    assert fp({"mode": "script", "batch_size": 7, "n_process": 2}) == base
    assert fp({"mode": "script", "near_root": 3}) == base  # near_root only matters in paper mode
    assert fp({"mode": "paper"}) != base and fp({"mode": "paper", "near_root": 2}) != fp({"mode": "paper"})
    assert fp({"coref": "none"}) != base


def test_neuralcoref_without_its_environment_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("MRHP_NEURALCOREF_ENV", str(tmp_path / "missing"))
    stage = build_stage(manifest(tmp_path, {"coref": "neuralcoref"}), "toy", records=records())
    with pytest.raises(StageError, match="make neuralcoref-env"):
        stage.plan()
