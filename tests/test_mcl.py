"""MCL: the adaptive contrastive loss (Eq. 32-33) and its hyperspherical form against
hand-computed values, the public code's circle variant, and the contrastive aux loss."""
from __future__ import annotations

import math

import torch

from models.mcl import (MCL, adaptive_contrastive_loss, adaptive_contrastive_loss_hyperspherical,
                        circle_contrastive_loss)
from test_models_common import TINY, learning_check, make_batch


def _hand_adaptive():
    # sim = [[0.5, 0.2], [-0.1, 0.8]], o_p = 2, o_n = 0, gamma = 1
    # row 0: alpha_p = 2 - 0.5 = 1.5 -> logit 0.75; alpha_n = 0.2 -> logit 0.04
    # row 1: alpha_p = 2 - 0.8 = 1.2 -> logit 0.96; alpha_n = [-0.1]_+ = 0 -> logit 0
    row0 = math.log(1 + math.exp(0.04 - 0.75))
    row1 = math.log(1 + math.exp(0.0 - 0.96))
    return (row0 + row1) / 2


def test_adaptive_contrastive_loss_matches_hand_computation():
    sim = torch.tensor([[0.5, 0.2], [-0.1, 0.8]])
    assert math.isclose(float(adaptive_contrastive_loss(sim)), _hand_adaptive(), rel_tol=1e-6)


def test_adaptive_weights_are_not_differentiated():
    sim = torch.tensor([[0.5, 0.2], [-0.1, 0.8]], requires_grad=True)
    adaptive_contrastive_loss(sim).backward()
    # d/ds_00 of row 0's loss with alpha_p fixed: -alpha_p * (1 - softmax_pos) / N
    p0 = math.exp(0.75) / (math.exp(0.75) + math.exp(0.04))
    assert math.isclose(float(sim.grad[0, 0]), -1.5 * (1 - p0) / 2, rel_tol=1e-6)
    # a negative with s_n < o_n has weight 0: no gradient at all
    assert float(sim.grad[1, 0]) == 0.0


def test_hyperspherical_form_matches_hand_computation():
    # unit vectors: u0=(1,0), u1=(0,1); v0=(0.6,0.8), v1=(0.8,0.6)
    # squared distances: |u0-v0|^2 = 0.16+0.64 = 0.8 -> s = 1 - 0.4 = 0.6
    #                    |u0-v1|^2 = 0.04+0.36 = 0.4 -> s = 0.8
    #                    |u1-v0|^2 = 0.36+0.04 = 0.4 -> s = 0.8
    #                    |u1-v1|^2 = 0.64+0.16 = 0.8 -> s = 0.6
    # row i: positive logit (2-0.6)*0.6 = 0.84, negative logit 0.8*0.8 = 0.64
    expected = math.log(1 + math.exp(0.64 - 0.84))
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    got = adaptive_contrastive_loss_hyperspherical(u, v)
    assert math.isclose(float(got), expected, rel_tol=1e-5)
    assert math.isclose(float(adaptive_contrastive_loss(u @ v.T)), expected, rel_tol=1e-6)


def test_hyperspherical_form_equals_cosine_form_on_random_vectors():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    cos = torch.nn.functional.normalize(u, dim=1) @ torch.nn.functional.normalize(v, dim=1).T
    assert torch.allclose(adaptive_contrastive_loss_hyperspherical(u, v, gamma=3.0),
                          adaptive_contrastive_loss(cos, gamma=3.0), atol=1e-5)


def test_circle_variant_matches_hand_computation():
    # sim = [[0.9, 0.3], [0.1, 0.5]], m = 0.25, gamma = 2
    m, g = 0.25, 2.0
    def row(sp, sn):
        ap, an = max(1 + m - sp, 0), max(sn + m, 0)
        return math.log(1 + math.exp(g * an * (sn - m)) * math.exp(-g * ap * (sp - 1 + m)))
    expected = (row(0.9, 0.3) + row(0.5, 0.1)) / 2
    got = circle_contrastive_loss(torch.tensor([[0.9, 0.3], [0.1, 0.5]]), margin=m, gamma=g)
    assert math.isclose(float(got), expected, rel_tol=1e-6)


def test_losses_are_zero_without_negatives():
    assert float(adaptive_contrastive_loss(torch.tensor([[0.3]]))) == 0.0
    assert float(circle_contrastive_loss(torch.zeros(0, 0))) == 0.0


def test_paper_defaults_and_public_code_variant():
    paper = MCL.from_config({"vocab_size": 10})
    assert len(paper.inter_r.text_from_image) == 5 and paper.config.o_p == 2.0 and paper.config.o_n == 0.0
    code = MCL.from_config({**TINY["mcl"], "interaction_layers": 1, "contrastive": "circle"})
    assert len(code.inter_r.text_from_image) == 1
    code.train()
    out = code(make_batch())
    assert set(out.aux_losses) == {"contrastive"} and torch.isfinite(out.aux_losses["contrastive"])


def test_contrastive_aux_loss_is_weighted_and_absent_in_eval():
    batch = make_batch()
    torch.manual_seed(0)
    a = MCL.from_config({**TINY["mcl"], "contrastive_weight": 1.0})
    torch.manual_seed(0)
    b = MCL.from_config({**TINY["mcl"], "contrastive_weight": 0.5})
    la, lb = a(batch).aux_losses["contrastive"].detach(), b(batch).aux_losses["contrastive"].detach()
    assert float(la) > 0 and math.isclose(float(lb), 0.5 * float(la), rel_tol=1e-5)
    a.eval()
    assert a(batch).aux_losses == {}


def test_learning_check_beats_length_and_random_on_held_out_products():
    learning_check("mcl", interaction_layers=1)
