"""Vocabularies for the tokens stage (REFERENCE.md section 3) and their cache beside the store.

Two modes:
- `mcr` (MCR-compatible): separate product and review vocabularies fit on the train split only,
  terms with train frequency >= min_freq, sorted; id 0 PAD, 1 OOV. A token not in the
  vocabulary is *deleted* from the sequence (so OOV is reserved and never emitted); at most
  max_len tokens are kept after the deletion.
- `standard`: one vocabulary over product and review train texts (terms with frequency >=
  min_freq, by decreasing frequency then alphabetically, cut so that there are at most
  max_vocab ids, PAD and OOV included); unknown tokens map to OOV; truncated at max_len.

Saved as `<store root>/vocab/<fingerprint>/{prd,rvw}.txt` (line i = the word of id i) plus
`meta.json`; `<store root>/vocab/fits/<fit key>.json` remembers which fingerprint a given
(train texts, parameters, tokenizer) produced, so a rerun neither re-tokenizes nor refits.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from features.text.tokenize import clean_text, tokenize, tokenizer_id
from pipeline.errors import StageError, StoreError
from pipeline.params import TokensParams

log = logging.getLogger(__name__)

PAD, OOV = "<pad>", "<oov>"
PAD_ID, OOV_ID = 0, 1
VOCAB_CODE_VERSION = "vocab-1"
FIELDS = ("prd", "rvw")


@dataclass(frozen=True)
class Vocabulary:
    """Word list of one text field: `words[i]` is the word of id i (0 PAD, 1 OOV)."""

    words: tuple[str, ...]  # including PAD and OOV at ids 0 and 1
    drop_unknown: bool  # MCR mode: tokens not in the vocabulary are deleted, not mapped to OOV
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.words[:2] != (PAD, OOV):
            raise StageError(f"vocabulary must start with {PAD!r}, {OOV!r}; got {self.words[:2]!r}")
        object.__setattr__(self, "index", {w: i for i, w in enumerate(self.words)})
        if len(self.index) != len(self.words):
            dup = next(w for w, n in Counter(self.words).items() if n > 1)
            raise StageError(f"vocabulary lists the word {dup!r} twice")

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, tokens: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, pos) as int32 arrays: the kept tokens' ids and their indices in `tokens`."""
        ids: list[int] = []
        pos: list[int] = []
        for j, tok in enumerate(tokens):
            if len(ids) >= max_len:
                break
            i = self.index.get(tok)
            if i is None:
                if self.drop_unknown:
                    continue
                i = OOV_ID
            ids.append(i)
            pos.append(j)
        return np.asarray(ids, dtype=np.int32), np.asarray(pos, dtype=np.int32)

    def digest(self) -> str:
        """sha256 of the word list (order matters: it defines the ids)."""
        h = hashlib.sha256()
        for w in self.words:
            h.update(w.encode("utf-8"))
            h.update(b"\n")
        return h.hexdigest()


@dataclass(frozen=True)
class Vocabularies:
    """The product and review vocabularies of a dataset (the same object twice in standard mode)."""

    prd: Vocabulary
    rvw: Vocabulary
    mode: str  # "mcr" or "standard"
    fingerprint: str  # hash of mode and both word lists: names the folder they are saved in
    path: Path | None = None  # <store root>/vocab/<fingerprint> once saved

    def field(self, name: str) -> Vocabulary:
        if name not in FIELDS:
            raise StageError(f"unknown text field {name!r}; expected one of {', '.join(FIELDS)}")
        return self.prd if name == "prd" else self.rvw


def fit_vocabulary(
    token_lists: Iterable[Sequence[str]], *, mode: str, min_freq: int, max_vocab: int | None = None
) -> Vocabulary:
    """Fit one vocabulary on tokenized train texts (see the module docstring for the rules)."""
    if mode not in ("mcr", "standard"):
        raise StageError(f"tokens.mode must be 'mcr' or 'standard', got {mode!r}")
    if max_vocab is not None and max_vocab < 3:  # PAD and OOV take two ids: fewer left no word at all
        raise StageError(f"tokens.max_vocab: expected >= 3 (PAD, OOV and at least one word), got {max_vocab}")
    counts: Counter[str] = Counter()
    for toks in token_lists:
        counts.update(toks)
    counts.pop(PAD, None)
    counts.pop(OOV, None)
    kept = [w for w, n in counts.items() if n >= min_freq]
    if mode == "mcr":
        words = sorted(kept)
    else:
        words = sorted(kept, key=lambda w: (-counts[w], w))
        if max_vocab is not None:
            words = words[: max(0, max_vocab - 2)]
    return Vocabulary(words=(PAD, OOV, *words), drop_unknown=(mode == "mcr"))


def vocabularies_fingerprint(prd: Vocabulary, rvw: Vocabulary, mode: str) -> str:
    h = hashlib.sha256(f"{VOCAB_CODE_VERSION}\0{mode}\0".encode())
    h.update(prd.digest().encode())
    h.update(rvw.digest().encode())
    return h.hexdigest()[:16]


def train_texts(records: Any) -> tuple[list[str], list[str]]:
    """Product texts and review texts of the train split of a DatasetRecords, in id order."""
    prd = [p.text for pid, p in sorted(records.products.items()) if p.split == "train"]
    rvw = [r.text for r in sorted(records.reviews, key=lambda r: r.id) if r.split == "train"]
    return prd, rvw


def fit_key(prd_texts: Sequence[str], rvw_texts: Sequence[str], *, language: str, params: TokensParams) -> str:
    """Cache key of a fit: the train texts, the parameters that shape a vocabulary, the tokenizer."""
    h = hashlib.sha256()
    cfg = {
        "code": VOCAB_CODE_VERSION,
        "mode": params.mode,
        "min_freq": params.min_freq,
        "max_vocab": params.max_vocab if params.mode == "standard" else None,
        "tokenizer": tokenizer_id(language),
    }
    h.update(json.dumps(cfg, sort_keys=True).encode())
    for tag, texts in (("prd", prd_texts), ("rvw", rvw_texts)):
        h.update(f"\0{tag}:{len(texts)}\0".encode())
        for t in texts:
            h.update(clean_text(t).encode("utf-8"))
            h.update(b"\0")
    return h.hexdigest()[:32]


def fit_vocabularies(
    prd_texts: Sequence[str],
    rvw_texts: Sequence[str],
    *,
    language: str,
    params: TokensParams,
    store_root: Path | None = None,
    dataset: str = "",
) -> Vocabularies:
    """Fit (or reuse the cached fit of) both vocabularies on train texts; saved under store_root."""
    key = fit_key(prd_texts, rvw_texts, language=language, params=params)
    if store_root is not None:
        cached = _cached_fit(Path(store_root), key)
        if cached is not None:
            return cached
    if not prd_texts and not rvw_texts:
        raise StageError(f"dataset {dataset or '?'}: no train texts to fit the vocabularies on")
    prd_tokens = list(tokenize(prd_texts, language, batch_size=params.batch_size))
    rvw_tokens = list(tokenize(rvw_texts, language, batch_size=params.batch_size))
    if params.mode == "mcr":
        prd = fit_vocabulary(prd_tokens, mode="mcr", min_freq=params.min_freq)
        rvw = fit_vocabulary(rvw_tokens, mode="mcr", min_freq=params.min_freq)
    else:
        prd = rvw = fit_vocabulary(
            [*prd_tokens, *rvw_tokens], mode="standard", min_freq=params.min_freq,
            max_vocab=params.max_vocab,
        )
    fp = vocabularies_fingerprint(prd, rvw, params.mode)
    vocabs = Vocabularies(prd=prd, rvw=rvw, mode=params.mode, fingerprint=fp)
    log.info(
        "vocabularies %s (%s mode) fit on %d product and %d review train texts: %d / %d words",
        fp, params.mode, len(prd_texts), len(rvw_texts), len(prd), len(rvw),
    )
    from pipeline.store import writes_allowed

    if store_root is not None and writes_allowed():  # not in read-only mode (`mrhp status`)
        meta = {
            "mode": params.mode, "min_freq": params.min_freq, "max_len": params.max_len,
            "max_vocab": params.max_vocab, "language": language, "dataset": dataset,
            "tokenizer": tokenizer_id(language), "fit_key": key,
            "train_texts": {"prd": len(prd_texts), "rvw": len(rvw_texts)},
            "sizes": {"prd": len(prd), "rvw": len(rvw)},
        }
        vocabs = save_vocabularies(vocabs, Path(store_root), meta=meta)
        _write_atomic(_fits_dir(Path(store_root)) / f"{key}.json", json.dumps({"fingerprint": fp}))
    return vocabs


def save_vocabularies(vocabs: Vocabularies, store_root: Path, *, meta: dict[str, Any]) -> Vocabularies:
    """Write `<store_root>/vocab/<fingerprint>/{prd,rvw}.txt` and meta.json (atomic per file)."""
    folder = vocab_dir(store_root, vocabs.fingerprint)
    folder.mkdir(parents=True, exist_ok=True)
    for name in FIELDS:
        _write_atomic(folder / f"{name}.txt", "\n".join(vocabs.field(name).words) + "\n")
    _write_atomic(folder / "meta.json", json.dumps({**meta, "fingerprint": vocabs.fingerprint}, indent=1))
    return Vocabularies(prd=vocabs.prd, rvw=vocabs.rvw, mode=vocabs.mode, fingerprint=vocabs.fingerprint, path=folder)


def read_vocabularies(store_root: Path, fingerprint: str) -> Vocabularies:
    """Load saved vocabularies by fingerprint; StoreError when missing or altered."""
    folder = vocab_dir(store_root, fingerprint)
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        mode = meta["mode"]
        words = {
            name: tuple((folder / f"{name}.txt").read_text(encoding="utf-8").split("\n")[:-1])
            for name in FIELDS
        }
    except (OSError, ValueError, KeyError) as e:
        raise StoreError(f"vocabularies {fingerprint} not readable under {folder}: {e}") from None
    prd = Vocabulary(words=words["prd"], drop_unknown=(mode == "mcr"))
    rvw = prd if (mode == "standard" and words["rvw"] == words["prd"]) else Vocabulary(
        words=words["rvw"], drop_unknown=(mode == "mcr")
    )
    got = vocabularies_fingerprint(prd, rvw, mode)
    if got != fingerprint:
        raise StoreError(
            f"vocabularies under {folder} hash to {got}, expected {fingerprint}: files were altered"
        )
    return Vocabularies(prd=prd, rvw=rvw, mode=mode, fingerprint=fingerprint, path=folder)


def vocab_dir(store_root: Path, fingerprint: str) -> Path:
    return Path(store_root) / "vocab" / fingerprint


def _fits_dir(store_root: Path) -> Path:
    return Path(store_root) / "vocab" / "fits"


def _cached_fit(store_root: Path, key: str) -> Vocabularies | None:
    path = _fits_dir(store_root) / f"{key}.json"
    try:
        fp = json.loads(path.read_text(encoding="utf-8"))["fingerprint"]
    except (OSError, ValueError, KeyError):
        return None
    try:
        return read_vocabularies(store_root, fp)
    except StoreError as e:
        log.warning("refitting vocabularies: cached fit %s unusable (%s)", key, e)
        return None


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
