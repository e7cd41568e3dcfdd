"""Training loader for a GPU: float16 ROI features travel as float16 and are upcast on the
device (same values), batches can be pinned, and the trainer is unchanged on CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.config import DataConfig
from models.data import Collator, ProductItem, ReviewItem, concat_rois


def _items(dtype) -> list[ProductItem]:
    rng = np.random.default_rng(0)

    def r(n):
        return rng.normal(size=(n, 8)).astype(dtype)

    revs = [ReviewItem(id=f"r{i}", tokens=np.arange(1, 4 + i), rois=r(i), probe=np.ones(3 + i, np.float32),
                       label=float(i), length=3.0 + i) for i in range(3)]
    return [ProductItem(id="p0", tokens=np.arange(1, 6), rois=r(2), reviews=revs[:2]),
            ProductItem(id="p1", tokens=np.arange(1, 3), rois=r(0), reviews=revs[2:])]


def test_half_rois_stay_float16_and_upcast_on_the_device_to_the_same_values():
    cfg = DataConfig(roi_dim=8)
    items = _items(np.float16)
    full = Collator(cfg)(items)
    half = Collator(cfg, half_rois=True)(items)
    assert full.rev_rois.dtype == torch.float32 and half.rev_rois.dtype == torch.float16
    assert half.prod_rois.dtype == torch.float16
    moved = half.to("cpu")
    assert moved.rev_rois.dtype == torch.float32 and moved.prod_rois.dtype == torch.float32
    assert torch.equal(moved.rev_rois, full.rev_rois) and torch.equal(moved.prod_rois, full.prod_rois)
    assert torch.equal(moved.rev_roi_mask, full.rev_roi_mask)
    assert moved.labels.dtype == torch.float32 and moved.rev_tokens.dtype == torch.int64  # others untouched


def test_float32_features_are_not_narrowed_and_mixed_parts_give_float32():
    cfg = DataConfig(roi_dim=8)
    items = _items(np.float32)
    assert Collator(cfg, half_rois=True)(items).rev_rois.dtype == torch.float32
    a16, a32 = np.ones((2, 8), np.float16), np.ones((1, 8), np.float32)
    assert concat_rois([a16, a16], cfg).dtype == np.float16
    assert concat_rois([a16, a32], cfg).dtype == np.float32


@pytest.mark.gpu
def test_pinned_batches_copy_asynchronously_to_cuda():
    batch = Collator(DataConfig(roi_dim=8), half_rois=True)(_items(np.float16)).pin_memory()
    assert batch.rev_rois.is_pinned()
    on = batch.to("cuda", non_blocking=True)
    assert on.rev_rois.dtype == torch.float32 and on.rev_rois.is_cuda
