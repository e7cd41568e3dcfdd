"""MM-SS: SSP-Label pieces against hand-computed values (anchors Eq. 17, Mahalanobis distance
Eq. 18, relative distance Eq. 19, offset Eq. 20-21, EWMA Eq. 10-12), the subtask loss
weighting (Eq. 14-15), and the per-review state across epochs and checkpoints."""
from __future__ import annotations

import io
import math

import pytest
import torch

from models.mmss import (MMSS, PseudoLabelBank, ewma_beta, label_weighted_anchors, mahalanobis,
                         offset_labels, relative_distance)
from pipeline.errors import TrainingError
from test_models_common import TINY, learning_check, make_batch


def test_label_weighted_anchors_match_hand_computation():
    # labels 4, 0, 2 -> helpful weights 1, 0, 0.5 and unhelpful weights 0, 1, 0.5
    h = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]]).unsqueeze(1)  # (R=3, K=1, H=2)
    hi, lo, has_hi, has_lo = label_weighted_anchors(h, torch.tensor([4.0, 0.0, 2.0]), 4.0)
    assert torch.allclose(hi, torch.tensor([[5 / 3, 1 / 3]]))  # (2 + 0.5, 0 + 0.5) / 1.5
    assert torch.allclose(lo, torch.tensor([[1 / 3, 5 / 3]]))
    assert has_hi and has_lo
    _, _, has_hi, _ = label_weighted_anchors(h, torch.zeros(3), 4.0)
    assert not has_hi


def test_mahalanobis_distance_uses_the_per_dimension_variance():
    h = torch.tensor([[[2.0, 0.0]]])  # (1, 1, 2)
    anchor = torch.tensor([[5 / 3, 1 / 3]])
    var = torch.tensor([[1.0, 4.0]])
    # (1/3)^2 / 1 + (1/3)^2 / 4 = 1/9 + 1/36 = 5/36
    assert math.isclose(float(mahalanobis(h, anchor, var)), math.sqrt(5 / 36), rel_tol=1e-5)


def test_relative_distance_and_offset_match_hand_computation():
    # D_hi = 1, D_lo = 2.5 -> alpha = 1.5 ; D_hi = 2, D_lo = 4 -> alpha = 1
    alpha = relative_distance(torch.tensor([1.0, 2.0]), torch.tensor([2.5, 4.0]))
    assert torch.allclose(alpha, torch.tensor([1.5, 1.0]), atol=1e-5)
    # y_g = 2, alpha_s = 1.5, alpha_g = 1: delta = (0.5 / 1) * (2 + 1) / 2 = 0.75 -> 2.75
    # y_g = 3, alpha_s = 5, alpha_g = 0.5: delta = 9 * 1.75 = 15.75 -> clamped to 4
    # y_g = 1, alpha_s = alpha_g: no offset
    got = offset_labels(torch.tensor([[1.5], [5.0], [0.7]]), torch.tensor([[1.0], [0.5], [0.7]]),
                        torch.tensor([2.0, 3.0, 1.0]), 4.0)
    assert torch.allclose(got, torch.tensor([[2.75], [4.0], [1.0]]), atol=1e-5)


def test_ewma_of_pseudo_labels_follows_beta_two_over_i_plus_one():
    assert [ewma_beta(i) for i in (1, 2, 3)] == [1.0, 2 / 3, 0.5]
    bank = PseudoLabelBank(2)
    y = torch.tensor([2.0, 0.0])
    assert torch.equal(bank.get(["a", "b"], y), torch.tensor([[2.0, 2.0], [0.0, 0.0]]))  # Eq. (12)
    bank.update(["a", "b"], torch.tensor([[2.6, 1.0], [0.4, 0.2]]), epoch=1)  # beta = 1
    assert torch.allclose(bank.get(["a", "b"], y), torch.tensor([[2.6, 1.0], [0.4, 0.2]]))
    bank.update(["b", "a"], torch.tensor([[1.0, 0.5], [3.2, 1.6]]), epoch=2)  # beta = 2/3
    # a: 2.6/3 + 2*3.2/3 = 3.0 ; 1.0/3 + 2*1.6/3 = 1.4 ; b: 0.4/3 + 2/3 = 0.8 ; 0.2/3 + 1/3 = 0.4
    assert torch.allclose(bank.get(["a", "b"], y), torch.tensor([[3.0, 1.4], [0.8, 0.4]]))
    assert torch.equal(bank.get(["c"], torch.tensor([3.0])), torch.tensor([[3.0, 3.0]]))


def test_bank_keeps_every_review_while_it_grows():
    bank = PseudoLabelBank(1)
    for start in range(0, 50, 7):
        ids = [f"r{i}" for i in range(start, min(start + 7, 50))]
        bank.get(ids, torch.tensor([float(i) for i in range(start, start + len(ids))]))
    assert bank.values.shape == (50, 1)
    assert torch.equal(bank.get(["r0", "r49", "r23"], torch.zeros(3)), torch.tensor([[0.0], [49.0], [23.0]]))


def _model():
    torch.manual_seed(0)
    return MMSS.from_config(TINY["mmss"]).train()


def test_first_epoch_targets_are_the_global_labels_so_only_the_uncertainty_term_remains():
    model, batch = _model(), make_batch()
    model.on_epoch_start(0)
    loss = model(batch).aux_losses["subtasks"]
    # weights tanh(|y_g - y_g|) = 0: loss = sum_s 0.5 * log_var_s = 0 at initialisation
    assert float(loss.detach()) == 0.0
    # the bank now holds the epoch-1 estimates (beta = 1), no longer all equal to y_g
    stored = model.bank.get(batch.review_ids, batch.labels)
    assert not torch.allclose(stored, batch.labels.unsqueeze(1).expand_as(stored))


def test_second_epoch_loss_is_weighted_by_tanh_of_the_label_gap():
    model, batch = _model(), make_batch()
    model.on_epoch_start(0)
    model(batch)
    model.on_epoch_start(1)
    y_s = model.bank.get(batch.review_ids, batch.labels).clone()
    with torch.no_grad():
        model.log_var.fill_(math.log(2.0))  # sigma^2 = 2
    # recompute the expected loss from the heads' predictions of the same forward pass
    captured = {}
    hooks = [model.heads[k].register_forward_hook(lambda m, i, o, k=k: captured.__setitem__(k, o.detach()))
             for k in model.heads]
    out_loss = float(model(batch).aux_losses["subtasks"].detach())
    for hk in hooks:
        hk.remove()
    pred = torch.cat([captured[k] for k in ("ptrt", "pvrv", "ptrv", "pvrt", "rtrv")], dim=-1)
    w = torch.tanh((y_s - batch.labels.unsqueeze(1)).abs())
    per_task = (w * (pred - y_s).abs()).mean(0)
    expected = float((0.5 / 2.0 * per_task + 0.5 * math.log(2.0)).sum())
    assert math.isclose(out_loss, expected, rel_tol=1e-5)
    assert out_loss > 5 * 0.5 * math.log(2.0)  # the weighted term is not zero any more


def test_pseudo_labels_survive_a_checkpoint_round_trip_with_weights_only_load():
    model, batch = _model(), make_batch()
    model.on_epoch_start(0)
    model(batch)
    model.on_epoch_start(3)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = _model()
    fresh.load_state_dict(state)
    assert fresh.epoch == 4
    assert fresh.bank.rows == model.bank.rows
    assert torch.equal(fresh.bank.values, model.bank.values)
    assert torch.equal(fresh.anchors, model.anchors)


def test_training_without_review_ids_is_a_clear_error():
    model, batch = _model(), make_batch()
    batch.review_ids = []
    with pytest.raises(TrainingError, match="review id"):
        model(batch)


def test_eval_mode_neither_returns_nor_updates_pseudo_labels():
    model, batch = _model(), make_batch()
    model.eval()
    assert model(batch).aux_losses == {}
    assert model.bank.rows == {}


def test_subtasks_can_be_switched_off():
    torch.manual_seed(0)
    model = MMSS.from_config({**TINY["mmss"], "subtasks": False}).train()
    assert model(make_batch()).aux_losses == {}
    assert not hasattr(model, "log_var")


def test_learning_check_beats_length_and_random_on_held_out_products():
    learning_check("mmss")
