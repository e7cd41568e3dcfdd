"""Data collation, the training loop (checkpoints, resume, NaN guard) and the learning check."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from models.batch import ModelOutput
from models.config import DataConfig, train_config
from models.data import Collator, InMemorySource, ProductItem, ReviewItem, eval_plan, make_loader, train_plan
from models.registry import register_model
from models.runs import RunPaths, load_checkpoint
from models.synthetic import make_synthetic, synthetic_train_config, train_and_evaluate
from models.trainer import evaluate, load_run, train
from pipeline.errors import TrainingError


def _review(rid, n_tok, n_roi, label, d=4):
    return ReviewItem(id=rid, tokens=np.arange(2, 2 + n_tok), rois=np.ones((n_roi, d), np.float32),
                      probe=np.ones(n_tok, np.float32), label=label, length=float(n_tok))


def test_collation_pads_masks_and_indexes_products():
    cfg = DataConfig(roi_dim=4)
    p1 = ProductItem(id="a", tokens=np.array([5, 6, 7]), rois=np.ones((2, 4), np.float32),
                     reviews=[_review("a1", 2, 0, 1.0), _review("a2", 4, 3, 3.0)])
    p2 = ProductItem(id="b", tokens=np.array([8]), rois=np.zeros((0, 4), np.float32),
                     reviews=[_review("b1", 1, 1, 0.0)])
    b = Collator(cfg)([p1, p2])
    assert b.prod_tokens.shape == (2, 3) and b.prod_token_mask.tolist() == [[True] * 3, [True, False, False]]
    assert b.prod_rois.shape == (2, 2, 4) and b.prod_roi_mask.tolist() == [[True, True], [False, False]]
    assert b.rev_tokens.shape == (3, 4) and b.rev_token_mask.sum(1).tolist() == [2, 4, 1]
    assert b.rev_roi_mask.sum(1).tolist() == [0, 3, 1]  # review without images: all-False mask
    assert b.rev_product.tolist() == [0, 0, 1]
    assert b.labels.tolist() == [1.0, 3.0, 0.0] and b.rev_length.tolist() == [2.0, 4.0, 1.0]
    assert b.review_ids == ["a1", "a2", "b1"] and b.product_ids == ["a", "b"]
    assert torch.equal(b.rev_probe_mask, b.rev_token_mask.float())


def test_empty_rois_zeros_option_gives_mcr_zero_rows():
    cfg = DataConfig(roi_dim=4, empty_rois="zeros", zeros_rois=16)
    p = ProductItem(id="a", tokens=np.array([2]), rois=np.zeros((0, 4), np.float32),
                    reviews=[_review("a1", 2, 0, 1.0)])
    b = Collator(cfg)([p])
    assert b.prod_rois.shape == (1, 16, 4) and bool(b.prod_roi_mask.all())
    assert float(b.prod_rois.abs().sum()) == 0.0


def test_plans_cover_every_review_in_eval_and_cap_reviews_in_training():
    prods = [ProductItem(id=f"p{i}", tokens=np.array([2]), rois=np.zeros((0, 4), np.float32),
                         reviews=[_review(f"p{i}-{j}", 1, 0, float(j % 5)) for j in range(n)])
             for i, n in enumerate([5, 1, 12])]
    src = InMemorySource(prods, roi_dim=4)
    plan = eval_plan(src, batch_products=2, max_reviews=4)
    seen = [(p, r) for batch in plan for p, revs in batch for r in revs]
    assert sorted(seen) == sorted((p, r) for p, n in enumerate([5, 1, 12]) for r in range(n))
    tplan = train_plan(src, batch_products=2, max_reviews=3, rng=np.random.default_rng(0))
    units = [u for b in tplan for u in b]
    assert {p for p, _ in units} == {0, 2}  # single-review product has no pair
    assert all(len(r) == 3 for _, r in units)
    batches = list(make_loader(src, plan, DataConfig(roi_dim=4)))
    assert sum(b.num_reviews for b in batches) == 18


@pytest.fixture(scope="module")
def tiny():
    return make_synthetic(n_products=20, reviews_per_product=(4, 8), vocab_size=60, embed_dim=8,
                          roi_dim=8, seed=1)


def _cfg(tiny, **kw):
    base = {"model_cfg": {"hidden": 8, "mlp_hidden": 8, "dropout": 0.2}, "epochs": 4, "batch_products": 3}
    base.update(kw)
    return synthetic_train_config("text-gru", tiny, base)


def test_resume_is_bit_identical_to_an_uninterrupted_run(tiny, tmp_path):
    torch.set_num_threads(1)
    train(_cfg(tiny), tiny.bundle, tmp_path / "straight")
    train(_cfg(tiny, epochs=2), tiny.bundle, tmp_path / "split")
    train(_cfg(tiny, epochs=4), tiny.bundle, tmp_path / "split", resume=True)
    a = load_checkpoint(RunPaths(tmp_path / "straight").last)
    b = load_checkpoint(RunPaths(tmp_path / "split").last)
    assert a["epoch"] == b["epoch"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    la = [json.loads(x) for x in (tmp_path / "straight/metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "split/metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in la if r["event"] == "epoch"] == \
        [r["train_loss"] for r in lb if r["event"] == "epoch"]


def test_resume_refuses_a_changed_config_and_a_fresh_run_refuses_an_existing_folder(tiny, tmp_path):
    train(_cfg(tiny, epochs=1), tiny.bundle, tmp_path / "r")
    with pytest.raises(TrainingError, match="changed: lr"):
        train(_cfg(tiny, epochs=2, lr=0.5), tiny.bundle, tmp_path / "r", resume=True)
    with pytest.raises(TrainingError, match="already holds a run"):
        train(_cfg(tiny, epochs=1), tiny.bundle, tmp_path / "r")
    with pytest.raises(TrainingError, match="nothing to resume"):
        train(_cfg(tiny, epochs=1), tiny.bundle, tmp_path / "empty", resume=True)


def test_run_folder_holds_config_metrics_checkpoints_tensorboard_and_plots(tiny, tmp_path):
    res = train(_cfg(tiny, epochs=2), tiny.bundle, tmp_path / "run")
    p = RunPaths(tmp_path / "run")
    assert p.config.is_file() and p.best.is_file() and p.last.is_file()
    assert any(p.tensorboard.iterdir())
    assert (p.plots / "loss.png").is_file() and (p.plots / "dev.png").is_file()
    events = [json.loads(x)["event"] for x in p.metrics.read_text().splitlines()]
    assert events == ["epoch", "epoch", "test"]
    assert set(res.test) == {"MAP", "NDCG@3", "NDCG@5", "MRR"}
    # the best checkpoint reloads safely and reproduces the test metrics
    model, cfg = load_run(p.root, embeddings=tiny.bundle.embeddings)
    again = evaluate(model, tiny.bundle.split("test"), threshold=tiny.bundle.threshold, cfg=cfg)
    assert again.metrics == pytest.approx(res.test)
    meta = json.loads(p.meta.read_text())
    assert meta["status"] == "done" and meta["best_epoch"] == res.best_epoch


@register_model("test-nan")
class _NaNModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    @classmethod
    def from_config(cls, cfg, embeddings=None):
        return cls()

    def forward(self, batch):
        return ModelOutput(scores=self.w * batch.rev_length + float("nan"))


def test_nan_loss_stops_with_a_clear_message(tiny, tmp_path):
    cfg = synthetic_train_config("test-nan", tiny, {"epochs": 1})
    with pytest.raises(TrainingError, match="non-finite loss at epoch 1 step 1"):
        train(cfg, tiny.bundle, tmp_path / "nan")
    assert json.loads((tmp_path / "nan/run.json").read_text())["status"] == "failed"


@register_model("test-epoch-hook")
class _EpochHookModel(nn.Module):
    seen: list[int] = []

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    @classmethod
    def from_config(cls, cfg, embeddings=None):
        return cls()

    def on_epoch_start(self, epoch: int) -> None:
        type(self).seen.append(epoch)

    def forward(self, batch):
        return ModelOutput(scores=self.w * batch.rev_length)


def test_trainer_calls_on_epoch_start_with_the_zero_based_epoch(tiny, tmp_path):
    _EpochHookModel.seen.clear()
    train(synthetic_train_config("test-epoch-hook", tiny, {"epochs": 3}), tiny.bundle, tmp_path / "h")
    assert _EpochHookModel.seen == [0, 1, 2]


def test_parameter_free_model_skips_optimisation(tiny, tmp_path):
    res = train(synthetic_train_config("length", tiny), tiny.bundle, tmp_path / "len")
    assert res.epochs_run == 0 and res.test is not None


def test_bad_config_values_name_the_key():
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="margin"):
        train_config({"margin": "soft"})
    with pytest.raises(ConfigError, match="valid keys"):
        train_config({"learning_rate": 1e-3})
    with pytest.raises(ConfigError, match="metric"):
        train_config({"metric": "NDCG@10"})


def test_learning_check_text_gru_beats_length_and_random_on_held_out_products():
    torch.set_num_threads(1)
    data = make_synthetic(n_products=60, seed=0)
    gru = train_and_evaluate("text-gru", data, {"model_cfg": {"hidden": 16, "mlp_hidden": 32}})
    length = train_and_evaluate("length", data)
    rand = train_and_evaluate("random", data)
    assert gru["MAP"] > length["MAP"] + 0.1
    assert gru["MAP"] > rand["MAP"] + 0.1
    assert gru["NDCG@3"] > max(length["NDCG@3"], rand["NDCG@3"]) + 0.1


def test_yaml_config_then_overrides_take_precedence(tmp_path):
    from models.config import load_train_config
    from pipeline.errors import ConfigError

    f = tmp_path / "cfg.yaml"
    f.write_text("model: text-gru\nlr: 0.001\nmodel_cfg: {hidden: 32, dropout: 0.0}\ndata: {max_rois: 64}\n")
    cfg = load_train_config(f, ["model_cfg.hidden=8", "epochs=3"], base={"dataset": "demo", "lr": 0.5})
    assert cfg.lr == 0.001 and cfg.epochs == 3 and cfg.dataset == "demo"
    # model_cfg resolves to every field of the model's config record (the rest are its defaults)
    assert cfg.model_cfg["hidden"] == 8 and cfg.model_cfg["dropout"] == 0.0 and cfg.data.max_rois == 64
    assert cfg.model_cfg["mlp_hidden"] == 128 and cfg.model_cfg["finetune_embeddings"] is False
    with pytest.raises(ConfigError, match="not found"):
        load_train_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_train_config(tmp_path / "bad.yaml")


@pytest.mark.gpu
def test_training_on_cuda_with_autocast_gives_finite_metrics(tiny, tmp_path):
    res = train(_cfg(tiny, epochs=1, device="cuda", autocast=True), tiny.bundle, tmp_path / "gpu")
    assert all(np.isfinite(v) for v in res.test.values())


class _Payload:
    pass


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "extra": _Payload()}, path)
    with pytest.raises(TrainingError, match="cannot load checkpoint safely"):
        load_checkpoint(path)
    with pytest.raises(TrainingError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
