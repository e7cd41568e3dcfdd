"""Ranking hinge loss on hand values."""
from __future__ import annotations

import pytest
import torch

from models.losses import ranking_loss


def test_label_difference_margin_on_hand_values():
    scores = torch.tensor([2.0, 1.5, 0.0, 1.0])
    labels = torch.tensor([4.0, 2.0, 0.0, 1.0])
    instances = torch.tensor([[0, 1, 2], [1, 2, 2]])
    # inst 0: max(0, 2 - 0.5) + max(0, 4 - 2) = 1.5 + 2 = 3.5
    # inst 1: 2 * max(0, 2 - 1.5) = 1.0
    loss = ranking_loss(scores, labels, instances)
    assert loss.item() == pytest.approx((3.5 + 1.0) / 2)


def test_fixed_margin_on_hand_values():
    scores = torch.tensor([2.0, 1.5, 0.0])
    labels = torch.tensor([4.0, 2.0, 0.0])
    instances = torch.tensor([[0, 1, 2]])
    # max(0, 1 - 0.5) + max(0, 1 - 2) = 0.5
    loss = ranking_loss(scores, labels, instances, margin="fixed", fixed_margin=1.0)
    assert loss.item() == pytest.approx(0.5)


def test_negative_weights_scale_terms_and_zero_weight_is_padding():
    scores = torch.tensor([0.0, 0.0, 0.0])
    labels = torch.tensor([3.0, 1.0, 0.0])
    instances = torch.tensor([[0, 1, 2]])
    w = torch.tensor([[0.5, 0.0]])
    loss = ranking_loss(scores, labels, instances, w)
    assert loss.item() == pytest.approx(0.5 * 2.0)


def test_gradient_pushes_positive_up_and_negative_down():
    scores = torch.tensor([0.0, 0.0], requires_grad=True)
    labels = torch.tensor([2.0, 0.0])
    ranking_loss(scores, labels, torch.tensor([[0, 1]])).backward()
    assert scores.grad.tolist() == [-1.0, 1.0]


def test_no_instances_gives_zero_with_graph():
    scores = torch.tensor([1.0, 2.0], requires_grad=True)
    loss = ranking_loss(scores, torch.tensor([1.0, 1.0]), torch.zeros((0, 8), dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert scores.grad.tolist() == [0.0, 0.0]


def test_unknown_margin_mode_is_rejected():
    with pytest.raises(ValueError, match="margin"):
        ranking_loss(torch.zeros(2), torch.zeros(2), torch.tensor([[0, 1]]), margin="soft")
