"""What the metrics average over is said, and a split they cannot measure is refused: products
without a relevant review and single-review products are counted (EvalResult.counts, eval_*.json),
a split with no relevant review at all is a TrainingError, and training batches without a
ranking pair are counted in the epoch record (before: each was dropped or averaged in silence)."""
from __future__ import annotations

import numpy as np
import pytest

from models.config import train_config
from models.data import DataBundle, InMemorySource, ProductItem, ReviewItem
from models.registry import build_model
from models.trainer import Trainer, counts_line, evaluate, train
from pipeline.errors import TrainingError

D = 4  # ROI width of these hand-made products


def _review(rid: str, label: float, length: int) -> ReviewItem:
    return ReviewItem(id=rid, tokens=np.arange(2, 2 + length), rois=np.zeros((0, D), np.float32),
                      probe=np.ones(length, np.float32), label=label, length=float(length))


def _product(pid: str, reviews: list[tuple[float, int]]) -> ProductItem:
    return ProductItem(id=pid, tokens=np.array([2, 3]), rois=np.zeros((0, D), np.float32),
                       reviews=[_review(f"{pid}-{i}", y, n) for i, (y, n) in enumerate(reviews)])


def _source() -> InMemorySource:
    # (label, length); the length baseline scores a review by its length
    return InMemorySource([
        _product("A", [(0.0, 5), (3.0, 2)]),  # relevant review ranked 2nd: MAP 1/2
        _product("B", [(0.0, 4), (1.0, 3)]),  # no label above 1: scores 0 (counted)
        _product("C", [(2.0, 3)]),  # a single review, relevant: MAP 1 (counted)
    ], roi_dim=D)


def _cfg(**kw):
    return train_config({"model": "length", "device": "cpu", "data": {"roi_dim": D}, **kw})


def test_products_without_relevant_review_and_single_review_products_are_counted():
    cfg = _cfg()
    res = evaluate(build_model("length", cfg.model_cfg, None), _source(), threshold=1.0, cfg=cfg)
    assert res.counts == {"products": 3, "products_without_relevant": 1, "single_review_products": 1}
    assert res.metrics["MAP"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)  # still averaged with equal weight
    assert counts_line("dev", res.counts) == ("dev: metrics over 3 product(s), 1 without a relevant review "
                                              "(scored 0), 1 with a single review")


def test_a_split_where_no_review_is_relevant_is_refused():
    cfg = _cfg()
    # highest label 3, threshold 3: label > 3 never holds, so MAP/NDCG/MRR would be 0 for any model
    with pytest.raises(TrainingError, match=r"no review of its 3 product\(s\) has a label above the threshold 3 "
                                            r"\(highest label 3\)"):
        evaluate(build_model("length", cfg.model_cfg, None), _source(), threshold=3.0, cfg=cfg)


def test_batches_without_a_ranking_pair_are_counted_in_the_epoch_record(tmp_path):
    # one product per batch; T1's labels (1, 1) give no pair (no label is above the lowest), so
    # one of the two batches of every epoch is skipped
    train_src = InMemorySource([_product("T0", [(0.0, 2), (2.0, 3)]), _product("T1", [(1.0, 2), (1.0, 3)])],
                               roi_dim=D)
    bundle = DataBundle(name="hand", splits={"train": train_src, "dev": _source()}, embeddings=None,
                        threshold=1.0, train_labels=[0.0, 2.0, 1.0, 1.0])
    cfg = train_config({"model": "text-gru", "device": "cpu", "epochs": 2, "batch_products": 1, "min_gap": 1.0,
                        "data": {"roi_dim": D},
                        "model_cfg": {"vocab_size": 8, "embed_dim": 4, "hidden": 4, "mlp_hidden": 4}})
    trainer = Trainer(cfg, bundle, tmp_path / "run", progress_bar=False)
    records = [trainer._train_epoch() for _ in range(2)]
    assert [(r["steps"], r["skipped_batches"]) for r in records] == [(1, 1), (1, 1)]
    said: list[str] = []
    trainer.progress = said.append
    trainer._log_epoch(_NoWriter(), {"epoch": 1, "train_loss": 0.5, **records[0]})
    assert said and said[0].endswith(", 1 batch(es) without a ranking pair skipped")


class _NoWriter:
    def add_scalar(self, *args):
        pass

    def flush(self):
        pass


def test_run_json_records_the_reviews_the_reader_left_out(tmp_path):
    import json

    from pipeline.records import DatasetRecords

    recs = DatasetRecords(name="hand", dropped={"reviews with 0 votes (dropped)": 3})
    bundle = DataBundle(name="hand", splits={"train": _source(), "dev": _source()}, embeddings=None,
                        threshold=1.0, records=recs)
    train(_cfg(), bundle, tmp_path / "run", progress=lambda _m: None, progress_bar=False)
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["dropped_reviews"] == {"reviews with 0 votes (dropped)": 3}


def test_an_unmeasurable_dev_split_stops_the_run_before_any_epoch(tmp_path):
    # dev labels top out at 3 and the threshold is 3: refused before training, not after epoch 1
    train_src = InMemorySource([_product("T0", [(0.0, 2), (2.0, 3)])], roi_dim=D)
    bundle = DataBundle(name="hand", splits={"train": train_src, "dev": _source()}, embeddings=None,
                        threshold=3.0, train_labels=[0.0, 2.0])
    cfg = train_config({"model": "text-gru", "device": "cpu", "epochs": 1, "min_gap": 1.0, "data": {"roi_dim": D},
                        "model_cfg": {"vocab_size": 8, "embed_dim": 4, "hidden": 4, "mlp_hidden": 4}})
    trainer = Trainer(cfg, bundle, tmp_path / "run", progress_bar=False)
    calls = []
    trainer._train_epoch = lambda: calls.append(1)  # type: ignore[method-assign]
    with pytest.raises(TrainingError, match=r"dev split: no review of its 3 product\(s\) has a label above the "
                                            r"threshold 3 \(highest label 3\)"):
        trainer.run()
    assert calls == []


def test_train_seeds_says_how_the_upvotes_were_read(tmp_path, monkeypatch):
    import models.data as data_mod
    import models.trainer as trainer_mod
    from models.trainer import train_seeds
    from pipeline.manifest import manifest_from_mapping
    from pipeline.records import DatasetRecords

    m = manifest_from_mapping({
        "version": 1, "roots": {"data": ".", "resources": ".", "store": "store", "runs": "runs"},
        "datasets": {"d": {"raw_root": "raw", "image_root": "pics", "categories": ["home"], "word_vectors": "wv"}},
        "resources": {"word_vectors": {"wv": {"format": "glove", "path": "g.txt"}}, "detectors": {"bua-r101-c4": {}}},
    }, tmp_path / "data_manifest.yaml")
    bundle = DataBundle(name="d", splits={"train": _source(), "dev": _source()}, embeddings=None, threshold=1.0,
                        records=DatasetRecords(name="d", label_interpretation="votes"))
    monkeypatch.setattr(data_mod, "build_datasets", lambda *a, **k: bundle)
    monkeypatch.setattr(trainer_mod, "_vocab_fingerprint", lambda *a: None)
    said: list[str] = []
    train_seeds(m, train_config({"model": "length", "dataset": "d", "device": "cpu", "data": {"roi_dim": D}}),
                progress=said.append, progress_bar=False)
    assert ("dataset 'd': rel.upvotes read as vote counts (label min(floor(log2 v), 4); v = 0 dropped) "
            "(manifest labels: auto)") in said
