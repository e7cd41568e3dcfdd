"""MM-SS's text-encoder settings meet the dataset: width from the stored features, glove fallback."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from models.config import TrainConfig
from models.trainer import _text_encoder_fallback, _text_feature_width
from pipeline.errors import TrainingError


class _Source:
    def __init__(self, items):
        self.items = items
        self.product_ids = [f"p{i}" for i in range(len(items))]

    def load(self, i):
        return self.items[i]


def _item(width):
    feats = None if width is None else np.zeros((3, width), np.float32)
    review = SimpleNamespace(text_feats=feats)
    return SimpleNamespace(text_feats=None, reviews=[review])


def _bundle(*widths):
    return SimpleNamespace(split=lambda name: _Source([_item(w) for w in widths]))


def test_text_feat_dim_follows_the_stored_features_and_says_so():
    said = []
    cfg = TrainConfig(model="mmss", model_cfg={"text_features": "bert", "text_feat_dim": 768})
    out = _text_feature_width(cfg, _bundle(None, 384), said.append)
    assert out.model_cfg["text_feat_dim"] == 384
    assert said == ["model_cfg.text_feat_dim: 768 -> 384 (the width of the stored bert features)"]
    same = _text_feature_width(out, _bundle(384), said.append)
    assert same is out and len(said) == 1


def test_no_stored_features_at_all_is_an_error():
    cfg = TrainConfig(model="mmss", model_cfg={"text_features": "bert", "text_feat_dim": 768})
    with pytest.raises(TrainingError, match="holds no text features"):
        _text_feature_width(cfg, _bundle(None, None), print)


def test_a_dataset_without_text_encoder_falls_back_to_glove_with_a_notice():
    said = []
    manifest = SimpleNamespace(dataset=lambda name: SimpleNamespace(text_encoder=None))
    cfg = TrainConfig(model="mmss", dataset="d", model_cfg={"text_features": "bert"})
    out = _text_encoder_fallback(cfg, manifest, said.append)
    assert out.model_cfg["text_features"] == "glove" and "declares no text_encoder" in said[0]
    declared = SimpleNamespace(dataset=lambda name: SimpleNamespace(text_encoder="minilm-l6"))
    assert _text_encoder_fallback(cfg, declared, said.append) is cfg


def test_the_glove_fallback_drops_berts_learning_rate_as_the_glove_preset_does():
    """The paper preset's text_encoder_lr (A.2: 5e-5, BERT fine-tuning) must not follow the text
    path onto the GRU: after the fallback the model has one lr group, as under `glove`."""
    from models.mmss import MMSS

    said = []
    manifest = SimpleNamespace(dataset=lambda name: SimpleNamespace(text_encoder=None))
    paper = MMSS.preset("paper")
    cfg = TrainConfig(model="mmss", dataset="d", lr=1e-4, model_cfg=paper["model_cfg"])
    out = _text_encoder_fallback(cfg, manifest, said.append)
    assert out.model_cfg["text_encoder_lr"] is None
    assert out.model_cfg["text_encoder_lr"] == MMSS.preset("glove")["model_cfg"]["text_encoder_lr"]
    assert said[0].endswith("text_encoder_lr 5e-05 (BERT's) -> none, the GRU trains at lr 0.0001")
    model = MMSS.from_config({**out.model_cfg, "vocab_size": 5, "embed_dim": 4, "roi_dim": 8, "hidden": 8,
                              "heads": 2})
    assert [g["lr"] for g in model.parameter_groups(1e-4)] == [1e-4]  # one group: GRU at the base lr
