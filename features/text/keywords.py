"""Product keywords for SANCL probe masks (REFERENCE.md section 7) and word-level matching.

English: the product *name* is parsed as a sentence (a final "." is appended, which keeps the
small English parser from reading title-cased names such as "Stainless Steel Frying Pan" as a
verb phrase); the keyword is the dependency root of the name. Only the name's first
comma-separated segment holding a letter is parsed: what follows a comma in a product name
lists attributes ("..., 2 Quart", "..., Blue, Large"), and the parser otherwise takes a
trailing measure as the root. A name is a noun phrase, so when
the parser still makes a leading gerund its root ("Running Shoes for Women": "Running" with
"Shoes" as its object), the root's first noun dependent to its right is taken instead.
- `script` mode: the root's lemma only (SANCL's script).
- `paper` mode: the nouns and proper nouns within `near_root` dependency arcs of the root,
  the root included when it is one (the paper's "words near the root"); possessors ("Men's",
  "Levi's") and what hangs below them are another entity than the product and are skipped.
Indonesian: no parser is available (`spacy.blank("id")`), and Indonesian noun phrases are
head-initial, so the keyword is the first alphabetic non-stop word of the name (paper mode:
the first `1 + near_root` of them).

Matching is word-level: a token matches when its lowercased form or lemma equals one of the
keyword's forms (lowercased text, lemma, and the noun lemma of the lowercased text: title-cased
names are tagged PROPN and keep "Shoes" as their lemma). "pan" never matches "Japan".
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

ALPHA_POS = {"NOUN", "PROPN"}


@dataclass(frozen=True)
class Keywords:
    """The keyword(s) of one product name and every surface form that counts as a match."""

    words: tuple[str, ...]  # the keywords, lowercased, in name order (empty: none found)
    forms: frozenset[str]  # lowercased forms a token's text or lemma may equal
    rule: str  # how they were found, for the record meta
    reason: str | None = None  # why there is none

    def __bool__(self) -> bool:
        return bool(self.words)

    def matches(self, token: Any) -> bool:
        return token.lower_ in self.forms or token.lemma_.lower() in self.forms

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"keywords": list(self.words), "keyword_rule": self.rule}
        if self.reason:
            out["keyword_reason"] = self.reason
        return out


def name_head(name: str) -> str:
    """The part of a product name that is parsed: its first comma segment with a letter."""
    for part in name.split(","):
        if has_alpha(part):
            return part.strip()
    return name.strip()


def name_text(name: str) -> str:
    """The text parsed for a product name: its head segment terminated as a sentence."""
    head = name_head(name)
    return f"{head}." if head else ""


def has_alpha(text: str) -> bool:
    return any(c.isalpha() for c in text)


def english_keywords(doc: Any, name_len: int, *, mode: str, near_root: int, noun_lemma: Any = None) -> Keywords:
    """Keywords from the parse of `name_text(name)`; `name_len` = len(name_head(name)) in
    characters (the tokens starting before it are the name's)."""
    tokens = [t for t in doc if t.idx < name_len and not t.is_space]
    if not tokens:
        return Keywords((), frozenset(), f"{mode}-root", reason="empty product name")
    span_end = tokens[-1].i + 1
    roots = [t for t in tokens if (t.head.i == t.i or t.head.i >= span_end) and has_alpha(t.text)]
    if not roots:
        return Keywords((), frozenset(), f"{mode}-root", reason="product name has no word")
    root = roots[0]
    if root.pos_ == "VERB" and root.tag_ in ("VBG", "VBN"):
        nouns = [c for c in root.rights if c.i < span_end and c.pos_ in ALPHA_POS]
        root = nouns[0] if nouns else root
    if mode == "script":
        chosen = [root]
    else:
        depth = _depths(root, span_end)
        chosen = [
            t for t in tokens
            if t.i in depth and depth[t.i] <= near_root and t.pos_ in ALPHA_POS and has_alpha(t.text)
        ]
        if not chosen:
            return Keywords(
                (), frozenset(), "paper-near-root",
                reason=f"no noun within {near_root} arc(s) of the root {root.text!r} of the product name",
            )
    words, forms = [], set()
    for t in chosen:
        word = t.lemma_.lower() if mode == "script" else t.lower_
        words.append(word)
        forms.update(_forms(t, noun_lemma))
    return Keywords(tuple(dict.fromkeys(words)), frozenset(forms), "script-root-lemma" if mode == "script" else "paper-near-root")


def indonesian_keywords(doc: Any, *, mode: str, near_root: int) -> Keywords:
    """Head-initial heuristic for Indonesian names (no parser): first content words."""
    words = [t for t in doc if t.is_alpha and not t.is_stop]
    if not words:
        return Keywords((), frozenset(), "id-head-initial", reason="product name has no content word")
    take = 1 if mode == "script" else 1 + near_root
    chosen = [t.lower_ for t in words[:take]]
    return Keywords(tuple(dict.fromkeys(chosen)), frozenset(chosen), "id-head-initial")


def _depths(root: Any, span_end: int) -> dict[int, int]:
    """Dependency distance from the root of every token in the name below it."""
    out = {root.i: 0}
    frontier = [root]
    while frontier:
        nxt = []
        for t in frontier:
            for c in t.children:
                if c.i < span_end and c.i not in out and c.dep_ != "poss":
                    out[c.i] = out[t.i] + 1
                    nxt.append(c)
        frontier = nxt
    return out


def _forms(token: Any, noun_lemma: Any) -> Iterable[str]:
    forms = {token.lower_, token.lemma_.lower()}
    if noun_lemma is not None and token.pos_ in ALPHA_POS:
        forms.update(noun_lemma(token.lower_))
    return {f for f in forms if f}
