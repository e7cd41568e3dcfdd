"""SANCL: Selective Attention and Natural Contrastive Learning (Han et al., 2022).

Reads top to bottom like the paper:
  1. encoders: GRU over the frozen word vectors for product and review text, a linear
     projection of the ROI features for their images;
  2. probe-mask selective attention over the review text: the probe mask M (1 on the
     sentences that mention the product, `Batch.rev_probe_mask`) is softened to
     M' = alpha * M + beta * (1 - M) with alpha = 1 and beta = sigmoid(W h_seq + b) learned per
     review (Eq. 2, 6), and the self-attention probabilities are re-weighted by the outer
     product M' M'^T and renormalised (Eq. 3-5, 7). The other fields use plain self-attention
     (M' = 1). The probe mask lives on review *tokens* (REFERENCE.md section 7 builds it from
     review sentences), so it is applied to the text side;
  3. cross-field attention: review text attends to product text, review images to product
     images, review text to review images; masked weighted pooling, weighted by M' on the
     review text (Eq. 8); an MLP scores the concatenation;
  4. projection networks into two shared domains (Eq. 9) and contrastive predictive coding
     (InfoNCE, temperature 1) in each (Eq. 10-13): the inner-instance domain, where a review's
     text and its images are the positive pair and other reviews' images the negatives; the
     product-review domain, where a review and its own product are the positive pair and the
     other products of the batch the negatives;
  5. loss = ranking + kappa * (CPC_inner + CPC_product_review) (Eq. 16-18); the two CPC terms
     are returned already multiplied by kappa, the trainer adds the ranking loss.

Table 2 ablations: `beta: fixed` (beta = 0.5), `probe_mask: false` (plain attention),
`cpc_inner: false`, `cpc_product_review: false`.
Parameter count without embeddings at the defaults: 1.48M (the paper reports 1.41M; its exact
layer sizes are not in the project's summary, so hidden 128 and the head sizes are assumed); see
`tests/test_sancl.py::test_parameter_count_is_near_the_papers_1_41M`.
The paper's text was not available offline: equation numbers are those the project's summary
pins; renormalising the re-weighted attention, cosine logits in the CPC and the pairing of the
product-review domain (every review with its own product) are this reading of it.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.batch import Batch, ModelOutput
from models.layers import (MaskedMultiheadAttention, RNNEncoder, embedding_pair, l2_normalize,
                           masked_mean, with_embed_dim)
from models.registry import register_model
from pipeline.config import from_mapping


@dataclass(frozen=True)
class SANCLConfig:
    vocab_size: int = 0  # rows of the random tables when no embedding matrix is given (tests)
    embed_dim: int = 300  # word-vector size (GloVe 6B 300d / fastText cc.id.300)
    finetune_embeddings: bool = False  # True trains the tables, as MCR does; frozen by default
    roi_dim: int = 2048  # bottom-up-attention ROI feature size
    hidden: int = 128  # hidden size of encoders, attention and pooled vectors
    heads: int = 1  # attention heads (single-head selective attention)
    proj_dim: int = 64  # size of the two shared contrastive domains (Eq. 9)
    dropout: float = 0.1  # dropout on attention probabilities and in the scorer
    probe_mask: bool = True  # False: plain self-attention (Table 2 "w/o probe mask")
    beta: Literal["learned", "fixed"] = "learned"  # Eq. (6) beta = sigmoid(W h + b), or fixed
    fixed_beta: float = 0.5  # beta when beta = fixed (Table 2)
    alpha: float = 1.0  # weight of the probed tokens in M' (Eq. 2), 1 in the paper
    cpc_inner: bool = True  # CPC in the inner-instance domain (review text x review images)
    cpc_product_review: bool = True  # CPC in the product-review domain
    kappa: float = 0.2  # weight of the CPC terms (Eq. 18); the paper tunes it in 0.1-0.3
    temperature: float = 1.0  # InfoNCE temperature (Eq. 10-13), 1 in the paper


def info_nce(query: torch.Tensor, keys: torch.Tensor, positive: torch.Tensor, *,
             temperature: float = 1.0) -> torch.Tensor:
    """Contrastive predictive coding loss (Eq. 10-13): for each query i (N, D) the logits are
    cos(query_i, keys_k) / temperature over all keys (M, D); keys[positive[i]] is its positive.
    Mean over queries; zero (with a graph) when there is no query or only one key."""
    if query.shape[0] == 0 or keys.shape[0] < 2:
        return (query.sum() + keys.sum()) * 0.0
    logits = l2_normalize(query) @ l2_normalize(keys).T / temperature  # (N, M)
    return F.cross_entropy(logits, positive)


class SelectiveSelfAttention(nn.Module):
    """Self-attention re-weighted by the outer product of the soft probe mask (Eq. 2-7)."""

    def __init__(self, *, hidden: int, heads: int, dropout: float, selective: bool,
                 beta: str = "learned", fixed_beta: float = 0.5, alpha: float = 1.0):
        super().__init__()
        self.att = MaskedMultiheadAttention(hidden, heads, dropout)
        self.ln = nn.LayerNorm(hidden)
        self.fixed_beta, self.alpha = fixed_beta, alpha
        self.beta = nn.Linear(hidden, 1) if selective and beta == "learned" else None

    def soft_mask(self, x: torch.Tensor, mask: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
        """M' (B, L) from the probe mask M (B, L) and the sequence vector (Eq. 2, 6)."""
        if self.beta is not None:
            beta = torch.sigmoid(self.beta(masked_mean(x, mask)))  # (B, 1)  Eq. (6)
        else:
            beta = x.new_full((x.shape[0], 1), self.fixed_beta)
        m_soft = self.alpha * probe + beta * (1 - probe)  # (B, L)  Eq. (2)
        return m_soft * mask.to(x.dtype)

    def forward(self, x, mask, probe: torch.Tensor | None):
        # x (B, L, H); probe (B, L) in {0, 1} or None for plain self-attention
        if probe is None:
            m_soft = mask.to(x.dtype)
            pair = None
        else:
            m_soft = self.soft_mask(x, mask, probe)  # (B, L)
            pair = m_soft.unsqueeze(2) * m_soft.unsqueeze(1)  # (B, L, L)  Eq. (7)
        out = self.ln(x + self.att(x, x, mask, pair_weights=pair))  # Eq. (3-5)
        return out * mask.unsqueeze(-1).to(x.dtype), m_soft


class CrossField(nn.Module):
    """Cross-field attention: q attends to kv, residual + layer norm."""

    def __init__(self, *, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.att = MaskedMultiheadAttention(hidden, heads, dropout)
        self.ln = nn.LayerNorm(hidden)

    def forward(self, q, q_mask, kv, kv_mask):
        return self.ln(q + self.att(q, kv, kv_mask)) * q_mask.unsqueeze(-1).to(q.dtype)


def weighted_pool(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Masked weighted pooling (Eq. 8): sum_i w_i x_i / sum_i w_i; zeros for empty rows."""
    w = weights.unsqueeze(-1)  # (B, L, 1)
    return (x * w).sum(1) / w.sum(1).clamp(min=1e-6)


@register_model("sancl")
class SANCL(nn.Module):
    """SANCL for multimodal review helpfulness prediction; see the module docstring."""

    def __init__(self, *, config: SANCLConfig, embeddings: Mapping[str, np.ndarray] | None = None):
        super().__init__()
        c = self.config = config
        self.emb_p, self.emb_r = embedding_pair(embeddings, vocab_size=c.vocab_size,
                                                dim=c.embed_dim, finetune=c.finetune_embeddings)
        # encoders
        self.text_p = RNNEncoder(kind="gru", input_dim=c.embed_dim, hidden=c.hidden)
        self.text_r = RNNEncoder(kind="gru", input_dim=c.embed_dim, hidden=c.hidden)
        self.img_p = nn.Linear(c.roi_dim, c.hidden)
        self.img_r = nn.Linear(c.roi_dim, c.hidden)
        # Eq. (2-7): selective self-attention per field (the probe mask on the review text)
        sa = dict(hidden=c.hidden, heads=c.heads, dropout=c.dropout, beta=c.beta,
                  fixed_beta=c.fixed_beta, alpha=c.alpha)
        self.sa = nn.ModuleDict({k: SelectiveSelfAttention(selective=(k == "rt" and c.probe_mask), **sa)
                                 for k in ("pt", "pv", "rt", "rv")})
        # cross-field attention
        cf = dict(hidden=c.hidden, heads=c.heads, dropout=c.dropout)
        self.cross = nn.ModuleDict({k: CrossField(**cf) for k in ("rt_pt", "rv_pv", "rt_rv")})
        # scorer over the pooled review fields and the pooled product
        self.scorer = nn.Sequential(nn.Linear(5 * c.hidden, c.hidden), nn.ReLU(),
                                    nn.Dropout(c.dropout), nn.Linear(c.hidden, 1))
        # Eq. (9): projection networks into the two shared domains
        def proj(d_in):
            return nn.Sequential(nn.Linear(d_in, c.hidden), nn.ReLU(), nn.Linear(c.hidden, c.proj_dim))
        self.proj_inner_t = proj(c.hidden) if c.cpc_inner else None
        self.proj_inner_v = proj(c.hidden) if c.cpc_inner else None
        self.proj_pr_p = proj(2 * c.hidden) if c.cpc_product_review else None
        self.proj_pr_r = proj(2 * c.hidden) if c.cpc_product_review else None

    @classmethod
    def from_config(cls, cfg: Mapping, embeddings: Mapping[str, np.ndarray] | None = None) -> "SANCL":
        cfg = with_embed_dim(cfg, embeddings)  # embed_dim defaults to the matrices' width
        return cls(config=from_mapping(SANCLConfig, cfg, "model.sancl"), embeddings=embeddings)

    def forward(self, batch: Batch) -> ModelOutput:
        c = self.config
        pm_t, pm_v = batch.prod_token_mask, batch.prod_roi_mask  # (P, Lp), (P, Np)
        rm_t, rm_v = batch.rev_token_mask, batch.rev_roi_mask  # (R, Lr), (R, Nr)
        # --- encoders
        pt = self.text_p(self.emb_p(batch.prod_tokens), pm_t)  # (P, Lp, H)
        rt = self.text_r(self.emb_r(batch.rev_tokens), rm_t)  # (R, Lr, H)
        pv = self.img_p(batch.prod_rois) * pm_v.unsqueeze(-1)  # (P, Np, H)
        rv = self.img_r(batch.rev_rois) * rm_v.unsqueeze(-1)  # (R, Nr, H)
        # --- selective attention, Eq. (2-7)
        probe = batch.rev_probe_mask.to(rt.dtype) if c.probe_mask else None  # (R, Lr)
        pt, w_pt = self.sa["pt"](pt, pm_t, None)
        pv, w_pv = self.sa["pv"](pv, pm_v, None)
        rt, w_rt = self.sa["rt"](rt, rm_t, probe)  # w_rt = M' (R, Lr)
        rv, w_rv = self.sa["rv"](rv, rm_v, None)
        # --- cross-field attention, each review beside its product
        idx = batch.rev_product
        rt_pt = self.cross["rt_pt"](rt, rm_t, pt[idx], pm_t[idx])  # (R, Lr, H)
        rv_pv = self.cross["rv_pv"](rv, rm_v, pv[idx], pm_v[idx])  # (R, Nr, H)
        rt_rv = self.cross["rt_rv"](rt, rm_t, rv, rm_v)  # (R, Lr, H)
        # --- masked weighted pooling, Eq. (8)
        h_pt, h_pv = weighted_pool(pt, w_pt), weighted_pool(pv, w_pv)  # (P, H)
        h_rt, h_rv = weighted_pool(rt, w_rt), weighted_pool(rv, w_rv)  # (R, H)
        feats = torch.cat([weighted_pool(rt_pt, w_rt), weighted_pool(rv_pv, w_rv),
                           weighted_pool(rt_rv, w_rt), h_rt, h_rv], dim=-1)  # (R, 5H)
        scores = self.scorer(feats).squeeze(-1)  # (R,)

        aux: dict[str, torch.Tensor] = {}
        if self.training and c.kappa > 0:
            if c.cpc_inner:  # Eq. (10-13): a review's text and images are the natural pair
                both = rm_t.any(1) & rm_v.any(1)  # (R,) reviews that have both
                zt = self.proj_inner_t(h_rt[both])  # (N, D)  Eq. (9)
                zv = self.proj_inner_v(h_rv[both])  # (N, D)  Eq. (9)
                pos = torch.arange(zt.shape[0], device=zt.device)
                aux["cpc_inner"] = c.kappa * info_nce(zt, zv, pos, temperature=c.temperature)
            if c.cpc_product_review:  # Eq. (10-13): a review and its own product
                zp = self.proj_pr_p(torch.cat([h_pt, h_pv], -1))  # (P, D)  Eq. (9)
                zr = self.proj_pr_r(torch.cat([h_rt, h_rv], -1))  # (R, D)  Eq. (9)
                aux["cpc_product_review"] = c.kappa * info_nce(zr, zp, idx,
                                                               temperature=c.temperature)
        return ModelOutput(scores=scores, aux_losses=aux)
