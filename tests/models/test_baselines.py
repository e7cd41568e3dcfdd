"""The baselines: length, random and text-gru."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.config import DataConfig
from models.data import Collator, ProductItem, ReviewItem
from models.registry import available_models, build_model
from pipeline.errors import ConfigError


def _batch():
    def rev(rid, n):
        return ReviewItem(id=rid, tokens=np.arange(2, 2 + n) % 9 + 2, rois=np.zeros((0, 4), np.float32),
                          probe=np.ones(n, np.float32), label=1.0, length=float(n))
    prods = [ProductItem(id="a", tokens=np.array([2, 3]), rois=np.zeros((0, 4), np.float32),
                         reviews=[rev("a1", 3), rev("a2", 7)]),
             ProductItem(id="b", tokens=np.array([4]), rois=np.zeros((0, 4), np.float32),
                         reviews=[rev("b1", 0), rev("b2", 5)])]
    return Collator(DataConfig(roi_dim=4))(prods)


def test_baselines_are_registered():
    assert {"length", "random", "text-gru"} <= set(available_models())


def test_length_scores_are_review_lengths_and_nothing_trains():
    m = build_model("length")
    assert m(_batch()).scores.tolist() == [3.0, 7.0, 0.0, 5.0]
    assert not any(p.requires_grad for p in m.parameters())


def test_random_scores_depend_on_seed_and_review_id_only():
    b = _batch()
    s0 = build_model("random", {"seed": 0})(b).scores
    again = build_model("random", {"seed": 0})(b).scores
    s1 = build_model("random", {"seed": 1})(b).scores
    assert torch.equal(s0, again) and not torch.equal(s0, s1)
    assert bool(((s0 >= 0) & (s0 < 1)).all())


def test_text_gru_shapes_frozen_embeddings_and_backward():
    emb = np.random.default_rng(0).normal(size=(12, 6)).astype(np.float32)
    m = build_model("text-gru", {"hidden": 4, "mlp_hidden": 8}, {"prd": emb, "rvw": emb})
    out = m(_batch())
    assert out.scores.shape == (4,) and out.aux_losses == {}
    out.scores.sum().backward()
    assert m.rvw_enc.embed.weight.grad is None  # frozen word vectors
    assert m.mlp[0].weight.grad is not None
    assert torch.isfinite(out.scores).all()  # the empty review (b1) is handled


def test_text_gru_without_embeddings_needs_vocab_size_and_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="vocab_size"):
        build_model("text-gru", {})
    assert build_model("text-gru", {"vocab_size": 20, "embed_dim": 4, "hidden": 2}) is not None
    with pytest.raises(ConfigError, match="valid keys"):
        build_model("text-gru", {"hiden": 3}, {"prd": np.zeros((3, 2)), "rvw": np.zeros((3, 2))})
    with pytest.raises(ConfigError, match="available"):
        build_model("no-such-model")
