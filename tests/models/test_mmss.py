"""MM-SS pinned to its paper (../shared/papers/mmss.txt): hand-computed values for Eq. 17
(anchor), Eq. 18 (Mahalanobis distance / sqrt(s_k)), Eq. 21 first line (pseudo label), Eq. 12
(EWMA at epochs 1, 2, 3), Eq. 14-15 (subtask loss with uncertainty weighting), the soft pooling
of Eq. 3-5 over the joint mask of the concatenated sequences; then the model's use of them
across epochs, presets, Table 4 switches, the BERT-feature path and the trainer's lr groups."""
from __future__ import annotations

import io
import math

import pytest
import torch

from models.mmss import (
    MMSS,
    TABLE4_SWITCHES,
    JointInteraction,
    anchor,
    ewma_update,
    mahalanobis,
    mahalanobis_full,
    soft_pool,
    ssp_label,
    subtask_loss,
)
from pipeline.errors import ConfigError, TrainingError
from tests.models.test_models_common import TINY, learning_check, make_batch

LN3 = math.log(3.0)  # sigmoid(ln 3) = 3/4, sigmoid(-ln 3) = 1/4, sigmoid(0) = 1/2


# --- Eq. 17: anchor ------------------------------------------------------------------------------
def test_anchor_is_the_sigmoid_weighted_mean_eq17():
    feats = torch.tensor([[2.0, 0.0], [0.0, 4.0], [4.0, 4.0]])
    labels = torch.tensor([0.0, LN3, -LN3])  # weights 1/2, 3/4, 1/4 (sum 3/2)
    # (1/2 (2, 0) + 3/4 (0, 4) + 1/4 (4, 4)) / (3/2) = ((1, 0) + (0, 3) + (1, 1)) / 1.5 = (4/3, 8/3)
    assert torch.allclose(anchor(feats, labels), torch.tensor([4 / 3, 8 / 3]))


# --- Eq. 18: Mahalanobis distance ------------------------------------------------------------------
def test_mahalanobis_distance_with_diagonal_sigma_divided_by_sqrt_s_eq18():
    f = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    a = torch.tensor([1.0, 1.0])
    var = torch.tensor([1.0, 4.0])
    # row 0: sqrt(1/1 + 1/4) / sqrt(2) = sqrt(0.625); row 1: sqrt(0 + 4/4) / sqrt(2) = sqrt(0.5)
    got = mahalanobis(f, a, var, scale=2.0)
    assert torch.allclose(got, torch.tensor([math.sqrt(0.625), math.sqrt(0.5)]))


def test_mahalanobis_distance_with_full_sigma_eq18():
    # Sigma = [[2, 1], [1, 2]] -> Sigma^-1 = [[2, -1], [-1, 2]] / 3; d = (1, 1):
    # d^T Sigma^-1 d = (2 - 1 - 1 + 2) / 3 = 2/3; / sqrt(s = 1). (Diagonal Sigma would give 1.)
    prec = torch.tensor([[2.0, -1.0], [-1.0, 2.0]]) / 3
    got = mahalanobis_full(torch.tensor([[[2.0, 1.0]]]), torch.tensor([[1.0, 0.0]]), prec[None], 1.0)
    assert torch.allclose(got, torch.tensor([[math.sqrt(2 / 3)]]))


def test_full_covariance_is_the_weighted_covariance_of_the_epoch():
    model, batch = _model(ssp_covariance="full"), make_batch()
    model.on_epoch_start(0)
    got, hooks = _capture_f_star(model)
    model(batch)
    for h in hooks:
        h.remove()
    model.on_epoch_start(1)
    f = got["g"].double()
    w = torch.sigmoid(batch.labels.double())
    a = anchor(f, batch.labels.double())
    d = f - a
    cov = torch.einsum("r,rh,rg->hg", w, d, d) / w.sum() + 1e-6 * torch.eye(f.shape[1], dtype=torch.float64)
    assert torch.allclose(model.precision[0] @ cov, torch.eye(f.shape[1], dtype=torch.float64), atol=1e-5)
    model(batch)  # epoch 2 runs on the full-covariance distance
    assert torch.isfinite(model.bank.values).all()


# --- Eq. 21, first line --------------------------------------------------------------------------
def test_ssp_label_is_the_first_line_of_eq21():
    # y_g=2, chi_g=1, chi_s=2, a1=a2=1: (2 + (2-1))/2 + 2*2/(2*1) = 1.5 + 2 = 3.5
    # (the second line, y_g + (2 chi_s - (chi_g+eps)) y_g / (2 (chi_g+eps)), would give 5)
    assert math.isclose(float(ssp_label(torch.tensor(2.0), torch.tensor(1.0), torch.tensor(2.0))), 3.5,
                        rel_tol=1e-5)
    # y_g=4, chi_g=2, chi_s=1, a1=0.5, a2=2, eps=0: (4 + 2(1-2))/2 + 0.5*1*4/(2*2) = 1 + 0.5 = 1.5,
    # the mean of Eq. 19 (0.5 * 1/2 * 4 = 1) and Eq. 20 (4 + 2(1-2) = 2)
    got = ssp_label(torch.tensor([4.0]), torch.tensor([2.0]), torch.tensor([1.0]), a1=0.5, a2=2.0, eps=0.0)
    assert torch.allclose(got, torch.tensor([1.5]))
    # eps only guards the division: chi_g = 0, eps = 0.5, y_g = 1, chi_s = 1: (1+1)/2 + 1/(2*0.5) = 2
    got = ssp_label(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(1.0), eps=0.5)
    assert math.isclose(float(got), 2.0, rel_tol=1e-6)
    # no clamp: y_g=4, chi_g=1, chi_s=3: (4+2)/2 + 3*4/2 = 9 > 4
    assert math.isclose(float(ssp_label(torch.tensor(4.0), torch.tensor(1.0), torch.tensor(3.0))), 9.0,
                        rel_tol=1e-5)


# --- Eq. 11-12: EWMA --------------------------------------------------------------------------------
def test_ewma_leaves_y_g_at_epoch_1_then_beta_two_over_i_plus_one():
    y_g, est = torch.tensor([2.0]), torch.tensor([3.5])
    assert torch.equal(ewma_update(y_g, est, 1), y_g)  # y_s(1) = y_g: the estimate is ignored
    y2 = ewma_update(y_g, est, 2)  # beta = 2/3: 2/3 * 3.5 + 1/3 * 2 = 3.0
    assert torch.allclose(y2, torch.tensor([3.0]))
    y3 = ewma_update(y2, torch.tensor([1.0]), 3)  # beta = 1/2: 0.5 * 1 + 0.5 * 3 = 2.0
    assert torch.allclose(y3, torch.tensor([2.0]))
    with pytest.raises(ValueError):
        ewma_update(y_g, est, 0)


# --- Eq. 14-15 -----------------------------------------------------------------------------------
def test_subtask_loss_weights_by_tanh_of_the_label_gap_and_by_uncertainty_eq14_15():
    y_g = torch.tensor([2.0, 0.0])
    y_s = torch.tensor([[2.0, 3.0], [1.0, 0.0]])
    pred = torch.tensor([[5.0, 3.5], [0.0, 2.0]])
    log_var = torch.tensor([0.0, math.log(2.0)])  # sigma^2 = 1, 2
    # W = tanh|y_s - y_g| = [[0, t], [t, 0]] with t = tanh(1); |pred - y_s| = [[3, .5], [1, 2]]
    # L_1 = (0 + t)/2, L_2 = (0.5 t + 0)/2 = t/4
    # L_sub = L_1/(2*1) + L_2/(2*2) + log(sigma_1 sigma_2) = t/4 + t/16 + 0.5 ln 2
    t = math.tanh(1.0)
    expected = t / 4 + t / 16 + 0.5 * math.log(2.0)  # = 0.584572...
    assert math.isclose(float(subtask_loss(pred, y_s, y_g, log_var)), expected, rel_tol=1e-6)


# --- Eq. 3-5: soft pooling over the joint mask ---------------------------------------------------------
def test_soft_pool_is_a_per_channel_softmax_weighted_sum_over_real_positions():
    x = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [5.0, 5.0]]])
    mask = torch.tensor([[True, True, False]])
    # channel 0: softmax(1, 0) = (e, 1)/(e+1) -> e/(e+1) * 1 = 0.731059; channel 1: values 0 -> 0
    e = math.e
    assert torch.allclose(soft_pool(x, mask), torch.tensor([[e / (e + 1), 0.0]]))
    assert torch.equal(soft_pool(x, torch.zeros(1, 3, dtype=torch.bool)), torch.zeros(1, 2))


def _identity_interaction() -> JointInteraction:
    """A joint interaction whose Self-ATT block is the identity (output projections zeroed), so
    the result is SoftPool over the concatenation and can be computed by hand."""
    m = JointInteraction(hidden=2, heads=1, dropout=0.0, pooling="softpool")
    with torch.no_grad():
        for lin in (m.self_att.att.o, m.self_att.ff.net[-1]):
            lin.weight.zero_(), lin.bias.zero_()
    return m


def test_joint_interaction_pools_over_the_concatenated_masks():
    m = _identity_interaction()
    e = math.e
    # X = [(1, 0)], Y = [(0, 0), pad (9, 9)] -> pool over {(1,0), (0,0)}: (e/(e+1), 0)
    x, xm = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[True]])
    y, ym = torch.tensor([[[0.0, 0.0], [9.0, 9.0]]]), torch.tensor([[True, False]])
    want = torch.tensor([[e / (e + 1), 0.0]])
    assert torch.allclose(m(x, xm, y, ym), want)
    # padding of X in the middle of the concatenation is excluded too
    x2, xm2 = torch.tensor([[[1.0, 0.0], [7.0, 7.0]]]), torch.tensor([[True, False]])
    assert torch.allclose(m(x2, xm2, y[:, :1], ym[:, :1]), want)
    # Y's real position counts: with Y fully masked the pool is over X alone, (1, 0)
    assert torch.allclose(m(x, xm, y, torch.zeros_like(ym)), torch.tensor([[1.0, 0.0]]))


def test_joint_self_attention_lets_each_side_see_the_other():
    """Eq. 3-5: C = Self-ATT([X; Y]) attends across the two sides (a pooled-only check could not
    tell this from two separate self-attentions pooled together). One head, Q/K/V/O = identity,
    the feed-forward sublayer off, so each output row is x + softmax(q k^T / sqrt 2) v with
    q, k, v the LayerNormed rows."""
    m = _identity_interaction()
    with torch.no_grad():
        for lin in (m.self_att.att.q, m.self_att.att.k, m.self_att.att.v, m.self_att.att.o):
            lin.weight.copy_(torch.eye(2)), lin.bias.zero_()
    rows = {}
    m.self_att.register_forward_hook(lambda mod, a, out: rows.__setitem__("c", out.detach()))
    # X = [(1, 0)], Y = [(0, 2)]; LN over 2 channels: (1, 0) -> (1, -1), (0, 2) -> (-1, 1).
    # Query of X (1, -1): scores X: 2/sqrt2 = sqrt2, Y: -sqrt2; softmax -> (1 + e^{-2 sqrt2})^-1 and
    # (1 + e^{2 sqrt2})^-1, whose difference is tanh(sqrt2) = t; attended value t (1, -1);
    # c_X = (1, 0) + t (1, -1) = (1 + t, -t). Symmetrically c_Y = (0, 2) + t (-1, 1) = (-t, 2 + t).
    t = math.tanh(math.sqrt(2.0))  # 0.888385...
    x, xm = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[True]])
    y, ym = torch.tensor([[[0.0, 2.0]]]), torch.tensor([[True]])
    pooled = m(x, xm, y, ym)
    assert torch.allclose(rows["c"], torch.tensor([[[1 + t, -t], [-t, 2 + t]]]), atol=1e-4)
    # SoftPool per channel over both rows: ch0 values (1+t, -t), ch1 values (-t, 2+t)
    def sp(a, b):
        return (a * math.exp(a) + b * math.exp(b)) / (math.exp(a) + math.exp(b))
    assert torch.allclose(pooled, torch.tensor([[sp(1 + t, -t), sp(-t, 2 + t)]]), atol=1e-4)
    # Y masked out: X attends to itself only, c_X = (1, 0) + (1, -1) = (2, -1), pooled (2, -1)
    assert torch.allclose(m(x, xm, y, torch.zeros_like(ym)), torch.tensor([[2.0, -1.0]]), atol=1e-4)
    # a padded X position changes nothing
    x2, xm2 = torch.tensor([[[1.0, 0.0], [100.0, -50.0]]]), torch.tensor([[True, False]])
    assert torch.allclose(m(x2, xm2, y, ym), pooled, atol=1e-6)


# --- the model across epochs --------------------------------------------------------------------------
def _model(**extra):
    torch.manual_seed(0)
    return MMSS.from_config({**TINY["mmss"], **extra}).train()


def _capture_f_star(model):
    """Forward hooks that record f*_g and f*_s (GELU of the projections; dropout is 0)."""
    got = {}
    hooks = [
        model.fuse.register_forward_hook(lambda m, i, o: got.__setitem__("g", torch.nn.functional.gelu(o).detach()))
    ]
    for s in model.subtasks:
        hooks.append(model.sub_proj[s].register_forward_hook(
            lambda m, i, o, s=s: got.__setitem__(s, torch.nn.functional.gelu(o).detach())))
    return got, hooks


def test_epoch_1_targets_are_y_g_and_the_loss_is_only_the_uncertainty_term():
    model, batch = _model(), make_batch()
    model.on_epoch_start(0)
    loss = model(batch).aux_losses["subtasks"]
    assert float(loss.detach()) == 0.0  # tanh(|y_g - y_g|) = 0 and log_var = 0 at init
    stored = model.bank.get(batch.review_ids, batch.labels)
    assert torch.equal(stored, batch.labels.unsqueeze(1).expand(-1, 5))  # Eq. 12: y_s(1) = y_g


def test_anchor_is_a_memory_over_the_whole_epoch_not_one_batch():
    model = _model()
    b1, b2 = make_batch(seed=1), make_batch(seed=2)
    b2.review_ids = [f"x{i}" for i in range(b2.num_reviews)]
    model.on_epoch_start(0)
    feats = []
    for b in (b1, b2):
        got, hooks = _capture_f_star(model)
        model(b)
        for h in hooks:
            h.remove()
        feats.append(got)
    model.on_epoch_start(1)  # closes epoch 1
    y = torch.cat([b1.labels, b2.labels])
    for k, name in enumerate(("g",) + model.subtasks):
        f = torch.cat([feats[0][name], feats[1][name]]).double()
        a = anchor(f, y.double())  # epoch 1: y_s = y_g, so every task weighs by sigmoid(y_g)
        assert torch.allclose(model.anchors[k], a, atol=1e-6), name
        w = torch.sigmoid(y.double())
        var = (w[:, None] * (f - a) ** 2).sum(0) / w.sum()
        assert torch.allclose(model.variances[k], var.clamp(min=1e-6), atol=1e-6), name


def test_epoch_2_pseudo_labels_follow_eq18_21_and_12():
    model, batch = _model(), make_batch()
    model.on_epoch_start(0)
    model(batch)
    model.on_epoch_start(1)
    anchors, variances = model.anchors.clone(), model.variances.clone()
    got, hooks = _capture_f_star(model)
    model(batch)
    for h in hooks:
        h.remove()
    y_g = batch.labels.double()
    H = TINY["mmss"]["hidden"]
    chi = [mahalanobis(got[n].double(), anchors[k], variances[k], float(H))
           for k, n in enumerate(("g",) + model.subtasks)]
    for j, s in enumerate(model.subtasks):
        est = ssp_label(y_g, chi[0], chi[1 + j])
        want = ewma_update(y_g, est, 2)  # y_s(1) = y_g
        have = model.bank.get(batch.review_ids, batch.labels)[:, j].double()
        assert torch.allclose(have, want, atol=1e-4), s
    assert not torch.allclose(model.bank.get(batch.review_ids, batch.labels),
                              batch.labels.unsqueeze(1).expand(-1, 5))


def test_epoch_3_anchors_weigh_each_subtask_by_its_own_pseudo_labels_and_ewma_uses_y_s2():
    """Epoch 1 cannot tell the weights apart (y_s(1) = y_g); epoch 2's sums can. Written out
    without the module's helpers: Eq. 17 with sigmoid(y_s(2)) for subtask s and sigmoid(y_g)
    for g; diagonal Eq. 18 divided by sqrt(s_k = H); Eq. 21 first line; Eq. 12 with beta = 1/2."""
    model, batch = _model(), make_batch()
    H = TINY["mmss"]["hidden"]
    model.on_epoch_start(0)
    model(batch)
    model.on_epoch_start(1)
    got2, hooks = _capture_f_star(model)
    model(batch)
    for h in hooks:
        h.remove()
    y_g = batch.labels.double()
    y2 = model.bank.get(batch.review_ids, batch.labels).double()  # y_s(2), (R, 5)
    model.on_epoch_start(2)  # closes epoch 2
    labels = [y_g] + [y2[:, j] for j in range(5)]
    names = ("g",) + model.subtasks
    A, V = [], []
    for k, (name, y) in enumerate(zip(names, labels, strict=True)):
        w, f = torch.sigmoid(y), got2[name].double()
        a = (w[:, None] * f).sum(0) / w.sum()
        v = ((w[:, None] * (f - a) ** 2).sum(0) / w.sum()).clamp(min=1e-6)
        assert torch.allclose(model.anchors[k], a, atol=1e-6), name
        assert torch.allclose(model.variances[k], v, atol=1e-6), name
        A.append(a), V.append(v)
    if not torch.allclose(y2, y_g[:, None].expand(-1, 5)):  # own-label weights differ from y_g's
        w_g = torch.sigmoid(y_g)
        a_wrong = (w_g[:, None] * got2["ptrt"].double()).sum(0) / w_g.sum()
        assert not torch.allclose(model.anchors[1], a_wrong, atol=1e-6)
    got3, hooks = _capture_f_star(model)
    model(batch)
    for h in hooks:
        h.remove()
    chi = [(((got3[n].double() - A[k]) ** 2 / V[k]).sum(-1) / H).sqrt() for k, n in enumerate(names)]
    y3 = model.bank.get(batch.review_ids, batch.labels).double()
    for j in range(5):
        est = (y_g + (chi[1 + j] - chi[0])) / 2 + chi[1 + j] * y_g / (2 * (chi[0] + 1e-6))
        assert torch.allclose(y3[:, j], 0.5 * est + 0.5 * y2[:, j], atol=1e-4), names[1 + j]


def test_epoch_2_without_a_finished_epoch_1_is_an_error():
    model, batch = _model(), make_batch()
    model.on_epoch_start(1)
    with pytest.raises(TrainingError, match="anchor"):
        model(batch)


def test_pseudo_labels_and_anchors_survive_a_weights_only_checkpoint():
    model, batch = _model(), make_batch()
    model.on_epoch_start(0)
    model(batch)
    model.on_epoch_start(1)
    model(batch)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = _model()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.epoch == 2 and fresh.bank.rows == model.bank.rows
    assert torch.equal(fresh.bank.values, model.bank.values)
    assert fresh.bank.state()["label_epochs"].tolist() == [2] * batch.num_reviews
    for name in ("anchors", "variances", "acc_w", "acc_f", "acc_f2", "anchor_ready"):
        assert torch.equal(getattr(fresh, name), getattr(model, name)), name


def test_a_second_update_in_one_epoch_is_an_error_not_a_second_ewma_step():
    # Eq. 12 moves y_s once per epoch; a loop that never calls on_epoch_start would keep i = 1
    # and the targets at y_g forever (a zero subtask loss), or apply the EWMA twice in one epoch
    model, batch = _model(), make_batch()
    model.on_epoch_start(0)
    model(batch)
    with pytest.raises(TrainingError, match="once per epoch"):
        model(batch)
    model.on_epoch_start(1)
    model(batch)  # epoch 2: one update per review again
    assert model.bank.state()["label_epochs"].tolist() == [2] * batch.num_reviews
    # a checkpoint written before the label epochs were recorded still loads (all "never")
    state = model.get_extra_state()
    del state["label_epochs"]
    fresh = _model()
    fresh.set_extra_state(state)
    assert fresh.bank.state()["label_epochs"].tolist() == [0] * batch.num_reviews


def test_clamp_only_when_asked():
    model, batch = _model(clamp_pseudo_labels=True, ssp_a1=50.0), make_batch()
    for e in range(3):
        model.on_epoch_start(e)
        model(batch)
    v = model.bank.values
    assert float(v.min()) >= 0.0 and float(v.max()) <= 4.0
    free = _model(ssp_a1=50.0)  # the same run without the flag leaves [0, 4] (Eq. 21 has no clamp)
    for e in range(3):
        free.on_epoch_start(e)
        free(batch)
    w = free.bank.values
    assert float(w.min()) < 0.0 or float(w.max()) > 4.0
    with pytest.raises(ConfigError, match="max_label"):
        _model(clamp_pseudo_labels=True, max_label=0.0)


def test_training_without_review_ids_is_a_clear_error():
    model, batch = _model(), make_batch()
    batch.review_ids = []
    with pytest.raises(TrainingError, match="review id"):
        model(batch)
    batch.review_ids = ["r0"] * batch.num_reviews  # two reviews would share one pseudo label
    with pytest.raises(TrainingError, match="repeats r0"):
        model(batch)


def test_eval_mode_neither_returns_nor_updates_pseudo_labels():
    model, batch = _model(), make_batch()
    model.eval()
    assert model(batch).aux_losses == {}
    assert model.bank.rows == {}


def _gelu(z: torch.Tensor) -> torch.Tensor:
    """GELU written out (Hendrycks & Gimpel): z * Phi(z) = z/2 (1 + erf(z / sqrt 2))."""
    return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))


def test_heads_use_gelu_eq7_9():
    model = _model()
    assert isinstance(model.sub_mlp["ptrt"][1], torch.nn.GELU)
    assert not any(isinstance(m, torch.nn.ReLU) for n, m in model.named_modules()
                   if n.startswith(("fuse", "out_g", "sub_")))


def test_global_and_subtask_heads_by_hand_eq6_9():
    model, batch = _model(), make_batch()  # dropout 0
    seen = {}
    hooks = [model.fuse.register_forward_pre_hook(lambda m, a: seen.__setitem__("F_c", a[0].detach()))]
    for s in model.subtasks:
        hooks.append(model.sub_proj[s].register_forward_pre_hook(
            lambda m, a, s=s: seen.__setitem__(("f", s), a[0].detach())))
        hooks.append(model.sub_mlp[s].register_forward_hook(
            lambda m, a, o, s=s: seen.__setitem__(("mlp", s), (a[0].detach(), o.detach()))))
    model.on_epoch_start(0)
    out = model(batch)
    for h in hooks:
        h.remove()
    F_c, H = seen["F_c"], TINY["mmss"]["hidden"]
    # Eq. 7-8: y^_g = W_g^T GELU(W F_c + b) + b_g, GELU written out (ReLU or the tanh
    # approximation would miss the 1e-6 tolerance)
    f_g = _gelu(F_c @ model.fuse.weight.T + model.fuse.bias)
    y_g = f_g @ model.out_g.weight[0] + model.out_g.bias[0]
    assert torch.allclose(out.scores.detach(), y_g.detach(), atol=1e-6)
    for j, s in enumerate(("ptrt", "pvrv", "ptrv", "pvrt", "rtrv")):
        f_s = seen[("f", s)]
        assert torch.equal(f_s, F_c[:, j * H:(j + 1) * H])  # Eq. 6: F_c = [f_ptrt; ...; f_rtrv]
        # Eq. 9: f*_s = GELU(W_s f_s + b_s); y^_s = MLP(f*_s) = W2 GELU(W1 f*_s + b1) + b2
        f_star = _gelu(f_s @ model.sub_proj[s].weight.T + model.sub_proj[s].bias).detach()
        mlp_in, mlp_out = seen[("mlp", s)]
        assert torch.allclose(mlp_in, f_star, atol=1e-6), s
        l1, l2 = model.sub_mlp[s][0], model.sub_mlp[s][-1]
        want = _gelu(f_star @ l1.weight.T + l1.bias) @ l2.weight.T + l2.bias
        assert torch.allclose(mlp_out, want.detach(), atol=1e-6), s


# --- presets, views, Table 4 switches ---------------------------------------------------------------
def test_presets_and_required_views():
    assert MMSS.PRESET_NAMES[0] == "paper" and "glove" in MMSS.PRESET_NAMES
    paper, glove = MMSS.preset("paper"), MMSS.preset("glove")
    assert paper["model_cfg"]["text_features"] == "bert" and paper["model_cfg"]["text_encoder_lr"] == 5e-5
    assert paper["train"]["lr"] == 1e-4 and paper["train"]["batch_products"] == 32
    assert paper["train"]["margin"] == "fixed" and paper["train"]["fixed_margin"] == 1.0  # A.2
    # Eq. 13 hinge per sample (mean over positives), on the footing of Eq. 14's per-sample L_s
    assert paper["train"]["ranking_reduction"] == glove["train"]["ranking_reduction"] == "mean"
    assert MMSS.required_views(paper["model_cfg"]) == {"tokens", "rois", "bert"}
    assert MMSS.required_views(glove["model_cfg"]) == {"tokens", "rois"}
    assert MMSS.required_views({}) == {"tokens", "rois"}
    with pytest.raises(ConfigError, match="paper, glove"):
        MMSS.preset("code")
    from models.config import train_config

    for name in MMSS.PRESET_NAMES:  # every override is a TrainConfig field, every model_cfg builds
        p = MMSS.preset(name, category="home")
        assert train_config({"model": "mmss", **p["train"], "model_cfg": p["model_cfg"]}).min_gap == 1.0
        MMSS.from_config({**p["model_cfg"], "vocab_size": 5, "embed_dim": 4, "roi_dim": 8})


def test_table4_subtask_switches():
    model = _model(subtasks=["ptrt", "pvrv", "ptrv", "pvrt"])  # -w/o intra-review-rtrv
    assert set(model.sub_mlp) == {"ptrt", "pvrv", "ptrv", "pvrt"} and model.log_var.shape == (4,)
    assert "rtrv" in model.interactions  # f_rtrv still enters F_c (Sec. 5.3: removed from 4.4 only)
    out = model(make_batch())
    assert out.aux_losses["subtasks"].shape == ()
    d = _model(subtasks=[])  # -w/o module(d)
    assert d(make_batch()).aux_losses == {} and not hasattr(d, "log_var")
    with pytest.raises(ConfigError, match="rvrt"):
        _model(subtasks=["rvrt"])


def test_reported_numbers_and_every_table4_row_has_a_switch():
    from pathlib import Path

    import yaml

    doc = yaml.safe_load((Path(__file__).parents[2] / "models/reported/mmss.yaml").read_text())
    assert doc["model"] == "mmss"
    rows = {(r["table"], r["dataset"], r["category"], r["setting"]): r for r in doc["results"]}
    assert rows[("Table 2", "amazon", "home", "")]["MAP"] == 65.3  # Table 2, H&K, MM-SS
    assert rows[("Table 1", "lazada", "electronics", "")]["NDCG@5"] == 77.7
    assert rows[("Table 4", "amazon", "clothing", "w/o module(b)")]["MAP"] == 63.97
    settings = {r["setting"] for r in doc["results"] if r["table"] == "Table 4"}
    assert len(settings) == 8 and settings == set(TABLE4_SWITCHES)
    for switch in TABLE4_SWITCHES.values():
        _model(**switch)(make_batch())  # each row builds and runs


def test_table4_without_module_b_concatenates_item_features():
    with pytest.raises(ConfigError, match="subtasks"):
        _model(interaction_module=False)
    model = _model(interaction_module=False, subtasks=[])
    assert not hasattr(model, "interactions")
    out = model(make_batch())
    assert out.scores.shape == (8,) and out.aux_losses == {}
    out.scores.sum().backward()
    assert model.flat_mlp[0].weight.grad is not None


# --- BERT-feature path and lr groups ------------------------------------------------------------------
def _with_text_feats(batch, H=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch.prod_text_feats = torch.randn(batch.num_products, 7, H, generator=g)
    batch.prod_text_feat_mask = torch.arange(7)[None, :] < torch.tensor([[7], [3]])
    batch.rev_text_feats = torch.randn(batch.num_reviews, 5, H, generator=g)
    batch.rev_text_feat_mask = torch.arange(5)[None, :] < torch.randint(1, 6, (batch.num_reviews, 1), generator=g)
    return batch


def test_bert_features_are_projected_and_trained():
    model = _model(text_features="bert", text_feat_dim=12, text_encoder_lr=5e-5)
    assert not hasattr(model, "emb_p")
    batch = _with_text_feats(make_batch())
    out = model(batch)
    assert torch.isfinite(out.scores).all()
    (out.scores.sum() + out.aux_losses["subtasks"]).backward()
    assert model.text_proj.weight.grad is not None and model.text_proj.weight.grad.abs().sum() > 0
    groups = model.parameter_groups(1e-4)
    assert [g["lr"] for g in groups] == [1e-4, 5e-5]
    assert groups[1]["params"] == [model.text_proj.weight, model.text_proj.bias]
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_bert_path_refuses_a_word_table_setting_it_would_ignore_for_training_only(tmp_path):
    # the bert path builds no word tables, so finetune_embeddings: true would silently do nothing:
    # a training config refuses it; a run folder saved before that refusal still loads (the key
    # never had an effect on the bert path, so the saved model is the same)
    import yaml

    from models.config import train_config
    from models.trainer import run_config

    pair = {"text_features": "bert", "text_feat_dim": 12, "finetune_embeddings": True}
    with pytest.raises(ConfigError, match="finetune_embeddings: true trains the word-vector tables"):
        train_config({"model": "mmss", "model_cfg": pair})
    saved = {"model": "mmss", "preset": "paper", "model_cfg": {**TINY["mmss"], **pair}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved), encoding="utf-8")
    cfg = run_config(tmp_path)  # what evaluate / predict read (load_run)
    assert cfg.model_cfg["finetune_embeddings"] is True and cfg.model_cfg["text_features"] == "bert"
    torch.manual_seed(0)
    loaded = MMSS.from_config(cfg.model_cfg)  # builds; same parameters as without the key
    torch.manual_seed(0)
    plain = MMSS.from_config({**cfg.model_cfg, "finetune_embeddings": False})
    assert not hasattr(loaded, "emb_p")
    assert loaded.state_dict().keys() == plain.state_dict().keys()
    a, b = loaded.state_dict(), plain.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b if isinstance(b[k], torch.Tensor))
    glove = _model(finetune_embeddings=True)  # the glove path trains its tables
    assert glove.emb_p.weight.requires_grad and glove.emb_r.weight.requires_grad


def test_bert_path_without_features_or_with_another_width_stops():
    model = _model(text_features="bert", text_feat_dim=12)
    with pytest.raises(TrainingError, match="stage 'bert'"):
        model(make_batch())
    with pytest.raises(TrainingError, match="text_feat_dim"):
        model(_with_text_feats(make_batch(), H=16))


def test_trainer_builds_adam_with_the_models_parameter_groups_and_adds_eq16(tmp_path):
    from models.synthetic import make_synthetic, synthetic_train_config
    from models.trainer import Trainer

    data = make_synthetic(n_products=6, seed=0)
    cfg = synthetic_train_config("mmss", data, {"lr": 1e-3, "model_cfg": {
        "embed_dim": 16, "roi_dim": 32, "hidden": 8, "heads": 2, "text_encoder_lr": 5e-5}})
    t = Trainer(cfg, data.bundle, tmp_path / "run")
    assert [g["lr"] for g in t.optimizer.param_groups] == [1e-3, 5e-5]
    text = {id(p) for p in t.model.text_encoder_parameters()}
    assert {id(p) for p in t.optimizer.param_groups[1]["params"]} == text
    # Eq. 16, L = L_tar + L_sub with weight 1: the epoch's mean loss is the mean ranking loss plus
    # the mean `subtasks` aux loss; checked in epoch 2, where the pseudo labels have left y_g
    t._train_epoch()
    t.epoch += 1
    rec = t._train_epoch()
    sub = rec["aux"]["subtasks"]
    assert abs(sub) > 1e-4
    assert math.isclose(rec["train_loss"], rec["rank_loss"] + sub, rel_tol=1e-6, abs_tol=1e-7)


def test_learning_check_beats_length_and_random_on_held_out_products():
    learning_check("mmss")


@pytest.mark.slow
def test_trainer_resume_keeps_pseudo_labels_and_anchors_bit_identical(tmp_path):
    from models.runs import RunPaths, load_checkpoint
    from models.synthetic import make_synthetic, synthetic_train_config
    from models.trainer import train

    torch.set_num_threads(1)
    data = make_synthetic(n_products=6, seed=1)

    def cfg(epochs):
        return synthetic_train_config("mmss", data, {"epochs": epochs, "model_cfg": {
            "embed_dim": 16, "roi_dim": 32, "hidden": 8, "heads": 2, "dropout": 0.1}})

    train(cfg(3), data.bundle, tmp_path / "straight")
    train(cfg(2), data.bundle, tmp_path / "split")
    train(cfg(3), data.bundle, tmp_path / "split", resume=True)
    a = load_checkpoint(RunPaths(tmp_path / "straight").last)["model"]
    b = load_checkpoint(RunPaths(tmp_path / "split").last)["model"]
    assert a["_extra_state"]["epoch"] == b["_extra_state"]["epoch"] == 3
    assert torch.equal(a["_extra_state"]["pseudo_labels"], b["_extra_state"]["pseudo_labels"])
    for k in a:
        if k != "_extra_state":
            assert torch.equal(a[k], b[k]), k
    # epochs 2-3 moved the pseudo labels off the integer labels y_g (Eq. 12 at i > 1)
    v = a["_extra_state"]["pseudo_labels"]
    assert bool(a["anchor_ready"]) and float((v - v.round()).abs().max()) > 1e-3


def test_an_anchor_with_zero_weight_is_an_error_not_a_stale_anchor():
    model, batch = _model(), make_batch()
    model.on_epoch_start(0)
    model(batch)
    model.acc_w[3] = 0.0  # as if every sigmoid weight of subtask ptrv had underflowed
    with pytest.raises(TrainingError, match="Eq. 17"):
        model.on_epoch_start(1)
