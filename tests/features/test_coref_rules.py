"""The built-in rule-based coreference backend on hand-written reviews."""
from __future__ import annotations

import pytest

from features.text.coref import get_backend
from features.text.coref.rules import RulesCoref
from features.text.probes import ProbeMasker


@pytest.fixture(scope="module")
def masker():
    return ProbeMasker(language="en", mode="paper", coref="rules")


@pytest.fixture(scope="module")
def pan(masker):
    return masker.keywords(["Stainless Steel Frying Pan"])[0]


def clusters(masker, text, keywords=None):
    doc = masker.nlp(text)
    return [[doc[s:e].text for s, e in c] for c in RulesCoref().doc_clusters(doc, keywords)]


def test_pronoun_takes_the_antecedent_agreeing_in_number(masker):
    assert clusters(masker, "I bought these plates and a bowl. They were poor quality.") == [
        ["these plates", "They"]
    ]


def test_gendered_pronouns_take_people_and_it_takes_things(masker):
    assert clusters(masker, "My husband bought a pan. He loves it.") == [["My husband", "He"], ["a pan", "it"]]


def test_subject_and_object_outrank_a_place_in_an_adverbial_phrase(masker, pan):
    assert clusters(masker, "I bought this pan in Japan. It heats evenly. The handle broke.", pan) == [
        ["this pan", "It"]
    ]


def test_pleonastic_it_is_not_a_mention(masker):
    assert clusters(masker, "It is easy to clean the pan.") == []


def test_first_and_second_person_pronouns_are_not_mentions(masker):
    # They refer to the reviewer and the reader (neuralcoref's default blacklist does the same).
    assert clusters(masker, "I love it. My kids too. I recommend it to you and your friends.") == [["it", "it"]]


def test_definite_noun_phrase_joins_the_earlier_one_with_the_same_head(masker):
    assert clusters(masker, "I bought a lid. The lid is thin.") == [["a lid", "The lid"]]


def test_keyword_noun_phrases_chain_even_when_indefinite(masker, pan):
    assert clusters(masker, "A pan arrived. Another pan was dented.", pan) == [["A pan", "Another pan"]]


def test_generic_product_noun_with_a_definite_determiner_is_the_product(masker):
    assert clusters(masker, "This product is great. I use it daily.") == [["This product", "it"]]


def test_reflexive_binds_inside_its_clause(masker):
    assert clusters(masker, "The pan heats itself quickly.") == [["The pan", "itself"]]


def test_clusters_are_ordered_by_first_mention(masker, pan):
    out = clusters(masker, "I love my wife. She bought this pan. It is great.", pan)
    assert out == [["my wife", "She"], ["this pan", "It"]]


def test_docs_without_a_parse_have_no_clusters():
    import spacy

    assert RulesCoref().doc_clusters(spacy.blank("en")("It is here. It works.")) == []


def test_backend_registry_names_the_valid_backends():
    from pipeline.errors import StageError

    assert get_backend("none") is None and get_backend("rules").name == "rules"
    with pytest.raises(StageError, match="auto, rules, neuralcoref, none"):
        get_backend("allennlp")


def fake_side_env(root):
    """The files `missing_reason` looks for (nothing is started: resolution only)."""
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "python").write_text("")
    (root / "model" / "neuralcoref").mkdir(parents=True)
    return root


def test_coref_auto_picks_rules_when_the_side_environment_is_absent(tmp_path, monkeypatch):
    from features.text.coref import resolve

    monkeypatch.setenv("MRHP_NEURALCOREF_ENV", str(tmp_path / "absent"))
    used, why = resolve("auto")
    assert used == "rules" and "make neuralcoref-env" in why
    assert get_backend("auto").name == "rules"
    m = ProbeMasker(coref="auto")
    assert m.coref_used == "rules" and m.coref_note().startswith("coreference rules: picked by coref auto")


def test_coref_auto_picks_neuralcoref_when_the_side_environment_is_built(tmp_path, monkeypatch):
    from features.text.coref import resolve

    monkeypatch.setenv("MRHP_NEURALCOREF_ENV", str(fake_side_env(tmp_path / "env")))
    assert resolve("auto")[0] == "neuralcoref" and resolve("rules")[0] == "rules"
    assert ProbeMasker(coref="auto").coref_used == "neuralcoref"


def test_the_backend_used_enters_the_fingerprint_and_the_summary_note(tmp_path, monkeypatch):
    from features.text.probes import build_stage
    from tests.features.test_probes import manifest, records

    stage = lambda coref: build_stage(manifest(tmp_path, {"coref": coref}), "toy", records=records())  # noqa: E731
    monkeypatch.setenv("MRHP_NEURALCOREF_ENV", str(tmp_path / "absent"))
    auto_rules = stage("auto")
    assert auto_rules.fingerprint() == stage("rules").fingerprint()  # same backend, same masks
    assert "coreference rules: picked by coref auto" in auto_rules.summary_note()
    monkeypatch.setenv("MRHP_NEURALCOREF_ENV", str(fake_side_env(tmp_path / "env")))
    auto_neural = stage("auto")
    assert auto_neural.fingerprint() == stage("neuralcoref").fingerprint() != auto_rules.fingerprint()
    assert "coreference neuralcoref: picked by coref auto" in auto_neural.summary_note()


def test_indonesian_uses_the_keyword_mentions_whatever_backend_is_asked():
    from features.text.probes import ID_COREF

    for coref in ("auto", "rules", "neuralcoref"):
        assert ProbeMasker(language="id", coref=coref).coref_used == ID_COREF
