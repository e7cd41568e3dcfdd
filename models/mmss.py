"""MM-SS (Gong, Jia, Jing 2024): multimodal interaction modelling via self-supervised multi-task
learning, built from the paper (`../shared/papers/mmss.txt`); no public code exists.

Reads top to bottom like the paper:
  Sec. 4.1  encoders. Text: precomputed BERT-family token features (Batch.prod_text_feats /
            rev_text_feats, stage "bert") through one linear projection H_enc -> hidden
            (`text_features: bert`, the `paper` preset; `finetune_text_encoder: true` runs
            the encoder itself on the stored word-piece ids and trains it, A.2), or word
            vectors through one bidirectional GRU (`text_features: glove`, the `glove` preset). Images: each item's
            ROIs (its images' boxes concatenated) 2048 -> hidden, then one self-attention block.
            Product and review share the text and the image encoder (the paper names one BERT
            and one self-attention).
  Eq. 3-5   five interactions f_xy = SoftPool(Self-ATT([X; Y])) for ptrt, pvrv, ptrv, pvrt,
            rtrv: one transformer self-attention block over the concatenation of the two
            sequences under their joint mask, then soft pooling over that joint mask.
  Eq. 6-8   F_c = [f_ptrt; ...; f_rtrv]; f*_g = GELU(Linear(F_c)); y^_g = W_g^T f*_g + b_g
            (the ranking score).
  Eq. 9     f*_s = GELU(W_s f_s + b_s); y^_s = MLP(f*_s) (Linear, GELU, Linear) per subtask.
  Eq. 17-21 SSP-Label: one anchor per task k in {g} + subtasks, A_k = sum_i sig(y_k(i)) f*_k(i)
            / sum_i sig(y_k(i)) over the training samples; chi_k = Mahalanobis distance of f*_k
            to A_k / sqrt(s_k); pseudo-label estimate from the FIRST line of Eq. 21
            (`ssp_label`).
  Eq. 11-12 EWMA over epochs (`ewma_update`): y_s(1) = y_g; y_s(i) = beta y^_s(i) +
            (1 - beta) y_s(i-1), beta = 2/(i+1).
  Eq. 13-16 L = L_tar + L_sub. L_tar is the trainer's hinge ranking loss (the `paper` preset
            sets margin 1, A.2); L_sub (Eq. 14-15) is returned as the aux loss `subtasks`:
            L_s = mean_i tanh(|y_s(i) - y_g|) |y^_s - y_s(i)|, balanced by homoscedastic
            uncertainty sum_s L_s / (2 sigma_s^2) + log(sigma_1 ... sigma_5), with a learned
            log sigma_s^2 per subtask.

Readings of what the paper leaves open (also in docs/fidelity.md, MM-SS section):
  * SoftPool [36]: the paper's references are numbered alphabetically and [36] sits between
    Sener [34] and Vaswani [40]; we read it as Stergiou et al.'s SoftPool: per channel,
    out_d = sum_i softmax_i(x_id) x_id over the real positions (parameter free,
    `pooling: softpool`). `pooling: attention` uses a learned attention pooling instead.
  * Eq. 17 sums sig(y_k(i)) eps_ik, "the modification value of the i-th sample in task k",
    never defined further; we read eps_ik as the sample's representation f*_k(i) (the anchor
    is a point in the space where Eq. 18 measures f*_k).
  * Eq. 17 "over the N training samples": the anchors used during epoch i are the
    sigmoid-weighted means accumulated over every training sample of epoch i-1 (a running
    memory of sums, not one batch, no per-sample feature store). The weights use each task's
    own labels: y_g for g, the pseudo label y_s(i) for subtask s. Epoch 1 needs no anchor (its
    pseudo labels are y_g, Eq. 12); it only accumulates.
  * Eq. 18 Sigma: the paper calls Sigma^-1 "the covariance matrix"; we take the usual
    Mahalanobis form, Sigma the covariance and Sigma^-1 its inverse (the distance divides by
    the variance). "The covariance between f*_k and the anchor" is read as the covariance of
    task k's representations around its anchor, with the same sigmoid weights, kept diagonal
    by default (per-dimension variance, floored at 1e-6): chi_k = sqrt(sum_d (f_d - A_d)^2 /
    var_d); `ssp_covariance: full` uses the full weighted covariance (+ 1e-6 I) and its inverse.
  * Eq. 18 s_k, "a scale factor": the width of f*_k (= hidden for every task) unless
    `ssp_scale` gives a number, i.e. chi_k is the per-dimension RMS Mahalanobis distance.
  * Eq. 21: the first line is implemented; the second line does not follow from the first
    (read as y_g + (2 chi_s - alpha (chi_g + eps)) y_g / (2 (chi_g + eps)) it equals
    y_g (1 - alpha/2) + chi_s y_g / (chi_g + eps): the a2 (chi_s - chi_g)/2 term is gone, the
    Eq. 19 term has lost a1 and its 1/2, and alpha is defined nowhere). eps is `ssp_eps`.
    Pseudo labels are not clamped unless `clamp_pseudo_labels` is set (then to [0, max_label]).
  * Eq. 12 "estimated value after the i-th epoch": the estimate y^_s(i) of a review is computed
    when the review is seen in epoch i (from that step's f*_g, f*_s, detached) and its EWMA
    value y_s(i) is the subtask target of that same step. A review not seen in epoch i-1
    (subsampled out) keeps its older value as y_s(i-1); a review first seen at i > 1 starts
    from y_g.
  * Table 4 "w/o s" rows remove subtask s from Sec. 4.4 only (`subtasks` lists the kept ones);
    f_s still enters F_c. "-module(b)" (`interaction_module: false`): each of T_p, T_r, V_p, V_r
    soft-pooled, concatenated, MLP -> y^_g, no subtasks. "-module(d)": `subtasks: []`.
  * Sec. 4.1 images: the paper concatenates the ROI features, applies self-attention and then
    projects to d_v; we project 2048 -> hidden first (A.2 "encode them into 128-dimensional
    vectors") and attend at the hidden width, over each item's own ROIs (product: its images'
    boxes; review: its images' boxes), so V_p and V_r stay separate as Eq. 4-5 use them
    ("combine ... from both the product and review image sets" is read as one shared encoder
    for both sets, not one attention across them, which would pre-empt Eq. 4's pvrv).
  * Table 4 "-w/o module(b)" is named "w/o Modality-specific Feature Extraction", Figure 2's
    module (a); its description (features concatenated -> MLP, subtasks and fusion removed)
    removes module (b), the interactions, and that is what is built.
  * No positional or segment embeddings in the self-attention blocks (the paper gives none).
  * Eq. 13, 14, 16 reductions: Eq. 13 sums the hinge over the products p_i; Eq. 14 sums over
    the subtasks s and leaves the sample index i free (a per-sample loss, no batch reduction
    written). Both terms of Eq. 16 are kept per sample: L_tar is the trainer's hinge, summed
    over the K negatives of a positive and averaged over positives (`ranking_reduction: mean`;
    a sum would scale L_tar alone by the batch's number of positives); L_s is averaged over
    the batch's reviews; Eq. 16 adds them with weight 1.
  * Fine-tuning BERT: A.2 fine-tunes it (lr 5e-5; Sec. 5.2 "our fine-tuned BERT"), the
    Conclusion lists fine-tuning BERT as future work. Both readings are built:
    `finetune_text_encoder: false` (default, `paper` preset too) reads the bert stage's frozen
    features; `true` builds the dataset's encoder (models/text_encoder.py: the manifest
    resource, verified weights, the stage's random_init/seed/keep_sep, filled in and recorded
    by `models.text_encoder.resolve_text_encoder`) under a forked RNG (every other parameter
    initialises as without it), runs it on the stored word-piece ids (same rows as the stored
    features: at initialisation equal to them up to float16 rounding) and trains it in the
    `text_encoder_lr` group. `text_encoder_lr` covers the projection (the paper preset reads
    A.2's "hidden layer in BERT 128" as this projection, so it gets BERT's 5e-5), the encoder
    when fine-tuned, or the GRU and tables (glove path, off in the `glove` preset: they train
    from scratch). `finetune_text_encoder` with `text_features: glove` is a ConfigError.
  * A.2 "batch size 32" does not say what it counts; the `paper` preset reads 32 products.
  * Not from the paper: dropout (`dropout`), the number of heads (`heads`), the feed-forward
    sublayer of the self-attention blocks, the GRU of the glove path; and the trainer's
    defaults the presets leave alone: 7 negatives per positive, 64 reviews per product in
    training, gradient clipping at norm 5, ReduceLROnPlateau and early stopping on dev MAP.

Training hooks: `on_epoch_start(epoch)` (0-based, the paper's i = epoch + 1) closes the previous
epoch's anchor sums; `parameter_groups(base_lr)` gives the text encoder its own lr (A.2: 5e-5,
`text_encoder_lr`). Per-review pseudo labels (keyed by Batch.review_ids) and the epoch that last
set them live in the module's extra state (a second update of one review in one epoch means
on_epoch_start is not being called: TrainingError); anchors and their running sums are
buffers, so `state_dict()` resumes exactly and loads with `torch.load(..., weights_only=True)`.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn

from models.batch import Batch, ModelOutput
from models.layers import CrossModalBlock, RNNEncoder, ROIEncoder, embedding_pair, masked_softmax, with_embed_dim
from models.layers import SoftPooling as AttentionPooling
from models.registry import register_model
from models.text_encoder import TextEncoder, text_encoder_from_config
from pipeline.config import from_mapping
from pipeline.errors import ConfigError, TrainingError

INTERACTIONS = ("ptrt", "pvrv", "ptrv", "pvrt", "rtrv")
VAR_FLOOR = 1e-6  # floor of the per-dimension variance in Eq. (18)
_NAMES = {"ptrt": "intra-modal-ptrt", "pvrv": "intra-modal-pvrv", "ptrv": "inter-modal-ptrv",
          "pvrt": "inter-modal-pvrt", "rtrv": "intra-review-rtrv"}
# Table 4 rows (models/reported/mmss.yaml `setting`) -> the model_cfg switches that run them
TABLE4_SWITCHES: dict[str, dict[str, Any]] = {
    "": {},
    **{f"w/o {n}": {"subtasks": [t for t in INTERACTIONS if t != s]} for s, n in _NAMES.items()},
    "w/o module(b)": {"interaction_module": False, "subtasks": []},
    "w/o module(d)": {"subtasks": []},
}


@dataclass(frozen=True)
class MMSSConfig:
    # Text (Sec. 4.1). The dataclass defaults are the paper's architecture with the glove text
    # path, so a bare config needs no BERT stage; the `paper` preset selects BERT features.
    text_features: Literal["bert", "glove"] = "glove"
    text_feat_dim: int = 768  # width H of the stored encoder features (bert path)
    vocab_size: int = 0  # rows of the random tables when no embedding matrix is given (tests)
    embed_dim: int = 300  # word-vector size (glove path)
    finetune_embeddings: bool = False  # glove path: train the word tables
    text_encoder_lr: float | None = None  # A.2: 5e-5 for the text encoder; None = the base lr
    # Fine-tuning the BERT-family encoder (bert path; A.2 fine-tunes BERT, the Conclusion calls it
    # future work: off by default, the stored features are read frozen). When on, the encoder is
    # built from the manifest resource and run on the word-piece ids of the bert view
    # (models/text_encoder.py); the trainer fills the next five keys from the manifest
    # (models.text_encoder.resolve_text_encoder) and the run's config records them.
    finetune_text_encoder: bool = False
    text_encoder: str | None = None  # resources.text_encoders name (the dataset's text_encoder)
    manifest: str | None = None  # the manifest file declaring it
    text_encoder_random_init: bool = False  # stages.bert.random_init: the stage's seeded random weights
    text_encoder_seed: int = 0  # stages.bert.seed (random init only)
    keep_sep: bool = False  # stages.bert.keep_sep: the [SEP] row is a token row too
    roi_dim: int = 2048  # ROI feature size (A.2)
    hidden: int = 128  # d_t = d_v = d_g (A.2: 128)
    heads: int = 4  # attention heads (not in the paper)
    dropout: float = 0.1  # dropout in attention blocks and after GELU (not in the paper)
    pooling: Literal["softpool", "attention"] = "softpool"  # SoftPool of Eq. 3-5
    interaction_module: bool = True  # False: Table 4 "-w/o module(b)"
    subtasks: tuple[str, ...] = INTERACTIONS  # Sec. 4.4 subtasks kept; () = "-w/o module(d)"
    ssp_a1: float = 1.0  # alpha_1 of Eq. 19 / 21
    ssp_a2: float = 1.0  # alpha_2 of Eq. 20 / 21
    ssp_eps: float = 1e-6  # epsilon of Eq. 19 / 21
    ssp_scale: float | None = None  # s_k of Eq. 18; None = the width of f*_k
    ssp_covariance: Literal["diagonal", "full"] = "diagonal"  # Sigma of Eq. 18
    clamp_pseudo_labels: bool = False  # clamp y_s to [0, max_label] (not in the paper)
    max_label: float = 4.0  # top of the helpfulness scale (only used by the clamp)


def _check(c: MMSSConfig) -> MMSSConfig:
    bad = [s for s in c.subtasks if s not in INTERACTIONS]
    if bad:
        raise ConfigError(f"model.mmss.subtasks: unknown subtask(s) {', '.join(bad)}; "
                          f"valid: {', '.join(INTERACTIONS)}")
    if len(set(c.subtasks)) != len(c.subtasks):
        raise ConfigError(f"model.mmss.subtasks: duplicates in {list(c.subtasks)}")
    if not c.interaction_module and c.subtasks:
        raise ConfigError("model.mmss.interaction_module: false (Table 4 -w/o module(b)) removes the "
                          "subtasks too; also set subtasks: []")
    for name in ("hidden", "heads", "roi_dim", "text_feat_dim"):
        if getattr(c, name) < 1:
            raise ConfigError(f"model.mmss.{name}: expected a positive integer, got {getattr(c, name)}")
    if c.hidden % c.heads:
        raise ConfigError(f"model.mmss.hidden: {c.hidden} is not divisible by heads={c.heads}")
    if c.finetune_text_encoder and c.text_features != "bert":
        raise ConfigError(f"model.mmss.finetune_text_encoder: true fine-tunes the BERT-family encoder of "
                          f"text_features: bert; text_features: {c.text_features} has none (its GRU trains "
                          f"anyway); set text_features: bert or drop finetune_text_encoder")
    if not c.finetune_text_encoder and (c.text_encoder_random_init or c.keep_sep):
        raise ConfigError("model.mmss.text_encoder_random_init / keep_sep: only read with "
                          "finetune_text_encoder: true (the frozen path reads the rows the bert stage "
                          "stored); drop them or set finetune_text_encoder: true")
    if c.text_features == "glove" and c.hidden % 2:
        raise ConfigError(f"model.mmss.hidden: {c.hidden} must be even for the bidirectional GRU")
    if not 0.0 <= c.dropout < 1.0:
        raise ConfigError(f"model.mmss.dropout: expected a number in [0, 1), got {c.dropout}")
    if c.clamp_pseudo_labels and c.max_label <= 0:
        raise ConfigError(f"model.mmss.max_label: the clamp [0, max_label] needs a positive top, "
                          f"got {c.max_label}")
    if c.ssp_eps <= 0:
        raise ConfigError(f"model.mmss.ssp_eps: expected a positive number, got {c.ssp_eps}")
    if c.ssp_scale is not None and c.ssp_scale <= 0:
        raise ConfigError(f"model.mmss.ssp_scale: expected a positive number or null, got {c.ssp_scale}")
    if c.text_encoder_lr is not None and c.text_encoder_lr <= 0:
        raise ConfigError(f"model.mmss.text_encoder_lr: expected a positive number or null, "
                          f"got {c.text_encoder_lr}")
    return c


# ---------------------------------------------------------------------------------------------
# Public SSP-Label pieces (the named functions)
# ---------------------------------------------------------------------------------------------
def ssp_label(y_g: torch.Tensor, chi_g: torch.Tensor, chi_s: torch.Tensor, a1: float = 1.0,
              a2: float = 1.0, eps: float = 1e-6) -> torch.Tensor:
    """Eq. (21), first line, elementwise:
    y_s = (y_g + a2 (chi_s - chi_g)) / 2 + a1 chi_s y_g / (2 (chi_g + eps)),
    the equal-weight mean of Eq. (19) y_s = a1 chi_s / (chi_g + eps) y_g and Eq. (20)
    y_s = y_g + a2 (chi_s - chi_g). No clamp."""
    return (y_g + a2 * (chi_s - chi_g)) / 2 + a1 * chi_s * y_g / (2 * (chi_g + eps))


def ewma_update(previous: torch.Tensor, estimate: torch.Tensor, epoch: int) -> torch.Tensor:
    """Eq. (12); `epoch` is the paper's i, counted from 1. At i = 1 returns `previous` unchanged
    (the caller starts it at y_g); at i > 1 returns beta * estimate + (1 - beta) * previous with
    beta = 2 / (i + 1) (Eq. 11)."""
    if epoch < 1:
        raise ValueError(f"epoch counts from 1, got {epoch}")
    if epoch == 1:
        return previous
    beta = 2.0 / (epoch + 1)
    return beta * estimate + (1 - beta) * previous


def subtask_loss(pred: torch.Tensor, y_s: torch.Tensor, y_g: torch.Tensor,
                 log_var: torch.Tensor) -> torch.Tensor:
    """Eq. (14-15). pred, y_s (R, S); y_g (R,); log_var (S,) = log sigma_s^2.
    L_s = mean_i tanh(|y_s(i) - y_g(i)|) |pred_s(i) - y_s(i)| (Eq. 14, averaged over the batch);
    L_sub = sum_s L_s / (2 sigma_s^2) + log(sigma_1 ... sigma_S) (Eq. 15)."""
    weight = torch.tanh((y_s - y_g.unsqueeze(-1)).abs())  # W_s^i
    per_task = (weight * (pred - y_s).abs()).mean(0)  # (S,)
    return (0.5 * torch.exp(-log_var) * per_task).sum() + 0.5 * log_var.sum()


def anchor(feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. (17): A = sum_i sigmoid(y(i)) f(i) / sum_i sigmoid(y(i)). feats (N, H), labels (N,)."""
    w = torch.sigmoid(labels.float())
    return (w.unsqueeze(-1) * feats).sum(0) / w.sum()


def mahalanobis(feats: torch.Tensor, anchor: torch.Tensor, var: torch.Tensor,
                scale: float) -> torch.Tensor:
    """Eq. (18) with a diagonal Sigma: sqrt(sum_d (f_d - A_d)^2 / var_d) / sqrt(s_k).
    feats (..., H), anchor/var broadcastable to it -> (...)."""
    return (((feats - anchor) ** 2) / var.clamp(min=VAR_FLOOR)).sum(-1).sqrt() / math.sqrt(scale)


def mahalanobis_full(feats: torch.Tensor, anchor: torch.Tensor, precision: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Eq. (18) with a full Sigma: sqrt((f - A)^T Sigma^-1 (f - A)) / sqrt(s_k).
    feats (R, K, H), anchor (K, H), precision = Sigma^-1 (K, H, H) -> (R, K)."""
    d = feats - anchor
    q = torch.einsum("rkh,khg,rkg->rk", d, precision, d)
    return q.clamp(min=0).sqrt() / math.sqrt(scale)


def soft_pool(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SoftPool (Stergiou et al.), per channel over the real positions: out_d = sum_i
    softmax_i(x_id) x_id. x (B, L, H), mask (B, L) -> (B, H); rows without a real position give
    zeros. The softmax is taken in float32."""
    w = masked_softmax(x.float(), mask.unsqueeze(-1), dim=1)  # (B, L, H)
    return (w * x.float()).sum(1).to(x.dtype)


class PseudoLabelBank:
    """Per-review pseudo labels y_s (S per review) across epochs, keyed by review id, with the
    epoch i that last set each review's labels (Eq. 12 updates a review once per epoch)."""

    def __init__(self, num_subtasks: int):
        self.num_subtasks = num_subtasks
        self.rows: dict[str, int] = {}
        self._store = torch.zeros(0, num_subtasks)  # capacity grows by doubling
        self._epoch = torch.zeros(0, dtype=torch.long)  # epoch of the last update, 0 = never

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
                size = max(need, 2 * self._store.shape[0])
                grown = torch.zeros(size, self.num_subtasks)
                grown[:start] = self._store[:start]
                self._store = grown
                grown_epoch = torch.zeros(size, dtype=torch.long)
                grown_epoch[:start] = self._epoch[:start]
                self._epoch = grown_epoch
            for k, i in enumerate(new):
                self.rows[ids[i]] = start + k
            init = y_g.detach().float().cpu()[new].unsqueeze(1)  # (n, 1)
            self._store[start:need] = init.expand(-1, self.num_subtasks)
        idx = torch.tensor([self.rows[r] for r in ids], dtype=torch.long)
        return self._store[idx].to(y_g.device)

    def updated_in(self, ids: Sequence[str], epoch: int) -> list[str]:
        """The ids among `ids` whose labels were already set in epoch `epoch`."""
        return [r for r in ids if r in self.rows and int(self._epoch[self.rows[r]]) == epoch]

    def set(self, ids: Sequence[str], values: torch.Tensor, epoch: int = 0) -> None:
        idx = torch.tensor([self.rows[r] for r in ids], dtype=torch.long)
        self._store[idx] = values.detach().float().cpu()
        self._epoch[idx] = int(epoch)

    def state(self) -> dict[str, Any]:
        ids = sorted(self.rows, key=self.rows.get)
        return {"review_ids": ids, "pseudo_labels": self.values.clone(),
                "label_epochs": self._epoch[:len(ids)].clone()}

    def load(self, state: Mapping[str, Any]) -> None:
        values = state["pseudo_labels"]
        ids = list(state["review_ids"])
        if values.shape != (len(ids), self.num_subtasks):
            raise TrainingError(f"MM-SS checkpoint: pseudo labels of shape {tuple(values.shape)} "
                                f"do not match {len(ids)} reviews x {self.num_subtasks} subtasks")
        epochs = state.get("label_epochs")  # absent in checkpoints written before it existed
        if epochs is None:
            epochs = torch.zeros(len(ids), dtype=torch.long)
        if tuple(epochs.shape) != (len(ids),):
            raise TrainingError(f"MM-SS checkpoint: label epochs of shape {tuple(epochs.shape)} do not "
                                f"match {len(ids)} reviews")
        self.rows = {r: i for i, r in enumerate(ids)}
        self._store = values.float().clone()
        self._epoch = epochs.long().clone()


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------
class Pool(nn.Module):
    """SoftPool (default, parameter free) or learned attention pooling over a mask."""

    def __init__(self, kind: str, dim: int):
        super().__init__()
        self.kind = kind
        self.att = AttentionPooling(dim) if kind == "attention" else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return soft_pool(x, mask) if self.att is None else self.att(x, mask)


class JointInteraction(nn.Module):
    """Eq. (3-5): f_xy = SoftPool(Self-ATT([X; Y])): one transformer self-attention block over
    the concatenation of X (B, Lx, H) and Y (B, Ly, H) under the joint mask [mx; my], pooled over
    that joint mask."""

    def __init__(self, *, hidden: int, heads: int, dropout: float, pooling: str):
        super().__init__()
        self.self_att = CrossModalBlock(hidden, heads, dropout)
        self.pool = Pool(pooling, hidden)

    def forward(self, x, x_mask, y, y_mask):
        xy = torch.cat([x, y], dim=1)  # (B, Lx + Ly, H)
        m = torch.cat([x_mask, y_mask], dim=1)  # (B, Lx + Ly)
        c = self.self_att(xy, m, xy, m)  # C = Self-ATT([X; Y])
        return self.pool(c, m)  # (B, H)


def _gelu_mlp(d_in: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1))


@register_model("mmss")
class MMSS(nn.Module):
    """MM-SS; see the module docstring for the equations, the readings and the hooks."""

    PRESET_NAMES: tuple[str, ...] = ("paper", "glove")

    def __init__(self, *, config: MMSSConfig, embeddings: Mapping[str, np.ndarray] | None = None):
        super().__init__()
        c = self.config = _check(config)
        # Sec. 4.1 encoders (shared by product and review)
        self.text_encoder: TextEncoder | None = None
        if c.text_features == "bert":
            if c.finetune_text_encoder:
                # built under a forked RNG, so every other parameter initialises as without it
                with torch.random.fork_rng(devices=[]):
                    self.text_encoder = text_encoder_from_config(dataclasses.asdict(c))
                if self.text_encoder is not None and self.text_encoder.hidden_size != c.text_feat_dim:
                    raise ConfigError(f"model.mmss.text_feat_dim: {c.text_feat_dim}, but text encoder "
                                      f"{c.text_encoder!r} has hidden_size {self.text_encoder.hidden_size}; "
                                      f"set it to {self.text_encoder.hidden_size}")
            self.text_proj = nn.Linear(c.text_feat_dim, c.hidden)
        else:
            self.emb_p, self.emb_r = embedding_pair(embeddings, vocab_size=c.vocab_size,
                                                    dim=c.embed_dim, finetune=c.finetune_embeddings)
            self.text_rnn = RNNEncoder(kind="gru", input_dim=c.embed_dim, hidden=c.hidden)
        self.image = ROIEncoder(roi_dim=c.roi_dim, hidden=c.hidden, heads=c.heads, layers=1,
                                dropout=c.dropout)
        self.drop = nn.Dropout(c.dropout)
        if c.interaction_module:
            # Eq. (3-5)
            self.interactions = nn.ModuleDict({
                k: JointInteraction(hidden=c.hidden, heads=c.heads, dropout=c.dropout, pooling=c.pooling)
                for k in INTERACTIONS})
            self.fuse = nn.Linear(len(INTERACTIONS) * c.hidden, c.hidden)  # Eq. (7)
            self.out_g = nn.Linear(c.hidden, 1)  # Eq. (8)
        else:
            # Table 4 "-w/o module(b)": item features concatenated -> MLP -> y_g
            self.item_pool = nn.ModuleList(Pool(c.pooling, c.hidden) for _ in range(4))
            self.flat_mlp = _gelu_mlp(4 * c.hidden, c.hidden, c.dropout)
        self.subtasks = tuple(c.subtasks)
        if self.subtasks:
            S, K = len(self.subtasks), len(self.subtasks) + 1  # K tasks: g and the subtasks
            self.sub_proj = nn.ModuleDict({s: nn.Linear(c.hidden, c.hidden) for s in self.subtasks})  # Eq. 9
            self.sub_mlp = nn.ModuleDict({s: _gelu_mlp(c.hidden, c.hidden, c.dropout)
                                          for s in self.subtasks})  # Eq. (9) y^_s = MLP(f*_s)
            self.log_var = nn.Parameter(torch.zeros(S))  # Eq. (15): log sigma_s^2
            # Eq. (17-18): anchors and diagonal covariances used this epoch (row 0 = g) ...
            self.register_buffer("anchors", torch.zeros(K, c.hidden, dtype=torch.float64))
            self.register_buffer("variances", torch.ones(K, c.hidden, dtype=torch.float64))
            self.register_buffer("anchor_ready", torch.zeros((), dtype=torch.bool))
            # ... and the running sums of the epoch in progress (sum w, sum w f, sum w f^2)
            self.register_buffer("acc_w", torch.zeros(K, dtype=torch.float64))
            self.register_buffer("acc_f", torch.zeros(K, c.hidden, dtype=torch.float64))
            self.register_buffer("acc_f2", torch.zeros(K, c.hidden, dtype=torch.float64))
            if c.ssp_covariance == "full":  # sum w f f^T and Sigma^-1
                eye = torch.eye(c.hidden, dtype=torch.float64).expand(K, -1, -1).clone()
                self.register_buffer("acc_ff", torch.zeros(K, c.hidden, c.hidden, dtype=torch.float64))
                self.register_buffer("precision", eye)
            self.bank = PseudoLabelBank(S)
        self.epoch = 1  # the paper's i (1-based), set by on_epoch_start

    # --- presets and views (shared contracts) ---------------------------------------------------
    @classmethod
    def preset(cls, name: str, *, category: str | None = None) -> dict:
        """`paper`: BERT token features, text-encoder lr 5e-5, rest 1e-4, batch 32, hinge margin 1
        over any higher label (A.2, Eq. 13). `glove`: the same with word vectors + GRU and one
        lr (the GRU trains from scratch). `category` changes nothing (the paper uses one setting)."""
        if name not in cls.PRESET_NAMES:
            raise ConfigError(f"mmss preset {name!r} unknown; valid: {', '.join(cls.PRESET_NAMES)}")
        # ranking_reduction spelled out: Eq. 13's hinge is kept per sample, like Eq. 14 (module docstring)
        train = {"lr": 1e-4, "batch_products": 32, "margin": "fixed", "fixed_margin": 1.0,
                 "min_gap": 1.0, "negative_weights": "none", "ranking_reduction": "mean"}
        if name == "paper":
            model_cfg = {"text_features": "bert", "text_encoder_lr": 5e-5, "hidden": 128}
        else:
            model_cfg = {"text_features": "glove", "text_encoder_lr": None, "hidden": 128}
        return {"model_cfg": model_cfg, "train": train}

    @classmethod
    def config_record(cls, cfg: Mapping[str, Any]) -> MMSSConfig:
        """The validated config record (models.registry.model_config calls this as a config
        loads, so contradictory settings stop before any data is read)."""
        return _check(from_mapping(MMSSConfig, dict(cfg), "model.mmss"))

    @classmethod
    def check_train_config(cls, record: MMSSConfig, train: Any) -> None:
        """Model settings a run about to train refuses (`models.config` calls this as a training
        config loads, not for a finished run's saved config). `finetune_embeddings: true` trains
        the word-vector tables of the glove path; `text_features: bert` has none, so the key
        would silently do nothing: refused for training. A run folder saved before this refusal
        with that pair still loads for evaluate / predict: the key never had an effect on the
        bert path, so its saved model is the same as without it."""
        if record.text_features == "bert" and record.finetune_embeddings:
            raise ConfigError("model.mmss.finetune_embeddings: true trains the word-vector tables of the glove "
                              "path; text_features: bert has none (its text encoder is text_proj over the stored "
                              "features); drop the key or set text_features: glove")

    @classmethod
    def required_views(cls, model_cfg: Mapping) -> frozenset[str]:
        """tokens + rois, and bert on the bert path (frozen or fine-tuned: the ids the encoder
        reads come from the bert view too)."""
        c = _check(from_mapping(MMSSConfig, dict(model_cfg or {}), "model.mmss"))
        views = {"tokens", "rois"}
        if c.text_features == "bert":
            views.add("bert")
        return frozenset(views)

    @classmethod
    def from_config(cls, cfg: Mapping, embeddings: Mapping[str, np.ndarray] | None = None) -> MMSS:
        cfg = dict(cfg)
        if cfg.get("text_features", "glove") == "glove":
            cfg = with_embed_dim(cfg, embeddings)  # embed_dim defaults to the matrices' width
        return cls(config=from_mapping(MMSSConfig, cfg, "model.mmss"), embeddings=embeddings)

    # --- trainer hooks and checkpoint state -------------------------------------------------------
    def text_encoder_parameters(self) -> list[nn.Parameter]:
        """The text encoder's trainable parameters (A.2's 5e-5 group): the projection over the
        BERT rows and, when fine-tuning, the BERT-family encoder itself; or the GRU and word
        tables of the glove path."""
        mods: list[nn.Module]
        if self.config.text_features == "bert":
            mods = [self.text_proj] + ([self.text_encoder] if self.text_encoder is not None else [])
        else:
            mods = [self.emb_p, self.emb_r, self.text_rnn]
        return [p for m in mods for p in m.parameters() if p.requires_grad]

    def parameter_groups(self, base_lr: float) -> list[dict]:
        """A.2: the text encoder at `text_encoder_lr` (5e-5 in the paper preset), the rest at
        base_lr. The base group comes first (the trainer logs its lr)."""
        lr_t = self.config.text_encoder_lr
        text = self.text_encoder_parameters() if lr_t is not None else []
        ids = {id(p) for p in text}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"params": rest, "lr": base_lr}]
        if text:
            groups.append({"params": text, "lr": lr_t})
        return groups

    def on_epoch_start(self, epoch: int) -> None:
        """Called by the trainer before epoch `epoch` (0-based) runs: closes the anchor sums of
        the previous epoch (Eq. 17 over its training samples) and sets i = epoch + 1."""
        i = int(epoch) + 1
        if self.subtasks and i != self.epoch and float(self.acc_w.max()) > 0:
            if float(self.acc_w.min()) <= 0:  # a task whose sigmoid weights all underflowed
                raise TrainingError(f"MM-SS epoch {self.epoch}: the Eq. 17 weight sums are "
                                    f"{self.acc_w.tolist()} (tasks g, {', '.join(self.subtasks)}); "
                                    f"an anchor with zero total weight is undefined")
            a = self.acc_f / self.acc_w.unsqueeze(-1)  # (K, H)  Eq. (17)
            var = self.acc_f2 / self.acc_w.unsqueeze(-1) - a ** 2  # weighted variance about A
            self.anchors.copy_(a)
            self.variances.copy_(var.clamp(min=VAR_FLOOR))
            if self.config.ssp_covariance == "full":
                cov = self.acc_ff / self.acc_w[:, None, None] - a.unsqueeze(-1) * a.unsqueeze(-2)
                eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
                self.precision.copy_(torch.linalg.inv(cov + VAR_FLOOR * eye))  # ridge: Sigma + 1e-6 I
                self.acc_ff.zero_()
            self.anchor_ready.fill_(True)
            self.acc_w.zero_(), self.acc_f.zero_(), self.acc_f2.zero_()
        self.epoch = i

    def get_extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch}
        if self.subtasks:
            state.update(self.bank.state())
        return state

    def set_extra_state(self, state: Mapping[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        if self.subtasks:
            self.bank.load(state)

    # --- forward ----------------------------------------------------------------------------------
    def text_token_features(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The BERT rows of Eq. (2) before the projection, (P, Lp, H), (P, Lp) bool, (R, Lr, H),
        (R, Lr) bool: the stored features (frozen), or the fine-tuned encoder run on the stored
        word-piece ids, cut to the longest text of the batch (same rows as the stored ones)."""
        c = self.config
        if self.text_encoder is not None:
            pi, pim = batch.prod_text_ids, batch.prod_text_ids_mask
            ri, rim = batch.rev_text_ids, batch.rev_text_ids_mask
            if pi is None or pim is None or ri is None or rim is None:
                raise TrainingError("MM-SS finetune_text_encoder: the batch carries no word-piece ids "
                                    "(the bert view's input_ids); run `mrhp extract --stage bert`")
            return (*self._encode(pi, pim), *self._encode(ri, rim))
        pf, pm = batch.prod_text_feats, batch.prod_text_feat_mask
        rf, rm = batch.rev_text_feats, batch.rev_text_feat_mask
        if pf is None or pm is None or rf is None or rm is None:
            raise TrainingError("MM-SS text_features=bert: the batch carries no text-encoder "
                                "features (stage 'bert'); run `mrhp extract --stage bert` or use "
                                "the glove preset")
        if pf.shape[-1] != c.text_feat_dim or rf.shape[-1] != c.text_feat_dim:
            raise TrainingError(f"MM-SS: text-encoder features are {pf.shape[-1]}-d, "
                                f"model_cfg.text_feat_dim is {c.text_feat_dim}; set it to "
                                f"{pf.shape[-1]}")
        return pf, pm.bool(), rf, rm.bool()

    def _encode(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.text_encoder is not None
        feats, rows = self.text_encoder(ids, mask)  # [SEP] row masked unless keep_sep
        width = max(1, int(rows.sum(1).max())) if rows.numel() else 1  # rows are left-aligned
        return feats[:, :width], rows[:, :width]

    def _text(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.config
        if c.text_features == "bert":
            pf, pm, rf, rm = self.text_token_features(batch)
            pt = self.text_proj(pf.to(self.text_proj.weight.dtype)) * pm.unsqueeze(-1)
            rt = self.text_proj(rf.to(self.text_proj.weight.dtype)) * rm.unsqueeze(-1)
            return pt, pm.bool(), rt, rm.bool()
        pm, rm = batch.prod_token_mask, batch.rev_token_mask
        pt = self.text_rnn(self.emb_p(batch.prod_tokens), pm)  # (P, Lp, H)
        rt = self.text_rnn(self.emb_r(batch.rev_tokens), rm)  # (R, Lr, H)
        return pt, pm, rt, rm

    def forward(self, batch: Batch) -> ModelOutput:
        pt, pm_t, rt, rm_t = self._text(batch)  # T_p, T_r (Eq. 2)
        pm_v, rm_v = batch.prod_roi_mask, batch.rev_roi_mask
        pv = self.image(batch.prod_rois, pm_v)  # V_p (P, Np, H)
        rv = self.image(batch.rev_rois, rm_v)  # V_r (R, Nr, H)
        idx = batch.rev_product
        pt_r, pmt_r, pv_r, pmv_r = pt[idx], pm_t[idx], pv[idx], pm_v[idx]
        if not self.config.interaction_module:  # Table 4 "-w/o module(b)"
            parts = [(pt_r, pmt_r), (rt, rm_t), (pv_r, pmv_r), (rv, rm_v)]
            flat = torch.cat([pool(x, m) for pool, (x, m) in zip(self.item_pool, parts, strict=True)], dim=-1)
            return ModelOutput(scores=self.flat_mlp(flat).squeeze(-1))
        it = self.interactions
        f = {  # each (R, H)
            "ptrt": it["ptrt"](pt_r, pmt_r, rt, rm_t),  # Eq. (4)
            "pvrv": it["pvrv"](pv_r, pmv_r, rv, rm_v),  # Eq. (4)
            "ptrv": it["ptrv"](pt_r, pmt_r, rv, rm_v),  # Eq. (5)
            "pvrt": it["pvrt"](pv_r, pmv_r, rt, rm_t),  # Eq. (5)
            "rtrv": it["rtrv"](rt, rm_t, rv, rm_v),  # Eq. (3)
        }
        F_c = torch.cat([f[k] for k in INTERACTIONS], dim=-1)  # (R, 5H)  Eq. (6)
        f_g = nn.functional.gelu(self.fuse(F_c))  # f*_g (R, H)  Eq. (7)
        scores = self.out_g(self.drop(f_g)).squeeze(-1)  # y^_g (R,)  Eq. (8)
        aux: dict[str, torch.Tensor] = {}
        if self.training and self.subtasks:
            aux["subtasks"] = self._subtask_loss(batch, f, f_g)
        return ModelOutput(scores=scores, aux_losses=aux)

    def _subtask_loss(self, batch: Batch, f: dict[str, torch.Tensor], f_g: torch.Tensor) -> torch.Tensor:
        c = self.config
        if len(batch.review_ids) != batch.num_reviews:
            raise TrainingError(f"MM-SS needs one review id per review to keep its pseudo labels: "
                                f"batch has {batch.num_reviews} reviews and {len(batch.review_ids)} ids")
        if len(set(batch.review_ids)) != len(batch.review_ids):
            dup = sorted({r for r in batch.review_ids if batch.review_ids.count(r) > 1})
            raise TrainingError(f"MM-SS keeps one pseudo label per review id: the batch repeats "
                                f"{', '.join(map(str, dup[:3]))}")
        again = self.bank.updated_in(batch.review_ids, self.epoch)
        if again:  # a second update in one epoch: on_epoch_start is not called, or ids collide
            raise TrainingError(f"MM-SS epoch {self.epoch}: review {again[0]!r} already has its pseudo "
                                f"labels of this epoch (Eq. 12 updates them once per epoch); call "
                                f"on_epoch_start(epoch) before every training epoch, and give every "
                                f"review its own id")
        f_s = {s: nn.functional.gelu(self.sub_proj[s](f[s])) for s in self.subtasks}  # f*_s, Eq. (9)
        pred = torch.cat([self.sub_mlp[s](self.drop(f_s[s])) for s in self.subtasks], dim=-1).float()  # (R, S)
        y_g = batch.labels.float()  # (R,)
        # SSP-Label reads f*_g and f*_s before dropout, detached (pseudo labels are targets)
        feats = torch.stack([f_g] + [f_s[s] for s in self.subtasks], dim=1).detach().double()  # (R, K, H)
        with torch.no_grad():
            y_prev = self.bank.get(batch.review_ids, y_g)  # y_s(i-1), or y_g when first seen
            if self.epoch == 1:
                y_s = ewma_update(y_prev, y_prev, 1)  # Eq. (12): y_s(1) = y_g
            else:
                if not bool(self.anchor_ready):
                    raise TrainingError(f"MM-SS epoch {self.epoch}: no anchor (Eq. 17) from a finished "
                                        f"training epoch; call on_epoch_start once per epoch")
                scale = float(c.ssp_scale) if c.ssp_scale is not None else float(c.hidden)
                if c.ssp_covariance == "full":
                    chi = mahalanobis_full(feats, self.anchors, self.precision, scale).float()
                else:
                    chi = mahalanobis(feats, self.anchors, self.variances, scale).float()  # (R, K) Eq. 18
                est = ssp_label(y_g.unsqueeze(-1), chi[:, :1], chi[:, 1:], a1=c.ssp_a1, a2=c.ssp_a2,
                                eps=c.ssp_eps)  # (R, S)  Eq. (21), first line
                y_s = ewma_update(y_prev, est, self.epoch)  # Eq. (12)
            if c.clamp_pseudo_labels:
                y_s = y_s.clamp(0.0, c.max_label)
            self.bank.set(batch.review_ids, y_s, self.epoch)
            # Eq. (17) running sums of this epoch, each task weighted by sigmoid of its own label
            w = torch.sigmoid(torch.cat([y_g.unsqueeze(-1), y_s], dim=-1).double())  # (R, K)
            self.acc_w += w.sum(0)
            self.acc_f += torch.einsum("rk,rkh->kh", w, feats)
            self.acc_f2 += torch.einsum("rk,rkh->kh", w, feats ** 2)
            if c.ssp_covariance == "full":
                self.acc_ff += torch.einsum("rk,rkh,rkg->khg", w, feats, feats)
        return subtask_loss(pred, y_s, y_g, self.log_var)  # Eq. (14-15)
