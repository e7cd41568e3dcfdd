"""Stage "embeddings": the embedding matrix of each vocabulary from GloVe/fastText via gensim.

View item ids `prd_vocab` and `rvw_vocab`; field `matrix` (float32, ragged (V, dim)): row i is
the vector of vocabulary id i, PAD row zeros, rows of words the vectors lack uniform(+-oov_init)
(REFERENCE.md section 3). An item's key is the hash of its vocabulary's word list, and the
fingerprint holds the vector source's sha256 and the parameters, so a matrix is rebuilt only
when its vocabulary, the vectors or the parameters change. In standard vocabulary mode both
view ids point at one item. Coverage (share of the vocabulary found) goes into the record meta
and the log.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from features.text.tokens import records_loader
from features.text.vectors import LoadedVectors, build_matrix, load_vectors, source_sha256
from features.text.vocab import FIELDS, Vocabularies, fit_vocabularies, read_vocabularies, train_texts
from pipeline.errors import StageError
from pipeline.hashing import fingerprint as stage_fingerprint
from pipeline.params import EmbeddingsParams
from pipeline.stage import FieldSpec, Plan, Record, WorkItem

log = logging.getLogger(__name__)

CODE_VERSION = "embeddings-1"


class EmbeddingsStage:
    """Embedding matrices of one dataset's product and review vocabularies."""

    name = "embeddings"
    depends_on: tuple[str, ...] = ("tokens",)

    def __init__(
        self,
        *,
        params: EmbeddingsParams,
        tokens_params: Any,
        vectors_spec: Any,
        language: str,
        dataset: str,
        records_loader: Any,
        store_root: Path,
    ) -> None:
        if params.oov_init < 0:
            raise StageError(f"embeddings.oov_init must be >= 0, got {params.oov_init}")
        self.params = params
        self.tokens_params = tokens_params
        self.vectors_spec = vectors_spec
        self.language = language
        self.dataset = dataset
        self._records_loader = records_loader
        self.store_root = Path(store_root)
        self._vectors: LoadedVectors | None = None
        self._sha: str | None = None

    @property
    def schema(self) -> dict[str, FieldSpec]:
        """`matrix` rows have the vectors' dimension: loads (memory-maps) the vectors."""
        return {"matrix": FieldSpec("float32", (self.loaded_vectors().dim,), ragged=True)}

    def vectors_sha256(self) -> str:
        if self._sha is None:
            self._sha = source_sha256(self.vectors_spec, cache_root=self.store_root)
        return self._sha

    def fingerprint(self) -> str:
        return stage_fingerprint(
            self.name,
            {
                **dataclasses.asdict(self.params),
                "vectors": {"format": self.vectors_spec.format, "sha256": self.vectors_sha256()},
            },
            code_version=CODE_VERSION,
        )

    def vocabularies(self) -> Vocabularies:
        records = self._records_loader()
        prd, rvw = train_texts(records)
        return fit_vocabularies(
            prd, rvw, language=self.language, params=self.tokens_params, store_root=self.store_root,
            dataset=self.dataset,
        )

    def plan(self) -> Plan:
        vocabs = self.vocabularies()
        items: dict[str, WorkItem] = {}
        view: dict[str, str] = {}
        for fld in FIELDS:
            key = hashlib.sha256(f"{self.name}\0{vocabs.field(fld).digest()}".encode()).hexdigest()
            items.setdefault(key, WorkItem(key=key, source=(vocabs.fingerprint, fld)))
            view[f"{fld}_vocab"] = key
        return Plan(items=items, view=view)

    def loaded_vectors(self) -> LoadedVectors:
        if self._vectors is None:
            self._vectors = load_vectors(self.vectors_spec, cache_root=self.store_root)
        return self._vectors

    def run(self, items: Sequence[WorkItem]) -> Iterator[Record]:
        vectors = self.loaded_vectors()
        for it in items:
            vocab_fp, fld = it.source
            vocab = read_vocabularies(self.store_root, vocab_fp).field(fld)
            matrix, cov = build_matrix(vocab.words, vectors, oov_init=self.params.oov_init, seed=self.params.seed)
            if cov.words and not cov.found + cov.subword:
                # every row random: vectors of another language or casing, not "low coverage"
                raise StageError(
                    f"embeddings {self.dataset}/{fld}: none of the {cov.words:,} vocabulary words is in the "
                    f"word vectors {self.vectors_spec.name!r}, so every row would be random; check "
                    f"datasets.{self.dataset}.word_vectors (language {self.language!r})"
                )
            log.info(
                "embeddings %s/%s: %d words, %.1f%% found in %s%s", self.dataset, fld, cov.words,
                100 * cov.share, self.vectors_spec.name,
                f" (+{cov.subword} from subwords)" if vectors.subwords else "",
            )
            yield Record(
                key=it.key,
                arrays={"matrix": matrix},
                meta={
                    "field": fld, "vocab": vocab_fp, "vectors": self.vectors_spec.name,
                    "vectors_sha256": vectors.sha256, "dim": vectors.dim, **cov.to_json(),
                },
            )


def build_stage(manifest: Any, dataset_name: str, *, records: Any = None) -> EmbeddingsStage:
    """The embeddings stage of `dataset_name` (records: already-loaded DatasetRecords, e.g. tests)."""
    spec = manifest.dataset(dataset_name)
    return EmbeddingsStage(
        params=manifest.stage_params("embeddings"),
        tokens_params=manifest.stage_params("tokens"),
        vectors_spec=manifest.word_vectors(spec.word_vectors),
        language=spec.language,
        dataset=dataset_name,
        records_loader=records_loader(manifest, dataset_name, records),
        store_root=Path(manifest.store_root),
    )
