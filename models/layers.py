"""Building blocks shared by the paper models: masked attention and pooling, text encoders over
frozen embedding tables, ROI encoders.

Every block takes explicit boolean masks (True = real position) and is safe when a row has no
real position at all (an item without images, a text emptied by vocabulary filtering): the
output for such a row is zeros, never NaN. Shapes: B rows, L positions, H hidden size.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from pipeline.errors import ConfigError

NEG_INF = -1e9  # finite "minus infinity": keeps softmax NaN-free, exp underflows to exactly 0


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax of `scores` over the positions where `mask` is True; all-False rows give zeros.
    Computed in float32 (safe under fp16/bf16 autocast)."""
    scores = scores.float().masked_fill(~mask, NEG_INF)
    weights = torch.softmax(scores, dim=dim)
    return weights * mask.to(weights.dtype)  # zeroes the uniform weights of all-masked rows


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x (B, L, H) over the real positions of mask (B, L); (B, H), zeros for empty rows."""
    m = mask.to(x.dtype).unsqueeze(-1)  # (B, L, 1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


def build_embedding(matrix: np.ndarray | None, *, vocab_size: int, dim: int, finetune: bool,
                    field: str) -> nn.Embedding:
    """An embedding table from a (V, dim) matrix (frozen unless `finetune`), or a random one of
    `vocab_size` rows for tests and from-scratch runs. Row 0 is PAD."""
    if matrix is None:
        if vocab_size < 2:
            raise ConfigError(
                f"{field}: no embedding matrix given, so vocab_size must be >= 2, got {vocab_size}"
            )
        emb = nn.Embedding(vocab_size, dim, padding_idx=0)
        nn.init.uniform_(emb.weight, -0.25, 0.25)
        with torch.no_grad():
            emb.weight[0].zero_()
    else:
        matrix = np.asarray(matrix, dtype=np.float32)
        if matrix.ndim != 2 or matrix.shape[1] != dim:
            raise ConfigError(
                f"{field}: embedding matrix has shape {tuple(matrix.shape)}, expected (V, {dim}) "
                f"for embed_dim={dim}"
            )
        emb = nn.Embedding.from_pretrained(torch.from_numpy(matrix.copy()), freeze=False,
                                           padding_idx=0)
    emb.weight.requires_grad_(finetune)
    return emb


def with_embed_dim(cfg: Mapping, embeddings: Mapping[str, np.ndarray] | None) -> dict:
    """`cfg` with `embed_dim` taken from the given matrices when the config leaves it out, so a
    model runs on whatever vectors the manifest names (50-d demo GloVe, 300-d for the papers)."""
    out = dict(cfg)
    if embeddings is not None and "embed_dim" not in out and "rvw" in embeddings:
        out["embed_dim"] = int(np.asarray(embeddings["rvw"]).shape[1])
    return out


def embedding_pair(embeddings: Mapping[str, np.ndarray] | None, *, vocab_size: int, dim: int,
                   finetune: bool) -> tuple[nn.Embedding, nn.Embedding]:
    """The product and review tables from `{"prd": matrix, "rvw": matrix}` (or random ones)."""
    if embeddings is None:
        return (build_embedding(None, vocab_size=vocab_size, dim=dim, finetune=finetune, field="prd"),
                build_embedding(None, vocab_size=vocab_size, dim=dim, finetune=finetune, field="rvw"))
    missing = [k for k in ("prd", "rvw") if k not in embeddings]
    if missing:
        raise ConfigError(f"embeddings: missing matrix for {', '.join(missing)}; "
                          f"got keys {sorted(embeddings)}")
    return (build_embedding(embeddings["prd"], vocab_size=0, dim=dim, finetune=finetune, field="prd"),
            build_embedding(embeddings["rvw"], vocab_size=0, dim=dim, finetune=finetune, field="rvw"))


class RNNEncoder(nn.Module):
    """LSTM or GRU over padded token vectors; padded and empty rows come out as zeros.

    `bidirectional` halves the per-direction size so the output is always `hidden` wide."""

    def __init__(self, *, kind: str, input_dim: int, hidden: int, bidirectional: bool = True,
                 num_layers: int = 1):
        super().__init__()
        if kind not in ("lstm", "gru"):
            raise ConfigError(f"rnn kind: expected 'lstm' or 'gru', got {kind!r}")
        if bidirectional and hidden % 2:
            raise ConfigError(f"hidden size {hidden} must be even for a bidirectional encoder")
        cls = nn.LSTM if kind == "lstm" else nn.GRU
        self.rnn = cls(input_dim, hidden // 2 if bidirectional else hidden, num_layers=num_layers,
                       batch_first=True, bidirectional=bidirectional)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # x (B, L, E), mask (B, L) -> (B, L, H)
        B, L, _ = x.shape
        lengths = mask.sum(1)  # (B,)
        if L == 0:
            return x.new_zeros(B, 0, self.hidden_size)
        # Real tokens are left-aligned by the collator; empty rows run one (masked-out) step.
        packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True,
                                      enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=L)  # (B, L, H)
        return out * mask.unsqueeze(-1).to(out.dtype)

    @property
    def hidden_size(self) -> int:
        return self.rnn.hidden_size * (2 if self.rnn.bidirectional else 1)


class MaskedMultiheadAttention(nn.Module):
    """Scaled dot-product multi-head attention with a key mask (Vaswani et al.).

    `pair_weights` (B, Lq, Lk), when given, re-weights the attention probabilities after the
    softmax, which are then renormalised (SANCL's selective attention). Queries whose keys are
    all masked attend to nothing and return zeros."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, kv_dim: int | None = None):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"hidden size {dim} is not divisible by the number of heads {heads}")
        kv_dim = kv_dim or dim
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim, dim)
        self.v = nn.Linear(kv_dim, dim)
        self.o = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, kv_mask: torch.Tensor,
                pair_weights: torch.Tensor | None = None) -> torch.Tensor:
        B, Lq, H = q.shape
        Lk = kv.shape[1]
        h, d = self.heads, H // self.heads
        Q = self.q(q).view(B, Lq, h, d).transpose(1, 2)  # (B, h, Lq, d)
        K = self.k(kv).view(B, Lk, h, d).transpose(1, 2)  # (B, h, Lk, d)
        V = self.v(kv).view(B, Lk, h, d).transpose(1, 2)  # (B, h, Lk, d)
        scores = Q @ K.transpose(-1, -2) / d ** 0.5  # (B, h, Lq, Lk)
        att = masked_softmax(scores, kv_mask[:, None, None, :])  # (B, h, Lq, Lk) float32
        if pair_weights is not None:
            att = att * pair_weights.unsqueeze(1).float()
            att = att / att.sum(-1, keepdim=True).clamp(min=1e-12)
        out = self.drop(att.to(V.dtype)) @ V  # (B, h, Lq, d)
        return self.o(out.transpose(1, 2).reshape(B, Lq, H))  # (B, Lq, H)


class FeedForward(nn.Module):
    """Position-wise two-layer feed-forward network."""

    def __init__(self, dim: int, mult: int = 2, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, mult * dim), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossModalBlock(nn.Module):
    """Pre-norm transformer block where `x` attends to `ctx` (self-attention when ctx is x):
    x <- x + Att(LN(x), LN(ctx)); x <- x + FFN(LN(x)). Padded rows of x stay zero."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.ln_q = nn.LayerNorm(dim)
        self.ln_kv = nn.LayerNorm(dim)
        self.att = MaskedMultiheadAttention(dim, heads, dropout)
        self.ln_ff = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, ctx: torch.Tensor,
                ctx_mask: torch.Tensor) -> torch.Tensor:
        keep = x_mask.unsqueeze(-1).to(x.dtype)  # (B, Lx, 1)
        x = x + self.att(self.ln_q(x), self.ln_kv(ctx), ctx_mask)
        x = x + self.ff(self.ln_ff(x))
        return x * keep


class SoftPooling(nn.Module):
    """Attention ("soft") pooling: w = softmax_mask(v^T tanh(W x)); out = sum_i w_i x_i."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.score = nn.Linear(dim, 1, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # x (B, L, H), mask (B, L) -> (B, H)
        w = masked_softmax(self.score(torch.tanh(self.proj(x))).squeeze(-1), mask)  # (B, L)
        return (w.unsqueeze(-1) * x).sum(1)


class ROIEncoder(nn.Module):
    """Projects 2048-d ROI features to the hidden size, then `layers` self-attention blocks."""

    def __init__(self, *, roi_dim: int, hidden: int, heads: int, layers: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        self.proj = nn.Linear(roi_dim, hidden)
        self.blocks = nn.ModuleList(CrossModalBlock(hidden, heads, dropout) for _ in range(layers))

    def forward(self, rois: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # rois (B, N, 2048), mask (B, N) -> (B, N, H)
        x = self.proj(rois) * mask.unsqueeze(-1).to(rois.dtype)
        for blk in self.blocks:
            x = blk(x, mask, x, mask)
        return x


def count_parameters(model: nn.Module, *, exclude_embeddings: bool = True) -> int:
    """Number of parameters, by default without the nn.Embedding tables (as the papers count)."""
    skip = set()
    if exclude_embeddings:
        for m in model.modules():
            if isinstance(m, nn.Embedding):
                skip.update(id(p) for p in m.parameters())
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1, eps=1e-8)
