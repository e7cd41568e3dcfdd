"""Product-grouped examples over the feature store, batching plans and collation into `Batch`.

A *source* gives, per product, its labels (cheap, for sampling) and its arrays on demand: the
product's token ids and ROI features, and for each review its token ids, ROI features, probe
mask, label and raw length. `StoreSource` reads the dataset views of the feature store
(`tokens`, `rois`, `probes`, `embeddings`, see docs/design.md) and opens the store lazily in
each process, so DataLoader workers never share HDF5 handles; `InMemorySource` holds arrays
for tests and the synthetic generator.

Batches are planned in the main process from the trainer's seeded Generator (which products,
which reviews) and collated in workers, so results do not depend on the number of workers.
A unit of work is `(product index, review indices)`.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from models.batch import Batch
from models.config import DataConfig
from pipeline.errors import DataError

_log = logging.getLogger(__name__)
Unit = tuple[int, tuple[int, ...]]  # (product index, review indices within the product)
# Failure reasons of the bert stage (features/text/bert.py) that mean "this text is empty".
EMPTY_TEXT_FAILURES = ("empty text", "no word piece")


@dataclass
class ReviewItem:
    id: str
    tokens: np.ndarray  # (t,) int64 token ids, no padding
    rois: np.ndarray  # (n, D) float32, n may be 0
    probe: np.ndarray  # (t,) float32 in {0, 1}, aligned with tokens
    label: float
    length: float  # number of raw tokens in the review text
    text_feats: np.ndarray | None = None  # (n, H) float32 text-encoder rows (stage "bert"), when read
    text_ids: np.ndarray | None = None  # (m,) int64 word-piece ids fed to the encoder, when read


@dataclass
class ProductItem:
    id: str
    tokens: np.ndarray  # (t,) int64
    rois: np.ndarray  # (n, D) float32
    reviews: list[ReviewItem] = field(default_factory=list)
    text_feats: np.ndarray | None = None  # (n, H) float32 text-encoder rows (stage "bert"), when read
    text_ids: np.ndarray | None = None  # (m,) int64 word-piece ids fed to the encoder, when read


class ProductSource(Protocol):
    """Products of one split."""

    product_ids: list[str]
    roi_dim: int

    def labels(self, index: int) -> np.ndarray:
        """Labels of the product's reviews, in the product's review order."""

    def load(self, index: int, reviews: Sequence[int] | None = None) -> ProductItem:
        """The product's arrays and those of the chosen reviews (all when None)."""


def as_rois(features: np.ndarray | None, roi_dim: int, where: str) -> np.ndarray:
    """One image's stored rois `features` as the models read them (float16 kept, else float32)."""
    if features is None:
        return np.zeros((0, roi_dim), dtype=np.float32)
    a = np.asarray(features)
    if a.ndim != 2 or a.shape[1] != roi_dim:
        raise DataError(f"{where}: ROI features of shape {a.shape}, expected (n, {roi_dim})")
    return a if a.dtype == np.float16 else a.astype(np.float32, copy=False)  # float16 kept: half the IPC


def concat_rois(per_image: Sequence[np.ndarray], cfg: DataConfig) -> np.ndarray:
    """At most `max_boxes_per_image` ROIs per image, images concatenated, capped at `max_rois`."""
    parts = [a[: cfg.max_boxes_per_image] for a in per_image if len(a)]
    if not parts:
        return np.zeros((0, cfg.roi_dim), dtype=np.float32)
    out = np.concatenate(parts, axis=0)[: cfg.max_rois]  # float16 when every part is
    return out if out.dtype == np.float16 else out.astype(np.float32, copy=False)


def token_ids(tok: Mapping[str, np.ndarray], cfg: DataConfig) -> np.ndarray:
    """A text's token ids (tokens-stage arrays) as the models read them: int64, capped at
    `cfg.max_tokens`."""
    ids = np.asarray(tok["ids"], dtype=np.int64)
    return ids[: cfg.max_tokens] if cfg.max_tokens is not None else ids


def aligned_probe(tok: Mapping[str, np.ndarray], mask: np.ndarray | None, cfg: DataConfig, where: str) -> np.ndarray:
    """The probe mask (probes-stage `mask`, over raw tokens) at the kept token positions
    (`mask[pos]`), float32, capped as `token_ids`; None (no probes view read, or a review whose
    mask failed) gives ones (plain attention): callers count and say those reviews, or refuse
    them, with `probe_fallback` (`data.probe_failures`). A mask shorter than the tokens'
    positions is a DataError naming `where`."""
    n = len(np.asarray(tok["ids"]))
    if mask is None:
        probe = np.ones(n, dtype=np.float32)
    else:
        pos = np.asarray(tok["pos"], dtype=np.int64)
        mask = np.asarray(mask)
        if len(pos) and pos.max() >= len(mask):
            raise DataError(f"{where}: probe mask has {len(mask)} raw tokens but the tokens view points at "
                            f"raw token {int(pos.max())}")
        probe = mask[pos].astype(np.float32)
    return probe[: cfg.max_tokens] if cfg.max_tokens is not None else probe


def review_item(rid: str, tok: Mapping[str, np.ndarray], mask: np.ndarray | None, rois: np.ndarray,
                label: float, cfg: DataConfig, where: str) -> ReviewItem:
    """A review as the models read it, from its tokens-stage arrays (`ids`, `pos`, `n_raw`), its
    probes-stage mask (or None) and its ROIs (`concat_rois`). `StoreSource` and `mrhp predict`
    both build reviews here, so new reviews reach a model exactly as training data did."""
    return ReviewItem(id=rid, tokens=token_ids(tok, cfg), rois=rois, probe=aligned_probe(tok, mask, cfg, where),
                      label=label, length=float(tok["n_raw"]))


def text_encoder_rows(got: Mapping[str, np.ndarray] | None, failure: str | None, hidden: Callable[[], int],
                      where: str) -> tuple[np.ndarray, np.ndarray]:
    """(features (n, H) float32, input ids (m,) int64) of one text's bert-stage record: the stored
    arrays, or zero rows for a text the stage recorded as empty (`hidden()` gives H); any other
    failure is a DataError "<where> failed: <reason>" (`where`: e.g. "dataset 'd': bert features
    of 'rvw:1'"). Shared by `StoreSource` and `mrhp predict`."""
    if failure is not None:
        if failure.startswith(EMPTY_TEXT_FAILURES):
            return np.zeros((0, hidden()), dtype=np.float32), np.zeros(0, dtype=np.int64)
        raise DataError(f"{where} failed: {failure}")
    if got is None:
        raise DataError(f"{where} are missing")
    return np.asarray(got["features"], dtype=np.float32), np.asarray(got["input_ids"], dtype=np.int64)


def _one_line(reason: str | None) -> str:
    """A stored failure reason (an exception's text may span lines) on one line."""
    return " ".join(str(reason).split())


def _refusal(dataset: str, split: str, rid: str, reason: str | None) -> str:
    reason = _one_line(reason)
    where = f"dataset {dataset!r} split {split!r}" if dataset else f"split {split!r}"
    return (f"{where}: review {rid!r} has no probe mask (probes failed: {reason}); data.probe_failures: "
            f"refuse stops here: set data.probe_failures: ones to use a mask of ones (plain attention) "
            f"for such reviews" + (f", or rerun `mrhp extract --dataset {dataset} --stage probes`" if dataset else ""))


def probe_fallback(split: str, n_reviews: int, failed: Sequence[tuple[str, str]], *, no_record: int = 0,
                   policy: str = "ones", say: Callable[[str], None] | None = None, dataset: str = "",
                   use: str = "train") -> dict[str, Any]:
    """Account for the reviews of one split whose probe mask falls back to ones (plain attention):
    `failed` lists (review id, failure reason) of reviews whose probes record is a failure,
    `no_record` counts reviews with no probes record at all (the view allowed missing). Shared by
    `bundle_from_records` (training, evaluate) and `mrhp predict`.

    `policy` is `data.probe_failures`: "refuse" raises a one-line DataError naming the first
    failed review and its reason; "ones" says one warning line through `say` when any review
    falls back ("N of M reviews in split S have no probe mask (...); they <use> with a mask of
    ones, i.e. plain attention") and returns the record written to run.json (`probe_fallback`):
    {"reviews", "probes_failed", "no_probes_record", "first_failed": [[id, reason], ...] (<= 5)}."""
    failed = [(rid, _one_line(reason)) for rid, reason in failed]
    if failed and policy == "refuse":
        rid, reason = failed[0]
        raise DataError(_refusal(dataset, split, rid, reason))
    record: dict[str, Any] = {"reviews": int(n_reviews), "probes_failed": len(failed),
                              "no_probes_record": int(no_record),
                              "first_failed": [[rid, reason] for rid, reason in failed[:5]]}
    n = len(failed) + int(no_record)
    if n:
        parts = []
        if failed:
            reasons: dict[str, int] = {}
            for _, reason in failed:
                reasons[reason] = reasons.get(reason, 0) + 1
            shown = "; ".join(f"{c} x {r}" for r, c in sorted(reasons.items(), key=lambda kv: -kv[1])[:3])
            more = f"; {len(reasons) - 3} other reasons" if len(reasons) > 3 else ""
            parts.append(f"probes failed: {len(failed)}, first {failed[0][0]!r}: {shown}{more}")
        if no_record:
            parts.append(f"no probes record (view allowed missing): {no_record}")
        prefix = f"dataset {dataset!r}: " if dataset else ""
        (say or _log.warning)(
            f"warning: {prefix}{n} of {n_reviews} reviews in split {split!r} have no probe mask "
            f"({'; '.join(parts)}); they {use} with a mask of ones, i.e. plain attention "
            f"(data.probe_failures: refuse stops instead)")
    return record


def _split_probe_fallback(view, records, *, split: str, dataset: str, missing: bool, policy: str,
                          say: Callable[[str], None] | None) -> dict[str, Any]:
    """`probe_fallback` of one split read from the store: the failures the probes `view` records
    for its reviews, or every review when the probes view is required but allowed missing
    (`missing`). An item the view lacks is left to the load (a DataError naming it)."""
    rids = [r.id for r in records.reviews]
    if missing:
        return probe_fallback(split, len(rids), [], no_record=len(rids), policy=policy, say=say, dataset=dataset)
    failed = []
    for rid in rids:
        item = f"rvw:{rid}"
        if item in view:
            reason = view.failure(item)
            if reason is not None:
                failed.append((rid, reason))
    return probe_fallback(split, len(rids), failed, policy=policy, say=say, dataset=dataset)


class InMemorySource:
    """Products held in memory (tests, synthetic data, predictions on new inputs)."""

    def __init__(self, products: Sequence[ProductItem], *, roi_dim: int) -> None:
        self.products = list(products)
        self.product_ids = [p.id for p in self.products]
        self.roi_dim = roi_dim

    def labels(self, index: int) -> np.ndarray:
        return np.array([r.label for r in self.products[index].reviews], dtype=np.float64)

    def load(self, index: int, reviews: Sequence[int] | None = None) -> ProductItem:
        p = self.products[index]
        chosen = p.reviews if reviews is None else [p.reviews[i] for i in reviews]
        return ProductItem(id=p.id, tokens=p.tokens, rois=p.rois, reviews=list(chosen),
                           text_feats=p.text_feats, text_ids=p.text_ids)


@dataclass(frozen=True)
class _ProductRef:
    id: str
    image_paths: tuple[str, ...]
    review_ids: tuple[str, ...]
    review_images: tuple[tuple[str, ...], ...]
    labels: tuple[float, ...]


# Views a model needs when its class does not say (`required_views`): the multimodal models read
# image features, SANCL its probe masks too; anything else is treated as multimodal (refusing a
# run is recoverable, training in silence without a view is not).
_FALLBACK_VIEWS = {"sancl": frozenset({"tokens", "rois", "probes"})}
_MULTIMODAL_FALLBACK = frozenset({"tokens", "rois"})
READ_VIEWS = ("tokens", "rois", "probes", "bert")  # the views StoreSource reads arrays from


def required_views(model: str, model_cfg: Mapping[str, Any] | None = None) -> frozenset[str]:
    """The stage views `model` needs with `model_cfg`: its class's `required_views(model_cfg)`,
    else {"tokens", "rois", "probes"} for sancl and {"tokens", "rois"} for any other model."""
    from models.registry import model_class

    cls = model_class(model)
    fn = getattr(cls, "required_views", None)
    if callable(fn):
        return frozenset(fn(dict(model_cfg or {})))
    return _FALLBACK_VIEWS.get(model, _MULTIMODAL_FALLBACK)


def check_views(store_root: str | Path, dataset: str, required: frozenset[str] | set[str] | None,
                allow_missing: Sequence[str] = (), *, what: str = "the model") -> tuple[str, ...]:
    """Refuse a missing required view unless `allow_missing` lists it; returns the views that
    are missing and allowed (for the run's records). `required=None`: nothing is required.

    Raises DataError naming the stage and the command that builds it; store errors (a damaged
    index) propagate as StoreError, never read as "no view"."""
    from pipeline.store import FeatureStore

    if not required:
        return ()
    have = {v.stage for v in FeatureStore(Path(store_root)).views() if v.dataset == dataset}
    missing = sorted(v for v in required if v not in have)
    refused = [v for v in missing if v not in allow_missing]
    if refused:
        v = refused[0]
        more = f" (also missing: {', '.join(refused[1:])})" if len(refused) > 1 else ""
        raise DataError(
            f"dataset {dataset!r}: {what} needs the {v} view, which the feature store at {store_root} "
            f"does not have{more}: build it with `mrhp extract --dataset {dataset} --stage {v}` "
            f"(or set allow_missing: [{v}] to run without it)"
        )
    return tuple(missing)


class StoreSource:
    """Products of one split read from the feature store's views of `dataset`.

    Item ids (docs/design.md): tokens `prd:<id>` / `rvw:<id>`, rois by image path relative to the
    image root, probes `rvw:<id>`. `views` names the views to read (default: every one of
    READ_VIEWS the dataset has); a view not read gives no ROIs / probe masks of ones, which
    `check_views` allows only when the model does not need it or `allow_missing` says so.
    Within a view read: an image recorded as failed adds no ROIs; a review whose probes record is
    a failure (its coref/parse step failed) gets a mask of ones (plain attention) under
    `data.probe_failures: ones` (the default), counted per split by `probe_fallback` and said
    at load, or stops the load under `refuse`. The released SANCL preprocessing (gen_amazon.py)
    has no such fallback: an error there stops the preprocessing, so its data holds no review
    without a mask; `refuse` is that behaviour, `ones` keeps the review and says so. An item
    the view lacks (stale view) is a DataError naming the item and the extract command; a store
    error (damaged segment or index) propagates as a StoreError, never as "no features"."""

    def __init__(self, *, store_root: str | Path, dataset: str, records, cfg: DataConfig,
                 split: str = "", views: Collection[str] | None = None) -> None:
        by_product = records.reviews_by_product()
        refs = []
        for pid in sorted(by_product):
            revs = by_product[pid]
            prod = records.products.get(pid)
            if prod is None:
                raise DataError(f"dataset {dataset!r} split {split!r}: reviews name unknown product {pid!r}")
            refs.append(_ProductRef(
                id=pid,
                image_paths=tuple(im.path for im in prod.images),
                review_ids=tuple(r.id for r in revs),
                review_images=tuple(tuple(im.path for im in r.images) for r in revs),
                labels=tuple(float(r.label) for r in revs),
            ))
        self._refs = refs
        self.product_ids = [r.id for r in refs]
        self.roi_dim = cfg.roi_dim
        self.cfg = cfg
        self.dataset = dataset
        self.split = split
        self.store_root = Path(store_root)
        self.read_views = tuple(views) if views is not None else None
        self._views: dict[str, Any] | None = None
        self._pid: int | None = None
        self.text_features = "bert" in (views or ())  # read the bert view (model requires it)
        self._bert_view: tuple[int, Any] | None = None  # (pid, View), opened lazily per process

    def __getstate__(self):  # never ship open stores/HDF5 handles to workers
        state = dict(self.__dict__)
        state["_views"] = None
        state["_pid"] = None
        state["_bert_view"] = None
        return state

    def _open(self) -> dict[str, Any]:
        if self._views is None or self._pid != os.getpid():
            from pipeline.store import FeatureStore

            store = FeatureStore(self.store_root)
            have = {v.stage for v in store.views() if v.dataset == self.dataset}
            if "tokens" not in have:
                raise DataError(
                    f"dataset {self.dataset!r}: the feature store at {self.store_root} has no tokens view: "
                    f"build it with `mrhp extract --dataset {self.dataset} --stage tokens`"
                )
            # tokens are always read (every model ranks text); the rest as asked
            wanted = (set(self.read_views) | {"tokens"}) if self.read_views is not None else set(READ_VIEWS)
            views: dict[str, Any] = {}
            for stage in READ_VIEWS:
                # Store errors (damaged index or segment) propagate: never "no view".
                views[stage] = store.view(self.dataset, stage) if stage in wanted and stage in have else None
            self._views = views
            self._pid = os.getpid()
        return self._views

    def _get(self, view, item_id: str) -> dict[str, np.ndarray] | None:
        """The item's arrays; None when the view is not read or the item is a recorded failure."""
        if view is None:
            return None
        if item_id not in view:
            raise DataError(
                f"dataset {self.dataset!r}: the {view.stage} view has no item {item_id!r} (the view is "
                f"older than the data): rerun `mrhp extract --dataset {self.dataset} --stage {view.stage}`"
            )
        if view.failure(item_id) is not None:
            return None
        return view.get(item_id)  # StoreError (corrupt, missing segment) propagates

    def labels(self, index: int) -> np.ndarray:
        return np.array(self._refs[index].labels, dtype=np.float64)

    def _tokens(self, item_id: str) -> dict[str, np.ndarray]:
        view = self._open()["tokens"]
        if item_id not in view or view.failure(item_id) is not None:
            why = view.failure(item_id) if item_id in view else "not in the view"
            raise DataError(
                f"dataset {self.dataset!r}: no tokens for {item_id!r} in the store "
                f"(tokens stage not run for it, or recorded as a failure: {why}); "
                f"rerun `mrhp extract --dataset {self.dataset} --stage tokens`"
            )
        return view.get(item_id)

    def _rois(self, paths: Sequence[str]) -> np.ndarray:
        view = self._open()["rois"]
        per_image = []
        for path in paths:
            got = self._get(view, path)
            if got is not None:
                per_image.append(as_rois(got["features"], self.roi_dim, f"rois {path!r}"))
        return concat_rois(per_image, self.cfg)

    def load(self, index: int, reviews: Sequence[int] | None = None) -> ProductItem:
        ref = self._refs[index]
        views = self._open()
        ptok = self._tokens(f"prd:{ref.id}")
        item = ProductItem(id=ref.id, tokens=token_ids(ptok, self.cfg), rois=self._rois(ref.image_paths))
        chosen = range(len(ref.review_ids)) if reviews is None else reviews
        for j in chosen:
            rid = ref.review_ids[j]
            tok = self._tokens(f"rvw:{rid}")
            probe_rec = self._get(views["probes"], f"rvw:{rid}")  # None: plain attention
            if probe_rec is None and views["probes"] is not None and self.cfg.probe_failures == "refuse":
                # the load-time scan (`probe_fallback`) refuses first; this guards other callers
                raise DataError(_refusal(self.dataset, self.split, rid, views["probes"].failure(f"rvw:{rid}")))
            item.reviews.append(review_item(
                rid, tok, None if probe_rec is None else probe_rec["mask"],
                self._rois(ref.review_images[j]), ref.labels[j], self.cfg,
                f"dataset {self.dataset!r} review {rid!r}",
            ))
        if self.text_features:
            self._attach_text_features(item)
        return item

    # ---- stage "bert": precomputed text-encoder features (docs/design.md)
    def _open_bert(self):
        if self._bert_view is None or self._bert_view[0] != os.getpid():
            from pipeline.store import FeatureStore

            store = FeatureStore(self.store_root)
            # only an absent view is "no view": a damaged store raises its own StoreError
            if not any(v.dataset == self.dataset and v.stage == "bert" for v in store.views()):
                raise DataError(
                    f"dataset {self.dataset!r}: the model reads text-encoder features and the store "
                    f"has no bert view; run `mrhp extract --dataset {self.dataset} --stage bert` "
                    f"(needs datasets.{self.dataset}.text_encoder in the manifest)"
                )
            self._bert_view = (os.getpid(), store.view(self.dataset, "bert"))
        return self._bert_view[1]

    def _text_features(self, item_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(features (n, H) float32, input ids (m,) int64) of one text from the bert view. A text
        the stage recorded as empty has zero rows (as the tokens view gives it zero ids); any
        other absence is a DataError naming the item and the command that builds it."""
        view = self._open_bert()
        if len(view) == 0:
            raise DataError(
                f"dataset {self.dataset!r}: the bert view is empty: the dataset declares no text "
                f"encoder; set datasets.{self.dataset}.text_encoder in the manifest, then run "
                f"`mrhp extract --dataset {self.dataset} --stage bert`"
            )
        if item_id not in view:
            raise DataError(
                f"dataset {self.dataset!r}: no bert features for {item_id!r} (the bert view has "
                f"{len(view)} items); run `mrhp extract --dataset {self.dataset} --stage bert`"
            )
        reason = view.failure(item_id)
        return text_encoder_rows(None if reason is not None else view.get(item_id), reason,
                                 lambda: self._hidden_size(view),
                                 f"dataset {self.dataset!r}: bert features of {item_id!r}")

    def _hidden_size(self, view) -> int:
        """H of the view's features: the width of its first item that did not fail."""
        if getattr(self, "_hidden", None) is None:
            for item_id in view.item_ids():
                if view.failure(item_id) is None:
                    self._hidden = int(np.asarray(view.get(item_id)["features"]).shape[1])
                    break
            else:
                raise DataError(f"dataset {self.dataset!r}: every item of the bert view is a failure")
        return self._hidden

    def _attach_text_features(self, item: ProductItem) -> None:
        item.text_feats, item.text_ids = self._text_features(f"prd:{item.id}")
        for r in item.reviews:
            r.text_feats, r.text_ids = self._text_features(f"rvw:{r.id}")


class ProductDataset(Dataset):
    """Map-style dataset whose indices are units `(product index, review indices)`."""

    def __init__(self, source: ProductSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source.product_ids)

    def __getitem__(self, unit: Unit) -> ProductItem:
        pidx, reviews = unit
        return self.source.load(pidx, reviews)


def train_plan(source: ProductSource, *, batch_products: int, max_reviews: int | None,
               rng: np.random.Generator) -> list[list[Unit]]:
    """One epoch of training batches: products shuffled, large products subsampled."""
    order = rng.permutation(len(source.product_ids))
    units: list[Unit] = []
    for p in order:
        n = len(source.labels(int(p)))
        if n < 2:
            continue  # a single review gives no ranking pair
        if max_reviews is not None and n > max_reviews:
            idx = tuple(int(i) for i in np.sort(rng.choice(n, size=max_reviews, replace=False)))
        else:
            idx = tuple(range(n))
        units.append((int(p), idx))
    return [units[i:i + batch_products] for i in range(0, len(units), batch_products)]


def eval_plan(source: ProductSource, *, batch_products: int, max_reviews: int) -> list[list[Unit]]:
    """Every review of every product, products in order; big products split into chunks."""
    units: list[Unit] = []
    for p in range(len(source.product_ids)):
        n = len(source.labels(p))
        for start in range(0, n, max_reviews):
            units.append((p, tuple(range(start, min(n, start + max_reviews)))))
    return [units[i:i + batch_products] for i in range(0, len(units), batch_products)]


def _pad_tokens(seqs: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max((len(s) for s in seqs), default=0))
    out = torch.zeros((len(seqs), width), dtype=torch.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.from_numpy(np.asarray(s, dtype=np.int64))
    return out, out != 0


def _pad_float(seqs: Sequence[np.ndarray], width: int) -> torch.Tensor:
    out = torch.zeros((len(seqs), width), dtype=torch.float32)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.from_numpy(np.asarray(s, dtype=np.float32))
    return out


def pad_text_feats(seqs: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_i, H) arrays -> (N, L, H) float32 zero-padded and (N, L) bool mask (True = real row);
    L >= 1 so an all-empty batch still has a (masked) column."""
    hidden = max((a.shape[1] for a in seqs if a.ndim == 2), default=0)
    width = max(1, max((len(a) for a in seqs), default=0))
    out = torch.zeros((len(seqs), width, hidden), dtype=torch.float32)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, a in enumerate(seqs):
        if len(a):
            out[i, : len(a)] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
            mask[i, : len(a)] = True
    return out, mask


def _add_text_features(batch: Batch, products: Sequence[ProductItem], reviews: Sequence[ReviewItem]) -> None:
    """Fill the Batch's text-encoder fields when the items carry bert features (all or none)."""
    items = [*products, *reviews]
    have = [it.text_feats is not None for it in items]
    if not any(have):
        return
    if not all(have):
        missing = next(it.id for it in items if it.text_feats is None)
        raise DataError(f"item {missing!r} has no text-encoder features while others in its batch do")
    batch.prod_text_feats, batch.prod_text_feat_mask = pad_text_feats([p.text_feats for p in products])
    batch.rev_text_feats, batch.rev_text_feat_mask = pad_text_feats([r.text_feats for r in reviews])
    if all(it.text_ids is not None for it in items):
        batch.prod_text_ids, batch.prod_text_ids_mask = _pad_ids([p.text_ids for p in products])
        batch.rev_text_ids, batch.rev_text_ids_mask = _pad_ids([r.text_ids for r in reviews])


def _pad_ids(seqs: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Word-piece ids -> (N, L) int64 and a mask from the lengths (an id may be 0 in some vocabularies)."""
    width = max(1, max((len(s) for s in seqs), default=0))
    out = torch.zeros((len(seqs), width), dtype=torch.int64)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.from_numpy(np.asarray(s, dtype=np.int64))
        mask[i, : len(s)] = True
    return out, mask


class Collator:
    """ProductItems -> Batch (padding and masks; instances are added later by the trainer)."""

    def __init__(self, cfg: DataConfig, *, half_rois: bool = False) -> None:
        self.cfg = cfg
        self.half_rois = half_rois  # float16 ROI features stay float16 (Batch.to upcasts on the device)

    def _rois(self, items: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        arrays, real = [], []
        for a in items:
            if len(a) == 0 and cfg.empty_rois == "zeros":
                arrays.append(np.zeros((cfg.zeros_rois, cfg.roi_dim), dtype=np.float32))
                real.append(cfg.zeros_rois)
            else:
                arrays.append(a)
                real.append(len(a))
        width = max(cfg.min_rois, max(real, default=0))
        half = self.half_rois and all(a.dtype == np.float16 for a in arrays if len(a))
        np_dtype = np.float16 if half else np.float32
        out = torch.zeros((len(items), width, cfg.roi_dim), dtype=torch.float16 if half else torch.float32)
        mask = torch.zeros((len(items), width), dtype=torch.bool)
        for i, (a, n) in enumerate(zip(arrays, real, strict=True)):
            if n:
                out[i, :n] = torch.from_numpy(np.ascontiguousarray(a, dtype=np_dtype))
                mask[i, :n] = True
        return out, mask

    def __call__(self, products: Sequence[ProductItem]) -> Batch:
        reviews = [(pi, r) for pi, p in enumerate(products) for r in p.reviews]
        prod_tokens, prod_token_mask = _pad_tokens([p.tokens for p in products])
        prod_rois, prod_roi_mask = self._rois([p.rois for p in products])
        rev_tokens, rev_token_mask = _pad_tokens([r.tokens for _, r in reviews])
        rev_rois, rev_roi_mask = self._rois([r.rois for _, r in reviews])
        probe = _pad_float([r.probe for _, r in reviews], rev_tokens.shape[1])
        batch = Batch(
            prod_tokens=prod_tokens, prod_token_mask=prod_token_mask,
            prod_rois=prod_rois, prod_roi_mask=prod_roi_mask,
            rev_tokens=rev_tokens, rev_token_mask=rev_token_mask,
            rev_rois=rev_rois, rev_roi_mask=rev_roi_mask,
            rev_probe_mask=probe * rev_token_mask.float(),
            rev_product=torch.tensor([pi for pi, _ in reviews], dtype=torch.int64),
            labels=torch.tensor([r.label for _, r in reviews], dtype=torch.float32),
            rev_length=torch.tensor([r.length for _, r in reviews], dtype=torch.float32),
            product_ids=[p.id for p in products],
            review_ids=[r.id for _, r in reviews],
        )
        _add_text_features(batch, products, [r for _, r in reviews])
        return batch


def make_loader(source: ProductSource, plan: list[list[Unit]], cfg: DataConfig, *,
                num_workers: int = 0, pin_memory: bool = False, half_rois: bool = False) -> DataLoader:
    """A DataLoader yielding one Batch per planned batch, in plan order. For a GPU: `pin_memory`
    (page-locked batches, asynchronous copies) and `half_rois` (float16 ROI features stay
    float16 until `Batch.to` upcasts them on the device); the values are the same either way."""
    return DataLoader(
        ProductDataset(source), batch_sampler=plan, collate_fn=Collator(cfg, half_rois=half_rois),
        num_workers=num_workers, persistent_workers=False, pin_memory=pin_memory,
    )


@dataclass
class DataBundle:
    """What the trainer needs from a dataset: split sources, embeddings, threshold."""

    name: str
    splits: dict[str, ProductSource]
    embeddings: dict[str, np.ndarray] | None
    threshold: float
    train_labels: list[float] = field(default_factory=list)  # for negative weights
    records: Any = None  # the DatasetRecords the bundle was built from, when read from a dataset
    missing_views: tuple[str, ...] = ()  # required views absent and allowed by allow_missing (recorded)
    # per split: reviews whose probe mask fell back to ones (`probe_fallback`; recorded in run.json)
    probe_fallback: dict[str, dict[str, Any]] = field(default_factory=dict)

    def split(self, name: str) -> ProductSource:
        if name not in self.splits:
            raise DataError(
                f"dataset {self.name!r}: no split {name!r}; available: {', '.join(self.splits) or '(none)'}"
            )
        return self.splits[name]


def store_embeddings(store_root: str | Path, dataset: str) -> dict[str, np.ndarray]:
    """The `prd` and `rvw` embedding matrices from the embeddings view of `dataset`."""
    from pipeline.store import FeatureStore

    store = FeatureStore(Path(store_root))
    if not any(v.dataset == dataset and v.stage == "embeddings" for v in store.views()):
        raise DataError(
            f"dataset {dataset!r}: the feature store at {store_root} has no embeddings view: build it "
            f"with `mrhp extract --dataset {dataset} --stage embeddings`"
        )
    view = store.view(dataset, "embeddings")  # store errors (damage) propagate as themselves
    out = {}
    for name, item in (("prd", "prd_vocab"), ("rvw", "rvw_vocab")):
        if item not in view or view.failure(item) is not None:
            raise DataError(
                f"dataset {dataset!r}: the embeddings view has no {item} matrix: rerun "
                f"`mrhp extract --dataset {dataset} --stage embeddings`"
            )
        out[name] = np.asarray(view.get(item)["matrix"], dtype=np.float32)
    return out


def bundle_from_records(records, *, store_root: str | Path, dataset: str, cfg: DataConfig,
                        threshold: float, splits: Sequence[str] = ("train", "dev", "test"),
                        embeddings: Mapping[str, np.ndarray] | None = None,
                        required: frozenset[str] | set[str] | None = None,
                        allow_missing: Sequence[str] = (),
                        say: Callable[[str], None] | None = None) -> DataBundle:
    """A DataBundle over store views for already-loaded DatasetRecords.

    `required` (models.data.required_views of the model): those views are checked first
    (`check_views`: a missing one is a DataError unless `allow_missing` lists it) and only the
    required ones are read. None: read whatever views the dataset has (no model known).

    Probe masks: for each split whose reviews the model reads masks for, the reviews that fall
    back to a mask of ones are counted (`probe_fallback`, per `cfg.probe_failures`: refused, or
    said in one warning line through `say`, default the module logger) into
    `DataBundle.probe_fallback`."""
    missing = check_views(store_root, dataset, required, allow_missing)
    read = None if required is None else tuple(v for v in READ_VIEWS if v in required and v not in missing)
    # the probes view, opened once here to count the reviews whose mask falls back to ones (the
    # sources open their own views lazily, per process); None when no split reads probe masks
    probes_view = None
    if read is None or "probes" in read:
        from pipeline.store import FeatureStore

        store = FeatureStore(Path(store_root))
        if any(v.dataset == dataset and v.stage == "probes" for v in store.views()):
            probes_view = store.view(dataset, "probes")  # store errors (damage) propagate
    sources: dict[str, ProductSource] = {}
    probe_fallbacks: dict[str, dict[str, Any]] = {}
    for s in splits:
        part = records.split(s)
        if not part.reviews:  # before: left out, so e.g. an empty test split meant no test metrics, unsaid
            dropped = f" ({', '.join(f'{n:,} {why}' for why, n in records.dropped.items())} in the dataset)" \
                if getattr(records, "dropped", None) else ""
            raise DataError(
                f"dataset {dataset!r}: split {s!r} has no reviews{dropped}; check its tables, or leave "
                f"the split out of datasets.{dataset}.splits in the manifest"
            )
        sources[s] = StoreSource(store_root=store_root, dataset=dataset, records=part, cfg=cfg, split=s,
                                 views=read)
        if probes_view is not None or "probes" in missing:
            probe_fallbacks[s] = _split_probe_fallback(probes_view, part, split=s, dataset=dataset,
                                                       missing="probes" in missing, policy=cfg.probe_failures,
                                                       say=say)
    emb = dict(embeddings) if embeddings is not None else store_embeddings(store_root, dataset)
    return DataBundle(
        name=dataset, splits=sources, embeddings=emb, threshold=float(threshold),
        train_labels=[float(r.label) for r in records.reviews if r.split == "train"],
        records=records, missing_views=missing, probe_fallback=probe_fallbacks,
    )


def build_datasets(manifest, dataset_name: str, cfg: DataConfig | None = None, *,
                   required: frozenset[str] | set[str] | None = None,
                   allow_missing: Sequence[str] = (),
                   say: Callable[[str], None] | None = None) -> DataBundle:
    """Labels and grouping from the dataset reader, arrays from the store views (the CLI and
    the training flow call this); `required`/`allow_missing`/`say` as in `bundle_from_records`."""
    from pipeline.datasets.mrhp import load_dataset

    spec = manifest.dataset(dataset_name)
    records = load_dataset(spec)
    return bundle_from_records(
        records, store_root=manifest.store_root, dataset=dataset_name, cfg=cfg or DataConfig(),
        threshold=spec.threshold, splits=spec.splits, required=required, allow_missing=allow_missing,
        say=say,
    )
