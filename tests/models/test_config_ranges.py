"""Impossible or contradictory training settings are refused in one line before any data is read
(the audit of silent degradation): each value here used to load and then quietly change what a
run trains or reports."""
from __future__ import annotations

import pytest
import torch

from models.config import train_config
from pipeline.errors import ConfigError


def _refused(mapping, match):
    with pytest.raises(ConfigError, match=match) as ei:
        train_config(mapping)
    assert "\n" not in str(ei.value)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_grad_clip_must_be_positive_or_null(value):
    _refused({"grad_clip": value}, r"grad_clip: expected a positive max gradient norm or null")


def test_a_zero_grad_clip_would_zero_every_gradient():
    # Why 0 is refused: clip_grad_norm_ multiplies each gradient by min(1, 0 / (norm + eps)) = 0,
    # so Adam would take no step at all and the run would "train" for its epochs unchanged.
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    (w * torch.tensor([3.0, 4.0])).sum().backward()  # grad = (3, 4), norm 5
    torch.nn.utils.clip_grad_norm_([w], 0.0)
    assert torch.equal(w.grad, torch.zeros(2))


def test_valid_grad_clip_values_load():
    assert train_config({"grad_clip": 5.0}).grad_clip == 5.0
    assert train_config({"grad_clip": None}).grad_clip is None


def test_lr_nan_is_refused():
    _refused({"lr": float("nan")}, r"lr: expected a positive number")


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_min_gap_must_be_positive(value):
    _refused({"min_gap": value}, r"min_gap: expected a positive label gap")


def test_a_zero_min_gap_would_pair_a_positive_with_itself():
    # Why 0 is refused: labels (0, 2): the positive is review 1 (above the lowest label 0); its
    # candidates are the reviews with label <= 2 - 0 = 2, i.e. reviews 0 and 1 (itself).
    from models.samplers import PairwiseSampler

    rows = PairwiseSampler(mode="listwise", min_gap=0.0).sample_product([0.0, 2.0], None)
    assert [(pos, list(negs)) for pos, negs, _ in rows] == [(1, [0, 1])]


@pytest.mark.parametrize("value", [-1.0, float("nan")])
def test_fixed_margin_must_be_non_negative(value):
    _refused({"fixed_margin": value}, r"fixed_margin: expected a number >= 0")


def test_valid_gaps_and_margins_load():
    cfg = train_config({"min_gap": 1.0, "fixed_margin": 0.0})
    assert (cfg.min_gap, cfg.fixed_margin) == (1.0, 0.0)


@pytest.mark.parametrize("ks", [[0], [-1, 3], [3, 3]])
def test_ndcg_cut_offs_must_be_distinct_and_positive(ks):
    _refused({"ks": ks}, r"ks: expected distinct NDCG cut-offs >= 1")


def test_product_metrics_refuses_a_cut_off_below_one():
    from models.metrics import product_metrics

    # labels (0, 2), scores ranking review 1 first: with k = -1 the old slice top[:-1] kept only
    # the first ranked review, a number no NDCG definition gives; k = 0 gave 0 whatever the ranking
    for k in (0, -1):
        with pytest.raises(ValueError, match="cut-offs must be >= 1"):
            product_metrics([0.0, 2.0], [0.0, 1.0], threshold=1.0, ks=(k,))
    # NDCG@1 by hand: top-1 is label 2 (gain 3 / ln 2), ideal the same: 1.0
    assert product_metrics([0.0, 2.0], [0.0, 1.0], threshold=1.0, ks=(1,))["NDCG@1"] == 1.0


def test_ks_without_ndcg_and_several_cut_offs_load():
    assert train_config({"ks": [1, 3, 10]}).ks == (1, 3, 10)


@pytest.mark.parametrize("value", [4.0, 7.0, -0.5, float("nan")])
def test_threshold_must_lie_within_the_label_range(value):
    _refused({"threshold": value}, r"threshold: expected a relevance threshold in \[0, 4\)")


def test_an_out_of_range_threshold_would_make_every_metric_a_constant():
    # Why: labels (0, 1, 4) with the worst ranking (the 4 last). Threshold 4: nothing is relevant,
    # MAP = 0 for any ranking. Threshold -0.5: all three are relevant, MAP = mean(1/1, 2/2, 3/3) = 1.
    from models.metrics import product_metrics

    worst = dict(labels=[0.0, 1.0, 4.0], scores=[3.0, 2.0, 1.0])
    assert product_metrics(**worst, threshold=4.0)["MAP"] == 0.0
    assert product_metrics(**worst, threshold=-0.5)["MAP"] == 1.0


def test_thresholds_in_range_load():
    for t in (0.0, 1.0, 3.5, None):
        assert train_config({"threshold": t}).threshold == t


@pytest.mark.parametrize("mapping, match", [
    ({"weight_decay": -0.01}, r"weight_decay: expected a number >= 0"),
    ({"min_lr": -1e-6}, r"min_lr: expected a number in \[0, lr=0.0001\]"),
    ({"min_lr": 1e-3}, r"min_lr: expected a number in \[0, lr=0.0001\]"),  # above lr: never cuts
    ({"lr": 1e-5, "min_lr": 2e-5}, r"min_lr: expected a number in \[0, lr=1e-05\]"),
])
def test_optimizer_settings_that_cannot_hold(mapping, match):
    _refused(mapping, match)


def test_a_min_lr_above_lr_would_freeze_the_scheduler():
    # Why: ReduceLROnPlateau sets lr to max(lr * factor, min_lr) only when that is lower than lr;
    # lr 1e-4, min_lr 1e-3: max(5e-5, 1e-3) = 1e-3 > 1e-4, so after any number of bad epochs lr stays.
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([w], lr=1e-4)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=0, min_lr=1e-3)
    for _ in range(5):
        sched.step(0.0)
    assert opt.param_groups[0]["lr"] == 1e-4


@pytest.mark.parametrize("data, match", [
    ({"max_tokens": 0}, r"data.max_tokens: expected a positive token cap or null, got 0"),
    ({"max_tokens": -3}, r"data.max_tokens: expected a positive token cap or null, got -3"),
    ({"roi_dim": 0}, r"data.roi_dim: expected a positive feature size"),
    ({"empty_rois": "zeros", "zeros_rois": 0}, r"data.zeros_rois: expected >= 1 rows"),
])
def test_data_sizes_that_cannot_hold(data, match):
    _refused({"data": data}, match)


def test_a_negative_max_tokens_would_have_cut_from_the_end():
    # Why: the data reader caps a text with ids[:max_tokens]; ids (5, 6, 7) with -1 kept (5, 6).
    from models.config import DataConfig
    from models.data import token_ids

    ids = {"ids": [5, 6, 7]}
    assert list(token_ids(ids, DataConfig(max_tokens=-1))) == [5, 6]
    assert list(token_ids(ids, DataConfig(max_tokens=2))) == [5, 6]


def test_valid_data_and_optimizer_settings_load():
    cfg = train_config({"weight_decay": 0.0, "min_lr": 0.0, "data": {"max_tokens": 1, "roi_dim": 4,
                                                                      "empty_rois": "mask", "zeros_rois": 0}})
    assert cfg.data.max_tokens == 1 and cfg.min_lr == 0.0


def test_listwise_with_sampling_weights_is_refused():
    _refused({"sampler": "listwise"}, r"negative_weights: 'sampling' draws negatives by weight, which sampler: "
                                      r"listwise does not do")


def test_listwise_dropped_the_sampling_weights():
    # Why: with weight_mode "sampling" the listwise rows weigh 1 each, exactly as "none": labels
    # (0, 0, 3), min_gap 1, label weights {0: 0.2, 3: 0.8}: positive review 2, negatives 0 and 1.
    from models.samplers import PairwiseSampler

    def rows(mode):
        s = PairwiseSampler(mode="listwise", min_gap=1.0, label_weights={0.0: 0.2, 3.0: 0.8}, weight_mode=mode)
        return [list(w) for _, _, w in s.sample_product([0.0, 0.0, 3.0], None)]

    assert rows("sampling") == rows("none") == [[1.0, 1.0]]
    assert rows("loss") == [[pytest.approx(0.2), pytest.approx(0.2)]]


def test_listwise_with_loss_or_no_weights_loads():
    for mode in ("loss", "none"):
        assert train_config({"sampler": "listwise", "negative_weights": mode}).sampler == "listwise"


def test_a_finished_run_saved_before_the_training_refusals_still_loads_for_evaluate_and_predict(tmp_path):
    """The refusals of training-only settings (sampler/negative_weights, min_gap, grad_clip,
    min_lr, SANCL's cpc_reduction beside ranking_reduction) guard a run about to train; a run
    folder that trained under them before they existed must still load for `mrhp evaluate` /
    `predict` (`run_config`, `load_run`), which train nothing. A new training config with the
    same settings is still refused."""
    import yaml

    from models.config import TrainConfig, config_to_yaml
    from models.trainer import run_config

    saved = yaml.safe_load(config_to_yaml(train_config({"model": "sancl"})))
    saved.update({"sampler": "listwise", "negative_weights": "sampling", "min_gap": 0.0, "grad_clip": 0.0,
                  "min_lr": 1.0, "ranking_reduction": "sum"})
    saved["model_cfg"]["cpc_reduction"] = "instances"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved), encoding="utf-8")
    cfg = run_config(tmp_path)
    assert isinstance(cfg, TrainConfig) and cfg.sampler == "listwise" and cfg.min_gap == 0.0
    assert cfg.model_cfg["cpc_reduction"] == "instances"
    _refused({"sampler": "listwise", "negative_weights": "sampling"}, r"negative_weights: .sampling. draws negatives")
    _refused({**saved, "sampler": "pairwise"}, r"grad_clip: expected a positive")
    # settings the data loading and the metrics read are still checked on a saved config
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**saved, "ks": [0]}), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"ks: expected distinct NDCG cut-offs >= 1"):
        run_config(tmp_path)
