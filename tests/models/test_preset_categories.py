"""A preset with per-category values on a dataset of several categories (before: the first
category's values applied to every category, unsaid)."""
from __future__ import annotations

import pytest

from models.config import resolve_train_config
from pipeline.errors import ConfigError
from pipeline.manifest import manifest_from_mapping


def _manifest(tmp_path, categories):
    return manifest_from_mapping({
        "version": 1,
        "roots": {"data": ".", "resources": ".", "store": "store"},
        "datasets": {"d": {"raw_root": "raw", "image_root": "pics", "categories": categories,
                           "word_vectors": "wv"}},
        "resources": {"word_vectors": {"wv": {"format": "glove", "path": "g.txt"}},
                      "detectors": {"bua-r101-c4": {}}},
    }, tmp_path / "data_manifest.yaml")


def test_per_category_preset_values_on_a_mixed_dataset_are_refused(tmp_path):
    # SANCL Table 5: clothing kappa 0.25, text_dropout 0.5; home kappa 0.1, text_dropout 0.2 (lr 1e-4 both)
    m = _manifest(tmp_path, ["clothing", "home"])
    with pytest.raises(ConfigError, match=r"preset 'paper' of sancl sets model_cfg\.kappa, model_cfg\.text_dropout "
                                          r"per category, and dataset 'd' has categories clothing, home \(clothing: "
                                          r"model_cfg\.kappa=0\.25, model_cfg\.text_dropout=0\.5; home: "
                                          r"model_cfg\.kappa=0\.1, model_cfg\.text_dropout=0\.2\)"):
        resolve_train_config(m, model="sancl", dataset="d")
    cfg = resolve_train_config(m, model="sancl", dataset="d",
                               overrides=["model_cfg.kappa=0.2", "model_cfg.text_dropout=0.3"])
    assert (cfg.model_cfg["kappa"], cfg.model_cfg["text_dropout"]) == (0.2, 0.3)


def test_one_category_or_a_category_free_preset_resolves(tmp_path):
    assert resolve_train_config(_manifest(tmp_path, ["home"]), model="sancl", dataset="d").model_cfg["kappa"] == 0.1
    mixed = _manifest(tmp_path, ["clothing", "home"])
    assert resolve_train_config(mixed, model="text-gru", dataset="d").model == "text-gru"
