"""SANCL: CPC against a hand-computed value, the soft probe mask M' (Eq. 2, 6), attention
re-weighting (Eq. 7), the Table 2 ablation switches and the parameter count."""
from __future__ import annotations

import math

import pytest
import torch

from models.layers import count_parameters
from models.sancl import SANCL, SelectiveSelfAttention, info_nce, weighted_pool
from test_models_common import TINY, learning_check, make_batch


def test_cpc_matches_hand_computation():
    # queries (1,0), (0,1); keys (1,0), (0.6,0.8) (unit vectors); positives 0 and 1; tau = 1
    # row 0 logits [1, 0.6] -> -log softmax_0 = log(1 + e^{-0.4})
    # row 1 logits [0, 0.8] -> -log softmax_1 = log(1 + e^{-0.8})
    expected = (math.log(1 + math.exp(-0.4)) + math.log(1 + math.exp(-0.8))) / 2
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    got = info_nce(q, k, torch.tensor([0, 1]), temperature=1.0)
    assert math.isclose(float(got), expected, rel_tol=1e-6)
    # temperature divides the logits
    got_t = info_nce(q, k, torch.tensor([0, 1]), temperature=0.5)
    expected_t = (math.log(1 + math.exp(-0.8)) + math.log(1 + math.exp(-1.6))) / 2
    assert math.isclose(float(got_t), expected_t, rel_tol=1e-6)


def test_cpc_is_zero_without_negatives():
    assert float(info_nce(torch.ones(3, 2), torch.ones(1, 2), torch.zeros(3, dtype=torch.long))) == 0.0


def test_soft_probe_mask_with_fixed_and_learned_beta():
    x = torch.randn(1, 4, 6)
    mask = torch.tensor([[True, True, True, False]])
    probe = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    fixed = SelectiveSelfAttention(hidden=6, heads=1, dropout=0.0, selective=True, beta="fixed",
                                   fixed_beta=0.5)
    assert torch.equal(fixed.soft_mask(x, mask, probe), torch.tensor([[1.0, 0.5, 1.0, 0.0]]))
    learned = SelectiveSelfAttention(hidden=6, heads=1, dropout=0.0, selective=True)
    with torch.no_grad():
        learned.beta.weight.zero_()
        learned.beta.bias.fill_(math.log(3))  # sigmoid(log 3) = 0.75
    assert torch.allclose(learned.soft_mask(x, mask, probe), torch.tensor([[1.0, 0.75, 1.0, 0.0]]))


def test_beta_near_zero_removes_unprobed_tokens_from_the_attention():
    torch.manual_seed(0)
    sa = SelectiveSelfAttention(hidden=6, heads=1, dropout=0.0, selective=True)
    with torch.no_grad():
        sa.beta.weight.zero_()
        sa.beta.bias.fill_(-40.0)  # beta ~ 4e-18
    mask = torch.ones(1, 4, dtype=torch.bool)
    probe = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    x = torch.randn(1, 4, 6)
    y = x.clone()
    y[0, 1] += 5.0  # change only an unprobed token
    y[0, 3] -= 5.0
    a, _ = sa(x, mask, probe)
    b, _ = sa(y, mask, probe)
    # probed positions attend only to probed positions: unchanged (beta itself depends on the
    # sequence mean, but at -40 bias it stays ~0)
    assert torch.allclose(a[0, [0, 2]], b[0, [0, 2]], atol=1e-5)
    plain = SelectiveSelfAttention(hidden=6, heads=1, dropout=0.0, selective=False)
    pa, _ = plain(x, mask, None)
    pb, _ = plain(y, mask, None)
    assert not torch.allclose(pa[0, [0, 2]], pb[0, [0, 2]], atol=1e-3)


def test_weighted_pooling_uses_the_soft_mask():
    x = torch.tensor([[[2.0], [4.0], [100.0]]])
    w = torch.tensor([[1.0, 0.5, 0.0]])
    assert torch.allclose(weighted_pool(x, w), torch.tensor([[(2 + 2) / 1.5]]))
    assert torch.equal(weighted_pool(x, torch.zeros(1, 3)), torch.zeros(1, 1))


@pytest.mark.parametrize("ablation,aux_keys", [
    ({}, {"cpc_inner", "cpc_product_review"}),
    ({"beta": "fixed"}, {"cpc_inner", "cpc_product_review"}),
    ({"probe_mask": False}, {"cpc_inner", "cpc_product_review"}),
    ({"cpc_inner": False}, {"cpc_product_review"}),
    ({"cpc_product_review": False}, {"cpc_inner"}),
])
def test_table2_ablations_build_and_return_their_cpc_terms(ablation, aux_keys):
    torch.manual_seed(0)
    model = SANCL.from_config({**TINY["sancl"], **ablation})
    model.train()
    out = model(make_batch())
    assert set(out.aux_losses) == aux_keys
    assert all(torch.isfinite(v) for v in out.aux_losses.values())
    assert (model.sa["rt"].beta is not None) == (ablation.get("beta", "learned") == "learned"
                                                  and ablation.get("probe_mask", True))


def test_cpc_terms_are_weighted_by_kappa():
    batch = make_batch()
    torch.manual_seed(0)
    a = SANCL.from_config({**TINY["sancl"], "kappa": 0.2})
    torch.manual_seed(0)
    b = SANCL.from_config({**TINY["sancl"], "kappa": 0.1})
    la, lb = a(batch).aux_losses, b(batch).aux_losses
    for k in la:
        assert math.isclose(float(lb[k].detach()), 0.5 * float(la[k].detach()), rel_tol=1e-5)


def test_the_probe_mask_changes_the_scores():
    batch = make_batch()
    torch.manual_seed(0)
    model = SANCL.from_config(TINY["sancl"]).eval()
    with torch.no_grad():
        model.sa["rt"].beta.bias.fill_(-5.0)
        s1 = model(batch).scores
        batch.rev_probe_mask = 1.0 - batch.rev_probe_mask * batch.rev_token_mask.float()
        s2 = model(batch).scores
    assert not torch.allclose(s1, s2)


def test_parameter_count_is_near_the_papers_1_41M():
    n = count_parameters(SANCL.from_config({"vocab_size": 10}))
    print(f"SANCL parameters without embeddings: {n / 1e6:.3f}M (paper: 1.41M)")
    assert abs(n - 1.41e6) / 1.41e6 < 0.10, n


def test_learning_check_beats_length_and_random_on_held_out_products():
    learning_check("sancl", proj_dim=16)
