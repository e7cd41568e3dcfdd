"""Stage "probes": SANCL probe masks over the raw tokens of each review (REFERENCE.md section 7).

Two modes (`stages.probes.mode`), both over the same parse of the review (its token i is raw
token i, so `mask[pos]` aligns a mask with the tokens stage's ids):

`paper` (default): Algorithm 1 of the SANCL paper (sancl.txt section 3.4), as written:
  1. core words W <- FindWordsNearRoot(DependencyParse(Lemmatise(P))) of the product name P
     (`features.text.keywords.english_keywords`, paper mode: the readings taken are listed
     there);
  2. clusters <- FindCoreferenceCluster(R^) over the review (`coref` backend);
  3. M <- ZeroInit; "if C = empty then return M": no cluster -> an all-zero mask, *even when
     the review names the product* (resolution case 3);
  4. "foreach c in clusters: if any w in W in c then gold_cluster = c": a cluster one of whose
     mention tokens matches a core word (word level, lemma forms). The loop has no break, so
     when several clusters hold a core word the *last* one (clusters in first-mention order) is
     the gold cluster: the pseudo-code read literally (case 1);
  5. "if gold_cluster = empty then gold_cluster = clusters[0]" (case 2);
  6. "foreach sent in R^: if any w in gold_cluster in sent then M[sent] <- True": every sentence
     (the parser's sentences) overlapping a mention of the gold cluster is 1 (*reading*: the
     prose's "mention-found sentences"; "any w in gold_cluster in sent" read as a word test
     would also mark a sentence for an unrelated "it"). Keyword occurrences outside the gold
     cluster do not mark a sentence: Algorithm 1 has no such step.

`script`: SANCL's released `scripts/generate_mask/gen_amazon.py`, rule for rule, so its masks
can be regenerated:
  - keyword: the lowercased lemma of the name's first dependency root, nothing else;
  - sentences: spaCy 2.1's rule sentencizer over the review tokens (a sentence ends after a
    token ".", "!" or "?", once a token that is neither punctuation nor one of those follows);
  - cluster: `doc._.coref_clusters[0]` whatever it holds (never the keyword's cluster); each
    of its mentions marks the sentence its *first token* is in;
  - keyword test: `keyword in str(sent)`, a substring test on the sentence as the script saw
    it (its lowercased tokens joined by spaces: "pan" matches "japan"). `keyword_test: word`
    opts into the word-level test instead (a fix; not the released behaviour);
  - mask = those sentences, union. Not reproduced: the script masked the review as MCR's
    vocabulary left it (tokens of train frequency < 5 deleted); here the mask covers every raw
    token (the trainer selects `mask[pos]`).

Coreference (`coref`): `auto` (default) runs neuralcoref when its side environment is built,
else the rules backend (`features.text.coref`); the backend used is in every record's meta,
the stage summary's note, `mrhp status`, the item keys and the fingerprint. English `paper`
with `coref: none` is refused (Algorithm 1 would return all-zero masks).

Indonesian (no coreference model exists for it): the mentions of the head-noun keyword (word
level, clitics stripped: "celananya" is "celana") form the one cluster (`keyword-mentions`;
unlike a backend's clusters, one mention suffices), so Algorithm 1 marks the sentences naming
the product; script mode adds its keyword test on top. The note says so in the meta.

View item ids `rvw:<review_id>`; field `mask` (uint8, ragged (n_raw,)). An item's key is
`text_key(review, "probes", product name, mode, coref used, language[, near_root][, keyword_test])`.
Each distinct review text is parsed once per chunk, each distinct product name once per stage
object. An all-zero mask always carries its reason in the record meta.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from features.text.coref import BACKENDS, Cluster, get_backend, resolve
from features.text.keywords import Keywords, english_keywords, indonesian_keywords, name_head, name_text
from features.text.tokenize import check_language, clean_text, load_english, tokenizer_pipeline
from pipeline.errors import StageError
from pipeline.hashing import fingerprint as stage_fingerprint
from pipeline.hashing import text_key
from pipeline.params import ProbesParams
from pipeline.stage import FieldSpec, Plan, Record, WorkItem

log = logging.getLogger(__name__)

CODE_VERSION = "probes-2"
SCHEMA = {"mask": FieldSpec("uint8", (), ragged=True)}
MAX_META_SENTENCES = 64  # masked sentence indices listed in a record's meta at most
NAME_CACHE_MAX = 200_000  # distinct product names remembered per stage object
MODES = ("paper", "script")
KEYWORD_TESTS = ("substring", "word")
ID_COREF = "keyword-mentions"
NO_ID_COREF = "no coreference model for Indonesian: the keyword's mentions are the cluster"
SCRIPT_SENT_PUNCT = frozenset({".", "!", "?"})  # spaCy 2.1 Sentencizer.default_punct_chars


@dataclasses.dataclass
class ProbeResult:
    """The mask of one review and what explains it."""

    mask: np.ndarray  # uint8 (n_raw,)
    meta: dict[str, Any]  # keywords, cluster used, masked sentences, reason when all zero


# -- the two rules, on token indices (no spaCy: what the tests pin by hand) ------------------------


def sentence_index(starts: Sequence[int], n: int) -> np.ndarray:
    """Sentence number of each of n tokens, from the sentences' first-token indices."""
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    return np.searchsorted(np.asarray(starts, dtype=np.int64), np.arange(n), side="right") - 1


def script_sentence_starts(words: Sequence[str], is_punct: Sequence[bool]) -> list[int]:
    """First-token indices of the sentences spaCy 2.1's rule sentencizer makes (what
    gen_amazon.py segments reviews with): after a token in {".", "!", "?"}, the next token that
    is neither punctuation nor one of those starts a sentence."""
    starts = [0] if words else []
    seen_end = False
    for i, (w, punct) in enumerate(zip(words, is_punct, strict=True)):
        if seen_end and not punct and w not in SCRIPT_SENT_PUNCT:
            starts.append(i)
            seen_end = False
        elif w in SCRIPT_SENT_PUNCT:
            seen_end = True
    return starts


def algorithm1(
    n: int, starts: Sequence[int], clusters: Sequence[Cluster], is_core: Callable[[int], bool],
) -> tuple[np.ndarray, dict[str, Any]]:
    """Algorithm 1's mask generation over n tokens: `starts` the sentences' first tokens,
    `clusters` in first-mention order, `is_core(i)` whether token i matches a core word.
    Returns the bool mask and {"cluster_rule": "core-word" | "first" | None, "gold": index}."""
    mask = np.zeros(n, dtype=bool)
    if not clusters:  # "if C = empty then return M"
        return mask, {"cluster_rule": None, "gold": None}
    gold = None
    for ci, c in enumerate(clusters):  # no break: the last cluster holding a core word
        if any(is_core(i) for s, e in c for i in range(s, e)):
            gold = ci
    rule = "core-word"
    if gold is None:
        gold, rule = 0, "first"
    sent = sentence_index(starts, n)
    marked = {int(x) for s, e in clusters[gold] for x in sent[s:e]}
    mask[:] = np.isin(sent, list(marked))
    return mask, {"cluster_rule": rule, "gold": gold}


def script_rule(
    n: int, starts: Sequence[int], clusters: Sequence[Cluster], keyword_sentences: Iterable[int],
) -> tuple[np.ndarray, dict[str, Any]]:
    """gen_amazon.py's mask over n tokens: the sentence of the first token of every mention
    of clusters[0], plus the sentences that passed the keyword test."""
    sent = sentence_index(starts, n)
    marked = set(int(k) for k in keyword_sentences)
    if clusters:
        marked.update(int(sent[s]) for s, _ in clusters[0])
    mask = np.isin(sent, list(marked)) if n else np.zeros(0, dtype=bool)
    return mask, {"cluster_rule": "first" if clusters else None, "gold": 0 if clusters else None}


# -- the masker ----------------------------------------------------------------------------------


class ProbeMasker:
    """Parse + keywords + coreference + sentence mask, without the store (used by the stage,
    the benchmarks and prediction on new reviews)."""

    def __init__(
        self,
        *,
        language: str = "en",
        mode: str = "paper",
        coref: str = "auto",
        near_root: int = 1,
        keyword_test: str = "substring",
        batch_size: int = 256,
        n_process: int = 1,
    ) -> None:
        check_language(language)
        if mode not in MODES:
            raise StageError(f"probes.mode must be 'paper' or 'script', got {mode!r}")
        if coref not in BACKENDS:
            raise StageError(f"probes.coref: unknown backend {coref!r}; valid: {', '.join(BACKENDS)}")
        if keyword_test not in KEYWORD_TESTS:
            raise StageError(f"probes.keyword_test must be 'substring' or 'word', got {keyword_test!r}")
        if near_root < 0 or batch_size < 1 or n_process < 1:
            raise StageError(
                f"probes: near_root must be >= 0 and batch_size, n_process >= 1; got near_root="
                f"{near_root}, batch_size={batch_size}, n_process={n_process}"
            )
        # each mode reads one of the two knobs; a value set for the other mode was ignored, unsaid
        if mode == "paper" and keyword_test != "substring":
            raise StageError(f"probes.keyword_test: {keyword_test!r} applies to mode script only (mode paper "
                             f"matches keywords word by word already); remove it or set mode: script")
        if mode == "script" and near_root != 1:
            raise StageError(f"probes.near_root: {near_root} applies to mode paper only (the script takes the "
                             f"root's lemma alone); remove it or set mode: paper")
        if language == "en" and mode == "paper" and coref == "none":
            raise StageError(
                "probes: mode paper with coref none would give every review an all-zero mask "
                "(Algorithm 1 returns zeros without coreference clusters); use coref auto or rules, "
                "or mode script"
            )
        self.language = language
        self.mode = mode
        self.coref_name = coref
        self.near_root = near_root
        self.keyword_test = keyword_test
        self.batch_size = batch_size
        self.n_process = n_process
        if language != "en":
            self.coref_used, self.coref_why = ID_COREF, NO_ID_COREF
        else:
            self.coref_used, self.coref_why = resolve(coref)
        self._nlp: Any = None
        self._backend: Any = None
        self._names: dict[tuple[str, tuple[str, ...]], Keywords] = {}

    @classmethod
    def from_params(cls, params: ProbesParams, language: str, **overrides: Any) -> ProbeMasker:
        kw = dict(
            language=language, mode=params.mode, coref=params.coref, near_root=params.near_root,
            keyword_test=params.keyword_test, batch_size=params.batch_size, n_process=params.n_process,
        )
        return cls(**{**kw, **overrides})

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_nlp=None, _backend=None)  # rebuilt on first use in the receiving process
        state.pop("_noun_lemma", None)
        return state

    # -- resources -----------------------------------------------------------------------------

    @property
    def nlp(self) -> Any:
        if self._nlp is None:
            if self.language == "en":
                self._nlp = load_english(exclude=["ner"])  # tagger, parser, lemmatizer: all used
            else:
                self._nlp = tokenizer_pipeline("id")  # blank "id" (ICU-style tokens) + sentencizer
        return self._nlp

    def coref_note(self) -> str:
        """Which coreference backend this masker uses and why (the stage summary's note)."""
        return f"coreference {self.coref_used}: {self.coref_why}"

    def backend(self) -> Any:
        if self._backend is None and self.coref_used not in (ID_COREF, "none"):
            self._backend = get_backend(self.coref_used)
        return self._backend

    @functools.cached_property
    def _noun_lemma(self) -> Callable[[str], list[str]] | None:
        if self.language != "en" or "lemmatizer" not in self.nlp.pipe_names:
            return None
        nlp, lem = self.nlp, self.nlp.get_pipe("lemmatizer")

        def noun_lemma(word: str) -> list[str]:
            doc = nlp.make_doc(word)
            if len(doc) != 1:
                return []
            doc[0].pos_ = "NOUN"
            return [w.lower() for w in lem.rule_lemmatize(doc[0])]

        return noun_lemma

    # -- work ----------------------------------------------------------------------------------

    def keywords(self, names: Sequence[str], brands: Sequence[Iterable[str]] | None = None) -> list[Keywords]:
        """Keywords of each product name (Indonesian: `brands[i]` = brand names of product i,
        whose words are never its keyword); each distinct name is parsed once and remembered."""
        brand_keys = [tuple(sorted(b)) for b in brands] if brands is not None else [()] * len(names)
        if len(brand_keys) != len(names):
            raise StageError(f"probes: {len(names)} product names but {len(brand_keys)} brand lists")
        keys = [(clean_text(n), b if self.language != "en" else ()) for n, b in zip(names, brand_keys, strict=True)]
        todo = [k for k in dict.fromkeys(keys) if k not in self._names]
        if todo:
            if len(self._names) + len(todo) > NAME_CACHE_MAX:
                self._names.clear()
            texts = [name_text(n, self.mode) if self.language == "en" else n for n, _ in todo]
            for (n, b), doc in zip(todo, self.nlp.pipe(texts, batch_size=self.batch_size), strict=True):
                if self.language == "en":
                    kw = english_keywords(
                        doc, len(name_head(n)), mode=self.mode, near_root=self.near_root, noun_lemma=self._noun_lemma
                    )
                else:
                    kw = indonesian_keywords(doc, mode=self.mode, near_root=self.near_root, brands=b)
                self._names[(n, b)] = kw
        return [self._names[k] for k in keys]

    def parse(self, texts: Sequence[str]) -> Iterator[Any]:
        """Docs of cleaned texts, in order, as `nlp.pipe` yields them (so masks are computed
        while worker processes parse on). A text the pipeline fails on yields its exception."""
        done = 0
        try:
            for doc in self.nlp.pipe(texts, batch_size=self.batch_size, n_process=self.n_process):
                yield doc
                done += 1
        except Exception:  # isolate the text at fault: the rest are parsed one by one
            for t in texts[done:]:
                try:
                    yield self.nlp(t)
                except Exception as e:  # recorded as that item's failure
                    yield e

    def masks(
        self, reviews: Sequence[str], names: Sequence[str], brands: Sequence[Iterable[str]] | None = None,
    ) -> list[ProbeResult | Exception]:
        """Probe masks of reviews (each with its product's name), in order; a review that
        could not be processed gets its exception (the stage records it as a failure)."""
        if len(reviews) != len(names):
            raise StageError(f"probes: {len(reviews)} reviews but {len(names)} product names")
        kws = self.keywords(names, brands)
        by_text: dict[str, list[int]] = {}
        for i, r in enumerate(reviews):
            by_text.setdefault(clean_text(r), []).append(i)
        unique = list(by_text)
        out: list[ProbeResult | Exception | None] = [None] * len(reviews)
        backend = self.backend()
        if backend is None or getattr(backend, "streaming", False):
            # Coreference per doc as it arrives (the rules backend, keyword mentions, or none).
            for text, doc in zip(unique, self.parse(unique), strict=True):
                for i in by_text[text]:
                    if isinstance(doc, Exception):
                        out[i] = doc
                        continue
                    out[i] = self._one(doc, kws[i], backend)
            return out  # type: ignore[return-value]
        # Batch backends (neuralcoref's side process): every doc of the chunk at once.
        pairs = []
        for text, doc in zip(unique, self.parse(unique), strict=True):
            for i in by_text[text]:
                if isinstance(doc, Exception):
                    out[i] = doc
                else:
                    pairs.append((i, doc))
        found = backend.clusters([d for _, d in pairs], [kws[i] for i, _ in pairs]) if pairs else []
        errors = getattr(backend, "errors", {})
        for j, ((i, doc), clusters) in enumerate(zip(pairs, found, strict=True)):
            if clusters is None:  # this review alone: a failure record, never a silent fallback
                out[i] = StageError(f"{backend.name} failed on this review: {errors.get(j, 'no result')}")
            else:
                out[i] = self._mask_or_error(doc, kws[i], clusters)
        return out  # type: ignore[return-value]

    def _one(self, doc: Any, keywords: Keywords, backend: Any) -> ProbeResult | Exception:
        try:
            if self.coref_used == ID_COREF:
                clusters = keyword_mention_clusters(doc, keywords)
            elif backend is None:
                clusters = []
            else:
                clusters = backend.clusters([doc], [keywords])[0]
        except Exception as e:  # a bug on odd input must not sink the chunk
            return e
        return self._mask_or_error(doc, keywords, clusters)

    def _mask_or_error(self, doc: Any, keywords: Keywords, clusters: Sequence[Cluster]) -> ProbeResult | Exception:
        try:
            return sentence_mask(
                doc, keywords, clusters, mode=self.mode, coref=self.coref_used, keyword_test=self.keyword_test,
            )
        except Exception as e:  # a bug on odd input must not sink the chunk
            return e


def keyword_mention_clusters(doc: Any, keywords: Keywords) -> list[Cluster]:
    """Indonesian: the keyword's mentions (word level, clitics stripped) as the one cluster."""
    if not keywords:
        return []
    mentions = [(t.i, t.i + 1) for t in doc if not t.is_space and keywords.matches(t)]
    return [mentions] if mentions else []


def sentence_mask(
    doc: Any, keywords: Keywords, clusters: Sequence[Cluster], *, mode: str = "paper", coref: str = "rules",
    keyword_test: str = "substring",
) -> ProbeResult:
    """The mask of one parsed review over its raw tokens (whitespace tokens skipped), by
    `algorithm1` (paper) or `script_rule` (script)."""
    raw = [t for t in doc if not t.is_space]
    meta: dict[str, Any] = {**keywords.to_json(), "coref": coref, "mode": mode}
    if coref == ID_COREF:
        meta["coref_note"] = NO_ID_COREF
    if not raw:
        meta["reason"] = "empty review text"
        return ProbeResult(np.zeros(0, dtype=np.uint8), meta)
    n = len(doc)
    if mode == "paper":
        starts = [s.start for s in doc.sents]
        mask, info = algorithm1(n, starts, clusters, lambda i: bool(keywords) and keywords.matches(doc[i]))
    else:
        starts = script_sentence_starts([t.text for t in doc], [t.is_punct for t in doc])
        sent = sentence_index(starts, n)
        hits: set[int] = set()
        if keywords:
            if keyword_test == "word":
                hits = {int(sent[t.i]) for t in raw if keywords.matches(t)}
            else:
                bounds = [*starts, n]
                for si in range(len(starts)):
                    text = " ".join(t.lower_ for t in doc[bounds[si]:bounds[si + 1]] if not t.is_space)
                    if keywords.in_sentence(text):
                        hits.add(si)
        mask, info = script_rule(n, starts, clusters, hits)
        meta["keyword_test"] = keyword_test
        meta["keyword_sentences"] = sorted(hits)[:MAX_META_SENTENCES]
    gold = info["gold"]
    if gold is not None:
        meta["cluster_rule"] = info["cluster_rule"]
        meta["cluster"] = [doc[s:e].text[:40] for s, e in clusters[gold][:8]]
    sent = sentence_index(starts, n)
    masked = sorted({int(sent[i]) for i in np.flatnonzero(mask)})
    meta["sentences"] = len(starts)
    meta["masked_sentence_count"] = len(masked)
    if len(masked) <= MAX_META_SENTENCES:  # the meta stays small for very long reviews
        meta["masked_sentences"] = masked
    out = np.fromiter((mask[t.i] for t in raw), dtype=np.uint8, count=len(raw))
    if not out.any():
        meta["reason"] = _zero_reason(mode, keywords, clusters, coref)
    return ProbeResult(out, meta)


def _zero_reason(mode: str, keywords: Keywords, clusters: Sequence[Cluster], coref: str) -> str:
    if mode == "paper":
        if not clusters:
            if coref == ID_COREF:
                return "no mention of the keyword " + (
                    f"{list(keywords.words)}" if keywords else f"(none: {keywords.reason or 'no keyword in the name'})"
                )
            return "no coreference cluster in the review (Algorithm 1: all-zero mask)"
        return "the gold cluster's mentions are in no sentence"  # not reachable with valid clusters
    if not keywords:
        return f"no keyword ({keywords.reason or 'none in the product name'}) and no coreference cluster"
    return "no sentence passes the keyword test and no coreference cluster was found"


class ProbesStage:
    """Probe masks of every review of one dataset."""

    name = "probes"
    schema = SCHEMA
    depends_on: tuple[str, ...] = ()

    def __init__(self, *, params: ProbesParams, language: str, dataset: str, records_loader: Any) -> None:
        self.params = params
        self.language = language
        self.dataset = dataset
        self._records_loader = records_loader
        self.masker = ProbeMasker.from_params(params, language)

    @property
    def coref_used(self) -> str:
        return self.masker.coref_used

    def summary_note(self) -> str:
        """One line for the end-of-run summary and `mrhp status`: the coreference backend used."""
        return self.masker.coref_note()

    def _qualifiers(self) -> tuple[str, ...]:
        q: tuple[str, ...] = (self.params.mode, self.coref_used, self.language)
        if self.params.mode == "paper":
            q = (*q, str(self.params.near_root))
        else:
            q = (*q, self.params.keyword_test)
        return q

    def fingerprint(self) -> str:
        p = dataclasses.asdict(self.params)
        for k in ("batch_size", "n_process"):  # do not change any output
            p.pop(k)
        p["coref"] = self.coref_used  # the backend that runs, not the name asked for ("auto")
        if p["mode"] != "paper":
            p.pop("near_root")
        else:
            p.pop("keyword_test")
        return stage_fingerprint(self.name, {**p, "language": self.language}, code_version=CODE_VERSION)

    def check_backend(self) -> None:
        """StageError now (before any work) when the coreference backend cannot run."""
        self.masker.backend()

    def plan(self) -> Plan:
        self.check_backend()
        records = self._records_loader()
        items: dict[str, WorkItem] = {}
        view: dict[str, str] = {}
        for r in records.reviews:
            it = self.work_item(r.text, records.products.get(r.product_id))
            items.setdefault(it.key, it)
            view[f"rvw:{r.id}"] = it.key
        return Plan(items=items, view=view)

    def work_item(self, text: str, product: Any | None) -> WorkItem:
        """The work item of one review text under its product (a `pipeline.records.Product`, or
        None: no name), keyed as `plan` keys it (`mrhp predict` featurises new reviews through it
        and `run`)."""
        name = product.name if product is not None else ""
        brand = getattr(product, "brand", "") if self.language != "en" else ""
        brands = (brand,) if brand else ()
        key = text_key(clean_text(text), self.name, clean_text(name), *brands, *self._qualifiers())
        return WorkItem(key=key, source=(text, name, brands))

    def run(self, items: Sequence[WorkItem]) -> Iterator[Record]:
        results = self.masker.masks(
            [it.source[0] for it in items], [it.source[1] for it in items],
            [it.source[2] if len(it.source) > 2 else () for it in items],
        )
        for it, res in zip(items, results, strict=True):
            if isinstance(res, Exception):
                yield Record(key=it.key, failure=f"probe mask failed: {type(res).__name__}: {res}")
            else:
                yield Record(key=it.key, arrays={"mask": res.mask}, meta=res.meta)


def build_stage(manifest: Any, dataset_name: str, *, records: Any = None) -> ProbesStage:
    """The probes stage of `dataset_name` (records: already-loaded DatasetRecords, e.g. tests)."""
    from features.text.tokens import records_loader

    spec = manifest.dataset(dataset_name)
    return ProbesStage(
        params=manifest.stage_params("probes"),
        language=spec.language,
        dataset=dataset_name,
        records_loader=records_loader(manifest, dataset_name, records),
    )
