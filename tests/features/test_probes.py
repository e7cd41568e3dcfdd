"""SANCL probe masks: Algorithm 1 (paper mode), gen_amazon.py's rules (script mode), Indonesian
keywords and clitics, the stage. Expected masks are worked out by hand in the comments."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from features.text import probes as probes_mod
from features.text.keywords import Keywords, strip_clitics
from features.text.probes import (
    ID_COREF,
    ProbeMasker,
    algorithm1,
    build_stage,
    script_rule,
    script_sentence_starts,
    sentence_index,
)
from features.text.tokens import encode_texts
from features.text.vocab import OOV, PAD, Vocabulary
from pipeline.errors import StageError
from pipeline.manifest import manifest_from_mapping
from pipeline.records import DatasetRecords, Product, Review

PAN = "Stainless Steel Frying Pan"
PAN_REVIEW = "I bought this pan in Japan. It heats evenly. The handle broke."
#             i bought this pan in japan . | it heats evenly . | the handle broke .
PAN_MASK = [1] * 7 + [1] * 4 + [0] * 4

# Three sentences of four tokens: tokens 0-3 | 4-7 | 8-11.
STARTS = [0, 4, 8]
ONES, ZEROS = [1] * 4, [0] * 4


# -- Algorithm 1 on token indices: the three resolution cases ----------------------------------


def test_sentence_index_from_sentence_starts():
    assert sentence_index(STARTS, 12).tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert sentence_index([], 0).tolist() == []


def test_algorithm1_case1_the_cluster_holding_a_core_word_is_gold():
    # cluster 0 = {0, 5} (no core word), cluster 1 = {2, 9}; token 9 is a core word
    # -> gold = cluster 1 -> its mentions sit in sentences 0 (token 2) and 2 (token 9).
    mask, info = algorithm1(12, STARTS, [[(0, 1), (5, 6)], [(2, 3), (9, 10)]], lambda i: i == 9)
    assert mask.astype(int).tolist() == ONES + ZEROS + ONES
    assert info == {"cluster_rule": "core-word", "gold": 1}


def test_algorithm1_loop_has_no_break_so_the_last_core_word_cluster_wins():
    # "foreach c in clusters: if any w in W in c then gold_cluster = c" with no break:
    # clusters 0 = {0, 1} and 1 = {5, 6} both hold a core word (tokens 0 and 6) -> gold = 1,
    # whose mentions are all in sentence 1.
    mask, info = algorithm1(12, STARTS, [[(0, 1), (1, 2)], [(5, 6), (6, 7)]], lambda i: i in (0, 6))
    assert mask.astype(int).tolist() == ZEROS + ONES + ZEROS and info["gold"] == 1


def test_algorithm1_case2_no_core_word_in_any_cluster_takes_clusters0():
    # cluster 0 = {4, 6} (sentence 1), cluster 1 = {8, 10} (sentence 2); no core word anywhere
    mask, info = algorithm1(12, STARTS, [[(4, 5), (6, 7)], [(8, 9), (10, 11)]], lambda i: False)
    assert mask.astype(int).tolist() == ZEROS + ONES + ZEROS
    assert info == {"cluster_rule": "first", "gold": 0}


def test_algorithm1_case3_no_cluster_gives_zeros_even_when_the_core_word_occurs():
    mask, info = algorithm1(12, STARTS, [], lambda i: True)
    assert mask.astype(int).tolist() == [0] * 12 and info["gold"] is None


def test_algorithm1_a_mention_across_a_sentence_boundary_marks_both_sentences():
    # mention (3, 5) covers token 3 (sentence 0) and token 4 (sentence 1)
    mask, _ = algorithm1(12, STARTS, [[(3, 5), (10, 11)]], lambda i: False)
    assert mask.astype(int).tolist() == ONES + ONES + ONES


# -- gen_amazon.py's rules on token indices -------------------------------------------------------


def test_script_sentencizer_is_spacy21s_rule():
    words = ["great", "pan", ".", "it", "works", "!", "!", '"', "ok", "?", "e.g", "end"]
    punct = [False, False, True, False, False, True, True, True, False, True, False, False]
    # after "." -> "it" starts (3); "!" "!" '"' are punctuation, so "ok" starts (8); "?" -> "e.g" (10)
    assert script_sentence_starts(words, punct) == [0, 3, 8, 10]
    assert script_sentence_starts([], []) == []


def test_script_rule_always_takes_clusters0_and_the_first_token_of_each_mention():
    # clusters[0] = {(3, 5), (9, 10)}: mention (3, 5) starts in sentence 0 (its token 4, in
    # sentence 1, is not looked at), (9, 10) is in sentence 2. Cluster 1 holds the keyword but
    # the script never looks at it. Keyword sentences: none.
    mask, info = script_rule(12, STARTS, [[(3, 5), (9, 10)], [(5, 6), (6, 7)]], [])
    assert mask.astype(int).tolist() == ONES + ZEROS + ONES and info["gold"] == 0


def test_script_rule_is_the_union_of_cluster_and_keyword_sentences():
    mask, _ = script_rule(12, STARTS, [[(0, 1), (2, 3)]], [2])
    assert mask.astype(int).tolist() == ONES + ZEROS + ONES
    mask, info = script_rule(12, STARTS, [], [1])  # no cluster: keyword sentences only
    assert mask.astype(int).tolist() == ZEROS + ONES + ZEROS and info["gold"] is None


# -- the masker on parsed English reviews -------------------------------------------------------


@pytest.fixture(scope="module")
def paper():
    return ProbeMasker(language="en", mode="paper", coref="rules")


@pytest.fixture(scope="module")
def script(paper):
    m = ProbeMasker(language="en", mode="script", coref="rules")
    m._nlp = paper.nlp  # one spaCy load per module
    return m


def with_nlp(masker, nlp):
    masker._nlp = nlp
    return masker


def one(masker, review, name=PAN):
    return masker.masks([review], [name])[0]


WIFE = "I love my wife. She bought this skillet. It is great."
#       i love my wife . (5) | she bought this skillet . (5) | it is great . (4)
# rules clusters, by first mention: [my wife, She], [this skillet, It]


def test_paper_mode_masks_the_core_word_clusters_sentences(paper):
    # core words of "Cast Iron Skillet." near the root: cast, iron, skillet; the cluster
    # [this skillet, It] holds one -> sentences 1 and 2.
    res = one(paper, WIFE, "Cast Iron Skillet")
    assert res.mask.dtype == np.uint8 and res.mask.tolist() == [0] * 5 + [1] * 5 + [1] * 4
    assert res.meta["cluster_rule"] == "core-word" and res.meta["cluster"] == ["this skillet", "It"]


def test_script_mode_on_the_same_review_takes_clusters0_plus_the_substring_sentence(script):
    # root lemma of "Cast Iron Skillet": "skillet"; clusters[0] = [my wife, She] -> sentences 0, 1;
    # "skillet" in "she bought this skillet ." -> sentence 1; union {0, 1}.
    res = one(script, WIFE, "Cast Iron Skillet")
    assert res.meta["keywords"] == ["skillet"] and res.meta["keyword_sentences"] == [1]
    assert res.meta["cluster"] == ["my wife", "She"] and res.mask.tolist() == [1] * 10 + [0] * 4


def test_paper_mode_without_a_cluster_is_all_zero_even_when_the_product_is_named(paper):
    res = one(paper, "We toured Japan in May. The pan was nice.", "Pan")
    assert not res.mask.any() and "no coreference cluster" in res.meta["reason"]


def test_script_substring_test_matches_japan_and_the_word_test_does_not(script):
    # keyword "pan" (root of "Pan"); "we toured japan in may ." contains "pan" as a substring
    res = one(script, "We toured Japan in May. The weather was nice.", "Pan")
    assert res.mask.tolist() == [1] * 6 + [0] * 5 and res.meta["keyword_test"] == "substring"
    word = with_nlp(ProbeMasker(mode="script", coref="rules", keyword_test="word"), script.nlp)
    res = one(word, "We toured Japan in May. The weather was nice.", "Pan")
    assert not res.mask.any() and res.meta["reason"]


def test_script_keyword_is_the_first_roots_lemma_of_the_whole_name(script):
    # gen_amazon.py's find_root: no comma trimming, no noun fallback: with this parser
    # "Frying" is the root of "Stainless Steel Frying Pan" and its lemma is "fry".
    doc = script.nlp(PAN)
    root = next(t for t in doc if t.head.i == t.i)
    assert script.keywords([PAN])[0].words == (root.lemma_.lower(),)
    assert script.keywords(["Cast Iron Skillet"])[0].words == ("skillet",)
    assert script.keywords([""])[0].words == ()


def test_paper_keywords_are_the_nouns_near_the_root(paper):
    assert paper.keywords([PAN])[0].words == ("pan",)
    near2 = with_nlp(ProbeMasker(mode="paper", coref="rules", near_root=2), paper.nlp)
    assert near2.keywords([PAN])[0].words == ("steel", "pan")
    # attributes after a comma are not parsed (the parser would take "Quart" as the root)
    assert paper.keywords(["Stainless Steel Saucepan with Lid, 2 Quart"])[0].words[-1] == "saucepan"


def test_word_level_match_is_by_lemma_so_japan_is_not_pan(paper):
    kw = paper.keywords(["Running Shoes for Women"])[0]
    doc = paper.nlp("One shoe squeaks in Japan.")
    assert [t.text for t in doc if kw.matches(t)] == ["shoe"]
    assert not any(paper.keywords([PAN])[0].matches(t) for t in doc)


def test_keyword_sentence_and_its_coreferent_sentence_are_masked_in_both_modes(paper, script):
    assert one(paper, PAN_REVIEW).mask.tolist() == PAN_MASK  # [this pan, It] holds "pan"
    assert one(script, PAN_REVIEW).mask.tolist() == PAN_MASK  # clusters[0] is the same one


@pytest.mark.parametrize("review", [
    "", "   \n\t ", "😀😀😀 !!! ...", "Great pan. " + "a" * 100_000 + " It broke.",
    b"Bad \xff\xfe bytes in this pan".decode("utf-8", "surrogateescape"),
    "This pan es muy bueno. 这个锅很好. It works.",
])
@pytest.mark.parametrize("name", [PAN, "", "!!!"])
@pytest.mark.parametrize("mode", ["paper", "script"])
def test_bad_input_yields_a_mask_over_every_raw_token(request, review, name, mode):
    res = one(request.getfixturevalue(mode), review, name)
    n_raw = encode_texts([review], Vocabulary(words=(PAD, OOV), drop_unknown=True), language="en")[0].n_raw
    assert res.mask.shape == (n_raw,) and res.mask.dtype == np.uint8
    if not res.mask.any():
        assert res.meta["reason"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["paper", "script"])
def test_a_100k_character_review_of_real_sentences_is_masked_whole(request, mode):
    # every "The pan" is a mention of the product chain: one cluster holding the core word
    res = one(request.getfixturevalue(mode), "The pan is great. " * 5600)
    assert res.mask.shape == (28000,) and res.mask.all()


def test_mask_aligns_with_token_positions(paper):
    review = "Love this pan!  Heats   evenly.\nIt was cheap."
    res = one(paper, review)
    assert (
        len(res.mask)
        == encode_texts([review], Vocabulary(words=(PAD, OOV), drop_unknown=False), language="en")[0].n_raw
    )


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


def test_a_text_the_parser_fails_on_fails_alone_and_the_stage_records_it(tmp_path, paper):
    m = with_nlp(ProbeMasker(coref="rules"), FlakyNlp(paper.nlp))
    out = m.masks(["Good pan. It works.", "BOOM it went.", PAN_REVIEW], [PAN] * 3)
    assert isinstance(out[1], ValueError)
    assert out[0].mask.tolist() == [1] * 6 and out[2].mask.tolist() == PAN_MASK
    recs = records()
    recs.reviews.append(Review(id="boom", product_id="p1", text="BOOM it went.", label=0, split="test"))
    stage = build_stage(manifest(tmp_path), "toy", records=recs)
    stage.masker._nlp = FlakyNlp(paper.nlp)
    plan = stage.plan()
    got = {r.key: r for r in stage.run(list(plan.items.values()))}
    assert got[plan.view["rvw:boom"]].failure == "probe mask failed: ValueError: cannot parse this text"
    assert sum(r.ok for r in got.values()) == len(got) - 1


def test_script_with_coref_none_uses_keyword_sentences_only(script):
    m = with_nlp(ProbeMasker(mode="script", coref="none"), script.nlp)
    res = one(m, "Great skillet. It is heavy.", "Cast Iron Skillet")
    assert res.mask.tolist() == [1] * 3 + [0] * 4 and res.meta["coref"] == "none"


def test_invalid_settings_are_stage_errors():
    with pytest.raises(StageError, match="'both'"):
        ProbeMasker(mode="both")
    with pytest.raises(StageError, match="near_root"):
        ProbeMasker(near_root=-1)
    with pytest.raises(StageError, match="'fuzzy'"):
        ProbeMasker(keyword_test="fuzzy")
    with pytest.raises(StageError, match="all-zero mask"):  # Algorithm 1 without clusters
        ProbeMasker(mode="paper", coref="none")


# -- Indonesian ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def id_paper():
    return ProbeMasker(language="id", mode="paper", coref="auto")


def test_strip_clitics():
    assert strip_clitics("celananya") == "celana"
    assert strip_clitics("bajunyalah") == "baju"  # particle, then -nya
    assert strip_clitics("sepatupun") == "sepatu" and strip_clitics("tasnya") == "tas"
    assert strip_clitics("apakah") == "apa"
    assert strip_clitics("punya") == "punya" and strip_clitics("hanya") == "hanya"  # stem < 3 letters


@pytest.mark.parametrize("name, brands, head", [
    ("Aerostreet Sepatu Sneakers Pria Hitam 39-43", (), "sepatu"),  # brand first, then the head
    ("Mooimom Celana Hamil Maternity Pants", (), "celana"),
    ("MOOIMOM celana panjang", (), "celana"),
    ("Xiaomi Redmi Note 9 Smartphone 4GB/64GB", (), "smartphone"),
    ("Wajan Anti Lengket 24cm", (), "wajan"),
    ("Kaos Polos Pria Cotton Combed 30s", (), "kaos"),
    ("Guling Bantal Kapuk", ("Guling",), "bantal"),  # the product's brand is never its keyword
    ("Guling Zzz", ("Guling",), "zzz"),
    ("Hitam Aerostreet kanvas", (), "kanvas"),  # no lexicon noun: a lowercase unknown word
])
def test_indonesian_keyword_is_the_head_noun_skipping_brands(id_paper, name, brands, head):
    kw = id_paper.keywords([name], [brands])[0]
    assert kw.words[0] == head


def test_indonesian_paper_mode_adds_lexicon_nouns_right_of_the_head():
    m = ProbeMasker(language="id", mode="paper", near_root=2)
    assert m.keywords(["Aerostreet Sepatu Sneakers Pria"])[0].words == ("sepatu", "sneakers")


def test_indonesian_clitics_match_and_the_keyword_mentions_are_the_cluster(id_paper):
    # celananya bagus . (3) | pengiriman cepat . (3) | bahan celana adem . (4)
    review = "Celananya bagus. Pengiriman cepat. Bahan celana adem."
    res = id_paper.masks([review], ["Mooimom Celana Hamil"])[0]
    assert res.meta["keywords"] == ["celana"] and res.meta["coref"] == ID_COREF
    assert res.meta["cluster"] == ["Celananya", "celana"]
    assert res.mask.tolist() == [1, 1, 1] + [0, 0, 0] + [1, 1, 1, 1]


def test_indonesian_glued_punctuation_and_emoji_do_not_hide_the_keyword(id_paper):
    # bagus banget . | celananya adem 😍 👍🏻 pengiriman lama  (3 + 6 tokens)
    # "banget.celananya" splits (glued, it would be one token matching nothing); the emoji and
    # its skin tone are one token, split from "adem"; the first sentence ends after ".".
    review = "Bagus banget.celananya adem😍👍🏻 Pengiriman lama"
    res = id_paper.masks([review], ["Mooimom Celana Hamil"])[0]
    assert res.meta["cluster"] == ["celananya"]
    assert res.mask.tolist() == [0, 0, 0] + [1] * 6


def test_indonesian_script_substring_test_also_finds_clitic_forms():
    m = ProbeMasker(language="id", mode="script")
    res = m.masks(["Pengiriman cepat. Bajunya pas."], ["Baju Muslim Pria"])[0]
    assert res.mask.tolist() == [0, 0, 0, 1, 1, 1]


def test_indonesian_keyword_in_no_sentence_is_zero_with_a_reason(id_paper):
    res = id_paper.masks(["Pengiriman cepat, penjual ramah."], ["Wajan Anti Lengket"])[0]
    assert not res.mask.any() and res.meta["reason"] == "no mention of the keyword ['wajan']"


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
        "stages": {"probes": probes or {"mode": "paper", "coref": "rules"}},
    }
    return manifest_from_mapping(data, tmp_path / "data_manifest.yaml")


def records() -> DatasetRecords:
    prd = {"p1": Product(id="p1", name=PAN, description="", text=PAN, split="train"),
           "p2": Product(id="p2", name="Cast Iron Skillet", description="", text="Cast Iron Skillet", split="test")}
    rv = [
        Review(
            id=f"r{i}",
            product_id="p1",
            text=PAN_REVIEW if i == 0 else f"Review {i} of this pan.",
            label=0,
            split="train",
        )
        for i in range(5)
    ]
    rv.append(Review(id="s1", product_id="p2", text=PAN_REVIEW, label=0, split="test"))  # same text, other product
    rv.append(Review(id="x1", product_id="gone", text="Orphan review.", label=0, split="test"))
    return DatasetRecords(name="toy", products=prd, reviews=rv)


def test_stage_plans_one_item_per_review_and_product_pair_and_writes_masks(tmp_path, paper, monkeypatch):
    stage = build_stage(manifest(tmp_path), "toy", records=records())
    stage.masker._nlp = paper.nlp
    plan = stage.plan()
    assert set(plan.view) == {"rvw:r0", "rvw:r1", "rvw:r2", "rvw:r3", "rvw:r4", "rvw:s1", "rvw:x1"}
    assert plan.view["rvw:s1"] != plan.view["rvw:r0"]  # the product name is part of the key
    parsed = []
    real = probes_mod.english_keywords
    monkeypatch.setattr(
        probes_mod, "english_keywords", lambda doc, *a, **k: parsed.append(doc.text) or real(doc, *a, **k)
    )
    items = list(plan.items.values())
    recs = {r.key: r for r in stage.run(items[:4])} | {r.key: r for r in stage.run(items[4:])}
    assert sorted(parsed) == ["", "Cast Iron Skillet.", f"{PAN}."]  # each distinct name parsed once
    assert recs[plan.view["rvw:r0"]].arrays["mask"].tolist() == PAN_MASK
    skillet = recs[plan.view["rvw:s1"]]  # [this pan, It] holds no core word of the skillet: case 2
    assert skillet.meta["keywords"] == ["cast", "iron", "skillet"] and skillet.meta["cluster_rule"] == "first"
    assert skillet.arrays["mask"].tolist() == PAN_MASK
    orphan = recs[plan.view["rvw:x1"]]
    assert orphan.ok and not orphan.arrays["mask"].any() and orphan.meta["reason"]


def test_fingerprint_and_keys_follow_what_changes_the_mask(tmp_path):
    fp = lambda probes: build_stage(manifest(tmp_path, probes), "toy", records=records()).fingerprint()  # noqa: E731
    base = fp({"mode": "paper", "coref": "rules"})
    assert fp({"mode": "paper", "coref": "rules", "batch_size": 7, "n_process": 2}) == base
    with pytest.raises(StageError, match="keyword_test"):  # a script-only setting: refused, not ignored
        fp({"mode": "paper", "coref": "rules", "keyword_test": "word"})
    assert fp({"mode": "paper", "coref": "rules", "near_root": 2}) != base
    script = fp({"mode": "script", "coref": "rules"})
    assert script != base
    with pytest.raises(StageError, match="near_root"):  # a paper-only setting: refused, not ignored
        fp({"mode": "script", "coref": "rules", "near_root": 3})
    assert fp({"mode": "script", "coref": "rules", "keyword_test": "word"}) != script
    assert fp({"mode": "script", "coref": "none"}) != script


def test_neuralcoref_without_its_environment_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("MRHP_NEURALCOREF_ENV", str(tmp_path / "missing"))
    stage = build_stage(manifest(tmp_path, {"coref": "neuralcoref"}), "toy", records=records())
    with pytest.raises(StageError, match="make neuralcoref-env"):
        stage.plan()


def test_a_review_neuralcoref_fails_on_is_a_failure_not_a_keyword_only_mask(paper):
    class Failing:
        name, streaming, errors = "neuralcoref", False, {0: "side process died"}

        def clusters(self, docs, kws):
            return [None for _ in docs]

    m = with_nlp(ProbeMasker(coref="rules"), paper.nlp)
    m._backend = Failing()
    (res,) = m.masks([PAN_REVIEW], [PAN])
    assert isinstance(res, StageError) and "side process died" in str(res)


def test_keywords_substring_test_is_on_the_joined_lowercased_sentence():
    kw = Keywords(("set",), frozenset({"set"}), "script-root-lemma")
    assert kw.in_sentence("we settle in .") and not kw.in_sentence("a pan .")


def test_status_and_the_run_summary_say_which_coreference_backend_is_used(tmp_path, monkeypatch):
    from mrhp.commands.status import stage_status
    from pipeline.runner import StageSummary, summary_table
    from pipeline.store import FeatureStore

    monkeypatch.setenv("MRHP_NEURALCOREF_ENV", str(tmp_path / "absent"))
    m = manifest(tmp_path, {"mode": "paper", "coref": "auto"})
    row = stage_status(m, FeatureStore(m.store_root), "toy", "probes")  # no raw files: planning fails
    assert row.note.startswith("coreference rules: picked by coref auto") and row.error
    s = StageSummary(dataset="toy", stage="probes", fingerprint="f", random_init=False, total=1, note=row.note)
    assert summary_table([s]).splitlines()[-1] == f"toy/probes: {row.note}"


def test_indonesian_stage_passes_a_products_brand_when_its_record_carries_one(tmp_path):
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class BrandedProduct(Product):  # what a reader exposing Lazada's brand_name would give
        brand: str = ""

    def stage_for(product):
        recs = DatasetRecords(name="toy", products={"p1": product}, reviews=[
            Review(id="r1", product_id="p1", text="Bantalnya empuk. Guling juga ok.", label=0, split="train")])
        return build_stage(manifest(tmp_path, {"mode": "script", "coref": "auto"}, language="id"), "toy", records=recs)

    name = "Guling Bantal Kapuk"
    plain = stage_for(Product(id="p1", name=name, description="", text=name, split="train"))
    branded = stage_for(BrandedProduct(id="p1", name=name, description="", text=name, split="train", brand="Guling"))
    got = {}
    for label, stage in (("plain", plain), ("branded", branded)):
        plan = stage.plan()
        (rec,) = stage.run(list(plan.items.values()))
        got[label] = (plan.view["rvw:r1"], rec.meta["keywords"], rec.arrays["mask"].tolist())
    # bantalnya empuk . | guling juga ok .
    assert got["plain"][1:] == (["guling"], [0, 0, 0, 1, 1, 1, 1])  # "Guling" is a lexicon noun
    assert got["branded"][1:] == (["bantal"], [1, 1, 1, 0, 0, 0, 0])  # the brand is skipped
    assert got["plain"][0] != got["branded"][0]  # the brand is part of the item key
