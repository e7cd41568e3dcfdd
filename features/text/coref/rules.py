"""Rule-based coreference over a spaCy parse: the built-in default backend.

Mentions are the parse's noun chunks (noun or proper-noun heads) and personal, possessive,
reflexive and demonstrative pronouns (pleonastic "it" excluded). Links:
- a third-person pronoun joins its antecedent: among the preceding mentions of the current and
  previous `window` sentences that agree in person, number and animacy/gender and are not a
  co-argument of the same verb (unless the pronoun is reflexive), the one with the highest
  salience in the style of Lappin & Leass (1994): recency (halved per sentence back),
  grammatical role (subject > object > other), not inside a verb's prepositional adjunct, not
  embedded in another noun phrase, plus a bonus for the product keyword's chain; ties go to
  the nearest;
- first- and second-person pronouns are not mentions: they refer to the reviewer and the
  reader, never the product (neuralcoref's default blacklist skips "i, me, my, you, your" for
  the same reason; here "we, us, our" and the rest of both persons are skipped too);
- noun phrases headed by a product keyword (word-level match), and definite ones headed by a
  generic product noun ("this product", "the item"), form the product chain;
- a definite noun phrase ("the/this/that/these/those/possessive + noun") joins the nearest
  preceding noun phrase with the same head lemma and number; repeated proper nouns join.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from features.text.coref import Cluster

# Third-person pronouns only (see the module docstring):
# lower form -> (person, number, gender); gender "m", "f", "n" or None (either)
PRONOUNS: dict[str, tuple[int, str | None, str | None]] = {
    **{w: (3, "sg", "n") for w in ("it", "its", "itself", "this")},
    **{w: (3, "sg", "m") for w in ("he", "him", "his", "himself")},
    **{w: (3, "sg", "f") for w in ("she", "her", "hers", "herself")},
    **{w: (3, "pl", None) for w in ("they", "them", "their", "theirs", "themselves", "these", "those")},
}
REFLEXIVE = {"itself", "himself", "herself", "themselves"}
DEMONSTRATIVE = {"this", "these", "those"}
DEFINITE_DET = {"the", "this", "that", "these", "those"}
# Nouns a neuter pronoun ("it") cannot refer to and a gendered one ("he", "she") can.
HUMAN_NOUNS = frozenset(
    "person people man men woman women guy girl boy lady husband wife son daughter kid kids child "
    "children baby mother father mom dad mum parent friend girlfriend boyfriend sister brother "
    "grandson granddaughter grandmother grandfather niece nephew teen teenager toddler customer "
    "seller buyer wearer user owner family".split()
)
# Generic nouns that refer to the reviewed product when definite ("this product", "the item").
PRODUCT_NOUNS = frozenset({"product", "item", "purchase"})
SUBJECT_DEPS = {"nsubj", "nsubjpass", "csubj", "csubjpass"}
ARG_DEPS = SUBJECT_DEPS | {"dobj", "dative", "iobj", "attr", "oprd"}


@dataclass
class _Mention:
    start: int
    end: int
    head: Any  # the head token
    sent: int  # sentence index
    person: int
    number: str | None
    gender: str | None  # "m", "f", "n" or None (unknown)
    animate: bool | None  # None: unknown (proper nouns)
    pronoun: bool
    salience: float  # role-based weight (recency applied at resolution)
    product: bool = False  # in the product keyword's chain


class RulesCoref:
    """Pronoun and noun-phrase resolution over the spaCy parse (see the module docstring)."""

    name = "rules"
    streaming = True  # works doc by doc: the probes stage runs it as docs come out of nlp.pipe

    def __init__(self, *, window: int = 2, product_bonus: float = 30.0) -> None:
        self.window = window  # previous sentences searched for an antecedent
        self.product_bonus = product_bonus  # salience bonus of the product keyword's chain

    def clusters(self, docs: Sequence[Any], keywords: Sequence[Any]) -> list[list[Cluster]]:
        return [self.doc_clusters(doc, kw) for doc, kw in zip(docs, keywords, strict=True)]

    def doc_clusters(self, doc: Any, keywords: Any = None) -> list[Cluster]:
        if not doc.has_annotation("DEP"):
            return []
        sent_of = {}
        for si, s in enumerate(doc.sents):
            for t in s:
                sent_of[t.i] = si
        mentions = self._mentions(doc, sent_of, keywords)
        parent = list(range(len(mentions)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        def union(a: int, b: int) -> None:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)

        product_first: int | None = None
        for i, m in enumerate(mentions):
            if m.product:
                if product_first is None:
                    product_first = i
                else:
                    union(product_first, i)
            elif not m.pronoun:
                j = self._same_head_antecedent(doc, mentions, i)
                if j is not None:
                    union(j, i)
                    if mentions[j].product:
                        m.product = True
            else:
                j = self._pronoun_antecedent(mentions, i, find)
                if j is not None:
                    union(j, i)
                    m.product = mentions[j].product or m.product
        groups: dict[int, list[tuple[int, int]]] = {}
        for i, m in enumerate(mentions):
            groups.setdefault(find(i), []).append((m.start, m.end))
        out = [sorted(set(g)) for g in groups.values() if len(set(g)) >= 2]
        return sorted(out, key=lambda c: c[0])

    # -- mentions ------------------------------------------------------------------------------

    def _mentions(self, doc: Any, sent_of: dict[int, int], keywords: Any) -> list[_Mention]:
        out: list[_Mention] = []
        for chunk in doc.noun_chunks:
            root = chunk.root
            if root.pos_ not in ("NOUN", "PROPN"):
                continue
            lemma = root.lemma_.lower()
            number = "pl" if root.tag_ in ("NNS", "NNPS") else "sg"
            human = lemma in HUMAN_NOUNS or root.lower_ in HUMAN_NOUNS
            definite = any(
                t.lower_ in DEFINITE_DET or t.dep_ == "poss" for t in chunk if t.i < root.i
            )
            product = (bool(keywords) and keywords.matches(root)) or (definite and lemma in PRODUCT_NOUNS)
            out.append(_Mention(
                start=chunk.start, end=chunk.end, head=root, sent=sent_of[root.i], person=3,
                number=number, gender=None if (human or root.pos_ == "PROPN") else "n",
                animate=True if human else (None if root.pos_ == "PROPN" else False),
                pronoun=False, salience=_role_weight(root), product=product,
            ))
        for t in doc:
            feats = PRONOUNS.get(t.lower_)
            if feats is None or t.pos_ != "PRON" or (t.lower_ in DEMONSTRATIVE and t.dep_ == "det"):
                continue
            if _pleonastic(t):
                continue
            person, number, gender = feats
            out.append(_Mention(
                start=t.i, end=t.i + 1, head=t, sent=sent_of[t.i], person=person, number=number,
                gender=gender, animate=None if gender is None else gender != "n", pronoun=True,
                salience=_role_weight(t),
            ))
        out.sort(key=lambda m: (m.start, m.end))
        return out

    # -- links ---------------------------------------------------------------------------------

    def _pronoun_antecedent(self, mentions: list[_Mention], i: int, find: Any) -> int | None:
        p = mentions[i]
        reflexive = p.head.lower_ in REFLEXIVE
        best, best_score = None, float("-inf")
        for j in range(i - 1, -1, -1):
            c = mentions[j]
            if p.sent - c.sent > (0 if reflexive else self.window):
                break
            if c.end > p.start or (c.start <= p.start < c.end):
                continue
            if not _agree(p, c):
                continue
            if not reflexive and _coargument(p.head, c.head):
                continue
            score = (100.0 + c.salience) * 0.5 ** (p.sent - c.sent)
            if c.product:
                score += self.product_bonus
            if score > best_score:  # scanning backwards: ties keep the nearest
                best, best_score = j, score
        return best

    def _same_head_antecedent(self, doc: Any, mentions: list[_Mention], i: int) -> int | None:
        m = mentions[i]
        head = m.head
        definite = any(
            t.lower_ in DEFINITE_DET or t.dep_ == "poss" for t in doc[m.start:head.i]
        )
        if not definite and head.pos_ != "PROPN":
            return None
        for j in range(i - 1, -1, -1):
            c = mentions[j]
            if c.pronoun or c.end > m.start:
                continue
            if head.pos_ == "PROPN":
                if c.head.lower_ == head.lower_:
                    return j
            elif c.head.lemma_.lower() == head.lemma_.lower() and c.number == m.number:
                return j
        return None


def _agree(p: _Mention, c: _Mention) -> bool:
    if c.person != p.person:
        return False
    if p.number and c.number and p.number != c.number:
        return False
    if p.gender in ("m", "f"):
        return c.animate is not False and (c.gender in (None, p.gender))
    if p.gender == "n":
        return c.animate is not True and c.gender in (None, "n")
    return True


def _coargument(a: Any, b: Any) -> bool:
    """Two direct arguments of the same verb (binding: "the pan heats it" is not the pan)."""
    return a.head.i == b.head.i and a.dep_ in ARG_DEPS and b.dep_ in ARG_DEPS


def _role_weight(t: Any) -> float:
    """Lappin & Leass-style salience of a mention's head from its grammatical role."""
    dep = t.dep_
    if dep in SUBJECT_DEPS:
        w = 80.0
    elif dep == "attr" and any(c.dep_ == "expl" for c in t.head.children):
        w = 70.0  # existential: "there is a stain"
    elif dep == "dobj":
        w = 50.0
    elif dep in ("dative", "iobj", "attr", "oprd"):
        w = 40.0
    else:
        w = 0.0
    adverbial = dep == "pobj" and t.head.dep_ == "prep" and t.head.head.pos_ in ("VERB", "AUX")
    embedded = dep in ("poss", "compound", "nmod") or (dep == "pobj" and t.head.head.pos_ in ("NOUN", "PROPN"))
    return w + (0.0 if adverbial else 50.0) + (0.0 if embedded else 80.0)


def _pleonastic(t: Any) -> bool:
    """Expletive "it": "it is easy to clean", "it seems that ...", "it's raining"."""
    if t.lower_ != "it":
        return False
    if t.dep_ == "expl":
        return True
    if t.dep_ not in ("nsubj", "nsubjpass"):
        return False
    head = t.head
    clausal = [c for c in head.children if c.dep_ in ("xcomp", "ccomp") and c.i > t.i]
    if head.lemma_ in ("seem", "appear", "happen", "turn") and clausal:
        return True
    if head.lemma_ == "be":
        adj = [c for c in head.children if c.dep_ in ("acomp", "attr")]
        inner = [c for a in adj for c in a.children if c.dep_ in ("xcomp", "ccomp")]
        return bool(adj) and bool(clausal or inner)
    return head.lemma_ == "rain"
