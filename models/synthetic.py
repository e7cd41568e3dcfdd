"""Synthetic MRHP data with a planted signal, for learning checks and benchmarks.

Each product has a topic. Words and ROI features belong to topics: a word's embedding and a
box's feature vector are its topic's centroid plus noise. A review draws each token from its
product's topic with probability a_text (else from another topic) and each box from the
product's visual topic with probability a_image; its helpfulness grows with a_text and a_image
(plus noise), quantised to labels 0..4. Review length is drawn independently of the label, so
`length` and `random` score near chance while a model that matches review to product can learn.

With `text_feat_dim`, every text also gets stand-in text-encoder rows (what the bert stage
stores): a `[CLS]` row (the mean) and one row per token, the token's embedding through a fixed
random projection to `text_feat_dim` plus noise, so the planted signal reaches models that read
`Batch.rev_text_feats` (MM-SS's paper preset) as it reaches the word-vector path.

`make_synthetic(...)` returns the data in memory (a DataBundle ready for the trainer) and, when
given a store root, also writes it into the feature store exactly as the stages would (tokens,
rois, probes and embeddings segments plus the dataset's views), with the DatasetRecords that
group it; `train_and_evaluate(...)` trains a registered model on it and returns test metrics.
"""
from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.config import DataConfig, TrainConfig, train_config
from models.data import DataBundle, InMemorySource, ProductItem, ReviewItem, bundle_from_records, concat_rois
from pipeline.config import deep_merge, to_mapping
from pipeline.hashing import text_key
from pipeline.records import DatasetRecords, ImageRef, Product, Review

SPLITS = ("train", "dev", "test")
SYNTHETIC_FINGERPRINT = "synthetic0000000"  # the stage fingerprint of synthetic store views unless told


@dataclass
class SyntheticData:
    """Synthetic dataset: in memory (`bundle`) and, if written, in the store under `dataset`."""

    bundle: DataBundle  # in-memory sources per split, embeddings, threshold
    records: DatasetRecords  # products and reviews with labels and image refs
    dataset: str
    store_root: Path | None  # where the store copy lives (None: memory only)
    data_cfg: DataConfig  # DataConfig matching the generated shapes (roi_dim)

    def store_bundle(self, views=None) -> DataBundle:
        """The same data read back through the feature store views (StoreSource); `views` are the
        required views of `models.data.bundle_from_records` (e.g. {"tokens", "bert"} to read the
        text features); None reads every view the store has."""
        if self.store_root is None:
            raise ValueError("this synthetic dataset was not written to a store")
        return bundle_from_records(self.records, store_root=self.store_root, dataset=self.dataset,
                                   cfg=self.data_cfg, threshold=self.bundle.threshold, required=views)


def _label(z: np.ndarray) -> np.ndarray:
    # z in about [0, 1]: five bins; the cuts make labels 0..4 all common
    return np.digitize(z, [0.25, 0.45, 0.62, 0.8]).astype(np.int64)


def make_synthetic(
    store_root: str | Path | None = None,
    dataset: str = "synth",
    *,
    n_products: int = 60,
    reviews_per_product: tuple[int, int] = (6, 12),
    vocab_size: int = 200,
    embed_dim: int = 16,
    n_topics: int = 8,
    roi_dim: int = 32,
    max_boxes: int = 4,
    image_prob: float = 0.7,
    review_len: tuple[int, int] = (8, 40),
    product_len: int = 24,
    noise: float = 0.08,
    split_shares: tuple[float, float, float] = (0.6, 0.2, 0.2),
    threshold: float = 1.0,
    seed: int = 0,
    text_feat_dim: int | None = None,
    fingerprints: Mapping[str, str] | None = None,
) -> SyntheticData:
    """Generate a planted-signal dataset; see the module docstring. Sizes are per item ranges.

    `fingerprints`: stage -> the fingerprint its segments and view carry in the store (default
    SYNTHETIC_FINGERPRINT for every stage). Tests of `mrhp predict` pass the fingerprints the
    manifest's stages compute (`Stage.fingerprint()`), so a run trained on this store records the
    fingerprints predict compares its own stages' with (stand-in arrays, real settings)."""
    if vocab_size < n_topics + 2:
        raise ValueError(f"vocab_size {vocab_size} must exceed n_topics + 2 = {n_topics + 2}")
    rng = np.random.default_rng(seed)
    # words 2..V-1 belong to topics round-robin; 0 = PAD, 1 = OOV
    word_topic = np.full(vocab_size, -1)
    word_topic[2:] = np.arange(vocab_size - 2) % n_topics
    topic_words = [np.flatnonzero(word_topic == t) for t in range(n_topics)]
    text_centroids = rng.normal(size=(n_topics, embed_dim))
    matrix = (text_centroids[np.clip(word_topic, 0, None)] + 0.5 * rng.normal(size=(vocab_size, embed_dim)))
    matrix[0] = 0.0
    matrix[1] = rng.uniform(-0.25, 0.25, size=embed_dim)
    matrix = matrix.astype(np.float32)
    vis_centroids = rng.normal(size=(n_topics, roi_dim))

    def words(topic: int, agree: float, n: int) -> np.ndarray:
        own = rng.random(n) < agree
        other = (topic + rng.integers(1, n_topics, size=n)) % n_topics
        topics = np.where(own, topic, other)
        return np.array([rng.choice(topic_words[t]) for t in topics], dtype=np.int64)

    def boxes(topic: int, agree: float, n: int) -> np.ndarray:
        own = rng.random(n) < agree
        other = (topic + rng.integers(1, n_topics, size=n)) % n_topics
        topics = np.where(own, topic, other)
        return (vis_centroids[topics] + 0.5 * rng.normal(size=(n, roi_dim))).astype(np.float32)

    n_train = int(round(split_shares[0] * n_products))
    n_dev = int(round(split_shares[1] * n_products))
    split_of = ["train"] * n_train + ["dev"] * n_dev + ["test"] * (n_products - n_train - n_dev)

    records = DatasetRecords(name=dataset, label_interpretation="labels")
    items: dict[str, list[ProductItem]] = {s: [] for s in SPLITS}
    arrays: dict[str, dict[str, np.ndarray]] = {}  # view item id -> arrays (tokens, probes)
    rois: dict[str, np.ndarray] = {}  # image path -> features
    cfg = DataConfig(roi_dim=roi_dim)
    for i in range(n_products):
        split = split_of[i]
        pid = f"P{i:05d}"
        topic = int(rng.integers(n_topics))
        ptok = words(topic, 0.9, product_len)
        pimgs = []
        for k in range(int(rng.integers(1, 3))):
            path = f"{split}/prd/{pid}/pic_{k}_0.jpg"
            rois[path] = boxes(topic, 0.9, int(rng.integers(1, max_boxes + 1)))
            pimgs.append(path)
        ptext = " ".join(f"w{t}" for t in ptok)
        records.products[pid] = Product(id=pid, name=ptext, description="", text=ptext,
                                        images=tuple(ImageRef(p, url=f"http://synthetic.invalid/{p}") for p in pimgs),
                                        category="home", split=split)
        arrays[f"prd:{pid}"] = {"ids": ptok.astype(np.int32), "pos": np.arange(len(ptok), dtype=np.int32),
                                "n_raw": np.int32(len(ptok))}
        n_rev = int(rng.integers(reviews_per_product[0], reviews_per_product[1] + 1))
        a_text = rng.random(n_rev)
        has_img = rng.random(n_rev) < image_prob
        a_img = rng.random(n_rev)
        z = 0.6 * a_text + 0.4 * np.where(has_img, a_img, 0.2) + noise * rng.normal(size=n_rev)
        labels = _label(z)
        revs = []
        for j in range(n_rev):
            rid = f"{pid}-{j}"
            n_tok = int(rng.integers(review_len[0], review_len[1] + 1))
            tok = words(topic, float(a_text[j]), n_tok)
            probe = (word_topic[tok] == topic).astype(np.uint8)
            rimgs = []
            if has_img[j]:
                path = f"{split}/rvw/{rid}/pic_0_0.jpg"
                rois[path] = boxes(topic, float(a_img[j]), int(rng.integers(1, max_boxes + 1)))
                rimgs.append(path)
            records.reviews.append(
                Review(
                    id=rid,
                    product_id=pid,
                    text=" ".join(f"w{t}" for t in tok),
                    label=int(labels[j]),
                    category="home",
                    split=split,
                    images=tuple(ImageRef(p, url=f"http://synthetic.invalid/{p}") for p in rimgs),
                )
            )
            arrays[f"rvw:{rid}"] = {"ids": tok.astype(np.int32), "pos": np.arange(n_tok, dtype=np.int32),
                                    "n_raw": np.int32(n_tok), "mask": probe}
            revs.append(ReviewItem(id=rid, tokens=tok, rois=concat_rois([rois[p] for p in rimgs], cfg),
                                   probe=probe.astype(np.float32), label=float(labels[j]), length=float(n_tok)))
        items[split].append(ProductItem(id=pid, tokens=ptok, rois=concat_rois([rois[p] for p in pimgs], cfg),
                                        reviews=revs))
    if text_feat_dim is not None:
        _add_text_features(items, arrays, matrix, text_feat_dim, noise, np.random.default_rng([seed, 1]))
    embeddings = {"prd": matrix, "rvw": matrix}
    bundle = DataBundle(
        name=dataset,
        splits={s: InMemorySource(items[s], roi_dim=roi_dim) for s in SPLITS if items[s]},
        embeddings=embeddings, threshold=float(threshold),
        train_labels=[float(r.label) for r in records.reviews if r.split == "train"],
    )
    root = None
    if store_root is not None:
        root = Path(store_root)
        _write_store(root, dataset, arrays, rois, matrix, fingerprints or {})
    return SyntheticData(bundle=bundle, records=records, dataset=dataset, store_root=root, data_cfg=cfg)


SYNTHETIC_CLS, SYNTHETIC_SEP = 101, 102  # stand-in [CLS] / [SEP] word-piece ids


def _add_text_features(items: dict[str, list[ProductItem]], arrays: dict[str, dict[str, np.ndarray]],
                       matrix: np.ndarray, dim: int, noise: float, rng: np.random.Generator) -> None:
    """Stand-in bert rows for every text: [CLS] (the mean of the token rows) + one row per token
    (its embedding through a fixed projection, plus noise); word-piece ids [CLS] tokens [SEP]."""
    proj = rng.normal(size=(matrix.shape[1], dim)) / np.sqrt(matrix.shape[1])

    def rows(tok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r = matrix[tok] @ proj + noise * rng.normal(size=(len(tok), dim))
        cls = r.mean(axis=0, keepdims=True) if len(r) else np.zeros((1, dim))
        feats = np.concatenate([cls, r]).astype(np.float16).astype(np.float32)  # as the store keeps them
        return feats, np.concatenate([[SYNTHETIC_CLS], tok, [SYNTHETIC_SEP]]).astype(np.int64)

    for split_items in items.values():
        for p in split_items:
            p.text_feats, p.text_ids = rows(p.tokens)
            arrays[f"prd:{p.id}"]["bert"] = (p.text_feats, p.text_ids)
            for r in p.reviews:
                r.text_feats, r.text_ids = rows(r.tokens)
                arrays[f"rvw:{r.id}"]["bert"] = (r.text_feats, r.text_ids)


def _write_store(root: Path, dataset: str, arrays: dict[str, dict[str, np.ndarray]],
                 rois: dict[str, np.ndarray], matrix: np.ndarray, fingerprints: Mapping[str, str]) -> None:
    """Write the arrays as the four stages would: content-keyed segments plus dataset views."""
    from pipeline.stage import FieldSpec, Record
    from pipeline.store import FeatureStore

    store = FeatureStore(root)

    def put(stage: str, schema: dict[str, FieldSpec], items: dict[str, tuple[str, dict[str, np.ndarray]]]) -> None:
        fp = fingerprints.get(stage, SYNTHETIC_FINGERPRINT)
        view: dict[str, str] = {}
        written: set[str] = set()
        writer = store.writer(stage, fp, schema, attrs={"synthetic": True})
        for item_id, (key, arrs) in items.items():
            view[item_id] = key
            if key not in written:
                writer.add(Record(key=key, arrays=arrs))
                written.add(key)
        writer.close()
        store.write_view(dataset, stage, fp, view)

    tok_schema = {"ids": FieldSpec("int32", (), True), "pos": FieldSpec("int32", (), True),
                  "n_raw": FieldSpec("int32", (), False)}
    put("tokens", tok_schema, {
        item: (text_key(item, "synthetic-tokens"), {k: a[k] for k in ("ids", "pos", "n_raw")})
        for item, a in arrays.items()
    })
    put("probes", {"mask": FieldSpec("uint8", (), True)}, {
        item: (text_key(item, "synthetic-probes"), {"mask": a["mask"]})
        for item, a in arrays.items() if "mask" in a
    })
    d = next(iter(rois.values())).shape[1] if rois else 2048
    roi_schema = {
        "features": FieldSpec("float32", (d,), True), "boxes": FieldSpec("float32", (4,), True),
        "obj_ids": FieldSpec("int32", (), True), "obj_conf": FieldSpec("float32", (), True),
        "attr_ids": FieldSpec("int32", (), True), "attr_conf": FieldSpec("float32", (), True),
        "image_hw": FieldSpec("int32", (2,), False),
    }

    def roi_arrays(f: np.ndarray) -> dict[str, np.ndarray]:
        n = len(f)
        return {"features": f, "boxes": np.tile(np.array([0, 0, 10, 10], np.float32), (n, 1)),
                "obj_ids": np.zeros(n, np.int32), "obj_conf": np.ones(n, np.float32),
                "attr_ids": np.zeros(n, np.int32), "attr_conf": np.ones(n, np.float32),
                "image_hw": np.array([10, 10], np.int32)}

    with_bert = {item: a["bert"] for item, a in arrays.items() if "bert" in a}
    if with_bert:
        h = next(iter(with_bert.values()))[0].shape[1]
        put("bert", {"features": FieldSpec("float16", (h,), True), "attention_mask": FieldSpec("uint8", (), True),
                     "input_ids": FieldSpec("int32", (), True)}, {
            item: (text_key(item, "synthetic-bert"), {
                "features": f.astype(np.float16), "attention_mask": np.ones(len(f), np.uint8),
                "input_ids": ids.astype(np.int32)})
            for item, (f, ids) in with_bert.items()
        })
    put("rois", roi_schema, {path: (text_key(path, "synthetic-image"), roi_arrays(f)) for path, f in rois.items()})
    put("embeddings", {"matrix": FieldSpec("float32", (matrix.shape[1],), True)}, {
        "prd_vocab": (text_key("vocab", "synthetic"), {"matrix": matrix}),
        "rvw_vocab": (text_key("vocab", "synthetic"), {"matrix": matrix}),
    })


def write_mrhp_tables(records: DatasetRecords, raw_root: str | Path, category: str = "home") -> Path:
    """Write records as released-format MRHP tables `<category>.{prd,rvw,rel}.<split>` (labels
    in the rel `upvotes` column), so the dataset reader and the CLI can load the synthetic data."""
    from pipeline.datasets.mrhp import PRD_COLUMNS, REL_COLUMNS, RVW_COLUMNS
    from pipeline.datasets.tables import ColumnTableWriter

    root = Path(raw_root)
    root.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        prd = ColumnTableWriter(root / f"{category}.prd.{split}", PRD_COLUMNS)
        rvw = ColumnTableWriter(root / f"{category}.rvw.{split}", RVW_COLUMNS)
        rel = ColumnTableWriter(root / f"{category}.rel.{split}", REL_COLUMNS)
        for p in records.products.values():
            if p.split == split:
                prd.add({"product_id": p.id, "name": p.name, "description": p.description,
                         "img_url": [im.url for im in p.images]})
        for r in records.reviews:
            if r.split == split:
                rvw.add({"product_id": r.product_id, "review_id": r.id, "content": r.text,
                         "img_url": [im.url for im in r.images]})
                rel.add({"product_id": r.product_id, "review_id": r.id, "upvotes": r.label})
        for w in (prd, rvw, rel):
            w.close()
    return root


# Settings that make a small synthetic run learn in seconds on a CPU.
SYNTHETIC_TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 8, "lr": 3e-3, "batch_products": 4, "eval_batch_products": 16, "patience": 0,
    "lr_patience": 3, "grad_clip": 5.0, "device": "cpu", "num_workers": 0,
}


def synthetic_train_config(model_name: str, data: SyntheticData,
                           overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    base = deep_merge(SYNTHETIC_TRAIN_DEFAULTS, {"model": model_name, "dataset": data.dataset,
                                                 "data": to_mapping(data.data_cfg)})
    return train_config(deep_merge(base, dict(overrides or {})))


def train_and_evaluate(model_name: str, data: SyntheticData, cfg_overrides: Mapping[str, Any] | None = None,
                       *, run_dir: str | Path | None = None) -> dict[str, float]:
    """Train `model_name` on the synthetic data and return its test metrics (best dev epoch)."""
    from models.trainer import train

    cfg = synthetic_train_config(model_name, data, cfg_overrides)
    if run_dir is not None:
        return train(cfg, data.bundle, run_dir).test or {}
    with tempfile.TemporaryDirectory(prefix="mrhp-synth-run-") as tmp:
        return train(cfg, data.bundle, Path(tmp) / model_name).test or {}
