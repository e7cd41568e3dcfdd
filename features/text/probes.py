"""Stage "probes": SANCL probe masks over the raw tokens of each review (REFERENCE.md section 7).

For a review of a product: the keyword(s) of the product name (`features.text.keywords`),
coreference clusters over the review (`features.text.coref`), then every sentence that contains
a keyword match or a mention of the chosen cluster is 1 for all its tokens, every other token 0.
The chosen cluster is the first one (by first mention) with a mention containing a keyword
match, else the first cluster (SANCL's script; in `paper` mode the keywords are the nouns near
the root, Algorithm 1's core words). The mask covers the review's raw tokens (docs/design.md),
so `mask[pos]` aligns it with the tokens stage's ids.

View item ids `rvw:<review_id>`; field `mask` (uint8, ragged (n_raw,)). An item's key is
`text_key(review, "probes", product name, mode, backend, language[, near_root])`. Each distinct
review text is parsed once per chunk, each distinct product name once per stage object.
Nothing found (empty review, no keyword in the name, no match): an all-zero mask and the reason
in the record meta. Indonesian: keyword sentences only, the reason recorded in the meta.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from features.params import ProbesParams
from features.text.coref import BACKENDS, Cluster, get_backend
from features.text.keywords import Keywords, english_keywords, indonesian_keywords, name_head, name_text
from features.text.tokenize import check_language, clean_text, load_english, tokenizer_pipeline
from pipeline.errors import StageError
from pipeline.hashing import fingerprint as stage_fingerprint
from pipeline.hashing import text_key
from pipeline.stage import FieldSpec, Plan, Record, WorkItem

log = logging.getLogger(__name__)

CODE_VERSION = "probes-1"
SCHEMA = {"mask": FieldSpec("uint8", (), ragged=True)}
MAX_META_SENTENCES = 64  # masked sentence indices listed in a record's meta at most
NAME_CACHE_MAX = 200_000  # distinct product names remembered per stage object
NO_ID_COREF = "no coreference model for Indonesian: keyword sentences only"


@dataclasses.dataclass
class ProbeResult:
    """The mask of one review and what explains it."""

    mask: np.ndarray  # uint8 (n_raw,)
    meta: dict[str, Any]  # keywords, cluster used, masked sentences, reason when all zero


class ProbeMasker:
    """Parse + keywords + coreference + sentence mask, without the store (used by the stage,
    the benchmarks and prediction on new reviews)."""

    def __init__(
        self,
        *,
        language: str = "en",
        mode: str = "script",
        coref: str = "rules",
        near_root: int = 1,
        batch_size: int = 256,
        n_process: int = 1,
    ) -> None:
        check_language(language)
        if mode not in ("script", "paper"):
            raise StageError(f"probes.mode must be 'script' or 'paper', got {mode!r}")
        if coref not in BACKENDS:
            raise StageError(f"probes.coref: unknown backend {coref!r}; valid: {', '.join(BACKENDS)}")
        if near_root < 0 or batch_size < 1 or n_process < 1:
            raise StageError(
                f"probes: near_root must be >= 0 and batch_size, n_process >= 1; got near_root="
                f"{near_root}, batch_size={batch_size}, n_process={n_process}"
            )
        self.language = language
        self.mode = mode
        self.coref_name = coref
        self.near_root = near_root
        self.batch_size = batch_size
        self.n_process = n_process
        self._nlp: Any = None
        self._backend: Any = None
        self._names: dict[str, Keywords] = {}

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
                self._nlp = tokenizer_pipeline("id")  # blank "id" + sentencizer, shared
        return self._nlp

    def coref_note(self) -> str | None:
        """Why coreference is not used for this masker (None when it is)."""
        if self.coref_name == "none":
            return "coreference disabled (probes.coref: none): keyword sentences only"
        if self.language != "en":
            return NO_ID_COREF
        return None

    def backend(self) -> Any:
        if self._backend is None and self.coref_note() is None:
            self._backend = get_backend(self.coref_name)
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

    def keywords(self, names: Sequence[str]) -> list[Keywords]:
        """Keywords of each product name; each distinct name is parsed once and remembered."""
        cleaned = [clean_text(n) for n in names]
        todo = [n for n in dict.fromkeys(cleaned) if n not in self._names]
        if todo:
            if len(self._names) + len(todo) > NAME_CACHE_MAX:
                self._names.clear()
            docs = self.nlp.pipe([name_text(n) if self.language == "en" else n for n in todo], batch_size=self.batch_size)
            for n, doc in zip(todo, docs):
                if self.language == "en":
                    kw = english_keywords(
                        doc, len(name_head(n)), mode=self.mode, near_root=self.near_root, noun_lemma=self._noun_lemma
                    )
                else:
                    kw = indonesian_keywords(doc, mode=self.mode, near_root=self.near_root)
                self._names[n] = kw
        return [self._names[n] for n in cleaned]

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

    def masks(self, reviews: Sequence[str], names: Sequence[str]) -> list[ProbeResult | Exception]:
        """Probe masks of reviews (each with its product's name), in order; a review that
        could not be processed gets its exception (the stage records it as a failure)."""
        if len(reviews) != len(names):
            raise StageError(f"probes: {len(reviews)} reviews but {len(names)} product names")
        kws = self.keywords(names)
        by_text: dict[str, list[int]] = {}
        for i, r in enumerate(reviews):
            by_text.setdefault(clean_text(r), []).append(i)
        unique = list(by_text)
        out: list[ProbeResult | Exception | None] = [None] * len(reviews)
        note = self.coref_note()
        backend = None if note else self.backend()
        if backend is None or getattr(backend, "streaming", False):
            # Coreference per doc as it arrives (the rules backend, or none).
            for text, doc in zip(unique, self.parse(unique)):
                for i in by_text[text]:
                    if isinstance(doc, Exception):
                        out[i] = doc
                        continue
                    clusters = [] if backend is None else backend.clusters([doc], [kws[i]])[0]
                    out[i] = _mask_or_error(doc, kws[i], clusters, note or self.coref_name)
            return out  # type: ignore[return-value]
        # Batch backends (neuralcoref's side process): every doc of the chunk at once.
        pairs = []
        for text, doc in zip(unique, self.parse(unique)):
            for i in by_text[text]:
                if isinstance(doc, Exception):
                    out[i] = doc
                else:
                    pairs.append((i, doc))
        found = backend.clusters([d for _, d in pairs], [kws[i] for i, _ in pairs]) if pairs else []
        errors = getattr(backend, "errors", {})
        for j, ((i, doc), clusters) in enumerate(zip(pairs, found)):
            if clusters is None:
                why = f"{backend.name} failed on this review ({errors.get(j, 'no result')}): keyword sentences only"
                out[i] = _mask_or_error(doc, kws[i], [], why)
            else:
                out[i] = _mask_or_error(doc, kws[i], clusters, backend.name)
        return out  # type: ignore[return-value]


def _mask_or_error(doc: Any, keywords: Keywords, clusters: Sequence[Cluster], coref: str) -> ProbeResult | Exception:
    try:
        return sentence_mask(doc, keywords, clusters, coref=coref)
    except Exception as e:  # a bug on odd input must not sink the chunk
        return e


def sentence_mask(doc: Any, keywords: Keywords, clusters: Sequence[Cluster], *, coref: str = "rules") -> ProbeResult:
    """The mask of one parsed review: sentences with a keyword match or a mention of the chosen
    cluster are 1 (over the raw tokens: whitespace tokens skipped)."""
    raw = [t for t in doc if not t.is_space]
    meta: dict[str, Any] = {**keywords.to_json(), "coref": coref}
    if not raw:
        meta["reason"] = "empty review text"
        return ProbeResult(np.zeros(0, dtype=np.uint8), meta)
    if not keywords:
        meta["reason"] = keywords.reason or "no keyword in the product name"
        return ProbeResult(np.zeros(len(raw), dtype=np.uint8), meta)
    starts = np.array([s.start for s in doc.sents], dtype=np.int64)
    sent_of = np.searchsorted(starts, np.arange(len(doc)), side="right") - 1
    hits = {t.i for t in raw if keywords.matches(t)}
    masked = {int(sent_of[i]) for i in hits}
    chosen, rule = None, None
    for c in clusters:
        if any(i in hits for s, e in c for i in range(s, e)):
            chosen, rule = c, "keyword"
            break
    if chosen is None and clusters:
        chosen, rule = clusters[0], "first"
    if chosen is not None:
        for s, e in chosen:
            masked.update(int(x) for x in np.unique(sent_of[s:e]))
        meta["cluster_rule"] = rule
        meta["cluster"] = [doc[s:e].text[:40] for s, e in chosen[:8]]
    meta["sentences"] = int(len(starts))
    meta["masked_sentence_count"] = len(masked)
    if len(masked) <= MAX_META_SENTENCES:  # the meta stays small for very long reviews
        meta["masked_sentences"] = sorted(masked)
    mask = np.fromiter((sent_of[t.i] in masked for t in raw), dtype=np.uint8, count=len(raw))
    if not mask.any():
        meta["reason"] = "no sentence mentions the keyword and no coreference cluster was found"
    return ProbeResult(mask, meta)


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
        self.masker = ProbeMasker(
            language=language, mode=params.mode, coref=params.coref, near_root=params.near_root,
            batch_size=params.batch_size, n_process=params.n_process,
        )

    def _qualifiers(self) -> tuple[str, ...]:
        q = (self.params.mode, self.params.coref, self.language)
        return (*q, str(self.params.near_root)) if self.params.mode == "paper" else q

    def fingerprint(self) -> str:
        p = dataclasses.asdict(self.params)
        for k in ("batch_size", "n_process"):  # do not change any output
            p.pop(k)
        if p["mode"] != "paper":
            p.pop("near_root")
        return stage_fingerprint(self.name, {**p, "language": self.language}, code_version=CODE_VERSION)

    def check_backend(self) -> None:
        """StageError now (before any work) when the coreference backend cannot run."""
        if self.masker.coref_note() is None:
            self.masker.backend()

    def plan(self) -> Plan:
        self.check_backend()
        records = self._records_loader()
        items: dict[str, WorkItem] = {}
        view: dict[str, str] = {}
        for r in records.reviews:
            product = records.products.get(r.product_id)
            name = product.name if product is not None else ""
            key = text_key(clean_text(r.text), self.name, clean_text(name), *self._qualifiers())
            items.setdefault(key, WorkItem(key=key, source=(r.text, name)))
            view[f"rvw:{r.id}"] = key
        return Plan(items=items, view=view)

    def run(self, items: Sequence[WorkItem]) -> Iterator[Record]:
        results = self.masker.masks([it.source[0] for it in items], [it.source[1] for it in items])
        for it, res in zip(items, results):
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
