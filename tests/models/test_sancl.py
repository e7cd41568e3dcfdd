"""SANCL against its paper (../shared/papers/sancl.txt): hand-computed values for Eq. 2-8
(selective attention, un-renormalised), Eq. 9 (projection networks), Eq. 10-13 (CPC in both
domains, label-based positives), Eq. 14-15 (the scorer reads exactly the four projected review
vectors); presets from Table 5; the Table 2 ablation switches; the views the model needs; the
parameter count beside the paper's 1.41M; and the planted-signal learning check."""
from __future__ import annotations

import math

import pytest
import torch

from models.batch import Batch
from models.layers import count_parameters
from models.sancl import SANCL, SelectiveSelfAttention, TextGRU, selective_attention_weights, weighted_pool
from pipeline.errors import ConfigError, DataError
from tests.models.test_models_common import TINY, learning_check, make_batch

E = math.exp


# ---- Eq. 2-5: the public function -----------------------------------------------------------
def test_eq5_three_factors_on_a_three_token_example():
    attn = torch.tensor([[0.5, 0.3, 0.2],
                         [0.1, 0.6, 0.3],
                         [0.2, 0.2, 0.6]])
    mask = torch.tensor([1.0, 0.0, 1.0])  # tokens 0 and 2 are in probed sentences
    # alpha = 0.8, beta = 0.4: M' = [0.8, 0.4, 0.8]
    # alpha^2 = 0.64 (both probed), alpha*beta = 0.32 (one probed), beta^2 = 0.16 (neither)
    expected = torch.tensor([[0.5 * 0.64, 0.3 * 0.32, 0.2 * 0.64],
                             [0.1 * 0.32, 0.6 * 0.16, 0.3 * 0.32],
                             [0.2 * 0.64, 0.2 * 0.32, 0.6 * 0.64]])
    got = selective_attention_weights(attn, mask, 0.8, 0.4)
    assert torch.allclose(got, expected, atol=1e-7)
    # not renormalised: row 0 sums to 0.32 + 0.096 + 0.128 = 0.544, not 1
    assert math.isclose(float(got[0].sum()), 0.544, rel_tol=1e-6)
    # alpha = 1 (the paper's setting), beta = 0.25: factors 1, 0.25, 0.0625
    got = selective_attention_weights(attn, mask, 1.0, 0.25)
    assert math.isclose(float(got[0, 2]), 0.2, rel_tol=1e-6)
    assert math.isclose(float(got[0, 1]), 0.075, rel_tol=1e-6)
    assert math.isclose(float(got[1, 1]), 0.0375, rel_tol=1e-6)


def test_beta_is_per_sequence_when_batched():
    attn = torch.full((2, 2, 2), 0.5)
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    got = selective_attention_weights(attn, mask, 1.0, torch.tensor([0.5, 0.1]))
    # sequence 0: M' = [1, 0.5] -> [[0.5, 0.25], [0.25, 0.125]]
    # sequence 1: M' = [1, 0.1] -> [[0.5, 0.05], [0.05, 0.005]]
    assert torch.allclose(got, torch.tensor([[[0.5, 0.25], [0.25, 0.125]],
                                             [[0.5, 0.05], [0.05, 0.005]]]), atol=1e-7)


# ---- Eq. 6-8 in the module --------------------------------------------------------------------
def test_selective_self_attention_and_pooling_by_hand():
    sa = SelectiveSelfAttention(hidden=1, scale=True, selective=True, beta="learned",
                                fixed_beta=0.5, alpha=1.0)
    with torch.no_grad():
        for lin in (sa.q, sa.k):  # zero scores -> A = softmax(0) = 1/3 everywhere (Eq. 3)
            lin.weight.zero_()
            lin.bias.zero_()
        sa.beta_gen.weight.zero_()
        sa.beta_gen.bias.fill_(math.log(1 / 3))  # beta = sigmoid(log 1/3) = 0.25 (Eq. 6)
    h = torch.tensor([[[3.0], [6.0], [9.0]]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    probe = torch.tensor([[1.0, 0.0, 1.0]])
    out, m_soft = sa(h, mask, probe, torch.zeros(1, 1))
    # M' = [1, 0.25, 1] (Eq. 2); A' = outer(M', M') / 3 (Eq. 4)
    # (A'H)_0 = (1*3 + 0.25*6 + 1*9) / 3 = 4.5; (A'H)_1 = 0.25 * 4.5 = 1.125; (A'H)_2 = 4.5
    # H' = H + A'H = [7.5, 7.125, 13.5] (Eq. 7)
    assert torch.allclose(m_soft, torch.tensor([[1.0, 0.25, 1.0]]))
    assert torch.allclose(out, torch.tensor([[[7.5], [7.125], [13.5]]]))
    # Eq. 8: (7.5*1 + 7.125*0.25 + 13.5*1) / 2.25 = 10.125
    assert torch.allclose(weighted_pool(out, m_soft), torch.tensor([[10.125]]))
    # padding gets no pooling weight and zero output
    out2, m2 = sa(torch.tensor([[[3.0], [6.0], [9.0], [50.0]]]),
                  torch.tensor([[True, True, True, False]]), torch.tensor([[1.0, 0.0, 1.0, 0.0]]),
                  torch.zeros(1, 1))
    assert torch.allclose(out2[0, :3], out[0]) and float(out2[0, 3].detach()) == 0.0
    assert torch.allclose(m2, torch.tensor([[1.0, 0.25, 1.0, 0.0]]))


def test_fixed_beta_ablation_uses_half():
    sa = SelectiveSelfAttention(hidden=2, scale=True, selective=True, beta="fixed",
                                fixed_beta=0.5, alpha=1.0)
    assert sa.beta_gen is None
    _, m_soft = sa(torch.randn(1, 3, 2), torch.ones(1, 3, dtype=torch.bool),
                   torch.tensor([[0.0, 1.0, 0.0]]), torch.randn(1, 2))
    assert torch.equal(m_soft, torch.tensor([[0.5, 1.0, 0.5]]))


def test_beta_comes_from_the_gru_sequence_state():
    # Eq. 1: uni-directional GRU, h_seq = the state after the last real token
    torch.manual_seed(0)
    gru = TextGRU(4, 3)
    assert not gru.gru.bidirectional and gru.gru.hidden_size == 3
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    out, h_seq = gru(x, mask)
    assert torch.allclose(h_seq[0], out[0, 4], atol=1e-6)
    assert torch.allclose(h_seq[1], out[1, 1], atol=1e-6)
    # Eq. 6: beta = sigmoid(W h_seq + b)
    sa = SelectiveSelfAttention(hidden=3, scale=True, selective=True, beta="learned",
                                fixed_beta=0.5, alpha=1.0)
    with torch.no_grad():
        sa.beta_gen.weight.copy_(torch.tensor([[1.0, -2.0, 0.5]]))
        sa.beta_gen.bias.fill_(0.3)
    hs = torch.tensor([[0.2, 0.1, -0.4]])  # W h + b = 0.2 - 0.2 - 0.2 + 0.3 = 0.1
    assert math.isclose(float(sa.beta(hs).detach()), 1 / (1 + E(-0.1)), rel_tol=1e-6)


def test_paper_encoder_sizes():
    m = SANCL.from_config({"vocab_size": 10})
    assert m.gru_r.gru.hidden_size == 128 and not m.gru_r.gru.bidirectional
    assert m.img_p.map.in_features == 2048 and m.img_p.map.out_features == 128
    assert m.img_r is not m.img_p  # two image self-attention modules (Sec. 3.2)
    assert not hasattr(m, "cross") and set(m.proj) == {"ii_t", "pr_t", "ii_v", "pr_v"}


# ---- Eq. 9, 14-15: projections and the scorer ------------------------------------------------
def test_scorer_reads_exactly_the_four_projected_review_vectors():
    torch.manual_seed(0)
    model = SANCL.from_config({**TINY["sancl"], "proj_dim": 3}).eval()
    batch = make_batch()
    assert isinstance(model.out, torch.nn.Linear) and model.out.in_features == 4 * 3  # Eq. 15
    seen = []
    model.out.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    with torch.no_grad():
        scores = model(batch).scores
        pooled = model.pooled(batch)

        def eq9(net, s):  # W2 tanh(W1 s + b1) + b2, written out
            l1, act, l2 = net
            assert isinstance(act, torch.nn.Tanh)
            return torch.tanh(s @ l1.weight.T + l1.bias) @ l2.weight.T + l2.bias

        f = torch.cat([eq9(model.proj["ii_t"], pooled["t_r"]), eq9(model.proj["pr_t"], pooled["t_r"]),
                       eq9(model.proj["ii_v"], pooled["v_r"]), eq9(model.proj["pr_v"], pooled["v_r"])], -1)
    assert torch.allclose(seen[0], f, atol=1e-6)  # Eq. 14
    assert torch.allclose(scores, f @ model.out.weight[0] + model.out.bias, atol=1e-6)  # Eq. 15
    # the same network projects the product field (shared by fields, Eq. 9)
    z = model.project(pooled)
    assert torch.allclose(z["ii_v_p"], eq9(model.proj["ii_v"], pooled["v_p"]), atol=1e-6)


def test_code_scorer_is_an_mlp_over_eight_projected_vectors():
    model = SANCL.from_config({**TINY["sancl"], "proj_dim": 3, "scorer": "code"})
    assert model.out[0].in_features == 8 * 3
    assert model(make_batch()).scores.shape == (8,)


# ---- Eq. 10-13: CPC by hand on two products --------------------------------------------------
def _four_reviews(**kw) -> Batch:
    """Product 0: r0 (label 4, high), r1 (label 0, low); product 1: r2 (label 3, high),
    r3 (label 1, low). Every item has text and one ROI unless `no_rev_rois` says otherwise."""
    no_rev_rois = kw.get("no_rev_rois", ())
    rev_roi_mask = torch.ones(4, 1, dtype=torch.bool)
    for i in no_rev_rois:
        rev_roi_mask[i] = False
    return Batch(
        prod_tokens=torch.ones(2, 2, dtype=torch.long), prod_token_mask=torch.ones(2, 2, dtype=torch.bool),
        prod_rois=torch.zeros(2, 1, 4), prod_roi_mask=torch.ones(2, 1, dtype=torch.bool),
        rev_tokens=torch.ones(4, 2, dtype=torch.long), rev_token_mask=torch.ones(4, 2, dtype=torch.bool),
        rev_rois=torch.zeros(4, 1, 4), rev_roi_mask=rev_roi_mask,
        rev_probe_mask=torch.ones(4, 2), rev_product=torch.tensor([0, 0, 1, 1]),
        labels=torch.tensor([4.0, 0.0, 3.0, 1.0]), rev_length=torch.full((4,), 2.0),
        instances=torch.tensor([[0, 1], [2, 3]]), instance_weights=torch.ones(2, 1),
    )


def _t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# projected vectors (D = 2), chosen so every cosine is a round number
Z = {
    # inner-instance domain: cos(text, image) per instance
    "ii_t_p": _t((1, 0), (1, 0)), "ii_v_p": _t((1, 0), (0, 1)),  # p0: 1, p1: 0
    "ii_t_r": _t((1, 0), (0, 1), (1, 0), (1, 0)),
    "ii_v_r": _t((0.6, 0.8), (0, -1), (0.8, 0.6), (0, 1)),  # r0 0.6, r1 -1, r2 0.8, r3 0
    # product-review domain: cos(review, its product) per modality
    "pr_t_p": _t((1, 0), (0, 1)),
    "pr_t_r": _t((1, 0), (0, 1), (0.6, 0.8), (0, -1)),  # r0 1, r1 0, r2 0.8, r3 -1
    "pr_v_p": _t((0, 1), (1, 0)),
    "pr_v_r": _t((0.6, 0.8), (1, 0), (1, 0), (0.6, 0.8)),  # r0 0.8, r1 0, r2 1, r3 0.6
}


def _cpc(batch, **cfg):
    model = SANCL.from_config({**TINY["sancl"], "roi_dim": 4, **cfg})
    return {k: float(v) for k, v in model.cpc_losses(batch, Z).items()}


def test_eq11_inner_instance_domain_by_hand():
    got = _cpc(_four_reviews(), cpc_reduction="sum")
    # positives: the two products (S^P_ii) and the high reviews r0, r2 (S+_ii); the denominator
    # runs over every instance's own pair, the low reviews r1, r3 (S-_ii) included:
    d = E(1) + E(0) + E(0.6) + E(-1) + E(0.8) + E(0)
    expected = -(1 - math.log(d)) - (0 - math.log(d)) - (0.6 - math.log(d)) - (0.8 - math.log(d))
    assert math.isclose(got["cpc_ii"], expected, rel_tol=1e-6)
    # a review without images has no text-image pair: r3 leaves the denominator
    got = _cpc(_four_reviews(no_rev_rois=(3,)), cpc_reduction="sum")
    d3 = d - E(0)
    assert math.isclose(got["cpc_ii"], 4 * math.log(d3) - 2.4, rel_tol=1e-6)


def test_eq12_13_product_review_domain_by_hand():
    got = _cpc(_four_reviews(), cpc_reduction="sum")
    # per modality, a high review against its own product, normalised over that product's reviews
    cpc_t = -(1 - math.log(E(1) + E(0))) - (0.8 - math.log(E(0.8) + E(-1)))
    cpc_v = -(0.8 - math.log(E(0.8) + E(0))) - (1 - math.log(E(1) + E(0.6)))
    assert math.isclose(got["cpc_pr"], cpc_t + cpc_v, rel_tol=1e-6)  # Eq. 13
    # high is a configurable threshold: at 4 only r0 is positive
    got4 = _cpc(_four_reviews(), cpc_reduction="sum", high_label=4.0)
    assert math.isclose(got4["cpc_pr"], -(1 - math.log(E(1) + E(0))) - (0.8 - math.log(E(0.8) + E(0))),
                        rel_tol=1e-6)


def test_eq12_batch_wide_normaliser_option_by_hand():
    got = _cpc(_four_reviews(), cpc_reduction="sum", pr_normaliser="batch")
    # one denominator over every review of the batch, each against its own product
    d_t = E(1) + E(0) + E(0.8) + E(-1)
    d_v = E(0.8) + E(0) + E(1) + E(0.6)
    cpc_t = -(1 - math.log(d_t)) - (0.8 - math.log(d_t))
    cpc_v = -(0.8 - math.log(d_v)) - (1 - math.log(d_v))
    assert math.isclose(got["cpc_pr"], cpc_t + cpc_v, rel_tol=1e-6)


def test_eq18_total_loss_is_the_papers_sum_over_the_instance_count_by_hand():
    """Eq. 16 + kappa (Eq. 11 + Eq. 13) with plain sums, as the paper writes them, equals the
    trainer's loss (mean-over-instances ranking loss + the model's aux terms) times I."""
    from models.losses import ranking_loss

    batch = _four_reviews()
    model = SANCL.from_config({**TINY["sancl"], "roi_dim": 4, "proj_dim": 2, "kappa": 0.1}).train()
    model.project = lambda pooled: Z  # the hand-picked projected vectors above
    aux = model(batch).aux_losses  # paper default: cpc_reduction instances
    # Eq. 16 on hand-picked scores, gamma = 1: instances (r0 > r1) and (r2 > r3)
    scores = torch.tensor([2.0, 0.5, 1.0, 0.6])
    # hinges: max(0, 1 - (2 - 0.5)) = 0 and max(0, 1 - (1 - 0.6)) = 0.6; Eq. 16 sum = 0.6
    rank = ranking_loss(scores, batch.labels, batch.instances, batch.instance_weights,
                        margin="fixed", fixed_margin=1.0)
    trainer_loss = float(rank) + sum(float(v.detach()) for v in aux.values())
    d = E(1) + E(0) + E(0.6) + E(-1) + E(0.8) + E(0)
    cpc_ii = 4 * math.log(d) - (1 + 0 + 0.6 + 0.8)  # Eq. 11 (see the hand test above)
    cpc_pr = (-(1 - math.log(E(1) + E(0))) - (0.8 - math.log(E(0.8) + E(-1)))  # Eq. 12, text
              - (0.8 - math.log(E(0.8) + E(0))) - (1 - math.log(E(1) + E(0.6))))  # Eq. 12, image
    eq18 = 0.6 + 0.1 * (cpc_ii + cpc_pr)  # L = L_task + kappa (cpc_ii + cpc_pr)
    assert math.isclose(trainer_loss * 2, eq18, rel_tol=1e-6)  # I = 2 ranking instances


def test_cpc_reductions():
    s = _cpc(_four_reviews(), cpc_reduction="sum")
    # instances: divided by the batch's 2 ranking instances, as the trainer divides Eq. 16
    inst = _cpc(_four_reviews(), cpc_reduction="instances")
    assert math.isclose(inst["cpc_ii"], s["cpc_ii"] / 2, rel_tol=1e-6)
    assert math.isclose(inst["cpc_pr"], s["cpc_pr"] / 2, rel_tol=1e-6)
    # mean: per positive term (4 in Eq. 11; 2 per modality in Eq. 12)
    mean = _cpc(_four_reviews(), cpc_reduction="mean")
    assert math.isclose(mean["cpc_ii"], s["cpc_ii"] / 4, rel_tol=1e-6)
    assert math.isclose(mean["cpc_pr"], s["cpc_pr"] / 2, rel_tol=1e-6)


def test_no_high_review_and_no_product_pair_gives_zero():
    b = _four_reviews()
    b.labels = torch.tensor([0.0, 1.0, 2.0, 0.0])
    got = _cpc(b, cpc_reduction="sum")
    assert got["cpc_pr"] == 0.0
    assert got["cpc_ii"] > 0  # the products are still positives


# ---- the model as a whole ---------------------------------------------------------------------
@pytest.mark.parametrize("ablation,aux_keys", [
    ({}, {"cpc_ii", "cpc_pr"}),
    ({"beta": "fixed"}, {"cpc_ii", "cpc_pr"}),
    ({"probe_mask": False}, {"cpc_ii", "cpc_pr"}),
    ({"cpc_ii": False}, {"cpc_pr"}),
    ({"cpc_pr": False}, {"cpc_ii"}),
    ({"cpc_ii": False, "cpc_pr": False}, set()),
    ({"text_only": True}, {"cpc_pr"}),
])
def test_table2_ablations_and_text_only_train(ablation, aux_keys):
    torch.manual_seed(0)
    model = SANCL.from_config({**TINY["sancl"], **ablation}).train()
    batch = make_batch()
    if ablation.get("probe_mask") is False:
        batch.rev_probe_mask = None  # no probes needed for the w/o-probe-mask row
    out = model(batch)
    assert set(out.aux_losses) == aux_keys
    loss = out.scores.sum() + sum(out.aux_losses.values(), torch.zeros(()))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert (model.self_att.beta_gen is not None) == (ablation.get("beta", "learned") == "learned"
                                                     and ablation.get("probe_mask", True))


def test_missing_probe_masks_are_an_error_not_ones():
    batch = make_batch()
    batch.rev_probe_mask = None
    with pytest.raises(DataError, match="probe_mask: false"):
        SANCL.from_config(TINY["sancl"])(batch)


def test_the_probe_mask_changes_the_scores():
    batch = make_batch()
    torch.manual_seed(0)
    model = SANCL.from_config(TINY["sancl"]).eval()
    with torch.no_grad():
        model.self_att.beta_gen.bias.fill_(-3.0)
        s1 = model(batch).scores
        batch.rev_probe_mask = (1.0 - batch.rev_probe_mask) * batch.rev_token_mask.float()
        s2 = model(batch).scores
    assert not torch.allclose(s1, s2)


def test_text_only_ignores_images():
    torch.manual_seed(0)
    model = SANCL.from_config({**TINY["sancl"], "text_only": True}).eval()
    assert not hasattr(model, "img_p") and set(model.proj) == {"ii_t", "pr_t"}
    batch = make_batch()
    with torch.no_grad():
        s1 = model(batch).scores
        batch.rev_rois = torch.randn_like(batch.rev_rois)
        batch.prod_roi_mask = torch.zeros_like(batch.prod_roi_mask)
        assert torch.equal(s1, model(batch).scores)


def test_cpc_terms_are_weighted_by_kappa():
    batch = make_batch()
    torch.manual_seed(0)
    a = SANCL.from_config({**TINY["sancl"], "kappa": 0.2, "text_dropout": 0.0})
    torch.manual_seed(0)
    b = SANCL.from_config({**TINY["sancl"], "kappa": 0.1, "text_dropout": 0.0})
    la, lb = a(batch).aux_losses, b(batch).aux_losses
    for k in la:
        assert math.isclose(float(lb[k].detach()), 0.5 * float(la[k].detach()), rel_tol=1e-5)


@pytest.mark.parametrize("cfg,views", [
    ({}, {"tokens", "rois", "probes"}),
    ({"probe_mask": False}, {"tokens", "rois"}),
    ({"text_only": True}, {"tokens", "probes"}),
    ({"text_only": True, "probe_mask": False}, {"tokens"}),
])
def test_required_views(cfg, views):
    assert SANCL.required_views(cfg) == frozenset(views)


@pytest.mark.parametrize("bad", [{"alpha": 1.5}, {"beta": "fixed", "fixed_beta": 1.0},
                                 {"temperature": 0.0}, {"high_label": 0.0}, {"kappa": -1.0},
                                 {"alpha": 0.8},  # learned beta in (0, 1) may exceed alpha (Eq. 2)
                                 {"pr_normaliser": "review"}, {"cpc_reduction": "max"}])
def test_impossible_settings_are_config_errors(bad):
    with pytest.raises(ConfigError):
        SANCL.from_config({**TINY["sancl"], **bad})


def test_alpha_below_one_is_possible_with_a_fixed_beta_below_it():
    SANCL.from_config({**TINY["sancl"], "alpha": 0.8, "beta": "fixed", "fixed_beta": 0.5})
    SANCL.from_config({**TINY["sancl"], "alpha": 0.8, "probe_mask": False})  # no M' at all


def test_a_non_binary_probe_mask_is_an_error():
    batch = make_batch()
    batch.rev_probe_mask[0, 0] = 0.5
    with pytest.raises(DataError, match="binary"):
        SANCL.from_config(TINY["sancl"])(batch)


def test_the_instances_reduction_needs_the_ranking_instances():
    batch = make_batch()
    batch.instances = None
    with pytest.raises(DataError, match="Batch.instances"):
        SANCL.from_config(TINY["sancl"]).train()(batch)
    # an evaluation forward computes no CPC and needs none
    SANCL.from_config(TINY["sancl"]).eval()(batch)


# ---- presets (Table 5) --------------------------------------------------------------------------
@pytest.mark.parametrize("category,lr,dropout,kappa", [
    ("clothing", 1e-4, 0.5, 0.25), ("electronics", 5e-5, 0.5, 0.1), ("home", 1e-4, 0.2, 0.1),
])
def test_paper_preset_per_category_follows_table5(category, lr, dropout, kappa):
    p = SANCL.preset("paper", category=category)
    assert p["train"]["lr"] == lr and p["train"]["batch_products"] == 32
    assert p["model_cfg"]["text_dropout"] == dropout and p["model_cfg"]["kappa"] == kappa
    assert p["model_cfg"]["proj_dim"] == 64 and p["model_cfg"]["hidden"] == 128
    SANCL.from_config({**p["model_cfg"], "vocab_size": 10})  # builds


def test_presets_names_and_errors():
    assert SANCL.PRESET_NAMES[0] == "paper" and "code" in SANCL.PRESET_NAMES
    code = SANCL.preset("code", category="home")["model_cfg"]
    assert code["scorer"] == "code"
    # the released GloVe model: M' = 1 on probed tokens, 0.5 elsewhere; CPC averaged
    assert code["beta"] == "fixed" and code["fixed_beta"] == 0.5 and code["cpc_reduction"] == "mean"
    paper = SANCL.preset("paper", category="home")["model_cfg"]
    assert paper["cpc_reduction"] == "instances" and paper.get("beta", "learned") == "learned"
    SANCL.from_config({**code, "vocab_size": 10})  # builds
    with pytest.raises(ConfigError, match="paper, code"):
        SANCL.preset("nope")
    with pytest.raises(ConfigError, match="category"):
        SANCL.preset("paper", category="toys")


def test_parameter_count_is_near_the_papers_1_41M():
    n = count_parameters(SANCL.from_config({"vocab_size": 10}))
    print(f"SANCL parameters without embeddings: {n / 1e6:.3f}M (paper: 1.41M)")
    assert abs(n - 1.41e6) / 1.41e6 < 0.05, n


def test_learning_check_beats_length_and_random_on_held_out_products():
    learning_check("sancl")  # paper defaults at the tests' tiny sizes (shared space 64)


def test_reported_numbers_are_data_and_consistent():
    from pathlib import Path

    import yaml

    path = Path(__file__).resolve().parents[2] / "models" / "reported" / "sancl.yaml"
    d = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert d["model"] == "sancl" and d["extra"]["parameters_without_embeddings"] == 1410000
    assert d["extra"]["gpu_memory_gb_train_amazon_home"] == 2.4
    rows = {(r["table"], r["method"], r["setting"], r["category"]): r for r in d["results"]}
    # Table 2's full-model row is Table 1's multimodal SANCL on electronics
    t1, t2 = rows["Table 1", "SANCL", "", "electronics"], rows["Table 2", "SANCL", "", "electronics"]
    assert (
        [t1[k] for k in ("MAP", "NDCG@3", "NDCG@5")]
        == [t2[k] for k in ("MAP", "NDCG@3", "NDCG@5")]
        == [56.19, 46.98, 49.92]
    )
    assert rows["Table 1", "SANCL", "text-only", "home"]["MAP"] == 58.03
    assert len([r for r in d["results"] if r["table"] == "Table 2"]) == 6


def test_forward_weights_the_cpc_sums_by_kappa_over_the_ranking_instances():
    batch = make_batch()
    cfg = {**TINY["sancl"], "text_dropout": 0.0, "kappa": 0.3}
    torch.manual_seed(0)
    a = SANCL.from_config(cfg).train()  # cpc_reduction: instances (default)
    b = SANCL.from_config({**cfg, "cpc_reduction": "sum"}).train()
    b.load_state_dict(a.state_dict())
    got = a(batch).aux_losses
    with torch.no_grad():
        sums = b.cpc_losses(batch, b.project(b.pooled(batch)))
    n_inst = batch.instances.shape[0]
    for k in ("cpc_ii", "cpc_pr"):
        assert math.isclose(float(got[k].detach()), 0.3 * float(sums[k]) / n_inst, rel_tol=1e-5)


def test_paper_preset_without_category_sets_only_the_shared_sizes():
    p = SANCL.preset("paper")
    assert "lr" not in p["train"] and "kappa" not in p["model_cfg"]
    assert p["model_cfg"]["hidden"] == 128 and p["model_cfg"]["proj_dim"] == 64
    assert p["train"]["batch_products"] == 32


# ---- second review: settings checked as the config loads ---------------------------------------
@pytest.mark.parametrize("bad", [{"alpha": 1.5}, {"beta": "fixed", "fixed_beta": 1.0}, {"alpha": 0.8},
                                 {"temperature": 0.0}, {"high_label": 5.0}])
def test_impossible_settings_fail_when_the_training_config_loads(bad):
    """Before any data is read (models.config.train_config), not only when the model is built."""
    from models.config import train_config

    with pytest.raises(ConfigError, match=r"model\.sancl\."):
        train_config({"model": "sancl", "model_cfg": bad})


def test_instances_reduction_beside_a_summed_ranking_loss_is_refused():
    """cpc_reduction: instances exists to match the trainer's mean over instances (Eq. 18 / I);
    beside ranking_reduction: sum it would weigh kappa * L_aux I times less than Eq. 18."""
    from models.config import load_train_config, train_config

    with pytest.raises(ConfigError, match="ranking_reduction"):
        train_config({"model": "sancl", "ranking_reduction": "sum"})
    with pytest.raises(ConfigError, match="cpc_reduction: sum"):
        load_train_config(base={"model": "sancl"}, overrides=["ranking_reduction=sum"])
    # the consistent pairs load
    train_config({"model": "sancl", "ranking_reduction": "sum", "model_cfg": {"cpc_reduction": "sum"}})
    train_config({"model": "sancl", "ranking_reduction": "sum", "model_cfg": {"cpc_reduction": "mean"}})
    load_train_config(base={"model": "sancl"})  # paper preset: mean ranking loss + instances


def test_eq18_with_summed_ranking_loss_and_summed_cpc_by_hand():
    """The other consistent pair: ranking_reduction sum + cpc_reduction sum is Eq. 18 itself
    (no division by I). Same hand numbers as the instances test above."""
    from models.losses import ranking_loss

    batch = _four_reviews()
    model = SANCL.from_config({**TINY["sancl"], "roi_dim": 4, "proj_dim": 2, "kappa": 0.1,
                               "cpc_reduction": "sum"}).train()
    model.project = lambda pooled: Z
    aux = model(batch).aux_losses
    scores = torch.tensor([2.0, 0.5, 1.0, 0.6])  # hinges 0 and 0.6 (gamma = 1)
    rank = ranking_loss(scores, batch.labels, batch.instances, batch.instance_weights,
                        margin="fixed", fixed_margin=1.0, reduction="sum")
    loss = float(rank) + sum(float(v.detach()) for v in aux.values())
    d = E(1) + E(0) + E(0.6) + E(-1) + E(0.8) + E(0)
    cpc_ii = 4 * math.log(d) - 2.4
    cpc_pr = (-(1 - math.log(E(1) + E(0))) - (0.8 - math.log(E(0.8) + E(-1)))
              - (0.8 - math.log(E(0.8) + E(0))) - (1 - math.log(E(1) + E(0.6))))
    assert math.isclose(loss, 0.6 + 0.1 * (cpc_ii + cpc_pr), rel_tol=1e-6)


def test_eq3_scores_are_unscaled_by_default_by_hand():
    """Eq. 3 A = softmax(W H) carries no 1/sqrt(d) (nor does the public code): the paper
    default leaves the bilinear scores unscaled; attn_scale: true divides them by sqrt(d)."""
    ones = torch.ones(1, 2, dtype=torch.bool)
    h = torch.tensor([[[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]])
    for cfg, a00 in (({}, E(4) / (E(4) + 1)), ({"attn_scale": True}, E(2) / (E(2) + 1))):
        sa = SANCL.from_config({**TINY["sancl"], "hidden": 4, "probe_mask": False, **cfg}).self_att
        with torch.no_grad():
            for lin in (sa.q, sa.k):  # W_q = W_k = I: scores h_i . h_j = [[4, 0], [0, 0]]
                lin.weight.copy_(torch.eye(4))
                lin.bias.zero_()
            out, _ = sa(h, ones, None, torch.zeros(1, 4))
        # unscaled: A_00 = e^4 / (e^4 + 1); scaled by 1/sqrt(4): e^2 / (e^2 + 1); row 1 = [1/2, 1/2]
        # H' = H + A H (Eq. 7): row 0 = (1 + A_00) * [1, 1, 1, 1] (h_1 = 0), row 1 = 0.5 * [1, 1, 1, 1]
        assert torch.allclose(out[0, 0], torch.full((4,), 1 + a00), atol=1e-6), cfg
        assert torch.allclose(out[0, 1], torch.full((4,), 0.5), atol=1e-6), cfg


def test_eq8_weighted_average_is_exact_for_a_small_beta():
    """An all-zero probe mask (Algorithm 1 without a cluster) gives M' = beta on every token, so
    Eq. 8 is the plain average whatever beta is: tokens 2, 4, 6 -> 4. With beta = 1e-9 the
    weight sum is 3e-9; a floor of 1e-6 on the divisor gave 1e-9 * 12 / 1e-6 = 0.012."""
    x = torch.tensor([[[2.0], [4.0], [6.0]]])
    assert torch.allclose(weighted_pool(x, torch.full((1, 3), 1e-9)), torch.tensor([[4.0]]))
    # padding (weight 0) does not count; an empty row pools to zero
    assert torch.allclose(weighted_pool(x, torch.tensor([[0.5, 0.5, 0.0]])), torch.tensor([[3.0]]))
    assert torch.equal(weighted_pool(x, torch.zeros(1, 3)), torch.tensor([[0.0]]))


def test_code_scorer_reads_the_review_then_its_products_projected_vectors():
    """The `code` scorer's input: the four projected review vectors, then the same four of the
    review's own product (product images in the image slots, fidelity.md)."""
    torch.manual_seed(0)
    model = SANCL.from_config({**TINY["sancl"], "proj_dim": 3, "scorer": "code"}).eval()
    batch = make_batch()
    seen = []
    model.out[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    with torch.no_grad():
        model(batch)
        z = model.project(model.pooled(batch))
    idx = batch.rev_product
    order = [("ii", "t"), ("pr", "t"), ("ii", "v"), ("pr", "v")]
    want = torch.cat([z[f"{d}_{m}_r"] for d, m in order] + [z[f"{d}_{m}_p"][idx] for d, m in order], -1)
    assert torch.allclose(seen[0], want, atol=1e-6)
    assert not torch.allclose(z["ii_v_p"], z["ii_t_p"])  # the image slots are not the text vectors


def test_allow_missing_probes_with_the_probe_mask_on_is_refused():
    """A missing probes view let through by allow_missing gives every review a mask of ones
    (M' = 1: plain attention and mean pooling), the Table 2 'w/o probe mask' row under the
    full model's settings; probe_mask: false is the way to ask for that row."""
    from models.config import train_config

    with pytest.raises(ConfigError, match="probe_mask: false"):
        train_config({"model": "sancl", "allow_missing": ["probes"]})
    cfg = train_config({"model": "sancl", "allow_missing": ["probes"], "model_cfg": {"probe_mask": False}})
    assert "probes" not in SANCL.required_views(cfg.model_cfg)
    train_config({"model": "sancl", "allow_missing": ["rois"]})  # other views: the user's opt-in
