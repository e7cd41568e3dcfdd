"""A split the dataset declares but that holds no review stops the data loading in one line
(before: the split was left out of the bundle, so an empty test split meant a run without test
metrics and no word about it)."""
from __future__ import annotations

import numpy as np
import pytest

from models.config import DataConfig
from models.data import bundle_from_records
from pipeline.errors import DataError
from pipeline.records import DatasetRecords, Product, Review


def _records() -> DatasetRecords:
    recs = DatasetRecords(name="toy", dropped={"reviews with 0 votes (dropped)": 2})
    for split in ("train", "dev", "test"):
        recs.products[f"P{split}"] = Product(id=f"P{split}", name="pan", description="", text="pan", split=split)
    for split in ("train", "dev"):  # the test product's two reviews had 0 votes: none left
        recs.reviews += [Review(id=f"{split}{i}", product_id=f"P{split}", text="ok", label=i, split=split)
                         for i in range(2)]
    return recs


def test_a_declared_split_without_reviews_is_refused_naming_it(tmp_path):
    emb = {"prd": np.zeros((2, 2), np.float32), "rvw": np.zeros((2, 2), np.float32)}
    with pytest.raises(DataError, match=r"dataset 'toy': split 'test' has no reviews \(2 reviews with 0 votes "
                                        r"\(dropped\) in the dataset\); check its tables, or leave the split out "
                                        r"of datasets\.toy\.splits"):
        bundle_from_records(_records(), store_root=tmp_path / "store", dataset="toy", cfg=DataConfig(roi_dim=4),
                            threshold=1.0, embeddings=emb, required=None)
    # the splits that do hold reviews load (no store access until a product is read)
    bundle = bundle_from_records(_records(), store_root=tmp_path / "store", dataset="toy", cfg=DataConfig(roi_dim=4),
                                 threshold=1.0, splits=("train", "dev"), embeddings=emb, required=None)
    assert sorted(bundle.splits) == ["dev", "train"]
