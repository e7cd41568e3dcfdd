"""MCL: Multimodal Contrastive Learning for MRHP (Nguyen et al., EMNLP 2022), as its paper
(`../shared/papers/mcl.txt`, Eq. 1-35) writes it. Reads top to bottom like Sections 2-3:

  1. encoders (Sec. 2.2): K_p = LSTM_p(W_emb(T_p)), K_r = LSTM_r(W_emb(T_r)) (Eq. 2-3), a
     1-layer unidirectional LSTM of hidden size d = 128 over word vectors initialised from
     GloVe / fastText and trained with the model (Sec. 4.2); A = SelfAttn(ROIs) after a linear
     map 2048 -> d (Eq. 4);
  2. the multimodal interaction module (Sec. 2.3, Eq. 5-14): four streams gamma in
     {K_p, K_r, A_p, A_r}; each attends to eta = the concatenation of the other three encoder
     outputs; D = 5 layers of T = CM(LN(Q[i-1]), LN(X_eta)), U = T + Q[i-1],
     Q[i] = GELU(Linear(U)), Q[0] = X_gamma; X_eta stays the encoder outputs in every layer;
     H_p, V_p, H_r, V_r = Q[D] of the four streams (Eq. 13-14);
  3. fusion (Eq. 15-29): intra-modal SelfAttn([H_p, H_r]), SelfAttn([V_p, V_r]) ->
     CNN over their concatenation -> max-pool; inter-modal SelfAttn([H_p, V_r]),
     SelfAttn([V_p, H_r]) -> mean-pool; intra-review SelfAttn([H_p, V_p]), SelfAttn([H_r, V_r])
     -> mean-pool; z_final = [z_intraM, z_interM, z_intraR]; score = Linear(z_final);
  4. the adaptive cross-modal contrastive loss (Eq. 30-33) over max-pooled h_p, h_r, v_p, v_r
     of the helpful product-review pairs of the batch, returned as the aux loss `contrastive`;
     the trainer adds the ranking loss (Eq. 34, summed over the pairs under the `paper`
     preset: `ranking_reduction: sum`), giving Eq. 35.

Readings taken where the paper is silent or ambiguous (also in docs/fidelity.md, MCL section):
  * Products have several reviews, and eta of a product stream contains the review streams,
    so the product streams are computed once per review ("aligned to each review"): H_p and V_p
    are (R, L, d) tensors, one copy per review of the batch.
  * W_emb (Eq. 2-3): the store keeps separate product and review vocabularies (MCR's data
    format), so there are two tables, each initialised from the same word vectors; LSTM_p and
    LSTM_r are separate as the equations write them. The image encoders of Eq. 4 are separate
    for products and reviews too (A_p, A_r; the paper does not say whether they share weights).
  * CM (Eq. 5-8) is single-head scaled dot-product attention with bias-free W_Q, W_K, W_V and no
    output projection (`interaction_heads: 1`), with dropout (`dropout`) on its attention
    weights (paper silent); every CM, LN and Linear has its own parameters per stream and per
    layer; LN(X_eta) is one LayerNorm over the concatenated eta.
  * SelfAttn (Eq. 4, 15-16, 18-19, 23-24) is one post-norm Transformer encoder layer (Vaswani
    et al.): x = LN(x + MHA(x)); x = LN(x + FFN(x)), FFN width 4d, `heads` heads (4); each of
    the six fusion relations has its own SelfAttn.
  * "[., .]" concatenates along the token axis; real tokens are packed to the front so the CNN
    of Eq. 17 sees one contiguous sequence [H_intraM tokens, V_intraM tokens]. The CNN is one
    Conv1d(d, d, kernel 3, same padding) + ReLU; pools are masked (padding never counts).
  * Eq. 30-33: a "sample" is one helpful product-review pair of the batch: label >
    `helpful_threshold`, which defaults to the dataset's relevance threshold (the one MAP and
    NDCG use), handed to the model by the trainer through `set_dataset_threshold`. The
    pairs (t1, t2) are the 6 unordered pairs of distinct elements of {h_p, h_r, v_p, v_r}
    ("t1, t2 in {h_p, h_r, v_p, v_r}"; the paper calls all four "cross-modal features", the
    outputs of the cross-modal module, and Tables 7-8 credit the contrastive term with the
    intra-modal relations too, so the text-text and image-image pairs are kept, not only the
    four text-image pairs); sim is symmetric and the negative sum runs over j != k both ways,
    so ordered pairs would only double every term; the 6 losses are summed. For one pair type, samples whose t1 or
    t2 has no real token/ROI (a review without images) are left out of that pair's sum: a
    zero vector has no direction, and its cosine would be arbitrary. Two reviews of the same
    product are different samples, so (product side of review j, other side of review k) is a
    negative; with D = 0 the product streams of the two are identical, so in the 5 pair
    types with a product side such a negative equals a positive and the two terms pull
    against each other (kept as written).
  * Eq. 32-33 are sums, not means, exactly as written; the weights eps_p, eps_n are not
    detached (Theorem 1's derivation differentiates through them). Eq. 35 adds the
    contrastive sum to the ranking loss with weight 1 (`contrastive_weight`).
  * Theorem 1 holds where the brackets [.]_+ are inactive (sim_p <= o_p, sim_n >= o_n); its
    constant is C = B (o_p/2)^2 + B(B-1) (o_n/2)^2 (the appendix prints one term of each sum),
    and the appendix's Eq. 37 writes sim(t1_i, t2_i)^2 in the negative sum where
    sim(t1_j, t2_k)^2 is meant.
  * Table 7-8 distances: per sample, the mean over every pair of real tokens of the cosine
    distance (1 - cos) and the L2 distance between the two token sets of each relation,
    averaged over the two relations of the group, then mean and std over the samples with
    that label (`relation_distances`).

The public code (nguyentthong/adaptive_contrastive_mrhp) ships its model only as compiled
.pyc files; what its readable trainer and configs show is the `code` preset: one interaction
layer, the contrastive term on the samples with label >= 2 added with weight 1, 3 image
self-attention layers, MCR's weighted sampler with 7 negatives, the label-difference hinge
(AdaptiveRankHingeLoss), Adam at 1e-4 halved after 4 flat epochs, early stop after 8, and no
gradient clipping (`build_trainer` passes no `clip_norm`). Its configs set `batch_size` per
dataset and category (2 for four of the six, 4 for Lazada clothing, 8 for Amazon home, in
the framework's own units, not products); a preset only knows the category, so `code` takes
8, read as 8 products (override `batch_products` to match another config).
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.batch import Batch, ModelOutput
from models.layers import NEG_INF, MaskedMultiheadAttention, RNNEncoder, embedding_pair, masked_mean, with_embed_dim
from models.registry import register_model
from pipeline.config import from_mapping
from pipeline.errors import ConfigError, TrainingError


@dataclass(frozen=True)
class MCLConfig:
    vocab_size: int = 0  # rows of the random tables when no embedding matrix is given (tests)
    embed_dim: int = 300  # word-vector size (GloVe 6B 300d / fastText cc.id.300), Sec. 4.2
    finetune_embeddings: bool = True  # Sec. 4.2 "initialize our word embedding with": trained
    roi_dim: int = 2048  # ROI feature size, Sec. 4.2
    hidden: int = 128  # d, Sec. 4.2 (LSTM hidden 128, ROIs encoded into 128-d vectors)
    bidirectional: bool = False  # Eq. 2-3: an LSTM (not a BiLSTM)
    heads: int = 4  # heads of every SelfAttn (paper silent; the public config uses 4)
    roi_self_attention_layers: int = 1  # SelfAttn layers of Eq. 4 (paper: one; code: 3)
    interaction_layers: int = 5  # D (Sec. 4.2); 0 = "w/o cross-modal module" (Table 6)
    interaction_heads: int = 1  # heads of CM (Eq. 8 is single-head)
    cnn_kernel: int = 3  # kernel of the CNN of Eq. 17 (paper silent)
    dropout: float = 0.1  # inside SelfAttn / CM attention (paper silent)
    contrastive: bool = True  # False = "w/o contrastive objective" (Table 6)
    adaptive_weighting: bool = True  # Eq. 33; False = Eq. 32 ("w/o adaptive weighting", Table 6)
    contrastive_weight: float = 1.0  # weight of L_AdaptiveCE in Eq. 35 (1 as written)
    o_p: float = 2.0  # Sec. 3.1: o_p = 2
    o_n: float = 0.0  # Sec. 3.1: o_n = 0
    helpful_threshold: float | None = None  # helpful iff label > this; None = the dataset's
    helpful_min_label: float | None = None  # if set: helpful iff label >= this (code preset: 2)


STREAMS = ("kp", "kr", "ap", "ar")  # K_p, K_r, A_p, A_r; outputs H_p, H_r, V_p, V_r
CONTRASTIVE_PAIRS = tuple(itertools.combinations(("hp", "hr", "vp", "vr"), 2))  # Eq. 32-33
RELATIONS = {  # Tables 7-8: relation group -> its two token-set pairs
    "intra-modal": (("hp", "hr"), ("vp", "vr")),
    "inter-modal": (("hp", "vr"), ("vp", "hr")),
    "intra-review": (("hp", "vp"), ("hr", "vr")),
}


# ---------------------------------------------------------------------------------------------
# The contrastive loss (Eq. 32-33, Theorem 1)
# ---------------------------------------------------------------------------------------------
def cosine_matrix(t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    """sim[j, k] = cos(t1_j, t2_k) for t1 (B, d), t2 (B, d) -> (B, B), in float32 (float64
    inputs stay float64, e.g. for gradcheck)."""
    dtype = torch.promote_types(torch.promote_types(t1.dtype, t2.dtype), torch.float32)
    a, b = t1.to(dtype), t2.to(dtype)
    a = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    b = b / b.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    return a @ b.T


def adaptive_contrastive_loss(t1: torch.Tensor, t2: torch.Tensor, o_p: float = 2.0,
                              o_n: float = 0.0, adaptive: bool = True) -> torch.Tensor:
    """Eq. 33 (Eq. 32 when `adaptive=False`) for t1, t2 of shape (B, d), row i of each from
    sample i, sim = cosine similarity:

        L = - sum_i eps_p_i sim(t1_i, t2_i) + sum_{j != k} eps_n_jk sim(t1_j, t2_k),
        eps_p_i = [o_p - sim(t1_i, t2_i)]_+,  eps_n_jk = [sim(t1_j, t2_k) - o_n]_+

    (all eps = 1 for Eq. 32). A sum, not a mean; the weights are part of the graph (not
    detached), so the optimum of a positive term is sim = o_p / 2 (Theorem 1)."""
    if t1.ndim != 2 or t1.shape != t2.shape:
        raise ValueError(f"t1 and t2 must both be (B, d); got {tuple(t1.shape)} and {tuple(t2.shape)}")
    sim = cosine_matrix(t1, t2)  # (B, B)
    pos = sim.diagonal()  # (B,)
    off = ~torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)  # j != k
    if adaptive:
        eps_p = (o_p - pos).clamp(min=0)  # Eq. 33
        eps_n = (sim - o_n).clamp(min=0)
        return -(eps_p * pos).sum() + (eps_n * sim)[off].sum()
    return -pos.sum() + sim[off].sum()  # Eq. 32


def hyperspherical_form(t1: torch.Tensor, t2: torch.Tensor, o_p: float = 2.0,
                        o_n: float = 0.0) -> torch.Tensor:
    """Theorem 1's right-hand side without the constant: sum_i (sim_ii - o_p/2)^2 +
    sum_{j != k} (sim_jk - o_n/2)^2. Equals Eq. 33 + C, C = B (o_p/2)^2 + B(B-1) (o_n/2)^2,
    wherever the brackets of Eq. 33 are inactive (sim_ii <= o_p, sim_jk >= o_n)."""
    sim = cosine_matrix(t1, t2)
    off = ~torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    return ((sim.diagonal() - o_p / 2) ** 2).sum() + ((sim[off] - o_n / 2) ** 2).sum()


# ---------------------------------------------------------------------------------------------
# Small masked helpers
# ---------------------------------------------------------------------------------------------
def pack(parts: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[x_1, x_2, ...]: concatenation along the token axis, each x (B, L_i, H) with mask (B, L_i);
    real positions are moved to the front (stable, so their order is kept) -> (B, sum L_i, H)."""
    xs, ms = zip(*parts, strict=True)
    x, m = torch.cat(xs, dim=1), torch.cat(ms, dim=1)
    order = torch.argsort((~m).to(torch.int8), dim=1, stable=True)  # real first
    return x.gather(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1])), m.gather(1, order)


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max over the real positions of x (B, L, H) -> (B, H); zeros for rows without any."""
    filled = x.masked_fill(~mask.unsqueeze(-1), NEG_INF)
    out = filled.max(dim=1).values if x.shape[1] else x.new_zeros(x.shape[0], x.shape[2])
    return torch.where(mask.any(1, keepdim=True), out, torch.zeros_like(out))


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor,
                     dropout: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(d_k)) v over the keys where key_mask (B, Lk) is True, dropout on the
    weights when `dropout` > 0; q (B, h, Lq, dk), k, v (B, h, Lk, dk) -> (B, h, Lq, dk). Rows of
    key_mask without a True attend to nothing and give zeros. The same values as
    masked_softmax(q k^T / sqrt(d_k)) @ v (tests/models/test_mcl.py pins it), through
    F.scaled_dot_product_attention. Where PyTorch has a fused kernel for the case (CPU without
    dropout: eval, predict, distances; CUDA's memory-efficient kernel, with dropout too) the
    (Lq, Lk) weights are not materialised or kept for backward; CPU training with dropout runs
    its math path, as costly as the written formula (docs/benchmarks.md, MCL review)."""
    has = key_mask.any(-1)  # (B,)
    mask = (key_mask | ~has.unsqueeze(-1))[:, None, None, :]  # an all-False row would give NaN
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    return out * has[:, None, None, None].to(out.dtype)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------
class FusedMultiheadAttention(MaskedMultiheadAttention):
    """MaskedMultiheadAttention (same parameters, names and initialisation) computed with
    `masked_attention`; the selective-attention `pair_weights` of SANCL are not supported."""

    def forward(self, q: torch.Tensor, kv: torch.Tensor, kv_mask: torch.Tensor) -> torch.Tensor:
        B, Lq, H = q.shape
        Lk, h = kv.shape[1], self.heads
        Q = self.q(q).view(B, Lq, h, H // h).transpose(1, 2)  # (B, h, Lq, d)
        K = self.k(kv).view(B, Lk, h, H // h).transpose(1, 2)  # (B, h, Lk, d)
        V = self.v(kv).view(B, Lk, h, H // h).transpose(1, 2)  # (B, h, Lk, d)
        out = masked_attention(Q, K, V, kv_mask, self.drop.p if self.training else 0.0)
        return self.o(out.transpose(1, 2).reshape(B, Lq, H))


class SelfAttn(nn.Module):
    """SelfAttn (Vaswani et al.): x = LN(x + MHA(x, x)); x = LN(x + FFN(x)) over the real
    positions of `mask`; padded positions come out as zeros."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.att = FusedMultiheadAttention(dim, heads, dropout)
        self.ln1 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Dropout(dropout),
                                nn.Linear(4 * dim, dim))
        self.ln2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.drop(self.att(x, x, mask)))
        x = self.ln2(x + self.drop(self.ff(x)))
        return x * mask.unsqueeze(-1).to(x.dtype)


class ImageEncoder(nn.Module):
    """Eq. 4: A = SelfAttn({a_1..a_m}) after a linear map of the 2048-d ROI features to d."""

    def __init__(self, *, roi_dim: int, hidden: int, heads: int, layers: int, dropout: float):
        super().__init__()
        self.proj = nn.Linear(roi_dim, hidden)
        self.blocks = nn.ModuleList(SelfAttn(hidden, heads, dropout) for _ in range(layers))

    def forward(self, rois: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.proj(rois) * mask.unsqueeze(-1).to(rois.dtype)  # (B, m, d)
        for blk in self.blocks:
            x = blk(x, mask)
        return x


class CrossModalAttention(nn.Module):
    """CM_gamma(X_gamma, X_eta) = softmax(Q K^T / sqrt(d_k)) V with Q = X_gamma W_Q,
    K = X_eta W_K, V = X_eta W_V (Eq. 5-8); bias-free, no output projection. With h heads the
    d columns are split into h groups (d_k = d / h); h = 1 is Eq. 8 as printed."""

    def __init__(self, dim: int, heads: int = 1, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"model.mcl: hidden {dim} is not divisible by interaction_heads {heads}")
        self.heads = heads
        self.w_q = nn.Linear(dim, dim, bias=False)  # Eq. 5
        self.w_k = nn.Linear(dim, dim, bias=False)  # Eq. 6
        self.w_v = nn.Linear(dim, dim, bias=False)  # Eq. 7
        self.drop = nn.Dropout(dropout)

    def forward(self, x_gamma: torch.Tensor, x_eta: torch.Tensor, eta_mask: torch.Tensor) -> torch.Tensor:
        B, Lq, d = x_gamma.shape
        Lk, h = x_eta.shape[1], self.heads
        q = self.w_q(x_gamma).view(B, Lq, h, d // h).transpose(1, 2)  # (B, h, Lq, dk)
        k = self.w_k(x_eta).view(B, Lk, h, d // h).transpose(1, 2)  # (B, h, Lk, dk)
        v = self.w_v(x_eta).view(B, Lk, h, d // h).transpose(1, 2)  # (B, h, Lk, dk)
        z = masked_attention(q, k, v, eta_mask, self.drop.p if self.training else 0.0)  # Eq. 8
        return z.transpose(1, 2).reshape(B, Lq, d)  # (B, Lq, d)


class InteractionLayer(nn.Module):
    """Layer i of one stream: T = CM(LN(Q[i-1]), LN(X_eta)) (Eq. 10), U = T + Q[i-1]
    (Eq. 11), Q[i] = GELU(Linear(U)) (Eq. 12); padded positions of the stream stay zero."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.ln_q = nn.LayerNorm(dim)
        self.ln_eta = nn.LayerNorm(dim)
        self.cm = CrossModalAttention(dim, heads, dropout)
        self.linear = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, q_mask: torch.Tensor, x_eta: torch.Tensor,
                eta_mask: torch.Tensor) -> torch.Tensor:
        t = self.cm(self.ln_q(q), self.ln_eta(x_eta), eta_mask)  # Eq. 10
        u = t + q  # Eq. 11
        return F.gelu(self.linear(u)) * q_mask.unsqueeze(-1).to(u.dtype)  # Eq. 12


class InteractionModule(nn.Module):
    """Eq. 9-14: D layers per stream gamma in (K_p, K_r, A_p, A_r); eta = concatenation of the
    other three encoder outputs, fixed across layers; Q[0] = X_gamma; outputs Q[D]."""

    def __init__(self, *, hidden: int, heads: int, layers: int, dropout: float):
        super().__init__()
        self.streams = nn.ModuleDict({s: nn.ModuleList(InteractionLayer(hidden, heads, dropout)
                                                       for _ in range(layers)) for s in STREAMS})

    def forward(self, x: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        out = {}
        for gamma in STREAMS:
            x_eta, eta_mask = pack(x[s] for s in STREAMS if s != gamma)  # eta = [others]
            q, q_mask = x[gamma]  # Eq. 9
            for layer in self.streams[gamma]:
                q = layer(q, q_mask, x_eta, eta_mask)  # Eq. 10-12, X_eta unchanged
            out[gamma] = q  # Eq. 13-14
        return out


class Fusion(nn.Module):
    """Eq. 15-28: the intra-modal, inter-modal and intra-review paths -> z_final (R, 5d)."""

    def __init__(self, *, hidden: int, heads: int, dropout: float, cnn_kernel: int):
        super().__init__()
        if cnn_kernel < 1 or cnn_kernel % 2 == 0:
            raise ConfigError(f"model.mcl.cnn_kernel: expected an odd positive size, got {cnn_kernel}")
        sa = lambda: SelfAttn(hidden, heads, dropout)  # noqa: E731
        self.sa = nn.ModuleDict({
            "hp_hr": sa(), "vp_vr": sa(),  # Eq. 15-16
            "hp_vr": sa(), "vp_hr": sa(),  # Eq. 18-19
            "hp_vp": sa(), "hr_vr": sa(),  # Eq. 23-24
        })
        self.cnn = nn.Conv1d(hidden, hidden, cnn_kernel, padding=cnn_kernel // 2)  # Eq. 17

    def forward(self, f: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        def attend(a: str, b: str) -> tuple[torch.Tensor, torch.Tensor]:
            x, m = pack([f[a], f[b]])
            return self.sa[f"{a}_{b}"](x, m), m

        # intra-modal, Eq. 15-17
        s, m = pack([attend("hp", "hr"), attend("vp", "vr")])  # [H_intraM, V_intraM]
        c = torch.relu(self.cnn(s.transpose(1, 2))).transpose(1, 2)  # (R, L, d)
        z_intra_m = masked_max(c, m)
        # inter-modal, Eq. 18-22; intra-review, Eq. 23-27
        pooled = {k: masked_mean(*attend(*k.split("_"))) for k in ("hp_vr", "vp_hr", "hp_vp", "hr_vr")}
        return {"intra_modal": z_intra_m, **pooled}


@register_model("mcl")
class MCL(nn.Module):
    """MCL for multimodal review helpfulness prediction; see the module docstring."""

    PRESET_NAMES: tuple[str, ...] = ("paper", "code", "no-adaptive-weighting", "no-contrastive",
                                     "no-cross-modal")
    # Table 6 rows: each is the paper preset with one switch changed.
    ABLATIONS: dict[str, dict[str, Any]] = {
        "no-adaptive-weighting": {"adaptive_weighting": False},  # Eq. 32 instead of Eq. 33
        "no-contrastive": {"contrastive": False},  # L = L_ranking
        "no-cross-modal": {"interaction_layers": 0},  # H_p, V_p, H_r, V_r = encoder outputs
    }

    def __init__(self, *, config: MCLConfig, embeddings: Mapping[str, np.ndarray] | None = None):
        super().__init__()
        c = self.config = config
        _check(c)
        self.dataset_threshold: float | None = None
        self.emb_p, self.emb_r = embedding_pair(embeddings, vocab_size=c.vocab_size,
                                                dim=c.embed_dim, finetune=c.finetune_embeddings)
        # Eq. 2-3
        self.text_p = RNNEncoder(kind="lstm", input_dim=c.embed_dim, hidden=c.hidden,
                                 bidirectional=c.bidirectional)
        self.text_r = RNNEncoder(kind="lstm", input_dim=c.embed_dim, hidden=c.hidden,
                                 bidirectional=c.bidirectional)
        # Eq. 4
        img = dict(roi_dim=c.roi_dim, hidden=c.hidden, heads=c.heads,
                   layers=c.roi_self_attention_layers, dropout=c.dropout)
        self.img_p, self.img_r = ImageEncoder(**img), ImageEncoder(**img)
        # Eq. 5-14
        self.interaction = InteractionModule(hidden=c.hidden, heads=c.interaction_heads,
                                             layers=c.interaction_layers, dropout=c.dropout)
        # Eq. 15-28
        self.fusion = Fusion(hidden=c.hidden, heads=c.heads, dropout=c.dropout, cnn_kernel=c.cnn_kernel)
        self.scorer = nn.Linear(5 * c.hidden, 1)  # Eq. 29

    # ---- contracts ----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Mapping, embeddings: Mapping[str, np.ndarray] | None = None) -> MCL:
        cfg = with_embed_dim(cfg, embeddings)  # embed_dim defaults to the matrices' width
        return cls(config=from_mapping(MCLConfig, cfg, "model.mcl"), embeddings=embeddings)

    @classmethod
    def preset(cls, name: str, *, category: str | None = None) -> dict:
        """{"model_cfg": ..., "train": ...} of a named preset (see PRESET_NAMES). `paper`: the
        equations (MCLConfig defaults) and Sec. 4.2's protocol: batch size 32 (read as 32
        products per batch), hinge margin 1 (Eq. 34 with beta = 1) summed over the pairs as
        Eq. 34 prints it (like the sums of Eq. 32-33, so Eq. 35 weighs them as written),
        negatives any review with a lower label drawn uniformly ("random reviews"); what the
        paper does not give stays at the TrainConfig defaults (lr 1e-4, grad_clip 5, ...;
        docs/fidelity.md, MCL protocol row). `code`: the public release's readable trainer and
        configs, with the shipped hinge averaged over instances (REFERENCE.md section 4; the
        trainer's default) and no gradient clipping (its trainer is built without `clip_norm`).
        The three ablation presets
        are Table 6's rows. `category` is accepted for the shared contract; MCL's presets are the
        same for every category."""
        paper_train = {"batch_products": 32, "margin": "fixed", "fixed_margin": 1.0,
                       "negative_weights": "none", "min_gap": 1.0, "ranking_reduction": "sum"}
        # every model field spelled out (so a run's saved config shows them), except the sizes
        # that come from the data: vocab_size and embed_dim (the word vectors' width)
        paper = {f.name: getattr(MCLConfig(), f.name) for f in dataclasses.fields(MCLConfig)
                 if f.name not in ("vocab_size", "embed_dim")}
        if name == "paper":
            return {"model_cfg": paper, "train": dict(paper_train)}
        if name == "code":
            return {"model_cfg": {**paper, "interaction_layers": 1, "helpful_min_label": 2.0,
                                  "roi_self_attention_layers": 3},
                    "train": {"batch_products": 8, "num_negatives": 7, "negative_weights": "sampling",
                              "margin": "label", "min_gap": 2.0, "lr": 1e-4, "lr_patience": 4,
                              "patience": 8, "grad_clip": None}}
        if name in cls.ABLATIONS:
            return {"model_cfg": {**paper, **copy.deepcopy(cls.ABLATIONS[name])}, "train": dict(paper_train)}
        raise ConfigError(f"model mcl: unknown preset {name!r}; valid: {', '.join(cls.PRESET_NAMES)}")

    @classmethod
    def required_views(cls, model_cfg: Mapping) -> frozenset[str]:
        """MCL reads text and ROI features of products and reviews (Eq. 2-4), in every setting."""
        return frozenset({"tokens", "rois"})

    def set_dataset_threshold(self, threshold: float) -> None:
        """Trainer hook: the dataset's relevance threshold; a review is in a helpful pair
        (Eq. 30-31) when its label exceeds it, unless `helpful_threshold` or
        `helpful_min_label` in the model config says otherwise."""
        self.dataset_threshold = float(threshold)

    def check_training_labels(self, labels: Iterable[float]) -> None:
        """Trainer hook, called once before training with the label of every training review:
        Eq. 30-33 compare helpful pairs, so a helpfulness rule that fewer than 2 training
        reviews meet would train the ranking loss alone under a config that says otherwise;
        that stops here with a one-line TrainingError. No labels given: nothing to check."""
        c = self.config
        y = torch.tensor([float(v) for v in labels], dtype=torch.float32)
        if not (c.contrastive and c.contrastive_weight > 0) or y.numel() == 0:
            return
        n = int(self.helpful(y).sum())
        if n < 2:
            rule = (f"label >= {c.helpful_min_label:g}" if c.helpful_min_label is not None else
                    f"label > {c.helpful_threshold if c.helpful_threshold is not None else self.dataset_threshold:g}")
            raise TrainingError(
                f"model mcl: {n} of {y.numel()} training reviews are helpful ({rule}); the contrastive "
                f"loss (Eq. 30-33) needs at least 2; lower model_cfg.helpful_threshold / "
                f"helpful_min_label or set contrastive: false"
            )

    # ---- forward ------------------------------------------------------------------------------
    def encode(self, batch: Batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """H_p, H_r, V_p, V_r (Eq. 13-14) with their masks, one row per review:
        {"hp": (R, Lp, d), (R, Lp)), "hr": ..., "vp": ..., "vr": ...}."""
        idx = batch.rev_product
        k_p = self.text_p(self.emb_p(batch.prod_tokens), batch.prod_token_mask)  # Eq. 2
        k_r = self.text_r(self.emb_r(batch.rev_tokens), batch.rev_token_mask)  # Eq. 3
        a_p = self.img_p(batch.prod_rois, batch.prod_roi_mask)  # Eq. 4
        a_r = self.img_r(batch.rev_rois, batch.rev_roi_mask)
        x = {"kp": (k_p[idx], batch.prod_token_mask[idx]), "kr": (k_r, batch.rev_token_mask),
             "ap": (a_p[idx], batch.prod_roi_mask[idx]), "ar": (a_r, batch.rev_roi_mask)}
        q = self.interaction(x)  # Eq. 9-14 (identity when D = 0)
        return {"hp": (q["kp"], x["kp"][1]), "hr": (q["kr"], x["kr"][1]),
                "vp": (q["ap"], x["ap"][1]), "vr": (q["ar"], x["ar"][1])}

    def forward(self, batch: Batch) -> ModelOutput:
        f = self.encode(batch)
        z = self.fusion(f)
        z_final = torch.cat([z["intra_modal"], z["hp_vr"], z["vp_hr"], z["hp_vp"], z["hr_vr"]],
                            dim=-1)  # Eq. 28: [z_intraM, z_interM, z_intraR], (R, 5d)
        scores = self.scorer(z_final).squeeze(-1)  # Eq. 29
        aux: dict[str, torch.Tensor] = {}
        c = self.config
        if self.training and c.contrastive and c.contrastive_weight > 0:
            aux["contrastive"] = c.contrastive_weight * self.contrastive_loss(batch, f)
        return ModelOutput(scores=scores, aux_losses=aux)

    def helpful(self, labels: torch.Tensor) -> torch.Tensor:
        """(R,) bool: the reviews whose product-review pair is helpful (Eq. 30-31 input)."""
        c = self.config
        if c.helpful_min_label is not None:
            return labels >= c.helpful_min_label
        thr = c.helpful_threshold if c.helpful_threshold is not None else self.dataset_threshold
        if thr is None:
            raise TrainingError(
                "model mcl: the contrastive loss needs the helpfulness threshold; train through the "
                "trainer (it passes the dataset's) or set model_cfg.helpful_threshold"
            )
        return labels > thr

    def contrastive_loss(self, batch: Batch, f: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """L_AdaptiveCE (Eq. 33, or Eq. 32 without adaptive weighting) summed over the 6 pairs
        of {h_p, h_r, v_p, v_r}, max-pooled (Eq. 30-31) over the helpful pairs of the batch."""
        c = self.config
        keep = self.helpful(batch.labels)  # (R,)
        pooled = {k: masked_max(x, m) for k, (x, m) in f.items()}  # Eq. 30-31, (R, d)
        has = {k: m.any(1) for k, (_, m) in f.items()}  # (R,) the sample has this modality
        total = sum(x.sum() for x in pooled.values()) * 0.0  # a zero carrying the graph
        for a, b in CONTRASTIVE_PAIRS:
            rows = keep & has[a] & has[b]
            if rows.any():
                total = total + adaptive_contrastive_loss(pooled[a][rows], pooled[b][rows], o_p=c.o_p,
                                                          o_n=c.o_n, adaptive=c.adaptive_weighting)
        return total


def _check(c: MCLConfig) -> None:
    if c.hidden < 1 or c.heads < 1 or c.interaction_heads < 1:
        raise ConfigError("model.mcl: hidden, heads and interaction_heads must be positive")
    if c.interaction_layers < 0 or c.roi_self_attention_layers < 0:
        raise ConfigError("model.mcl: interaction_layers and roi_self_attention_layers must be >= 0")
    if not 0.0 <= c.dropout < 1.0:
        raise ConfigError(f"model.mcl.dropout: expected a probability in [0, 1), got {c.dropout}")
    if c.contrastive_weight < 0:
        raise ConfigError(f"model.mcl.contrastive_weight: expected >= 0, got {c.contrastive_weight}")
    if c.helpful_threshold is not None and c.helpful_min_label is not None:
        raise ConfigError("model.mcl: set helpful_threshold or helpful_min_label, not both")
    if c.contrastive and c.contrastive_weight == 0:
        raise ConfigError("model.mcl.contrastive_weight: 0 with contrastive: true would train without "
                          "Eq. 33 while the config says it has it; set contrastive: false (Table 6 "
                          "'w/o contrastive objective') or a positive weight")
    if c.contrastive and c.adaptive_weighting and c.o_p <= -1:
        raise ConfigError(f"model.mcl.o_p: expected > -1, got {c.o_p}: cosine similarity is >= -1, so "
                          "eps_p = [o_p - sim]_+ would be 0 for every positive pair (Eq. 33)")
    if c.contrastive and c.adaptive_weighting and c.o_n >= 1:
        raise ConfigError(f"model.mcl.o_n: expected < 1, got {c.o_n}: cosine similarity is <= 1, so "
                          "eps_n = [sim - o_n]_+ would be 0 for every negative pair (Eq. 33)")


# ---------------------------------------------------------------------------------------------
# Tables 7-8: intra-modal, inter-modal and intra-review distances
# ---------------------------------------------------------------------------------------------
def _pair_distances(a: torch.Tensor, am: torch.Tensor, b: torch.Tensor, bm: torch.Tensor):
    """Per row: mean over all (real a token, real b token) pairs of the cosine distance
    1 - cos and of the L2 distance; rows where either side is empty are marked invalid."""
    an = a.float() / a.float().norm(dim=-1, keepdim=True).clamp(min=1e-8)
    bn = b.float() / b.float().norm(dim=-1, keepdim=True).clamp(min=1e-8)
    pair = (am.unsqueeze(2) & bm.unsqueeze(1)).float()  # (R, La, Lb)
    n = pair.sum((1, 2))
    cs = ((1.0 - an @ bn.transpose(1, 2)) * pair).sum((1, 2)) / n.clamp(min=1)
    l2 = (torch.cdist(a.float(), b.float()) * pair).sum((1, 2)) / n.clamp(min=1)
    return cs, l2, n > 0


@torch.no_grad()
def relation_distances(model: MCL, batches: Iterable[Batch], *, labels: Iterable[float] = (1.0, 4.0),
                       device: torch.device | str = "cpu") -> dict[float, dict[str, dict[str, float]]]:
    """Tables 7-8 over `batches`: for each label, each relation group ("intra-modal",
    "inter-modal", "intra-review") the mean and std over the reviews with that label of the
    cosine distance ("CS") and the L2 distance ("L2") between the token sets of H_p, H_r, V_p,
    V_r (the interaction module's outputs); a sample's value is the mean over the group's two
    relations of the mean over every pair of real tokens. Also `n`, the samples counted.
    Returns {label: {group: {"CS": m, "CS_std": s, "L2": m, "L2_std": s, "n": k}}}."""
    if not isinstance(model, MCL):
        raise ConfigError(f"distances: the analysis reads MCL's interaction outputs; got {type(model).__name__}")
    labels = [float(x) for x in labels]
    model.eval()
    acc: dict[float, dict[str, dict[str, list[float]]]] = {
        y: {g: {"CS": [], "L2": []} for g in RELATIONS} for y in labels}
    for batch in batches:
        b = batch.to(device)
        f = model.encode(b)
        for g, pairs in RELATIONS.items():
            parts = [_pair_distances(*f[x], *f[y]) for x, y in pairs]
            ok = parts[0][2] & parts[1][2]  # the sample has all four token sets
            cs = (parts[0][0] + parts[1][0]) / 2
            l2 = (parts[0][1] + parts[1][1]) / 2
            for y in labels:
                sel = ok & (b.labels == y)
                acc[y][g]["CS"].extend(cs[sel].cpu().tolist())
                acc[y][g]["L2"].extend(l2[sel].cpu().tolist())
    out: dict[float, dict[str, dict[str, float]]] = {}
    for y in labels:
        out[y] = {}
        for g in RELATIONS:
            cs, l2 = np.asarray(acc[y][g]["CS"]), np.asarray(acc[y][g]["L2"])
            out[y][g] = {"CS": float(cs.mean()) if cs.size else float("nan"),
                         "CS_std": float(cs.std()) if cs.size else float("nan"),
                         "L2": float(l2.mean()) if l2.size else float("nan"),
                         "L2_std": float(l2.std()) if l2.size else float("nan"),
                         "n": int(cs.size)}
    return out
