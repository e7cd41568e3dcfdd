"""SANCL: Selective Attention and Natural Contrastive Learning (Han et al., COLING 2022).

The paper (`../shared/papers/sancl.txt`) is the specification; equation numbers below are its.
Reads top to bottom like the paper:

  1. Input encoding (Sec. 3.3). Text: word vectors (text-embedding dropout, Table 5) into a
     uni-directional GRU, hidden 128, giving token states H_t and the sequence state h_seq_t
     (Eq. 1); one GRU per field (product, review). Images: ROI features through Linear
     2048 -> 128 and Transformer self-attention layers, "same as Liu et al. (2021)" (MCR); one
     image encoder per field ("two self-attention modules", Sec. 3.2).
  2. Probe-based selective attention (Sec. 3.4) on the review text only:
     A = softmax(score(H, H)) (Eq. 3); M' = alpha*M + beta*(1-M) (Eq. 2) with alpha = 1 and
     beta = sigmoid(W h_seq + b) per review (Eq. 6); A' = (M')^T M' (elementwise) A (Eq. 4),
     NOT renormalised, so a'_ij is alpha^2 a_ij, alpha*beta a_ij or beta^2 a_ij (Eq. 5), see
     `selective_attention_weights`; H' = H + A' H (Eq. 7). Cross-field text attention (review
     tokens attend to product tokens) without probe masks gives H''; S_t_r is the M'-weighted
     average of H'' (Eq. 8). Images: cross-image attention (review ROIs attend to product ROIs)
     and average pooling give S_v_r. Product fields: average pooling (S_t_p, S_v_p).
  3. Projection networks (Eq. 9): S^d_{m,f} = W2 tanh(W1 S_{m,f} + b1) + b2, one network per
     (modality m, domain d), shared by the review and product fields f.
  4. Multi-domain natural contrastive learning with phi(A, B) = exp(cos(A, B) / tau), tau = 1
     (Eq. 10). "High-helpfulness" reviews are those with label >= `high_label` (3, as the
     public code). Inner-instance domain (Eq. 11): each instance's own text-image pair; the
     product descriptions (S^P_ii) and high reviews (S+_ii) are the positives, the denominator
     runs over the matched pairs of every instance of the batch, low reviews (S-_ii) included.
     Product-review domain (Eq. 12-13): per modality m, a high review's S^pr_{m,r} against its
     product's S^pr_{m,p}, normalised over all reviews of that product; cpc_pr = cpc_t + cpc_v.
  5. Prediction (Eq. 14-15): F = [S^ii_{t,r}, S^pr_{t,r}, S^ii_{v,r}, S^pr_{v,r}], the four
     *projected* review vectors, then one Linear. Loss (Eq. 16-18): the trainer adds the
     ranking loss; the model returns kappa * cpc_ii and kappa * cpc_pr as `aux_losses`.

Readings where the paper is silent or ambiguous (also in docs/fidelity.md):
  * Eq. 3 writes A = softmax(W H); we read W H as the bilinear scores of single-head
    dot-product attention, (W_q H)(W_k H)^T, unscaled as Eq. 3 writes it (and as the public code
    computes it); `attn_scale: true` divides them by sqrt(d), the Transformer's habit, which
    neither source has (the learned W_q, W_k could absorb the factor; only the start of
    training differs). Values are H itself, as Eq. 7 writes (H + A'H, no value projection).
  * The conclusion speaks of "re-normalization" of the attention weights; Eq. 4-5 define a
    re-weighting whose factors alpha^2 / alpha*beta / beta^2 only survive without
    renormalisation, so none is applied.
  * Eq. 8's weighted_sum is read as the M'-weighted average (sum_i m'_i h_i / sum_i m'_i).
  * The paper says how the review fields are pooled, not the product fields: product text
    (GRU states) and product images (self-attention output) are averaged over real positions.
  * Eq. 1 writes one theta_t; the product and review texts get one GRU each (their own
    vocabularies and embedding tables), as the public code does. Tables 5-6 call its size
    "LSTM hidden dim" (128); Sec. 3.3 names a GRU and no LSTM, so that is the GRU's size.
  * Eq. 2 writes 1 > alpha > beta > 0, yet Sec. 3.4 "set[s] alpha to 1.0" and Eq. 6's sigmoid
    keeps beta in (0, 1): the binding constraint is read as alpha > beta, so alpha = 1 (the
    paper's value, the default) is allowed and alpha > 1 is not.
  * Cross-field and cross-image attention take MCR's product-aware form (the paper defers to
    Liu et al. 2021 and gives no equation): a_ij = softmax_j(relu(W p_j + b) . r_i) over the
    product positions j, r_i <- r_i + sum_j a_ij p_j.
  * Eq. 11, 12 and 16 are all plain sums and Eq. 18 adds them: L = L_task + kappa L_aux. The
    trainer's ranking loss is Eq. 16's hinge terms summed over the batch's sampled pairs and
    divided by the number I of ranking instances (shared by every model).
    `cpc_reduction: instances` (the paper preset) divides the CPC sums by the same I, so the
    step minimises Eq. 18 / I: kappa weighs the CPC sums against the ranking sum exactly as
    Eq. 18 does. `sum` keeps Eq. 11-12's sums undivided, which beside the trainer's 1/I weighs
    the CPC I times more than Eq. 18, and is Eq. 18 as written beside `ranking_reduction: sum`;
    `instances` beside `ranking_reduction: sum` (CPC I times lighter than Eq. 18) is refused as
    the config loads (`check_train_config`). `mean` (per positive term) is the public code's
    reduction (the `code` preset).
  * Eq. 12's denominator runs over S+_pr and S-_pr with each review k paired with its own
    product's S^p_{m,k}; we normalise a review over the reviews of its own product (issue 12:
    "normalised over all of that product's reviews"). The set notation alone would also allow
    one batch-wide normaliser, as Eq. 11 has; that reading is `pr_normaliser: batch`.
  * Eq. 16's pairs: the paper writes "an arbitrary positive/negative pair ... under product
    P_i", "same as Liu et al. (2021)", and gives no gamma; the trainer's MCR sampler (1
    positive, K = 7 negatives at least 2 labels lower per instance, drawn with probability
    1 - label frequency; docs/fidelity.md) draws them and the paper preset uses a fixed margin
    gamma = 1.
  * Items without the modality a term needs (a review without images, an empty text) are left
    out of that term's numerator and denominator; a term without any positive is zero.
  * Text-only setting (Table 1, upper half; `text_only: true`): no images, so no inner-instance
    domain (it pairs text with images); F = [S^ii_{t,r}, S^pr_{t,r}], cpc_pr = cpc_t_pr.

Table 2 ablations: `beta: fixed` (fixed_beta 0.5), `probe_mask: false` (plain attention and
plain average pooling; the probes view is then not required), `cpc_ii: false`,
`cpc_pr: false`, both false. The model never substitutes masks: with `probe_mask: true` a
batch without probe masks, or with a mask value other than 0/1, is a DataError (a missing
probes view is refused by the data loading through `required_views`, and `allow_missing:
[probes]` beside `probe_mask: true` as the config loads, `check_train_config`). The data
loading still gives a review whose probes record is a failure a mask of ones (plain attention
for it); the model cannot tell those from real masks (docs/fidelity.md).
Table 5 gives electronics lr 5e-5 although Appendix B's search space lists only {1e-4, 2e-5};
the presets follow Table 5.
Presets: `paper` (default) and `code` (the public release's 8-representation MLP scorer,
one image encoder shared by both fields, CPC averaged per positive, beta
fixed at 0.5 as its GloVe model does); both
take per-category values from Tables 5 (GloVe) via `SANCL.preset(name, category=...)`.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from models.batch import Batch, ModelOutput
from models.layers import NEG_INF, MaskedMultiheadAttention, embedding_pair, masked_mean, masked_softmax, with_embed_dim
from models.registry import register_model
from pipeline.config import from_mapping
from pipeline.errors import ConfigError, DataError

CATEGORIES = ("clothing", "electronics", "home")

# Table 5 (GloVe 300d): per category.
TABLE5_GLOVE = {
    "clothing": {"lr": 1e-4, "text_dropout": 0.5, "kappa": 0.25},
    "electronics": {"lr": 5e-5, "text_dropout": 0.5, "kappa": 0.1},
    "home": {"lr": 1e-4, "text_dropout": 0.2, "kappa": 0.1},
}
# Table 6 (BERT encoder): per category. Kept as data: this model reads word vectors; the BERT
# setting (fine-tuning BERT's last four layers under the GRU) is not built here.
TABLE6_BERT = {
    "clothing": {"lr": 2e-5, "text_dropout": 0.5, "kappa": 0.3, "embed_dim": 768},
    "electronics": {"lr": 2e-5, "text_dropout": 0.5, "kappa": 0.25, "embed_dim": 768},
    "home": {"lr": 2e-5, "text_dropout": 0.5, "kappa": 0.25, "embed_dim": 768},
}
# Both tables: text/image/GRU sizes 128, shared space 64, batch 32.
COMMON = {"hidden": 128, "proj_dim": 64}


@dataclass(frozen=True)
class SANCLConfig:
    vocab_size: int = 0  # rows of the random tables when no embedding matrix is given (tests)
    embed_dim: int = 300  # word-vector size (the paper: glove.840B.300d)
    finetune_embeddings: bool = False  # True trains the tables; frozen by default
    text_dropout: float = 0.2  # dropout on the word vectors (Table 5 "text embedding dropout")
    roi_dim: int = 2048  # ROI feature size (Faster R-CNN)
    hidden: int = 128  # GRU hidden size and image embedding size (Tables 5-6: 128 and 128)
    heads: int = 4  # attention heads of the image Transformer layers
    image_layers: int = 1  # Transformer layers of each image encoder (MCR's self-attention module)
    image_ffn: int = 512  # feed-forward width of those layers
    share_image_encoder: bool = False  # True: one image encoder for both fields (public code)
    dropout: float = 0.1  # dropout inside the image encoders
    attn_scale: bool = False  # True: Eq. 3 scores divided by sqrt(hidden) (in neither the paper
    # nor the public code; see the module docstring)
    probe_mask: bool = True  # False: plain attention and pooling (Table 2 "w/o probe mask")
    beta: Literal["learned", "fixed"] = "learned"  # Eq. 6 beta = sigmoid(W h_seq + b), or fixed
    fixed_beta: float = 0.5  # beta when beta = fixed (Table 2)
    alpha: float = 1.0  # weight of the probed tokens in M' (Eq. 2), 1 in the paper
    proj_dim: int = 64  # shared-space size of both domains (Eq. 9; Tables 5-6: 64)
    cpc_ii: bool = True  # inner-instance domain loss (Eq. 11); Table 2 "w/o cpc_ii"
    cpc_pr: bool = True  # product-review domain loss (Eq. 12-13); Table 2 "w/o cpc_pr"
    kappa: float = 0.1  # weight of the auxiliary loss (Eq. 18); Table 5 per category
    temperature: float = 1.0  # tau of Eq. 10, 1 in the paper
    high_label: float = 3.0  # a review is high-helpfulness (S+) when label >= this (public code: 3)
    cpc_reduction: Literal["instances", "mean", "sum"] = "instances"  # see the module docstring
    pr_normaliser: Literal["product", "batch"] = "product"  # Eq. 12's denominator: the review's
    # own product's reviews (issue 12's reading), or every review of the batch (module docstring)
    text_only: bool = False  # Table 1 upper half: no images, no inner-instance domain
    scorer: Literal["paper", "code"] = "paper"  # Eq. 14-15 Linear over 4 review vectors, or
    # the public code's MLP over 8 projected vectors (review and product, 2 modalities x 2 domains)


def _check_config(c: SANCLConfig) -> SANCLConfig:
    where = "model.sancl"
    if not 0 < c.alpha <= 1:
        raise ConfigError(f"{where}.alpha: expected 0 < alpha <= 1 (Eq. 2's 1 > alpha > beta, with "
                          f"Sec. 3.4's alpha = 1), got {c.alpha}")
    if c.beta == "learned" and c.probe_mask and c.alpha < 1:
        raise ConfigError(f"{where}.alpha: {c.alpha} < 1 with beta: learned cannot keep Eq. 2's "
                          f"alpha > beta (Eq. 6's sigmoid beta ranges over (0, 1)); use alpha: 1 "
                          f"(the paper's value) or beta: fixed with fixed_beta < alpha")
    if c.beta == "fixed" and not 0 < c.fixed_beta < c.alpha:
        raise ConfigError(f"{where}.fixed_beta: expected 0 < beta < alpha = {c.alpha} (Eq. 2), "
                          f"got {c.fixed_beta}")
    if c.temperature <= 0:
        raise ConfigError(f"{where}.temperature: expected > 0, got {c.temperature}")
    if c.kappa < 0:
        raise ConfigError(f"{where}.kappa: expected >= 0, got {c.kappa}")
    if not 0 <= c.text_dropout < 1 or not 0 <= c.dropout < 1:
        raise ConfigError(f"{where}: dropout and text_dropout must lie in [0, 1)")
    for k in ("hidden", "proj_dim", "heads", "image_ffn"):
        if getattr(c, k) < 1:
            raise ConfigError(f"{where}.{k}: expected a positive integer, got {getattr(c, k)}")
    if c.image_layers < 0:
        raise ConfigError(f"{where}.image_layers: expected >= 0, got {c.image_layers}")
    if c.hidden % c.heads:
        raise ConfigError(f"{where}.hidden {c.hidden} is not divisible by heads {c.heads}")
    if not 0 < c.high_label <= 4:
        raise ConfigError(f"{where}.high_label: expected a label threshold in (0, 4], got "
                          f"{c.high_label}")
    return c


def selective_attention_weights(attn: torch.Tensor, mask: torch.Tensor, alpha: float,
                                beta: torch.Tensor | float) -> torch.Tensor:
    """A' of Eq. 4: M' = alpha*M + beta*(1-M) (Eq. 2), A' = outer(M', M') * A, no renormalisation.

    attn (..., l, l) attention probabilities, mask (..., l) binary probe mask, alpha a scalar,
    beta (...,) (one per sequence) or a scalar. Entry (i, j) is multiplied by alpha^2 when both
    tokens are probed, alpha*beta when one is, beta^2 when neither is (Eq. 5)."""
    m = mask.to(attn.dtype)
    b = torch.as_tensor(beta, dtype=attn.dtype, device=attn.device)
    if b.dim() > 0:
        b = b.unsqueeze(-1)  # (..., 1) broadcast over the l tokens
    m_soft = alpha * m + b * (1 - m)  # (..., l)  Eq. 2
    return m_soft.unsqueeze(-1) * m_soft.unsqueeze(-2) * attn  # (..., l, l)  Eq. 4


def phi_logits(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """log phi(a_k, b_k) = cos(a_k, b_k) / tau for matched rows (Eq. 10): (N, D), (N, D) -> (N,)."""
    a, b = a.float(), b.float()
    return (F.normalize(a, dim=-1, eps=1e-8) * F.normalize(b, dim=-1, eps=1e-8)).sum(-1) / temperature


def cpc_inner_instance(log_phi: torch.Tensor, positive: torch.Tensor,
                       valid: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Eq. 11 as a sum: -sum_{j positive} log(phi_j / sum_{k valid} phi_k).

    log_phi (N,) log phi(S_t_k, S_v_k) of every instance's own text-image pair; positive (N,)
    bool (product descriptions and high reviews); valid (N,) bool (the instance has both
    modalities). Returns the sum and the number of positive terms."""
    pos = positive & valid
    n = int(pos.sum())
    if n == 0:
        return log_phi.sum() * 0.0, 0
    denom = torch.logsumexp(log_phi[valid], dim=0)
    return -(log_phi[pos] - denom).sum(), n


def cpc_product_review(log_phi: torch.Tensor, product: torch.Tensor, positive: torch.Tensor,
                       valid: torch.Tensor, num_products: int,
                       normaliser: str = "product") -> tuple[torch.Tensor, int]:
    """Eq. 12 for one modality as a sum: for each positive review j of product p,
    -log(phi(S_r_j, S_p_p) / sum_{k reviews of p} phi(S_r_k, S_p_p)); with normaliser "batch"
    the denominator is sum_{k every review} phi(S_r_k, S_p_{product(k)}) instead.

    log_phi (R,) log phi(S_r_k, S_p_{product(k)}); product (R,) product index; positive (R,)
    high reviews; valid (R,) reviews (and products) that have the modality. Returns the sum and
    the number of positive terms."""
    pos = positive & valid
    n = int(pos.sum())
    if n == 0:
        return log_phi.sum() * 0.0, 0
    if normaliser == "batch":
        return -(log_phi[pos] - torch.logsumexp(log_phi[valid], dim=0)).sum(), n
    member = (product.unsqueeze(0) == torch.arange(num_products, device=product.device)
              .unsqueeze(1)) & valid.unsqueeze(0)  # (P, R)
    grid = torch.where(member, log_phi.unsqueeze(0), torch.full_like(log_phi, NEG_INF).unsqueeze(0))
    denom = torch.logsumexp(grid, dim=1)  # (P,) one normaliser per product
    return -(log_phi[pos] - denom[product[pos]]).sum(), n


class TextGRU(nn.Module):
    """Uni-directional GRU over padded word vectors (Eq. 1): token states (B, L, H), zero on
    padding, and the sequence state h_seq (B, H), the hidden state after the last real token
    (zeros for an empty text)."""

    def __init__(self, input_dim: int, hidden: int):
        super().__init__()
        self.gru = nn.GRU(input_dim, hidden, batch_first=True)
        self.hidden = hidden

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, L, _ = x.shape
        if L == 0:
            return x.new_zeros(B, 0, self.hidden), x.new_zeros(B, self.hidden)
        lengths = mask.sum(1)
        packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True,
                                      enforce_sorted=False)
        out, h_n = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=L)
        keep = mask.any(1, keepdim=True).to(out.dtype)  # (B, 1)
        return out * mask.unsqueeze(-1).to(out.dtype), h_n[-1] * keep


class ImageEncoder(nn.Module):
    """ROI features -> Linear(roi_dim, hidden) -> post-norm Transformer encoder layers (the
    self-attention module of MCR that Sec. 3.3 reuses). Padded ROIs come out as zeros."""

    def __init__(self, *, roi_dim: int, hidden: int, heads: int, layers: int, ffn: int,
                 dropout: float):
        super().__init__()
        self.map = nn.Linear(roi_dim, hidden)
        self.drop = nn.Dropout(dropout)
        self.att = nn.ModuleList(MaskedMultiheadAttention(hidden, heads, dropout) for _ in range(layers))
        self.ln1 = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.ffn = nn.ModuleList(nn.Sequential(nn.Linear(hidden, ffn), nn.ReLU(), nn.Dropout(dropout),
                                               nn.Linear(ffn, hidden)) for _ in range(layers))
        self.ln2 = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))

    def forward(self, rois: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = mask.unsqueeze(-1).to(rois.dtype)
        x = self.drop(self.map(rois))
        for att, ln1, ffn, ln2 in zip(self.att, self.ln1, self.ffn, self.ln2, strict=True):
            x = ln1(x + self.drop(att(x, x, mask)))
            x = ln2(x + self.drop(ffn(x)))
        return x * keep


class ProductAwareAttention(nn.Module):
    """Cross-field attention of MCR's form: each review position i attends over the product
    positions j with a_ij = softmax_j(relu(W p_j + b) . r_i); r_i <- r_i + sum_j a_ij p_j.
    No probe mask here (Sec. 3.4: "we do not utilize probe masks in this stage")."""

    def __init__(self, hidden: int):
        super().__init__()
        self.lin = nn.Linear(hidden, hidden)

    def forward(self, r, r_mask, p, p_mask):
        keys = torch.relu(self.lin(p))  # (B, Lp, H)
        scores = r @ keys.transpose(1, 2)  # (B, Lr, Lp)
        a = masked_softmax(scores, p_mask.unsqueeze(1))  # (B, Lr, Lp) float32
        out = r + (a.to(p.dtype) @ p)
        return out * r_mask.unsqueeze(-1).to(out.dtype)


class SelectiveSelfAttention(nn.Module):
    """Probe-based selective self-attention on the review text (Eq. 2-7)."""

    def __init__(self, *, hidden: int, scale: bool, selective: bool, beta: str, fixed_beta: float,
                 alpha: float):
        super().__init__()
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.scale = hidden ** -0.5 if scale else 1.0
        self.selective, self.alpha, self.fixed_beta = selective, alpha, fixed_beta
        self.beta_gen = nn.Linear(hidden, 1) if selective and beta == "learned" else None

    def beta(self, h_seq: torch.Tensor) -> torch.Tensor:
        """beta (B,) of Eq. 6 from the GRU sequence state, or the fixed value."""
        if self.beta_gen is None:
            return h_seq.new_full((h_seq.shape[0],), self.fixed_beta)
        return torch.sigmoid(self.beta_gen(h_seq)).squeeze(-1)

    def forward(self, h: torch.Tensor, mask: torch.Tensor, probe: torch.Tensor | None,
                h_seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (B, L, H), mask (B, L) bool, probe (B, L) in {0, 1} or None when not selective.
        Returns H' (Eq. 7) and the pooling weights M' (B, L) (zero on padding)."""
        scores = (self.q(h) @ self.k(h).transpose(1, 2)) * self.scale  # (B, L, L)
        attn = masked_softmax(scores, mask.unsqueeze(1))  # Eq. 3 (float32)
        valid = mask.to(attn.dtype)
        if self.selective:
            beta = self.beta(h_seq).float()  # (B,)  Eq. 6
            attn = selective_attention_weights(attn, probe.float(), self.alpha, beta)  # Eq. 4
            pm = probe.float()
            m_soft = (self.alpha * pm + beta.unsqueeze(-1) * (1 - pm)) * valid  # Eq. 2
        else:
            m_soft = valid
        out = h + (attn.to(h.dtype) @ h)  # Eq. 7: H' = H + A'H
        return out * mask.unsqueeze(-1).to(out.dtype), m_soft


def weighted_pool(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eq. 8: sum_i w_i x_i / sum_i w_i over (B, L, H) with (B, L) weights; zeros for empty rows.
    The divisor is the exact weight sum (no floor: a small beta on an all-zero probe mask still
    gives the plain average)."""
    w = weights.to(x.dtype).unsqueeze(-1)
    total = w.sum(1)  # (B, 1)
    return (x * w).sum(1) / torch.where(total > 0, total, torch.ones_like(total))


def _proj(d_in: int, d: int) -> nn.Sequential:
    """Eq. 9: W2 tanh(W1 S + b1) + b2."""
    return nn.Sequential(nn.Linear(d_in, d), nn.Tanh(), nn.Linear(d, d))


@register_model("sancl")
class SANCL(nn.Module):
    """SANCL for multimodal review helpfulness prediction; see the module docstring."""

    PRESET_NAMES: tuple[str, ...] = ("paper", "code")

    def __init__(self, *, config: SANCLConfig, embeddings: Mapping[str, np.ndarray] | None = None):
        super().__init__()
        c = self.config = _check_config(config)
        self.emb_p, self.emb_r = embedding_pair(embeddings, vocab_size=c.vocab_size,
                                                dim=c.embed_dim, finetune=c.finetune_embeddings)
        self.text_drop = nn.Dropout(c.text_dropout)
        self.gru_p = TextGRU(c.embed_dim, c.hidden)  # Eq. 1, product text
        self.gru_r = TextGRU(c.embed_dim, c.hidden)  # Eq. 1, review text
        self.self_att = SelectiveSelfAttention(hidden=c.hidden, scale=c.attn_scale,
                                               selective=c.probe_mask, beta=c.beta,
                                               fixed_beta=c.fixed_beta, alpha=c.alpha)
        self.cross_t = ProductAwareAttention(c.hidden)
        modalities = ("t",) if c.text_only else ("t", "v")
        if not c.text_only:
            enc = dict(roi_dim=c.roi_dim, hidden=c.hidden, heads=c.heads, layers=c.image_layers,
                       ffn=c.image_ffn, dropout=c.dropout)
            self.img_p = ImageEncoder(**enc)
            self.img_r = self.img_p if c.share_image_encoder else ImageEncoder(**enc)
            self.cross_v = ProductAwareAttention(c.hidden)
        # Eq. 9: one projection network per (modality, domain), shared by both fields
        self.proj = nn.ModuleDict({f"{d}_{m}": _proj(c.hidden, c.proj_dim)
                                   for m in modalities for d in ("ii", "pr")})
        n_rev = 2 * len(modalities)  # projected review vectors
        if c.scorer == "paper":
            self.out = nn.Linear(n_rev * c.proj_dim, 1)  # Eq. 15
        else:  # the public code: review and product vectors, MLP 128-64-1
            self.out = nn.Sequential(nn.Linear(2 * n_rev * c.proj_dim, 128), nn.ReLU(),
                                     nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 1))

    # ---- configuration helpers (shared contracts) -----------------------------------------
    @classmethod
    def from_config(cls, cfg: Mapping, embeddings: Mapping[str, np.ndarray] | None = None) -> SANCL:
        cfg = with_embed_dim(cfg, embeddings)  # embed_dim defaults to the matrices' width
        return cls(config=from_mapping(SANCLConfig, cfg, "model.sancl"), embeddings=embeddings)

    @classmethod
    def config_record(cls, cfg: Mapping[str, Any]) -> SANCLConfig:
        """The validated settings (`models.registry.model_config` calls this as the training
        config loads): an unknown key, a wrong type or an impossible value (alpha > 1, a fixed
        beta not below alpha, ...) is a ConfigError before any data is read."""
        return _check_config(from_mapping(SANCLConfig, dict(cfg or {}), "model_cfg"))

    @classmethod
    def check_train_config(cls, record: SANCLConfig, train: Any) -> None:
        """Settings that contradict the trainer's (`models.config` calls this as the config
        loads). `allow_missing: [probes]` with `probe_mask: true`: the data loading would give
        every review a mask of ones, M' = 1, i.e. plain attention and mean pooling, the
        "w/o probe mask" row recorded as the full model (issue 12: `probe_mask: false` is the
        way to ask for it); refused. `cpc_reduction: instances` divides the CPC sums by the number I of ranking
        instances because the trainer divides Eq. 16's hinge sum by I (`ranking_reduction:
        mean`); beside `ranking_reduction: sum` it would weigh the CPC I times less than Eq. 18
        does, so that pair is refused (`cpc_reduction: sum` keeps Eq. 18 as written)."""
        if record.probe_mask and "probes" in tuple(getattr(train, "allow_missing", ()) or ()):
            raise ConfigError(
                "allow_missing: [probes] with model_cfg.probe_mask: true would give every review a "
                "probe mask of ones when the view is absent, i.e. train the Table 2 'w/o probe mask' "
                "model under the full model's settings; set model_cfg.probe_mask: false for that "
                "ablation, or build the view with `mrhp extract --stage probes`"
            )
        if record.cpc_reduction == "instances" and getattr(train, "ranking_reduction", "mean") == "sum":
            raise ConfigError(
                "model_cfg.cpc_reduction: 'instances' divides the CPC sums by the number of ranking "
                "instances to match ranking_reduction: mean, but ranking_reduction is 'sum'; with a "
                "summed ranking loss set cpc_reduction: sum (Eq. 18 as written), or keep both defaults"
            )

    @classmethod
    def required_views(cls, model_cfg: Mapping) -> frozenset[str]:
        """Store views a run needs: tokens always, rois unless text_only, probes unless
        probe_mask is false."""
        c = cls.config_record(model_cfg or {})
        views = {"tokens"}
        if not c.text_only:
            views.add("rois")
        if c.probe_mask:
            views.add("probes")
        return frozenset(views)

    @classmethod
    def preset(cls, name: str, *, category: str | None = None) -> dict[str, Any]:
        """`{"model_cfg": {...}, "train": {...}}` for a preset name and (optionally) an Amazon
        category. Tables 5 (GloVe; this model's word-vector setting): lr, text-embedding
        dropout and kappa per category; sizes 128 / 128 / 64 and batch 32 for every category.
        Without a category only the category-independent values are set."""
        if name not in cls.PRESET_NAMES:
            raise ConfigError(f"sancl: unknown preset {name!r}; valid presets: "
                              f"{', '.join(cls.PRESET_NAMES)}")
        if category is not None and category not in CATEGORIES:
            raise ConfigError(f"sancl: preset {name!r} has no values for category {category!r} "
                              f"(Table 5 covers {', '.join(CATEGORIES)})")
        # cpc_reduction "instances": Eq. 18's balance under the trainer's 1/I (module docstring)
        model_cfg: dict[str, Any] = {**COMMON, "high_label": 3.0, "temperature": 1.0, "alpha": 1.0,
                                     "cpc_reduction": "instances"}
        # Paper: Eq. 16 with a fixed margin gamma (its value is not given; 1 as the other papers)
        train: dict[str, Any] = {"batch_products": 32, "margin": "fixed", "fixed_margin": 1.0}
        if name == "code":
            # the released GloVe model fixes beta at 0.5 (its mask: 1 probed, 0.5 elsewhere)
            model_cfg.update(scorer="code", attn_scale=False, share_image_encoder=True,
                             cpc_reduction="mean", beta="fixed", fixed_beta=0.5)
            train.update(margin="label")  # the released training loop inherits MCR's hinge
        if category is not None:
            t = TABLE5_GLOVE[category]
            model_cfg.update(text_dropout=t["text_dropout"], kappa=t["kappa"])
            train["lr"] = t["lr"]
        return {"model_cfg": model_cfg, "train": train}

    # ---- forward ----------------------------------------------------------------------------
    def pooled(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Pooled field vectors S_{m,f} before projection: keys t_p (P, H), t_r (R, H) and, unless
        text_only, v_p (P, H), v_r (R, H); plus `m_soft` (R, Lr), the M' of Eq. 2."""
        c = self.config
        idx = batch.rev_product
        pm_t, rm_t = batch.prod_token_mask, batch.rev_token_mask
        probe = None
        if c.probe_mask:
            probe = getattr(batch, "rev_probe_mask", None)
            if probe is None:
                raise DataError(
                    "sancl: probe_mask is true but the batch has no probe masks "
                    "(Batch.rev_probe_mask is None): run `mrhp extract --dataset D --stage probes`, "
                    "or set model_cfg.probe_mask: false for the Table 2 'w/o probe mask' ablation"
                )
            if probe.shape != rm_t.shape:
                raise DataError(f"sancl: rev_probe_mask has shape {tuple(probe.shape)}, expected "
                                f"{tuple(rm_t.shape)} (aligned with rev_tokens)")
            if bool(((probe != 0) & (probe != 1)).any()):
                bad = probe[(probe != 0) & (probe != 1)][0].item()
                raise DataError(f"sancl: rev_probe_mask holds {bad!r}; a probe mask is binary "
                                f"(Algorithm 1: 1 in sentences mentioning the product, else 0)")
        # Sec. 3.3, Eq. 1
        h_p, _ = self.gru_p(self.text_drop(self.emb_p(batch.prod_tokens)), pm_t)  # (P, Lp, H)
        h_r, hseq_r = self.gru_r(self.text_drop(self.emb_r(batch.rev_tokens)), rm_t)  # (R, Lr, H)
        # Sec. 3.4: selective self-attention (Eq. 2-7), cross-field attention, pooling (Eq. 8)
        h_r, m_soft = self.self_att(h_r, rm_t, probe, hseq_r)
        h_r = self.cross_t(h_r, rm_t, h_p[idx], pm_t[idx])  # H''
        out = {"t_r": weighted_pool(h_r, m_soft), "t_p": masked_mean(h_p, pm_t), "m_soft": m_soft}
        if not c.text_only:
            pm_v, rm_v = batch.prod_roi_mask, batch.rev_roi_mask
            v_p = self.img_p(batch.prod_rois, pm_v)  # (P, Np, H)
            v_r = self.img_r(batch.rev_rois, rm_v)  # (R, Nr, H)
            v_r = self.cross_v(v_r, rm_v, v_p[idx], pm_v[idx])  # cross-image attention
            out["v_r"] = masked_mean(v_r, rm_v)
            out["v_p"] = masked_mean(v_p, pm_v)
        return out

    def project(self, pooled: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Eq. 9: `{domain}_{modality}_{field}` -> S^d_{m,f}, e.g. `ii_t_r`, `pr_v_p`."""
        out = {}
        for key, net in self.proj.items():  # key = "{d}_{m}"
            m = key.split("_")[1]
            for f in ("r", "p"):
                out[f"{key}_{f}"] = net(pooled[f"{m}_{f}"])
        return out

    def scorer_input(self, z: Mapping[str, torch.Tensor], rev_product: torch.Tensor) -> torch.Tensor:
        """F of Eq. 14: [S^ii_{t,r}, S^pr_{t,r}, S^ii_{v,r}, S^pr_{v,r}] (the `code` scorer adds
        the product's four vectors after the review's)."""
        mods = ("t",) if self.config.text_only else ("t", "v")
        parts = [z[f"{d}_{m}_r"] for m in mods for d in ("ii", "pr")]
        if self.config.scorer == "code":
            parts += [z[f"{d}_{m}_p"][rev_product] for m in mods for d in ("ii", "pr")]
        return torch.cat(parts, dim=-1)

    def forward(self, batch: Batch) -> ModelOutput:
        c = self.config
        pooled = self.pooled(batch)
        z = self.project(pooled)
        scores = self.out(self.scorer_input(z, batch.rev_product)).squeeze(-1)  # Eq. 15
        aux: dict[str, torch.Tensor] = {}
        if self.training and c.kappa > 0 and (c.cpc_pr or (c.cpc_ii and not c.text_only)):
            aux = {k: c.kappa * v for k, v in self.cpc_losses(batch, z).items()}
        return ModelOutput(scores=scores, aux_losses=aux)

    def cpc_losses(self, batch: Batch, z: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Unweighted cpc_ii (Eq. 11) and cpc_pr (Eq. 12-13), reduced per `cpc_reduction`."""
        c = self.config
        idx = batch.rev_product
        high = batch.labels >= c.high_label  # (R,) S+ ; the rest is S-
        has = {("t", "p"): batch.prod_token_mask.any(1), ("t", "r"): batch.rev_token_mask.any(1)}
        if not c.text_only:
            has[("v", "p")] = batch.prod_roi_mask.any(1)
            has[("v", "r")] = batch.rev_roi_mask.any(1)
        if c.cpc_reduction == "instances" and batch.instances is None:
            raise DataError("sancl: cpc_reduction 'instances' divides the CPC sums by the batch's "
                            "number of ranking instances, but Batch.instances is None (the trainer "
                            "sets it); set it, or choose cpc_reduction: sum or mean")
        n_inst = batch.instances.shape[0] if batch.instances is not None else 1

        def reduce(s: torch.Tensor, n: int) -> torch.Tensor:
            if c.cpc_reduction == "mean":
                return s / max(n, 1)
            if c.cpc_reduction == "instances":  # Eq. 16's sum is divided by I in the trainer
                return s / max(int(n_inst), 1)
            return s

        out: dict[str, torch.Tensor] = {}
        if c.cpc_ii and not c.text_only:  # Eq. 11 over products (S^P) and reviews (S+, S-)
            log_phi = torch.cat([phi_logits(z["ii_t_p"], z["ii_v_p"], c.temperature),
                                 phi_logits(z["ii_t_r"], z["ii_v_r"], c.temperature)])
            valid = torch.cat([has["t", "p"] & has["v", "p"], has["t", "r"] & has["v", "r"]])
            positive = torch.cat([torch.ones_like(has["t", "p"]), high])
            out["cpc_ii"] = reduce(*cpc_inner_instance(log_phi, positive, valid))
        if c.cpc_pr:  # Eq. 12 per modality, Eq. 13 their sum
            terms = []
            for m in (("t",) if c.text_only else ("t", "v")):
                log_phi = phi_logits(z[f"pr_{m}_r"], z[f"pr_{m}_p"][idx], c.temperature)
                valid = has[m, "r"] & has[m, "p"][idx]
                terms.append(reduce(*cpc_product_review(log_phi, idx, high, valid,
                                                        batch.num_products, c.pr_normaliser)))
            out["cpc_pr"] = sum(terms[1:], terms[0])
        return out
