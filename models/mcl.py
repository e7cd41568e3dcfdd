"""MCL: Adaptive Contrastive Learning on Multimodal Transformer (Nguyen et al., EMNLP 2022).

Reads top to bottom like the paper:
  1. encoders: LSTM over the frozen word vectors for product and review text, a linear
     projection plus self-attention over ROI features for their images (before Eq. 5);
  2. the multimodal interaction module: D stacked cross-modal attention blocks in which each
     item's text attends to its images and its images to its text (Eq. 5-14, D = 5);
  3. fusion: intra-modal (product text x review text, product images x review images),
     inter-modal (product text x review images, product images x review text) and
     intra-review (review text x review images), each a cross-attention pooled to a vector,
     concatenated and scored by an MLP (Eq. 15-28);
  4. the adaptive cross-modal contrastive loss over review text/image pairs across the batch
     (Eq. 32-33, o_p = 2, o_n = 0), returned as the aux loss `contrastive`; the trainer adds
     the ranking loss.

The adaptive loss, for a pair similarity s (cosine of the projected, L2-normalised vectors):
  alpha_p = [o_p - s_p]_+,  alpha_n = [s_n - o_n]_+            (weights, not differentiated)
  L = -1/N sum_i log( e^{gamma alpha_p s_ii} / (e^{gamma alpha_p s_ii} + sum_{j!=i} e^{gamma alpha_n s_ij}) )
The hyperspherical form (the paper's appendix) writes the same loss through squared distances
on the unit sphere, s = 1 - |u - v|^2 / 2; `adaptive_contrastive_loss_hyperspherical` computes
it that way and the tests pin that both agree with hand-computed values.

The public code differs: one interaction layer and a circle-loss style contrastive term on the
reviews with label >= 2. Set `interaction_layers: 1, contrastive: circle` for that variant.
Hidden sizes are not in the project's summary of the paper; 128 is assumed. Equation numbers
are the ranges the summary pins (encoders before Eq. 5, interaction 5-14, fusion 15-28, loss
32-33); the paper's own text was not available offline, so the split inside a range, the
projection heads feeding the contrastive loss and the placement of gamma are this reading of it.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn

from models.batch import Batch, ModelOutput
from models.layers import (CrossModalBlock, MaskedMultiheadAttention, ROIEncoder, RNNEncoder,
                           SoftPooling, embedding_pair, l2_normalize, masked_mean, with_embed_dim)
from models.registry import register_model
from pipeline.config import from_mapping


@dataclass(frozen=True)
class MCLConfig:
    vocab_size: int = 0  # rows of the random tables when no embedding matrix is given (tests)
    embed_dim: int = 300  # word-vector size (GloVe 6B 300d / fastText cc.id.300)
    finetune_embeddings: bool = False  # True trains the tables, as MCR does; frozen by default
    roi_dim: int = 2048  # bottom-up-attention ROI feature size
    hidden: int = 128  # size of every hidden representation (assumed, see module docstring)
    heads: int = 4  # attention heads in every attention layer
    roi_self_attention_layers: int = 1  # self-attention layers over the projected ROI features
    interaction_layers: int = 5  # D, stacked cross-modal attention blocks (Eq. 5-14); code: 1
    dropout: float = 0.1  # dropout inside attention and feed-forward layers
    contrastive: Literal["adaptive", "circle", "none"] = "adaptive"  # Eq. 32-33 / public code
    contrastive_weight: float = 1.0  # lambda, weight of the contrastive term beside ranking
    o_p: float = 2.0  # optimum of positive similarities in the adaptive weights (Eq. 32)
    o_n: float = 0.0  # optimum of negative similarities in the adaptive weights (Eq. 32)
    gamma: float = 1.0  # scale of the similarities inside the exponentials (Eq. 33)
    circle_margin: float = 0.25  # m of the circle-loss variant (public code)
    circle_gamma: float = 32.0  # scale of the circle-loss variant (public code)
    circle_min_label: float = 2.0  # the circle variant uses reviews with label >= this


# ---------------------------------------------------------------------------------------------
# The contrastive losses (Eq. 32-33 and the public code's variant)
# ---------------------------------------------------------------------------------------------
def adaptive_contrastive_loss(sim: torch.Tensor, *, o_p: float = 2.0, o_n: float = 0.0,
                              gamma: float = 1.0) -> torch.Tensor:
    """Adaptive cross-modal contrastive loss over a square similarity matrix `sim` (N, N):
    sim[i, i] are the positive pairs, sim[i, j != i] the negatives of row i. Returns a scalar;
    zero when N < 2 (no negative to contrast with)."""
    N = sim.shape[0]
    if N < 2:
        return sim.sum() * 0.0
    eye = torch.eye(N, dtype=torch.bool, device=sim.device)
    s_p = sim.diagonal()  # (N,)
    alpha_p = (o_p - s_p).clamp(min=0).detach()  # Eq. (32)
    alpha_n = (sim - o_n).clamp(min=0).detach()  # Eq. (32)  (N, N)
    logits = gamma * torch.where(eye, alpha_p.unsqueeze(1) * sim, alpha_n * sim)  # (N, N)
    return -(torch.log_softmax(logits, dim=1).diagonal()).mean()  # Eq. (33)


def adaptive_contrastive_loss_hyperspherical(u: torch.Tensor, v: torch.Tensor, *, o_p: float = 2.0,
                                             o_n: float = 0.0, gamma: float = 1.0) -> torch.Tensor:
    """The same loss written on the unit hypersphere: for unit vectors s = 1 - |u - v|^2 / 2, so
    positives are pulled to distance 0 and negatives pushed apart with weights from distances.
    u, v (N, H) are normalised here; row i of u and row i of v are the positive pair."""
    u, v = l2_normalize(u), l2_normalize(v)
    d2 = torch.cdist(u, v).pow(2)  # (N, N) squared distances on the sphere
    return adaptive_contrastive_loss(1.0 - d2 / 2.0, o_p=o_p, o_n=o_n, gamma=gamma)


def circle_contrastive_loss(sim: torch.Tensor, *, margin: float = 0.25,
                            gamma: float = 32.0) -> torch.Tensor:
    """Circle-loss style contrastive term (public code's variant), positives on the diagonal:
    L = log(1 + sum_n e^{gamma a_n (s_n - m)} * sum_p e^{-gamma a_p (s_p - 1 + m)}), averaged over rows,
    with a_p = [1 + m - s_p]_+ and a_n = [s_n + m]_+."""
    N = sim.shape[0]
    if N < 2:
        return sim.sum() * 0.0
    eye = torch.eye(N, dtype=torch.bool, device=sim.device)
    s_p = sim.diagonal()  # (N,)
    a_p = (1 + margin - s_p).clamp(min=0).detach()
    a_n = (sim + margin).clamp(min=0).detach()
    logit_p = -gamma * a_p * (s_p - (1 - margin))  # (N,)
    logit_n = (gamma * a_n * (sim - margin)).masked_fill(eye, -1e9)  # (N, N)
    return nn.functional.softplus(logit_p + torch.logsumexp(logit_n, dim=1)).mean()


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------
class InteractionModule(nn.Module):
    """D stacked cross-modal attention blocks between an item's text and its images
    (Eq. 5-14): each layer updates text from images and images from text."""

    def __init__(self, *, hidden: int, heads: int, layers: int, dropout: float):
        super().__init__()
        self.text_from_image = nn.ModuleList(CrossModalBlock(hidden, heads, dropout)
                                             for _ in range(layers))
        self.image_from_text = nn.ModuleList(CrossModalBlock(hidden, heads, dropout)
                                             for _ in range(layers))

    def forward(self, t, t_mask, v, v_mask):
        for t2v, v2t in zip(self.text_from_image, self.image_from_text):
            t, v = t2v(t, t_mask, v, v_mask), v2t(v, v_mask, t, t_mask)  # Eq. (5-14)
        return t, v


class FusionHead(nn.Module):
    """One fusion: `q` attends to `kv`, residual + layer norm, soft-pooled over q's tokens."""

    def __init__(self, *, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.att = MaskedMultiheadAttention(hidden, heads, dropout)
        self.ln = nn.LayerNorm(hidden)
        self.pool = SoftPooling(hidden)

    def forward(self, q, q_mask, kv, kv_mask):
        x = self.ln(q + self.att(q, kv, kv_mask))  # (R, Lq, H)
        return self.pool(x, q_mask)  # (R, H)


@register_model("mcl")
class MCL(nn.Module):
    """MCL for multimodal review helpfulness prediction; see the module docstring."""

    def __init__(self, *, config: MCLConfig, embeddings: Mapping[str, np.ndarray] | None = None):
        super().__init__()
        c = self.config = config
        self.emb_p, self.emb_r = embedding_pair(embeddings, vocab_size=c.vocab_size,
                                                dim=c.embed_dim, finetune=c.finetune_embeddings)
        # encoders (before Eq. 5): LSTM over text, projection + self-attention over ROIs
        self.text_p = RNNEncoder(kind="lstm", input_dim=c.embed_dim, hidden=c.hidden)
        self.text_r = RNNEncoder(kind="lstm", input_dim=c.embed_dim, hidden=c.hidden)
        self.img_p = ROIEncoder(roi_dim=c.roi_dim, hidden=c.hidden, heads=c.heads,
                                layers=c.roi_self_attention_layers, dropout=c.dropout)
        self.img_r = ROIEncoder(roi_dim=c.roi_dim, hidden=c.hidden, heads=c.heads,
                                layers=c.roi_self_attention_layers, dropout=c.dropout)
        # Eq. (5-14): multimodal interaction module, one for products and one for reviews
        self.inter_p = InteractionModule(hidden=c.hidden, heads=c.heads,
                                         layers=c.interaction_layers, dropout=c.dropout)
        self.inter_r = InteractionModule(hidden=c.hidden, heads=c.heads,
                                         layers=c.interaction_layers, dropout=c.dropout)
        # Eq. (15-28): intra-modal, inter-modal and intra-review fusion, then the scorer
        kw = dict(hidden=c.hidden, heads=c.heads, dropout=c.dropout)
        self.fuse = nn.ModuleDict({name: FusionHead(**kw)
                                   for name in ("rt_pt", "rv_pv", "rt_pv", "rv_pt", "rt_rv")})
        self.scorer = nn.Sequential(nn.Linear(5 * c.hidden, c.hidden), nn.ReLU(),
                                    nn.Dropout(c.dropout), nn.Linear(c.hidden, 1))
        # projections of review text and images into the contrastive space (Eq. 32-33 inputs)
        self.proj_t = nn.Sequential(nn.Linear(c.hidden, c.hidden), nn.ReLU(),
                                    nn.Linear(c.hidden, c.hidden))
        self.proj_v = nn.Sequential(nn.Linear(c.hidden, c.hidden), nn.ReLU(),
                                    nn.Linear(c.hidden, c.hidden))

    @classmethod
    def from_config(cls, cfg: Mapping, embeddings: Mapping[str, np.ndarray] | None = None) -> "MCL":
        cfg = with_embed_dim(cfg, embeddings)  # embed_dim defaults to the matrices' width
        return cls(config=from_mapping(MCLConfig, cfg, "model.mcl"), embeddings=embeddings)

    def forward(self, batch: Batch) -> ModelOutput:
        c = self.config
        pm_t, pm_v = batch.prod_token_mask, batch.prod_roi_mask  # (P, Lp), (P, Np)
        rm_t, rm_v = batch.rev_token_mask, batch.rev_roi_mask  # (R, Lr), (R, Nr)
        # --- encoders
        pt = self.text_p(self.emb_p(batch.prod_tokens), pm_t)  # (P, Lp, H)
        rt = self.text_r(self.emb_r(batch.rev_tokens), rm_t)  # (R, Lr, H)
        pv = self.img_p(batch.prod_rois, pm_v)  # (P, Np, H)
        rv = self.img_r(batch.rev_rois, rm_v)  # (R, Nr, H)
        # --- multimodal interaction module, Eq. (5-14)
        pt, pv = self.inter_p(pt, pm_t, pv, pm_v)
        rt, rv = self.inter_r(rt, rm_t, rv, rm_v)
        # --- each review next to its product
        idx = batch.rev_product
        pt_r, pmt_r = pt[idx], pm_t[idx]  # (R, Lp, H), (R, Lp)
        pv_r, pmv_r = pv[idx], pm_v[idx]  # (R, Np, H), (R, Np)
        # --- fusion, Eq. (15-28)
        f = self.fuse
        h = torch.cat([
            f["rt_pt"](rt, rm_t, pt_r, pmt_r),  # intra-modal, text
            f["rv_pv"](rv, rm_v, pv_r, pmv_r),  # intra-modal, images
            f["rt_pv"](rt, rm_t, pv_r, pmv_r),  # inter-modal
            f["rv_pt"](rv, rm_v, pt_r, pmt_r),  # inter-modal
            f["rt_rv"](rt, rm_t, rv, rm_v),  # intra-review
        ], dim=-1)  # (R, 5H)
        scores = self.scorer(h).squeeze(-1)  # (R,)  Eq. (15-28), the final scorer

        aux: dict[str, torch.Tensor] = {}
        if self.training and c.contrastive != "none" and c.contrastive_weight > 0:
            aux["contrastive"] = c.contrastive_weight * self._contrastive(batch, rt, rv)
        return ModelOutput(scores=scores, aux_losses=aux)

    def _contrastive(self, batch: Batch, rt: torch.Tensor, rv: torch.Tensor) -> torch.Tensor:
        """Cross-modal pairs across the batch: review i's text and images are the positive
        pair, its text with other reviews' images the negatives. Reviews without tokens or
        without ROIs take no part (they have no pair)."""
        c = self.config
        keep = batch.rev_token_mask.any(1) & batch.rev_roi_mask.any(1)  # (R,)
        if c.contrastive == "circle":
            keep = keep & (batch.labels >= c.circle_min_label)
        zt = l2_normalize(self.proj_t(masked_mean(rt, batch.rev_token_mask)[keep]))  # (N, H)
        zv = l2_normalize(self.proj_v(masked_mean(rv, batch.rev_roi_mask)[keep]))  # (N, H)
        sim = zt @ zv.T  # (N, N) cosine similarities
        if c.contrastive == "circle":
            return circle_contrastive_loss(sim, margin=c.circle_margin, gamma=c.circle_gamma)
        return adaptive_contrastive_loss(sim, o_p=c.o_p, o_n=c.o_n, gamma=c.gamma)  # Eq. (33)
