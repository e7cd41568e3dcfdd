"""The neuralcoref backend: real neuralcoref 4.0 in the Python 3.7 side environment.

Tests that need the side environment skip with the reason (`make neuralcoref-env` builds it)."""
from __future__ import annotations

import pytest

from features.text.coref.neuralcoref import map_char_clusters, missing_reason

needs_env = pytest.mark.skipif(missing_reason() is not None, reason=str(missing_reason()))


@pytest.fixture(scope="module")
def backend():
    if missing_reason() is not None:
        pytest.skip(missing_reason())
    from features.text.coref.neuralcoref import NeuralCoref

    nc = NeuralCoref()
    yield nc
    nc.close()


@pytest.fixture(scope="module")
def nlp():
    from features.text.tokenize import load_english

    return load_english(exclude=["ner"])


def test_char_spans_map_onto_this_side_tokens_expanding_partial_overlaps(nlp):
    doc = nlp("I bought these plates. They're poor quality.")
    # neuralcoref's own tokenization may split differently: spans cover every overlapped token
    assert map_char_clusters(doc, [[(9, 21), (23, 27)]]) == [[(2, 4), (5, 6)]]
    assert map_char_clusters(doc, [[(9, 21)], [(0, 1), (0, 1)]]) == []  # fewer than 2 mentions


@needs_env
def test_side_process_finds_the_documented_cluster(backend):
    text = "I bought these plates last month. They were poor quality."
    (clusters,) = backend.char_clusters([text])
    assert [[text[s:e] for s, e in c] for c in clusters] == [["these plates", "They"]]


@needs_env
def test_batches_keep_order_and_empty_texts_have_no_clusters(backend):
    texts = ["", "My husband bought a pan. He loves it.", "😀 !!!"] * 30  # spans two request lines
    out = backend.char_clusters(texts)
    assert len(out) == 90 and out[0] == [] and out[2] == []
    husband = [[texts[1][s:e] for s, e in c] for c in out[1]]
    assert ["My husband", "He"] in husband and out[1] == out[4]


@needs_env
def test_a_dead_side_process_is_restarted(backend):
    backend.char_clusters(["It works."])
    backend._proc.kill()
    backend._proc.wait()
    (clusters,) = backend.char_clusters(["I bought these plates last month. They were poor quality."])
    assert len(clusters) == 1


@needs_env
def test_probe_masks_with_neuralcoref_on_the_pan_review(backend):
    from features.text.probes import ProbeMasker

    m = ProbeMasker(coref="neuralcoref")
    m._backend = backend
    res = m.masks(["I bought this pan in Japan. It heats evenly. The handle broke."], ["Stainless Steel Frying Pan"])[0]
    assert res.mask.tolist() == [1] * 11 + [0] * 4
    assert res.meta["coref"] == "neuralcoref" and res.meta["cluster"] == ["this pan", "It"]


def test_missing_environment_is_a_stage_error_naming_the_make_target(tmp_path, monkeypatch):
    from features.text.coref.neuralcoref import NeuralCoref
    from pipeline.errors import StageError

    monkeypatch.setenv("MRHP_NEURALCOREF_ENV", str(tmp_path / "none"))
    with pytest.raises(StageError, match="make neuralcoref-env"):
        NeuralCoref()
