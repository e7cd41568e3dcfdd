"""Raw tokens: the tokenization the tokens and probes stages share (docs/design.md)."""
from __future__ import annotations

import pytest

from features.text.tokenize import clean_text, tokenize, tokenizer_pipeline
from pipeline.errors import StageError


def toks(text, language="en"):
    return next(tokenize([text], language))


def test_english_tokens_are_lowercased_spacy_tokens_without_whitespace():
    assert toks("I bought this Pan in  Japan.\n\tIt heats!") == [
        "i", "bought", "this", "pan", "in", "japan", ".", "it", "heats", "!",
    ]


def test_tokenizing_happens_before_lowercasing_so_cased_exceptions_still_split():
    # "Don't" splits into do + n't through the tokenizer's exceptions either way; the token
    # sequence must equal the cased parse's tokens (what the probes stage relies on).
    nlp = tokenizer_pipeline("en")
    text = "Don't buy the U.S. version"
    assert toks(text) == [t.lower_ for t in nlp(text)]


def test_indonesian_uses_the_blank_id_tokenizer():
    assert toks("Wajan anti lengket, BAGUS sekali!", "id") == [
        "wajan", "anti", "lengket", ",", "bagus", "sekali", "!",
    ]


def test_bad_text_never_raises():
    undecodable = b"caf\xc3\xa9 \xff\xfe ok".decode("utf-8", "surrogateescape")
    assert toks(undecodable) == ["café", "\ufffd", "\ufffd", "ok"]
    assert toks("") == [] and toks("   \n ") == []
    assert toks("😀😀 !!!") == ["😀", "😀", "!", "!", "!"]
    assert len(toks("word " * 20000)) == 20000


def test_clean_text_accepts_bytes_and_none():
    assert clean_text(b"a\xffb  c") == "a\ufffdb c"
    assert clean_text(None) == ""


def test_unknown_language_is_a_stage_error():
    with pytest.raises(StageError, match="'fr'"):
        tokenizer_pipeline("fr")
