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


@pytest.mark.parametrize("text, tokens", [
    ("bagus banget.bahan adem", ["bagus", "banget", ".", "bahan", "adem"]),
    ("alhamdulillah,,baju sesuai", ["alhamdulillah", ",", ",", "baju", "sesuai"]),
    ("bagus!!mantap", ["bagus", "!", "!", "mantap"]),
    ("ok😍.bagus", ["ok", "😍", ".", "bagus"]),
    ("...bagus", ["...", "bagus"]),
    ("ukuran 40.pas", ["ukuran", "40", ".", "pas"]),
    ("Rp.50.000", ["rp", ".", "50.000"]),
    # numbers keep their separators (ICU WB11/WB12); one-letter abbreviations stay whole
    ("harga 1.500.000,00 dan 2,5kg", ["harga", "1.500.000,00", "dan", "2,5", "kg"]),
    ("a.n. budi s.d besok", ["a.n.", "budi", "s.d", "besok"]),
])
def test_indonesian_glued_punctuation_splits_icu_style(text, tokens):
    assert toks(text, "id") == tokens


@pytest.mark.parametrize("text, tokens", [
    ("mantap😍😍bagus", ["mantap", "😍", "😍", "bagus"]),
    # an emoji with its skin tone, variation selector or ZWJ sequence is one grapheme, one token
    ("mantap👍🏻👍🏻bagus", ["mantap", "👍🏻", "👍🏻", "bagus"]),
    ("suka❤️❤️", ["suka", "❤️", "❤️"]),
    ("keluarga👨\u200d👩\u200d👧senang", ["keluarga", "👨\u200d👩\u200d👧", "senang"]),
    ("bendera🇮🇩mantap", ["bendera", "🇮🇩", "mantap"]),
])
def test_indonesian_emoji_are_split_from_words_and_kept_whole(text, tokens):
    assert toks(text, "id") == tokens


def test_indonesian_doc_text_is_the_input_text_so_token_offsets_hold():
    text = "Bagus banget.bahan adem😍👍🏻 ok"
    doc = tokenizer_pipeline("id")(text)
    assert doc.text == text and [t.idx for t in doc][:4] == [0, 6, 12, 13]


def test_the_indonesian_tokenizer_rules_enter_the_token_fingerprint():
    from features.text.tokenize import ID_TOKENIZER_VERSION, tokenizer_id

    assert tokenizer_id("id").endswith(f"/id/blank+{ID_TOKENIZER_VERSION}")
