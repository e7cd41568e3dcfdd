"""Stage "tokens": token ids per text field, in the dataset's vocabularies (docs/design.md).

View item ids `prd:<product_id>` and `rvw:<review_id>`; fields `ids` (int32, ragged), `pos`
(int32, ragged: index of each kept token among the raw tokens) and `n_raw` (int32: number of raw
tokens). An item's key is `text_key(text, "tokens", field, digest of the field's vocabulary)`,
so an unchanged text with an unchanged vocabulary is never recomputed (a new review vocabulary
leaves product items alone), and a text shared by several items is computed once.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from features.text.tokenize import check_language, clean_text, tokenize, tokenizer_id
from features.text.vocab import Vocabularies, Vocabulary, fit_vocabularies, read_vocabularies, train_texts
from pipeline.errors import StageError
from pipeline.hashing import fingerprint as stage_fingerprint
from pipeline.hashing import text_key
from pipeline.params import TokensParams
from pipeline.stage import FieldSpec, Plan, Record, WorkItem

log = logging.getLogger(__name__)

CODE_VERSION = "tokens-1"
SCHEMA = {
    "ids": FieldSpec("int32", (), ragged=True),
    "pos": FieldSpec("int32", (), ragged=True),
    "n_raw": FieldSpec("int32", ()),
}


@dataclasses.dataclass
class Encoded:
    """One text in a vocabulary: what the stage stores for it."""

    ids: np.ndarray  # int32 (t,) token ids (0 PAD never appears; 1 OOV in standard mode)
    pos: np.ndarray  # int32 (t,) index of each kept token among the raw tokens
    n_raw: int  # number of raw tokens of the text


def encode_texts(
    texts: Sequence[str], vocab: Vocabulary, *, language: str, max_len: int = 128, batch_size: int = 512
) -> list[Encoded]:
    """Tokenize texts and encode them in `vocab`, as the stage's `run` does (`token_arrays`)."""
    out = []
    for toks in tokenize(texts, language, batch_size=batch_size):
        a = token_arrays(toks, vocab, max_len)
        out.append(Encoded(ids=a["ids"], pos=a["pos"], n_raw=int(a["n_raw"])))
    return out


def token_arrays(toks: Sequence[str], vocab: Vocabulary, max_len: int) -> dict[str, np.ndarray]:
    """The stored arrays of one text's raw tokens in `vocab` (`ids`, `pos`, `n_raw`: SCHEMA)."""
    ids, pos = vocab.encode(toks, max_len)
    return {"ids": ids, "pos": pos, "n_raw": np.asarray(len(toks), dtype=np.int32)}


def load_records(manifest: Any, dataset_name: str) -> Any:
    """The dataset's records through the MRHP reader (imported lazily: it is another package)."""
    from features.records_cache import load_dataset_once

    return load_dataset_once(manifest.dataset(dataset_name))  # once per command, shared by the stages


def records_loader(manifest: Any, dataset_name: str, records: Any = None) -> Any:
    """A picklable loader of the dataset's records (the given ones, else the MRHP reader's)."""
    if records is not None:
        return GivenRecords(records)
    return functools.partial(load_records, manifest, dataset_name)


def dataset_vocabularies(manifest: Any, dataset_name: str, *, records: Any = None) -> Vocabularies:
    """The vocabularies of a dataset under the manifest's tokens parameters: fit on its train
    split on first use, read from `<store root>/vocab/` afterwards."""
    spec = manifest.dataset(dataset_name)
    params: TokensParams = manifest.stage_params("tokens")
    if records is None:
        records = load_records(manifest, dataset_name)
    prd, rvw = train_texts(records)
    return fit_vocabularies(
        prd, rvw, language=spec.language, params=params, store_root=Path(manifest.store_root),
        dataset=dataset_name,
    )


def load_vocabularies(
    manifest: Any, dataset_name: str, *, fingerprint: str | None = None
) -> tuple[Vocabulary, Vocabulary]:
    """(product vocabulary, review vocabulary) of a dataset; with `fingerprint`, exactly the saved
    pair of that fingerprint (what a trained model recorded), without reading the dataset."""
    if fingerprint is not None:
        v = read_vocabularies(Path(manifest.store_root), fingerprint)
    else:
        v = dataset_vocabularies(manifest, dataset_name)
    return v.prd, v.rvw


class TokensStage:
    """Token ids of every product and review text of one dataset."""

    name = "tokens"
    schema = SCHEMA
    depends_on: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        params: TokensParams,
        language: str,
        dataset: str,
        records_loader: Callable[[], Any],
        store_root: Path | None,
    ) -> None:
        check_language(language)
        if params.max_len < 1 or params.min_freq < 1 or params.n_process < 1:
            raise StageError(
                f"tokens: max_len, min_freq and n_process must be >= 1, got max_len={params.max_len}, "
                f"min_freq={params.min_freq}, n_process={params.n_process}"
            )
        if params.batch_size < 1:
            raise StageError(f"tokens.batch_size: expected a positive integer, got {params.batch_size}")
        if params.max_vocab is not None:  # before: ignored in mcr mode, an empty vocabulary below 3
            if params.mode != "standard":
                raise StageError(
                    f"tokens.max_vocab: applies to mode 'standard' only (mode {params.mode!r} keeps every "
                    f"train term at min_freq); remove max_vocab or set mode: standard"
                )
            if params.max_vocab < 3:
                raise StageError(f"tokens.max_vocab: expected >= 3 (PAD, OOV and at least one word), "
                                 f"got {params.max_vocab}")
        self.params = params
        self.language = language
        self.dataset = dataset
        self._records_loader = records_loader
        self.store_root = store_root
        self.vocabularies: Vocabularies | None = None
        self._digests: dict[tuple[str, str], str] = {}  # (vocabularies fingerprint, field) -> digest

    def fingerprint(self) -> str:
        # The vocabulary is not part of it: its fingerprint is in every item key instead, so one
        # folder of segments serves successive vocabularies and unchanged items are reused.
        p = dataclasses.asdict(self.params)
        p.pop("batch_size")  # does not change any output
        p.pop("n_process", None)  # neither does the number of tokenizing processes
        return stage_fingerprint(
            self.name, {**p, "language": self.language, "tokenizer": tokenizer_id(self.language)},
            code_version=CODE_VERSION,
        )

    def plan(self) -> Plan:
        records = self._records_loader()
        prd, rvw = train_texts(records)
        vocabs = self.vocabularies = fit_vocabularies(
            prd, rvw, language=self.language, params=self.params, store_root=self.store_root,
            dataset=self.dataset,
        )
        items: dict[str, WorkItem] = {}
        view: dict[str, str] = {}

        def add(item_id: str, fld: str, text: str) -> None:
            it = self.work_item(fld, text, vocabs)
            items.setdefault(it.key, it)
            view[item_id] = it.key

        for pid, p in records.products.items():
            add(f"prd:{pid}", "prd", p.text)
        for r in records.reviews:
            add(f"rvw:{r.id}", "rvw", r.text)
        return Plan(items=items, view=view)

    def work_item(self, fld: str, text: str, vocabularies: Vocabularies) -> WorkItem:
        """The work item of one text of field `fld` ("prd" or "rvw") in `vocabularies`, keyed as
        `plan` keys it (`mrhp predict` featurises new texts through it and `run`)."""
        fp = vocabularies.fingerprint
        digest = self._digests.get((fp, fld))
        if digest is None:
            digest = self._digests[(fp, fld)] = vocabularies.field(fld).digest()
        key = text_key(clean_text(text), self.name, fld, digest)
        return WorkItem(key=key, source=(fld, text, fp))

    def vocabularies_for(self, fingerprint: str) -> Vocabularies:
        """The planned vocabularies; read back from the store when this object did not plan
        (a stage rebuilt in another worker process, or `mrhp predict` with a run's vocabulary)."""
        if self.vocabularies is None or self.vocabularies.fingerprint != fingerprint:
            if self.store_root is None:
                raise StageError("tokens: run() needs plan() first when no store root is set")
            self.vocabularies = read_vocabularies(self.store_root, fingerprint)
        return self.vocabularies

    def run(self, items: Sequence[WorkItem]) -> Iterator[Record]:
        texts = [it.source[1] for it in items]
        toks_iter = tokenize_parallel(texts, self.language, batch_size=self.params.batch_size,
                                      n_process=self.params.n_process)
        for it, toks in zip(items, toks_iter, strict=True):
            fld, _, vfp = it.source
            vocabs = self.vocabularies_for(vfp)
            arrays = token_arrays(toks, vocabs.field(fld), self.params.max_len)
            meta: dict[str, Any] = {"field": fld, "vocab": vfp}
            if not toks:
                meta["reason"] = "empty text: no tokens"
            elif len(arrays["ids"]) == 0:
                meta["reason"] = "no token of the text is in the vocabulary"
            yield Record(key=it.key, arrays=arrays, meta=meta)


def build_stage(manifest: Any, dataset_name: str, *, records: Any = None) -> TokensStage:
    """The tokens stage of `dataset_name` (records: already-loaded DatasetRecords, e.g. in tests)."""
    spec = manifest.dataset(dataset_name)
    return TokensStage(
        params=manifest.stage_params("tokens"),
        language=spec.language,
        dataset=dataset_name,
        records_loader=records_loader(manifest, dataset_name, records),
        store_root=Path(manifest.store_root),
    )


# --------------------------------------------------------------------------- n_process

_POOL_CHUNK = 1000  # texts per task handed to a tokenizing process
_pools: dict[tuple[str, int], Any] = {}
_pools_lock = __import__("threading").Lock()


def _tokenize_chunk(args: tuple[list[str], str, int]) -> list[list[str]]:
    texts, language, batch_size = args
    return list(tokenize(texts, language, batch_size=batch_size))


def _pool(language: str, n_process: int):
    """A persistent pool of `n_process` tokenizing processes per language (spawned once per
    process, reused by every chunk; spawn, not fork: the flow process runs threads)."""
    import atexit
    import multiprocessing as mp

    with _pools_lock:
        pool = _pools.get((language, n_process))
        if pool is None:
            pool = mp.get_context("spawn").Pool(n_process)
            _pools[(language, n_process)] = pool
            atexit.register(pool.terminate)
        return pool


def tokenize_parallel(texts: Sequence[str], language: str, *, batch_size: int = 512,
                      n_process: int = 1) -> Iterator[list[str]]:
    """`tokenize` over `n_process` processes (1: in this process), in input order. spaCy's
    tokenizer is single-threaded and pure Python-bound, so it scales with processes; each
    process loads the pipeline once. The tokens are the same whatever n_process."""
    if n_process <= 1 or len(texts) <= _POOL_CHUNK:
        yield from tokenize(texts, language, batch_size=batch_size)
        return
    chunks = [(list(texts[i:i + _POOL_CHUNK]), language, batch_size) for i in range(0, len(texts), _POOL_CHUNK)]
    for toks in _pool(language, n_process).imap(_tokenize_chunk, chunks):
        yield from toks


@dataclasses.dataclass(frozen=True)
class GivenRecords:
    """A records loader returning records already in memory (picklable, unlike a lambda)."""

    records: Any

    def __call__(self) -> Any:
        return self.records

