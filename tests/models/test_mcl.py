"""MCL pinned to its paper (../shared/papers/mcl.txt): hand-computed values for the adaptive
contrastive loss (Eq. 32-33), Theorem 1, one interaction layer (Eq. 9-12), the fusion paths'
pooling (Eq. 15-27), the scorer (Eq. 28-29), the loss the trainer assembles (Eq. 30-35),
presets and Table 6 switches, and the Table 7-8 distances."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from models.config import train_config
from models.losses import ranking_loss
from models.mcl import (
    MCL,
    STREAMS,
    Fusion,
    InteractionLayer,
    InteractionModule,
    adaptive_contrastive_loss,
    hyperspherical_form,
    pack,
    relation_distances,
)
from pipeline.errors import ConfigError, TrainingError
from tests.models.test_models_common import TINY, learning_check, make_batch

T1 = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # unit directions (1,0), (0,1)
T2 = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
# sim = [[0.6, 0.8], [0.8, 0.6]]: positives 0.6, 0.6; negatives 0.8, 0.8


# --- Eq. 32-33 -------------------------------------------------------------------------------
def test_eq32_hand_value():
    # -(0.6 + 0.6) + (0.8 + 0.8) = 0.4
    got = adaptive_contrastive_loss(T1, T2, adaptive=False)
    assert math.isclose(float(got), 0.4, abs_tol=1e-6)


def test_eq33_hand_value_with_paper_optima():
    # eps_p = 2 - 0.6 = 1.4, eps_n = 0.8 - 0 = 0.8
    # -(1.4*0.6 + 1.4*0.6) + (0.8*0.8 + 0.8*0.8) = -1.68 + 1.28 = -0.4
    got = adaptive_contrastive_loss(T1, T2)
    assert math.isclose(float(got), -0.4, abs_tol=1e-6)


def test_eq33_brackets_clip_negative_weights():
    # sim = [[0.6, -0.8], [-0.8, 0.6]]
    t2 = torch.tensor([[0.6, -0.8], [-0.8, 0.6]])
    # o_n = 0: eps_n = [-0.8]_+ = 0, only positives: -(1.4*0.6)*2 = -1.68
    assert math.isclose(float(adaptive_contrastive_loss(T1, t2)), -1.68, abs_tol=1e-6)
    # o_n = -1: eps_n = 0.2 -> + 2 * 0.2 * (-0.8) = -0.32; total -2.0
    assert math.isclose(float(adaptive_contrastive_loss(T1, t2, o_n=-1.0)), -2.0, abs_tol=1e-6)
    # o_p = 1: eps_p = 0.4 -> -(0.4*0.6)*2 = -0.48
    assert math.isclose(float(adaptive_contrastive_loss(T1, t2, o_p=1.0)), -0.48, abs_tol=1e-6)
    # Eq. 32: -(0.6 + 0.6) + (-0.8 - 0.8) = -2.8
    assert math.isclose(float(adaptive_contrastive_loss(T1, t2, adaptive=False)), -2.8, abs_tol=1e-6)


def test_loss_is_a_sum_over_the_batch_not_a_mean():
    # B = 1 is row 0 alone; B = 2 adds row 1's positive and the two negatives
    a = adaptive_contrastive_loss(T1[:1], T2[:1])  # -(1.4 * 0.6) = -0.84
    assert math.isclose(float(a), -0.84, abs_tol=1e-6)
    b = adaptive_contrastive_loss(T1, T2)  # -0.84 - 0.84 + 0.64 + 0.64
    assert math.isclose(float(b), 2 * float(a) + 1.28, abs_tol=1e-6)


# --- Theorem 1 ---------------------------------------------------------------------------------
def test_theorem1_hand_value():
    # o_p = 1.5, o_n = 0.2: Eq. 33 = -(0.9*0.6)*2 + (0.6*0.8)*2 = -1.08 + 0.96 = -0.12
    # hyperspherical: (0.6-0.75)^2*2 + (0.8-0.1)^2*2 = 0.045 + 0.98 = 1.025
    # C = B (o_p/2)^2 + B(B-1) (o_n/2)^2 = 2*0.5625 + 2*0.01 = 1.145; 1.025 - 1.145 = -0.12
    eq33 = adaptive_contrastive_loss(T1, T2, o_p=1.5, o_n=0.2)
    hyp = hyperspherical_form(T1, T2, o_p=1.5, o_n=0.2)
    assert math.isclose(float(eq33), -0.12, abs_tol=1e-6)
    assert math.isclose(float(hyp), 1.025, abs_tol=1e-6)
    assert math.isclose(float(hyp) - 1.145, float(eq33), abs_tol=1e-6)


def test_theorem1_on_random_vectors_where_the_brackets_are_inactive():
    g = torch.Generator().manual_seed(0)
    t1, t2 = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    # o_p = 2 >= every cosine, o_n = -1 <= every cosine: no bracket clips
    B = 5
    C = B * 1.0 ** 2 + B * (B - 1) * 0.5 ** 2
    got = adaptive_contrastive_loss(t1, t2, o_p=2.0, o_n=-1.0)
    assert torch.allclose(got, hyperspherical_form(t1, t2, o_p=2.0, o_n=-1.0) - C, atol=1e-5)


def test_gradient_vanishes_at_half_the_positive_optimum():
    # B = 1, o_p = 1: optimum at sim = o_p/2 = 0.5; t2 at 60 degrees from t1 has cos 0.5
    t1 = torch.tensor([[1.0, 0.0]], requires_grad=True)
    t2 = torch.tensor([[0.5, math.sqrt(3) / 2]], requires_grad=True)
    adaptive_contrastive_loss(t1, t2, o_p=1.0).backward()
    assert t1.grad.abs().max() < 1e-6 and t2.grad.abs().max() < 1e-6
    # Eq. 32 has no optimum there: d(-cos)/dt1 != 0
    t1.grad = t2.grad = None
    adaptive_contrastive_loss(t1, t2, adaptive=False).backward()
    assert t1.grad.abs().max() > 0.1


def test_weights_are_differentiated_not_detached():
    # t2 = (cos th, sin th), t1 = (1, 0): L(th) = -(o_p - cos th) cos th
    # dL/dth = (o_p - 2 cos th) sin th; at o_p = 2, th = pi/3: (2 - 1) * sqrt(3)/2 = 0.8660
    # (detached weights would give (o_p - cos th) sin th = 1.5 * 0.866 = 1.299)
    th = torch.tensor(math.pi / 3, requires_grad=True)
    t2 = torch.stack([torch.cos(th), torch.sin(th)]).unsqueeze(0)
    adaptive_contrastive_loss(torch.tensor([[1.0, 0.0]]), t2).backward()
    assert math.isclose(float(th.grad), math.sqrt(3) / 2, rel_tol=1e-5)


def test_float64_inputs_pass_gradcheck():
    # the public function keeps float64 (no silent float32 cast), so gradcheck can verify the
    # gradient of Eq. 33 (weights in the graph) and Eq. 32 against finite differences
    g = torch.Generator().manual_seed(1)
    t1 = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t2 = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert adaptive_contrastive_loss(t1, t2).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda a, b: adaptive_contrastive_loss(a, b, o_n=-1.0), (t1, t2))
    assert torch.autograd.gradcheck(lambda a, b: adaptive_contrastive_loss(a, b, adaptive=False), (t1, t2))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="B, d"):
        adaptive_contrastive_loss(torch.zeros(3, 2), torch.zeros(2, 2))


# --- Eq. 9-12: one interaction layer on a 2-token example ------------------------------------
def _gelu(x: float) -> float:
    return 0.5 * x * (1 + math.erf(x / math.sqrt(2)))


def test_one_interaction_layer_hand_value():
    layer = InteractionLayer(2, heads=1, dropout=0.0)
    with torch.no_grad():  # LN: weight 1, bias 0 (init); W_Q = W_K = W_V = I; Linear = 0.5 I + (0.1, 0)
        for w in (layer.cm.w_q, layer.cm.w_k, layer.cm.w_v):
            w.weight.copy_(torch.eye(2))
        layer.linear.weight.copy_(0.5 * torch.eye(2))
        layer.linear.bias.copy_(torch.tensor([0.1, 0.0]))
    q = torch.tensor([[[1.0, -1.0], [3.0, 1.0], [7.0, 7.0]]])  # 2 tokens + padding
    q_mask = torch.tensor([[True, True, False]])
    eta = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]]])  # 2 tokens + padding
    eta_mask = torch.tensor([[True, True, False]])
    out = layer(q, q_mask, eta, eta_mask)
    # LN of a 2-d (a, b) with a > b is (1, -1) * n, n = 1/sqrt(1 + 1e-5): both query tokens and
    # eta token 1 normalise to n(1, -1), eta token 2 to n(-1, 1).
    n = 1 / math.sqrt(1 + 1e-5)
    # scores: (+-2 n^2) / sqrt(2) -> softmax p1 = sigmoid(2 sqrt(2) n^2); T = (p1 - p2) n (1, -1)
    tau = math.tanh(math.sqrt(2) * n * n) * n
    for i, (a, b) in enumerate([(1.0, -1.0), (3.0, 1.0)]):
        u = (a + tau, b - tau)  # Eq. 11: residual on the un-normalised Q[0]
        expected = (_gelu(0.5 * u[0] + 0.1), _gelu(0.5 * u[1]))  # Eq. 12
        assert torch.allclose(out[0, i], torch.tensor(expected), atol=1e-5), (i, out[0, i], expected)
    assert torch.equal(out[0, 2], torch.zeros(2))  # padding stays zero


def test_interaction_module_keeps_x_eta_fixed_and_uses_the_other_three_streams():
    torch.manual_seed(0)
    mod = InteractionModule(hidden=4, heads=1, layers=2, dropout=0.0)
    x = {s: (torch.randn(1, n, 4), torch.ones(1, n, dtype=torch.bool))
         for s, n in zip(STREAMS, (2, 3, 1, 2), strict=True)}
    out = mod(x)
    # K_r's eta is [K_p, A_p, A_r] (encoder outputs), the same in both layers
    eta = torch.cat([x["kp"][0], x["ap"][0], x["ar"][0]], dim=1)
    m = torch.ones(1, 5, dtype=torch.bool)
    q = x["kr"][0]
    for layer in mod.streams["kr"]:
        q = layer(q, x["kr"][1], eta, m)
    assert torch.allclose(out["kr"], q, atol=1e-6)
    # eta excludes the stream itself: with K_r's own tokens in its eta the output differs
    q_self = x["kr"][0]
    eta_self = torch.cat([x["kp"][0], x["kr"][0], x["ap"][0], x["ar"][0]], dim=1)
    for layer in mod.streams["kr"]:
        q_self = layer(q_self, x["kr"][1], eta_self, torch.ones(1, 8, dtype=torch.bool))
    assert not torch.allclose(out["kr"], q_self, atol=1e-3)
    assert {k: v.shape for k, v in out.items()} == {"kp": (1, 2, 4), "kr": (1, 3, 4),
                                                     "ap": (1, 1, 4), "ar": (1, 2, 4)}


# --- the fused attention kernel changes no value ------------------------------------------------
def test_masked_attention_equals_the_softmax_formula_and_zeroes_keyless_rows():
    from models.layers import masked_softmax
    from models.mcl import masked_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 4, 8, generator=g) for _ in range(3))
    mask = torch.tensor([[True, True, False, False, True], [False] * 5, [True] * 5])
    k, v = k.repeat(1, 1, 2, 1)[:, :, :5], v.repeat(1, 1, 2, 1)[:, :, :5]
    ref = masked_softmax(q @ k.transpose(-1, -2) / math.sqrt(8), mask[:, None, None, :]) @ v
    got = masked_attention(q, k, v, mask, 0.0)
    assert torch.allclose(got, ref, atol=1e-6)
    assert torch.equal(got[1], torch.zeros_like(got[1]))  # no key: zeros, not NaN
    # dropout on the weights (training): inverted dropout keeps the expectation
    torch.manual_seed(0)
    drawn = torch.stack([masked_attention(q, k, v, mask, 0.5) for _ in range(4000)])
    assert not torch.allclose(drawn[0], ref, atol=1e-3)
    assert torch.allclose(drawn.mean(0), ref, atol=0.1)


def _reference_cm(self, x_gamma, x_eta, eta_mask):
    """Eq. 8 written out: softmax(Q K^T / sqrt(d_k)) V over the real eta tokens (one head)."""
    from models.layers import masked_softmax

    q, k, v = self.w_q(x_gamma), self.w_k(x_eta), self.w_v(x_eta)
    att = masked_softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), eta_mask[:, None, :])
    return att @ v


def test_fused_attention_leaves_scores_losses_and_gradients_unchanged(monkeypatch):
    from models.layers import MaskedMultiheadAttention
    from models.mcl import CrossModalAttention, FusedMultiheadAttention

    # product 1 without images, reviews 0 and 5 without images: all-masked key rows occur
    batch = make_batch(empty_review_rois=(0, 5), empty_product_rois=(1,))

    def run():
        model = _tiny(interaction_heads=1)
        model.train()  # dropout 0 in TINY
        out = model(batch)
        loss = out.scores.square().sum() + out.aux_losses["contrastive"]
        loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out, grads = run()
    with monkeypatch.context() as mp:  # the masked-softmax formulation the model had before
        mp.setattr(FusedMultiheadAttention, "forward",
                   lambda self, q, kv, m: MaskedMultiheadAttention.forward(self, q, kv, m))
        mp.setattr(CrossModalAttention, "forward", _reference_cm)
        ref, ref_grads = run()
    assert torch.isfinite(out.scores).all()
    assert torch.allclose(out.scores, ref.scores, atol=1e-5)
    assert torch.allclose(out.aux_losses["contrastive"], ref.aux_losses["contrastive"], atol=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for n in grads:
        assert torch.allclose(grads[n], ref_grads[n], atol=1e-5, rtol=1e-4), n


# --- Eq. 15-27: the fusion paths' pooling --------------------------------------------------------
class _Identity(torch.nn.Module):
    def forward(self, x, mask):
        return x


def test_pack_moves_real_tokens_to_the_front_in_order():
    a, am = torch.tensor([[[1.0], [2.0], [9.0]]]), torch.tensor([[True, True, False]])
    b, bm = torch.tensor([[[3.0], [8.0]]]), torch.tensor([[True, False]])
    x, m = pack([(a, am), (b, bm)])
    assert x[0, :3, 0].tolist() == [1.0, 2.0, 3.0] and m[0].tolist() == [True, True, True, False, False]


def test_each_fusion_path_pools_as_written():
    fusion = Fusion(hidden=2, heads=1, dropout=0.0, cnn_kernel=1)
    for k in list(fusion.sa):
        fusion.sa[k] = _Identity()  # SelfAttn out of the way: pooling alone
    with torch.no_grad():
        fusion.cnn.weight.copy_(torch.eye(2).unsqueeze(-1))  # 1x1 conv = identity
        fusion.cnn.bias.zero_()
    t = lambda rows: torch.tensor([rows])  # noqa: E731
    f = {
        "hp": (t([[1.0, 2.0], [3.0, -4.0], [9.0, 9.0]]), torch.tensor([[True, True, False]])),
        "hr": (t([[0.0, 5.0], [7.0, 7.0]]), torch.tensor([[True, False]])),
        "vp": (t([[-1.0, -2.0], [2.0, 1.0]]), torch.tensor([[True, True]])),
        "vr": (t([[6.0, 0.0]]), torch.tensor([[True]])),
    }
    z = fusion(f)
    # Eq. 17: ReLU(CNN) over the real tokens of [H_p, H_r, V_p, V_r] -> (1,2),(3,0),(0,5),(0,0),
    # (2,1),(6,0); max-pool -> (6, 5)  (the padding 9s and 7s never count)
    assert torch.allclose(z["intra_modal"], torch.tensor([[6.0, 5.0]]))
    # Eq. 20: mean of (1,2),(3,-4),(6,0) = (10/3, -2/3); Eq. 21: (-1,-2),(2,1),(0,5) -> (1/3, 4/3)
    assert torch.allclose(z["hp_vr"], torch.tensor([[10 / 3, -2 / 3]]))
    assert torch.allclose(z["vp_hr"], torch.tensor([[1 / 3, 4 / 3]]))
    # Eq. 25: (1,2),(3,-4),(-1,-2),(2,1) -> (5/4, -3/4); Eq. 26: (0,5),(6,0) -> (3, 5/2)
    assert torch.allclose(z["hp_vp"], torch.tensor([[1.25, -0.75]]))
    assert torch.allclose(z["hr_vr"], torch.tensor([[3.0, 2.5]]))


# --- Eq. 28-29: the scorer --------------------------------------------------------------------
def _tiny(**extra) -> MCL:
    torch.manual_seed(0)
    return MCL.from_config({**TINY["mcl"], **extra})


def test_scorer_is_one_linear_over_the_five_pooled_vectors():
    model = _tiny()
    H = TINY["mcl"]["hidden"]
    assert isinstance(model.scorer, torch.nn.Linear) and model.scorer.in_features == 5 * H
    seen = {}
    model.scorer.register_forward_hook(lambda m, i, o: seen.setdefault("in", i[0]))
    model.fusion.register_forward_hook(lambda m, i, o: seen.setdefault("z", o))
    model.eval()
    batch = make_batch()
    model(batch)
    z = seen["z"]
    expected = torch.cat([z["intra_modal"], z["hp_vr"], z["vp_hr"], z["hp_vp"], z["hr_vr"]], dim=-1)
    assert seen["in"].shape == (batch.num_reviews, 5 * H) and torch.equal(seen["in"], expected)


# --- Eq. 30-35: the loss the trainer assembles --------------------------------------------------
def _hand_eq33(t1: torch.Tensor, t2: torch.Tensor, o_p=2.0, o_n=0.0, adaptive=True) -> float:
    """Eq. 33 written as the double loop of the paper, in float64."""
    a = [np.asarray(v, dtype=np.float64) for v in t1.tolist()]
    b = [np.asarray(v, dtype=np.float64) for v in t2.tolist()]
    cos = lambda u, v: float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))  # noqa: E731
    total = 0.0
    for i in range(len(a)):
        s = cos(a[i], b[i])
        total -= (max(o_p - s, 0.0) if adaptive else 1.0) * s
    for j, k in itertools.product(range(len(a)), repeat=2):
        if j != k:
            s = cos(a[j], b[k])
            total += (max(s - o_n, 0.0) if adaptive else 1.0) * s
    return total


def _expected_contrastive(model: MCL, batch, helpful, adaptive=True) -> float:
    with torch.no_grad():
        f = model.encode(batch)
    pooled, has = {}, {}
    for k, (x, m) in f.items():  # Eq. 30-31: max over the real tokens
        pooled[k] = torch.stack([x[r][m[r]].max(0).values if m[r].any() else torch.zeros(x.shape[-1])
                                 for r in range(x.shape[0])])
        has[k] = m.any(1)
    total = 0.0
    for a, b in itertools.combinations(("hp", "hr", "vp", "vr"), 2):
        rows = helpful & has[a] & has[b]
        if rows.any():
            total += _hand_eq33(pooled[a][rows], pooled[b][rows], adaptive=adaptive)
    return total


def test_total_loss_as_the_trainer_assembles_it(tmp_path, monkeypatch):
    model = _tiny()  # helpful_threshold 1.0 in TINY
    model.train()
    batch = make_batch(empty_review_rois=(3,))
    out = model(batch)
    helpful = batch.labels > 1.0  # labels 2, 3, 4
    expected = _expected_contrastive(model, batch, helpful)
    assert set(out.aux_losses) == {"contrastive"}
    assert math.isclose(float(out.aux_losses["contrastive"].detach()), expected, rel_tol=1e-4, abs_tol=1e-4)
    model.eval()
    assert model(batch).aux_losses == {}
    # Eq. 35 as models.trainer builds it, read off one real training step (every training
    # product in one batch): the loss it backpropagates is L_ranking + 1 * L_AdaptiveCE, with
    # the two terms the step computed (no rescaling, no averaging of the contrastive sum)
    import models.trainer as tr
    from models.synthetic import make_synthetic, synthetic_train_config

    data = make_synthetic(n_products=6, seed=0, threshold=1.0)
    cfg = synthetic_train_config("mcl", data, {"epochs": 1, "batch_products": 64, "ranking_reduction": "sum",
                                               "model_cfg": {"embed_dim": 16, "roi_dim": 32, "hidden": 8,
                                                             "heads": 2, "interaction_layers": 1}})
    trainer = tr.Trainer(cfg, data.bundle, tmp_path / "run")
    seen: dict[str, list] = {"rank": [], "out": []}
    real_rank, real_forward = tr.ranking_loss, trainer.model.forward
    monkeypatch.setattr(tr, "ranking_loss", lambda *a, **k: seen["rank"].append(real_rank(*a, **k)) or seen["rank"][-1])
    monkeypatch.setattr(trainer.model, "forward", lambda b: seen["out"].append(real_forward(b)) or seen["out"][-1])
    stats = trainer._train_epoch()
    assert stats["steps"] == 1 and len(seen["out"]) == 1
    rank, contrastive = float(seen["rank"][0].detach()), float(seen["out"][0].aux_losses["contrastive"].detach())
    assert abs(contrastive) > 1e-3 and rank > 0  # both terms present
    assert math.isclose(stats["train_loss"], rank + contrastive, rel_tol=1e-5, abs_tol=1e-5)
    assert math.isclose(stats["aux"]["contrastive"], contrastive, rel_tol=1e-5, abs_tol=1e-5)


def test_eq34_is_a_sum_under_the_paper_preset():
    # scores (1.2, 1, 0.5, 0.9), labels (4, 1, 3, 0); instances (0 | 1, 3), (2 | 1, 3), beta = 1:
    # instance 0: max(0, 1 - 0.2) + max(0, 1 - 0.3) = 1.5; instance 2: (1 + 0.5) + (1 + 0.4) = 2.9
    # Eq. 34 as printed: 1.5 + 2.9 = 4.4; the trainer's default mean: 2.2
    s = torch.tensor([1.2, 1.0, 0.5, 0.9])
    y = torch.tensor([4.0, 1.0, 3.0, 0.0])
    inst = torch.tensor([[0, 1, 3], [2, 1, 3]])
    assert math.isclose(float(ranking_loss(s, y, inst, margin="fixed", reduction="sum")), 4.4, abs_tol=1e-6)
    assert math.isclose(float(ranking_loss(s, y, inst, margin="fixed")), 2.2, abs_tol=1e-6)
    for name in ("paper", *MCL.ABLATIONS):  # Eq. 35 = the sum of Eq. 33 + the sum of Eq. 34
        assert train_config(MCL.preset(name)["train"]).ranking_reduction == "sum"
    assert train_config(MCL.preset("code")["train"]).ranking_reduction == "mean"
    with pytest.raises(ConfigError, match="ranking_reduction"):
        train_config({"ranking_reduction": "max"})


def test_trainer_sums_the_hinge_when_the_config_says_so(tmp_path, monkeypatch):
    import models.trainer as tr
    from models.synthetic import make_synthetic, synthetic_train_config

    seen = []
    real = tr.ranking_loss
    monkeypatch.setattr(tr, "ranking_loss", lambda *a, **k: seen.append(k.get("reduction")) or real(*a, **k))
    data = make_synthetic(n_products=6, seed=0, threshold=2.0)
    cfg = synthetic_train_config("mcl", data, {"epochs": 1, "ranking_reduction": "sum", "model_cfg": {
        "embed_dim": 16, "roi_dim": 32, "hidden": 8, "heads": 2, "interaction_layers": 1}})
    tr.Trainer(cfg, data.bundle, tmp_path / "run")._train_epoch()
    assert seen and set(seen) == {"sum"}


def test_only_helpful_pairs_enter_the_contrastive_loss():
    model = _tiny()
    model.train()
    batch = make_batch()
    before = float(model(batch).aux_losses["contrastive"])
    # relabel the unhelpful reviews among themselves: nothing changes
    unhelpful = batch.labels <= 1.0
    batch.labels[unhelpful] = 1.0 - batch.labels[unhelpful]
    assert math.isclose(float(model(batch).aux_losses["contrastive"]), before, rel_tol=1e-6)
    # the code preset's rule: label >= 2
    code = _tiny(helpful_threshold=None, helpful_min_label=2.0)
    code.train()
    expected = _expected_contrastive(code, batch, batch.labels >= 2.0)
    assert math.isclose(float(code(batch).aux_losses["contrastive"]), expected, rel_tol=1e-4, abs_tol=1e-4)


def test_dataset_threshold_reaches_the_model_through_the_trainer_hook():
    model = _tiny(helpful_threshold=None)
    model.train()
    with pytest.raises(TrainingError, match="helpful_threshold"):
        model(make_batch())
    model.set_dataset_threshold(1.0)
    ref = _tiny()
    ref.train()
    batch = make_batch()
    assert torch.allclose(model(batch).aux_losses["contrastive"], ref(batch).aux_losses["contrastive"])


def test_a_helpfulness_rule_no_training_review_meets_stops_training(tmp_path):
    model = _tiny()  # helpful: label > 1
    model.check_training_labels([0.0, 1.0, 2.0, 3.0])  # labels 2 and 3: two helpful reviews
    with pytest.raises(TrainingError, match=r"1 of 3 training reviews are helpful \(label > 1\)"):
        model.check_training_labels([0.0, 1.0, 4.0])  # only the 4
    code = _tiny(helpful_threshold=None, helpful_min_label=5.0)
    with pytest.raises(TrainingError, match=r"0 of 2 .*label >= 5"):
        code.check_training_labels([4.0, 4.0])
    _tiny(contrastive=False).check_training_labels([0.0])  # no contrastive loss: nothing to meet
    # the trainer calls the hook with the training split's labels (synthetic labels are 0..4)
    from models.synthetic import make_synthetic, synthetic_train_config
    from models.trainer import Trainer

    data = make_synthetic(n_products=6, seed=0, threshold=2.0)
    cfg = synthetic_train_config("mcl", data, {"model_cfg": {"embed_dim": 16, "roi_dim": 32, "hidden": 8,
                                                             "heads": 2, "helpful_threshold": 4.0}})
    with pytest.raises(TrainingError, match="label > 4"):
        Trainer(cfg, data.bundle, tmp_path / "run")


def test_trainer_hands_the_dataset_threshold_to_the_model(tmp_path):
    from models.synthetic import make_synthetic, synthetic_train_config
    from models.trainer import Trainer

    data = make_synthetic(n_products=6, seed=0, threshold=2.0)
    cfg = synthetic_train_config("mcl", data, {"model_cfg": {"embed_dim": 16, "roi_dim": 32,
                                                             "hidden": 8, "heads": 2}})
    trainer = Trainer(cfg, data.bundle, tmp_path / "run")
    assert trainer.model.dataset_threshold == 2.0


# --- presets, Table 6 switches, views -------------------------------------------------------------
def test_paper_preset_is_the_default_and_builds_the_paper_model():
    assert MCL.PRESET_NAMES[0] == "paper"
    p = MCL.preset("paper")
    model = MCL.from_config({"vocab_size": 10, **p["model_cfg"]})
    c = model.config
    assert (c.hidden, c.interaction_layers, c.o_p, c.o_n, c.bidirectional) == (128, 5, 2.0, 0.0, False)
    assert c.contrastive and c.adaptive_weighting and c.finetune_embeddings
    assert all(len(layers) == 5 for layers in model.interaction.streams.values())
    # every model field but the data-given sizes is spelled out, at the paper's values
    from dataclasses import fields

    from models.mcl import MCLConfig
    assert set(p["model_cfg"]) == {f.name for f in fields(MCLConfig)} - {"vocab_size", "embed_dim"}
    t = train_config(p["train"])  # every key is a TrainConfig field
    assert (t.batch_products, t.margin, t.fixed_margin) == (32, "fixed", 1.0)


def test_code_preset_and_unknown_name():
    p = MCL.preset("code")
    assert p["model_cfg"]["interaction_layers"] == 1 and p["model_cfg"]["helpful_min_label"] == 2.0
    t = train_config(p["train"])
    # the public trainer is built without clip_norm (basic_modeling.build_trainer): no clipping;
    # its configs: Adam 1e-4, ReduceLROnPlateau patience 4, early_stopping 8, 7 negatives
    assert t.grad_clip is None
    assert (t.lr, t.lr_patience, t.patience, t.num_negatives) == (1e-4, 4, 8, 7)
    # the paper gives no clipping either way; its preset keeps the trainer's guard
    assert train_config(MCL.preset("paper")["train"]).grad_clip == 5.0
    with pytest.raises(ConfigError, match="paper, code"):
        MCL.preset("papr")


def test_table6_switches():
    for name, switch in MCL.ABLATIONS.items():  # each ablation preset = paper + one switch
        cfg = MCL.preset(name)["model_cfg"]
        paper = MCL.preset("paper")["model_cfg"]
        assert {k: v for k, v in cfg.items() if paper[k] != v} == switch
    batch = make_batch()
    # w/o adaptive weighting: Eq. 32
    m = _tiny(**MCL.ABLATIONS["no-adaptive-weighting"])
    m.train()
    expected = _expected_contrastive(m, batch, batch.labels > 1.0, adaptive=False)
    assert math.isclose(float(m(batch).aux_losses["contrastive"]), expected, rel_tol=1e-4, abs_tol=1e-4)
    # w/o contrastive objective: ranking loss only
    m = _tiny(**MCL.ABLATIONS["no-contrastive"])
    m.train()
    assert m(batch).aux_losses == {}
    # w/o cross-modal module: H_p, H_r, V_p, V_r are the encoder outputs
    m = _tiny(**MCL.ABLATIONS["no-cross-modal"])
    m.eval()
    f = m.encode(batch)
    k_r = m.text_r(m.emb_r(batch.rev_tokens), batch.rev_token_mask)
    assert torch.equal(f["hr"][0], k_r)


def test_required_views():
    assert MCL.required_views({}) == frozenset({"tokens", "rois"})


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="not both"):
        _tiny(helpful_min_label=2.0)
    with pytest.raises(ConfigError, match="cnn_kernel"):
        _tiny(cnn_kernel=2)
    with pytest.raises(ConfigError, match="model.mcl.dropout"):
        _tiny(dropout=1.5)


def test_settings_that_silently_drop_a_term_of_eq33_are_refused():
    # sim of T1, T2: positives 0.6, 0.6; negatives 0.8, 0.8 (see the top of this file)
    # o_p = -1: eps_p = [-1 - 0.6]_+ = 0, so only the negatives remain: 2 * 0.8 * 0.8 = 1.28
    assert math.isclose(float(adaptive_contrastive_loss(T1, T2, o_p=-1.0)), 1.28, abs_tol=1e-6)
    # o_n = 1: eps_n = [0.8 - 1]_+ = 0, so only the positives remain: -2 * 1.4 * 0.6 = -1.68
    assert math.isclose(float(adaptive_contrastive_loss(T1, T2, o_n=1.0)), -1.68, abs_tol=1e-6)
    # ... for every cosine in [-1, 1], so a model config with them is refused
    with pytest.raises(ConfigError, match="model.mcl.o_p"):
        _tiny(o_p=-1.0)
    with pytest.raises(ConfigError, match="model.mcl.o_n"):
        _tiny(o_n=1.0)
    # contrastive on with weight 0 is "w/o contrastive objective" under another name
    with pytest.raises(ConfigError, match="contrastive: false"):
        _tiny(contrastive_weight=0.0)
    # where the setting has no effect it is accepted: Eq. 32 has no o_p/o_n, the ablation no loss
    _tiny(o_p=-1.0, adaptive_weighting=False)
    _tiny(o_n=1.0, contrastive=False, contrastive_weight=0.0)
    # inside the range the weights are live: with sim positives -0.6, negatives -0.8, o_p = -0.5
    # gives eps_p = [-0.5 + 0.6]_+ = 0.1 and eps_n = [-0.8]_+ = 0: L = -2 * 0.1 * (-0.6) = 0.12
    t2 = torch.tensor([[-0.6, -0.8], [-0.8, -0.6]])
    assert math.isclose(float(adaptive_contrastive_loss(T1, t2, o_p=-0.5)), 0.12, abs_tol=1e-6)
    _tiny(o_p=-0.5, o_n=0.9)


# --- Tables 7-8 ------------------------------------------------------------------------------------
def test_relation_distances_hand_values():
    model = _tiny()
    one = lambda rows: (torch.tensor(rows), torch.ones(len(rows), len(rows[0]), dtype=torch.bool))  # noqa: E731

    def encode(batch):
        # two reviews (labels 1, 4), one token per set, d = 2
        return {"hp": one([[[1.0, 0.0]], [[1.0, 0.0]]]), "hr": one([[[0.0, 1.0]], [[1.0, 0.0]]]),
                "vp": one([[[1.0, 0.0]], [[3.0, 0.0]]]), "vr": one([[[2.0, 0.0]], [[1.0, 0.0]]])}

    model.encode = encode
    batch = make_batch(products=1, reviews_per_product=2)
    batch.labels = torch.tensor([1.0, 4.0])
    d = relation_distances(model, [batch], labels=(1, 4))
    # label 1 intra-modal: (hp, hr) cos 0 -> CS 1, L2 sqrt 2; (vp, vr) CS 0, L2 1
    assert math.isclose(d[1.0]["intra-modal"]["CS"], 0.5, abs_tol=1e-6)
    assert math.isclose(d[1.0]["intra-modal"]["L2"], (math.sqrt(2) + 1) / 2, abs_tol=1e-6)
    # label 4 intra-review: (hp, vp) CS 0, L2 2; (hr, vr) CS 0, L2 0
    assert math.isclose(d[4.0]["intra-review"]["CS"], 0.0, abs_tol=1e-6)
    assert math.isclose(d[4.0]["intra-review"]["L2"], 1.0, abs_tol=1e-6)
    assert d[4.0]["inter-modal"]["n"] == 1


def test_relation_distances_mean_over_real_token_pairs_and_std_over_samples():
    model = _tiny()
    t = lambda rows: torch.tensor(rows)  # noqa: E731
    m = lambda rows: torch.tensor(rows)  # noqa: E731

    def encode(batch):
        # three reviews, all label 4; review 3 has no review image (left out), padding is 9s/5s/7s
        return {"hp": (t([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]], [[1.0, 0.0], [5.0, 5.0], [5.0, 5.0]],
                          [[1.0, 0.0], [5.0, 5.0], [5.0, 5.0]]]),
                       m([[True, True, False], [True, False, False], [True, False, False]])),
                "hr": (t([[[1.0, 0.0]]] * 3), m([[True]] * 3)),
                "vp": (t([[[2.0, 0.0]], [[1.0, 0.0]], [[1.0, 0.0]]]), m([[True]] * 3)),
                "vr": (t([[[0.0, 3.0]], [[1.0, 0.0]], [[7.0, 7.0]]]), m([[True], [True], [False]]))}

    model.encode = encode
    batch = make_batch(products=1, reviews_per_product=3)
    batch.labels = torch.tensor([4.0, 4.0, 4.0])
    d = relation_distances(model, [batch], labels=(4,))[4.0]
    # review 1, (hp, hr): token pairs (1,0)-(1,0): CS 0, L2 0; (0,1)-(1,0): CS 1, L2 sqrt 2
    #   -> CS 0.5, L2 sqrt2/2; (vp, vr): (2,0)-(0,3): CS 1, L2 sqrt 13
    #   -> intra-modal CS 0.75, L2 (sqrt2/2 + sqrt13)/2. Review 2: every token (1,0): 0, 0.
    #   mean over the 2 samples and population std: 0.375 +- 0.375
    l2 = (math.sqrt(2) / 2 + math.sqrt(13)) / 2
    im = d["intra-modal"]
    assert im["n"] == 2
    assert math.isclose(im["CS"], 0.375, abs_tol=1e-6) and math.isclose(im["CS_std"], 0.375, abs_tol=1e-6)
    assert math.isclose(im["L2"], l2 / 2, abs_tol=1e-5) and math.isclose(im["L2_std"], l2 / 2, abs_tol=1e-5)
    # inter-modal, review 1: (hp, vr): (1,0)-(0,3): CS 1, L2 sqrt 10; (0,1)-(0,3): CS 0, L2 2;
    # (vp, hr): (2,0)-(1,0): CS 0, L2 1 -> CS 0.25, L2 ((sqrt10 + 2)/2 + 1)/2; review 2: 0
    assert math.isclose(d["inter-modal"]["CS"], 0.125, abs_tol=1e-6)
    assert math.isclose(d["inter-modal"]["L2"], ((math.sqrt(10) + 2) / 2 + 1) / 4, abs_tol=1e-5)


# --- learning -------------------------------------------------------------------------------------
def test_learning_check_beats_length_and_random_on_held_out_products():
    learning_check("mcl")  # the paper configuration (D = 5) at tiny widths


def test_distances_command_over_a_trained_run(tmp_path, capsys):
    from models.synthetic import make_synthetic, train_and_evaluate
    from mrhp.commands.distances import distances_for_run, format_table

    torch.set_num_threads(1)
    data = make_synthetic(n_products=8, seed=1)
    train_and_evaluate("mcl", data, {"epochs": 1, "model_cfg": {
        "embed_dim": 16, "roi_dim": 32, "hidden": 8, "heads": 2, "interaction_layers": 1}},
        run_dir=tmp_path / "run")
    rec = distances_for_run(tmp_path / "run", data.bundle, split="test", labels=[1.0, 4.0])
    assert (tmp_path / "run" / "distances_test.json").is_file()
    groups = rec["distances"]["1"]
    assert set(groups) == {"intra-modal", "inter-modal", "intra-review"}
    counted = [g for y in rec["distances"].values() for g in y.values() if g["n"]]
    assert counted and all(0.0 <= g["CS"] <= 2.0 and g["L2"] >= 0.0 for g in counted)
    assert "intra-modal CS" in format_table("run", rec)
    # a run of another model is refused with a one-line error
    train_and_evaluate("length", data, {"epochs": 1}, run_dir=tmp_path / "len")
    with pytest.raises(ConfigError, match="analyses MCL runs"):
        distances_for_run(tmp_path / "len", data.bundle)
