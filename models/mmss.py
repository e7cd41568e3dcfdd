"""MM-SS: multimodal review helpfulness prediction with self-supervised multi-task learning.

Reads top to bottom like the paper:
  1. encoders: each field's tokens through a recurrent encoder, each ROI set through a linear
     projection (the paper uses BERT token features; see the deviation below);
  2. five interaction representations, each review beside its product: ptrt (review text x
     product text), pvrv (review images x product images), ptrv (review images x product
     text), pvrt (review text x product images) and rtrv (review text x review images); each a
     cross-attention, then self-attention (Eq. 3-4) and soft pooling to a vector (Eq. 5);
  3. global scoring from their concatenation (Eq. 6-8): the score the ranking loss uses
     (Eq. 13, 16, added by the trainer);
  4. five subtask heads, one per interaction (Eq. 9), regressing SSP-Label pseudo labels:
     label-weighted anchors (Eq. 17), Mahalanobis-normalised distances (Eq. 18), the relative
     distance and the offset from the global label (Eq. 19-21), an EWMA across epochs with
     beta = 2 / (i + 1), the label y_g itself in the first epoch (Eq. 12);
     subtask losses weighted by tanh(|y_s - y_g|) (Eq. 14) and balanced by learned homoscedastic
     uncertainty (Eq. 15). Returned as the aux loss `subtasks`.

Training hooks (the trainer calls them when the model has them):
  `on_epoch_start(epoch: int)`: `epoch` is the 0-based index of the epoch about to run; the
  paper's i is epoch + 1. Without it every epoch counts as the first (beta = 1).
Per-review state: pseudo labels keyed by `Batch.review_ids` (training batches must carry
them). They live in the module's extra state (`get_extra_state`/`set_extra_state`: a dict of
the epoch, the review ids and an (N, 5) float tensor), so `state_dict()` checkpoints resume
the EWMA exactly and load with `torch.load(..., weights_only=True)`. The anchors and feature
variances are buffers.

Deviations, stated: (a) the paper encodes text with BERT; offline we use the frozen word
vectors and a recurrent encoder like the other models; (b) the paper's anchors are over the
training set; here they are label-weighted means over each batch smoothed by an exponential
moving average across batches (`anchor_momentum`), which avoids a feature memory of every
review; (c) pseudo labels are clamped to the label range [0, max_label]; (d) the Mahalanobis
distance uses a diagonal covariance (per-dimension variance, also a moving average).
No public code exists and the paper's text was not available offline: the equation numbers are
those the project's summary pins; the L1 subtask regression and the offset formula follow the
Self-MM label generation that SSP-Label adapts.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn

from models.batch import Batch, ModelOutput
from models.layers import (CrossModalBlock, MaskedMultiheadAttention, RNNEncoder, SoftPooling,
                           embedding_pair, with_embed_dim)
from models.registry import register_model
from pipeline.config import from_mapping
from pipeline.errors import TrainingError

INTERACTIONS = ("ptrt", "pvrv", "ptrv", "pvrt", "rtrv")
EPS = 1e-6


@dataclass(frozen=True)
class MMSSConfig:
    vocab_size: int = 0  # rows of the random tables when no embedding matrix is given (tests)
    embed_dim: int = 300  # word-vector size (GloVe 6B 300d / fastText cc.id.300)
    finetune_embeddings: bool = False  # True trains the tables, as MCR does; frozen by default
    text_encoder: Literal["gru", "lstm"] = "gru"  # stands in for BERT (deviation (a))
    roi_dim: int = 2048  # bottom-up-attention ROI feature size
    hidden: int = 128  # size of every interaction representation (assumed)
    heads: int = 4  # attention heads
    dropout: float = 0.1  # dropout in attention and the scoring MLPs
    subtasks: bool = True  # False: global ranking only (the paper's "w/o SSP" ablation)
    max_label: float = 4.0  # top of the helpfulness scale; anchors weight labels by y / max_label
    anchor_momentum: float = 0.9  # EMA of the batch anchors and variances (deviation (b))


# ---------------------------------------------------------------------------------------------
# SSP-Label: self-supervised pseudo labels for the subtasks (Eq. 10-12, 17-21)
# ---------------------------------------------------------------------------------------------
def label_weighted_anchors(h: torch.Tensor, y: torch.Tensor, max_label: float
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. (17): helpful anchor sum_i (y_i/Y) h_i / sum_i (y_i/Y) and unhelpful anchor with
    weights 1 - y_i/Y. h (R, K, H) for K representations, y (R,). Returns both anchors (K, H)
    and whether each had any weight (scalars): a batch of all-0 labels has no helpful anchor."""
    w_hi = (y / max_label).clamp(0, 1)  # (R,)
    w_lo = 1.0 - w_hi  # (R,)
    hi = torch.einsum("r,rkh->kh", w_hi, h) / w_hi.sum().clamp(min=EPS)  # (K, H)
    lo = torch.einsum("r,rkh->kh", w_lo, h) / w_lo.sum().clamp(min=EPS)  # (K, H)
    return hi, lo, w_hi.sum() > EPS, w_lo.sum() > EPS


def mahalanobis(h: torch.Tensor, anchor: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Eq. (18) with a diagonal covariance: sqrt(sum_k (h_k - c_k)^2 / var_k).
    h (R, K, H), anchor (K, H), var (K, H) -> (R, K)."""
    return (((h - anchor) ** 2) / (var + EPS)).sum(-1).sqrt()


def relative_distance(d_hi: torch.Tensor, d_lo: torch.Tensor) -> torch.Tensor:
    """Eq. (19): alpha = (D_lo - D_hi) / (D_hi + eps); large when closer to the helpful anchor."""
    return (d_lo - d_hi) / (d_hi + EPS)


def offset_labels(alpha_s: torch.Tensor, alpha_g: torch.Tensor, y_g: torch.Tensor,
                  max_label: float) -> torch.Tensor:
    """Eq. (20-21): y_s = y_g + (alpha_s - alpha_g) / (alpha_g + eps) * (y_g + alpha_g) / 2,
    clamped to [0, max_label]. alpha_s (R, S), alpha_g (R, 1), y_g (R,) -> (R, S)."""
    y = y_g.unsqueeze(-1)  # (R, 1)
    delta = (alpha_s - alpha_g) / (alpha_g + EPS) * (y + alpha_g) / 2  # Eq. (20)
    return (y + delta).clamp(0.0, max_label)  # Eq. (21)


def ewma_beta(i: int) -> float:
    """EWMA weight of the new estimate at (1-based) epoch i: beta = 2 / (i + 1)."""
    return 2.0 / (i + 1)


class PseudoLabelBank:
    """Per-review pseudo labels (S per review) across epochs, keyed by review id."""

    def __init__(self, num_subtasks: int):
        self.num_subtasks = num_subtasks
        self.rows: dict[str, int] = {}
        self._store = torch.zeros(0, num_subtasks)  # capacity grows by doubling

    @property
    def values(self) -> torch.Tensor:
        """(N, S) labels of the N reviews seen so far, in row order."""
        return self._store[:len(self.rows)]

    def get(self, ids: Sequence[str], y_g: torch.Tensor) -> torch.Tensor:
        """Current labels (R, S) of `ids`; an unseen review starts at its label y_g (Eq. 12)."""
        new = [i for i, r in enumerate(ids) if r not in self.rows]
        if new:
            start = len(self.rows)
            need = start + len(new)
            if need > self._store.shape[0]:
                grown = torch.zeros(max(need, 2 * self._store.shape[0]), self.num_subtasks)
                grown[:start] = self._store[:start]
                self._store = grown
            for k, i in enumerate(new):
                self.rows[ids[i]] = start + k
            init = y_g.detach().float().cpu()[new].unsqueeze(1)  # (n, 1)
            self._store[start:need] = init.expand(-1, self.num_subtasks)
        idx = torch.tensor([self.rows[r] for r in ids], dtype=torch.long)
        return self._store[idx].to(y_g.device)

    def update(self, ids: Sequence[str], estimate: torch.Tensor, epoch: int) -> None:
        """EWMA: y_s <- (1 - beta_i) y_s + beta_i * estimate with beta_i = 2/(i+1)."""
        beta = ewma_beta(epoch)
        idx = torch.tensor([self.rows[r] for r in ids], dtype=torch.long)
        self._store[idx] = (1 - beta) * self._store[idx] + beta * estimate.detach().float().cpu()

    def state(self) -> dict[str, Any]:
        ids = sorted(self.rows, key=self.rows.get)
        return {"review_ids": ids, "pseudo_labels": self.values.clone()}

    def load(self, state: Mapping[str, Any]) -> None:
        values = state["pseudo_labels"]
        ids = list(state["review_ids"])
        if values.shape != (len(ids), self.num_subtasks):
            raise TrainingError(f"MM-SS checkpoint: pseudo labels of shape {tuple(values.shape)} "
                                f"do not match {len(ids)} reviews x {self.num_subtasks} subtasks")
        self.rows = {r: i for i, r in enumerate(ids)}
        self._store = values.float().clone()


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------
class Interaction(nn.Module):
    """One interaction representation: cross-attention of q over kv, self-attention (Eq. 3-4),
    soft pooling over q's positions (Eq. 5)."""

    def __init__(self, *, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.cross = MaskedMultiheadAttention(hidden, heads, dropout)
        self.ln = nn.LayerNorm(hidden)
        self.self_att = CrossModalBlock(hidden, heads, dropout)
        self.pool = SoftPooling(hidden)

    def forward(self, q, q_mask, kv, kv_mask):
        x = self.ln(q + self.cross(q, kv, kv_mask)) * q_mask.unsqueeze(-1).to(q.dtype)  # Eq. (3)
        x = self.self_att(x, q_mask, x, q_mask)  # (R, Lq, H)  Eq. (4)
        return self.pool(x, q_mask)  # (R, H)  Eq. (5)


def _mlp(d_in: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Dropout(dropout))


@register_model("mmss")
class MMSS(nn.Module):
    """MM-SS for multimodal review helpfulness prediction; see the module docstring (hooks,
    per-review state and deviations)."""

    def __init__(self, *, config: MMSSConfig, embeddings: Mapping[str, np.ndarray] | None = None):
        super().__init__()
        c = self.config = config
        self.emb_p, self.emb_r = embedding_pair(embeddings, vocab_size=c.vocab_size,
                                                dim=c.embed_dim, finetune=c.finetune_embeddings)
        self.text_p = RNNEncoder(kind=c.text_encoder, input_dim=c.embed_dim, hidden=c.hidden)
        self.text_r = RNNEncoder(kind=c.text_encoder, input_dim=c.embed_dim, hidden=c.hidden)
        self.img_p = nn.Linear(c.roi_dim, c.hidden)
        self.img_r = nn.Linear(c.roi_dim, c.hidden)
        # Eq. (3-5): the five interaction representations
        self.interactions = nn.ModuleDict({
            k: Interaction(hidden=c.hidden, heads=c.heads, dropout=c.dropout) for k in INTERACTIONS})
        # Eq. (6-8): global representation and score
        self.global_mlp = _mlp(len(INTERACTIONS) * c.hidden, c.hidden, c.dropout)  # Eq. (7)
        self.global_out = nn.Linear(c.hidden, 1)  # Eq. (8)
        if c.subtasks:
            # Eq. (9): subtask heads
            self.heads = nn.ModuleDict({k: nn.Sequential(_mlp(c.hidden, c.hidden, c.dropout),
                                                         nn.Linear(c.hidden, 1))
                                        for k in INTERACTIONS})
            # Eq. (15): log sigma^2 per subtask (homoscedastic uncertainty)
            self.log_var = nn.Parameter(torch.zeros(len(INTERACTIONS)))
            K = len(INTERACTIONS) + 1  # five subtasks and the global representation
            self.register_buffer("anchors", torch.zeros(2, K, c.hidden))  # helpful, unhelpful
            self.register_buffer("anchor_seen", torch.zeros(2, dtype=torch.bool))
            self.register_buffer("feat_var", torch.ones(K, c.hidden))
            self.bank = PseudoLabelBank(len(INTERACTIONS))
        self.epoch = 1  # the paper's i (1-based), set by on_epoch_start

    @classmethod
    def from_config(cls, cfg: Mapping, embeddings: Mapping[str, np.ndarray] | None = None) -> "MMSS":
        cfg = with_embed_dim(cfg, embeddings)  # embed_dim defaults to the matrices' width
        return cls(config=from_mapping(MMSSConfig, cfg, "model.mmss"), embeddings=embeddings)

    # --- trainer hooks and checkpoint state ---------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        """Called by the trainer before epoch `epoch` (0-based) runs."""
        self.epoch = int(epoch) + 1

    def get_extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch}
        if self.config.subtasks:
            state.update(self.bank.state())
        return state

    def set_extra_state(self, state: Mapping[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        if self.config.subtasks:
            self.bank.load(state)

    # --- forward ------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> ModelOutput:
        c = self.config
        pm_t, pm_v = batch.prod_token_mask, batch.prod_roi_mask  # (P, Lp), (P, Np)
        rm_t, rm_v = batch.rev_token_mask, batch.rev_roi_mask  # (R, Lr), (R, Nr)
        pt = self.text_p(self.emb_p(batch.prod_tokens), pm_t)  # (P, Lp, H)
        rt = self.text_r(self.emb_r(batch.rev_tokens), rm_t)  # (R, Lr, H)
        pv = self.img_p(batch.prod_rois) * pm_v.unsqueeze(-1)  # (P, Np, H)
        rv = self.img_r(batch.rev_rois) * rm_v.unsqueeze(-1)  # (R, Nr, H)
        idx = batch.rev_product
        pt_r, pmt_r, pv_r, pmv_r = pt[idx], pm_t[idx], pv[idx], pm_v[idx]
        it = self.interactions
        h = {  # each (R, H), Eq. (3-5)
            "ptrt": it["ptrt"](rt, rm_t, pt_r, pmt_r),
            "pvrv": it["pvrv"](rv, rm_v, pv_r, pmv_r),
            "ptrv": it["ptrv"](rv, rm_v, pt_r, pmt_r),
            "pvrt": it["pvrt"](rt, rm_t, pv_r, pmv_r),
            "rtrv": it["rtrv"](rt, rm_t, rv, rm_v),
        }
        h_cat = torch.cat([h[k] for k in INTERACTIONS], dim=-1)  # (R, 5H)  Eq. (6)
        z_g = self.global_mlp(h_cat)  # (R, H)  Eq. (7)
        scores = self.global_out(z_g).squeeze(-1)  # (R,)  Eq. (8)

        aux: dict[str, torch.Tensor] = {}
        if self.training and c.subtasks:
            aux["subtasks"] = self._subtask_loss(batch, h, z_g)
        return ModelOutput(scores=scores, aux_losses=aux)

    def _subtask_loss(self, batch: Batch, h: dict[str, torch.Tensor], z_g: torch.Tensor) -> torch.Tensor:
        c = self.config
        if len(batch.review_ids) != batch.num_reviews:
            raise TrainingError(f"MM-SS needs one review id per review to keep its pseudo labels: "
                                f"batch has {batch.num_reviews} reviews and {len(batch.review_ids)} ids")
        y_g = batch.labels.float()  # (R,)
        y_s = self.bank.get(batch.review_ids, y_g)  # (R, S) labels of this epoch (EWMA, Eq. 12)
        pred = torch.cat([self.heads[k](h[k]) for k in INTERACTIONS], dim=-1)  # (R, S)  Eq. (9)
        w = torch.tanh((y_s - y_g.unsqueeze(-1)).abs())  # (R, S)  Eq. (14)
        per_task = (w * (pred.float() - y_s).abs()).mean(0)  # (S,)  Eq. (14)
        loss = (0.5 * torch.exp(-self.log_var) * per_task + 0.5 * self.log_var).sum()  # Eq. (15)
        with torch.no_grad():
            feats = torch.stack([h[k] for k in INTERACTIONS] + [z_g], dim=1).detach().float()  # (R, K, H)
            self._update_anchors(feats, y_g)
            d_hi = mahalanobis(feats, self.anchors[0], self.feat_var)  # (R, K)  Eq. (18)
            d_lo = mahalanobis(feats, self.anchors[1], self.feat_var)  # (R, K)  Eq. (18)
            alpha = relative_distance(d_hi, d_lo)  # (R, K)  Eq. (19)
            estimate = offset_labels(alpha[:, :-1], alpha[:, -1:], y_g, c.max_label)  # Eq. (20-21)
            self.bank.update(batch.review_ids, estimate, self.epoch)  # EWMA, beta = 2/(i+1)
        return loss

    def _update_anchors(self, feats: torch.Tensor, y_g: torch.Tensor) -> None:
        """Label-weighted anchors (Eq. 17) and per-dimension variances, smoothed across batches."""
        m = self.config.anchor_momentum
        hi, lo, has_hi, has_lo = label_weighted_anchors(feats, y_g, self.config.max_label)
        for j, (a, has) in enumerate(((hi, has_hi), (lo, has_lo))):
            if not has:
                continue
            self.anchors[j] = m * self.anchors[j] + (1 - m) * a if self.anchor_seen[j] else a
            self.anchor_seen[j] = True
        if feats.shape[0] > 1:
            var = feats.var(0, unbiased=False)  # (K, H)
            self.feat_var.mul_(m).add_((1 - m) * var)
