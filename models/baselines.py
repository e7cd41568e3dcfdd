"""Baselines that keep everyone honest: `length`, `random` and `text-gru`.

- `length`: score = number of raw tokens in the review (no parameters, nothing to train).
- `random`: a seeded pseudo-random score per review id (no parameters; same score for a review
  whatever batch it lands in).
- `text-gru`: bidirectional GRU encoders over the frozen word-embedding matrices (one per
  vocabulary), masked mean pooling, product-review matching [r; p; r*p; |r-p|] -> MLP -> score,
  trained with the trainer's ranking loss. Text only: it ignores the images.

Each reads only the tokens view (`required_views` -> {"tokens"}: `length` its raw token counts,
`random` the review ids, `text-gru` the token ids).
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from models.batch import Batch, ModelOutput
from models.registry import register_model
from pipeline.config import from_mapping
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class NoConfig:
    """The parameter-free baselines take no settings except an optional seed."""

    seed: int = 0  # random baseline only


@register_model("length")
class LengthBaseline(nn.Module):
    """Longer reviews rank higher."""

    @classmethod
    def required_views(cls, model_cfg: Mapping[str, Any]) -> frozenset[str]:
        """Text only: the tokens view (token ids, raw lengths); no image or probe view."""
        return frozenset({"tokens"})

    def __init__(self) -> None:
        super().__init__()

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], embeddings: Mapping[str, np.ndarray] | None = None) -> LengthBaseline:
        from_mapping(NoConfig, cfg, "model_cfg")
        return cls()

    def forward(self, batch: Batch) -> ModelOutput:
        return ModelOutput(scores=batch.rev_length.float().clone())


@register_model("random")
class RandomBaseline(nn.Module):
    """A fixed pseudo-random score per (seed, review id)."""

    @classmethod
    def required_views(cls, model_cfg: Mapping[str, Any]) -> frozenset[str]:
        """Text only: the tokens view (token ids, raw lengths); no image or probe view."""
        return frozenset({"tokens"})

    def __init__(self, *, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], embeddings: Mapping[str, np.ndarray] | None = None) -> RandomBaseline:
        return cls(seed=from_mapping(NoConfig, cfg, "model_cfg").seed)

    def _score(self, review_id: str) -> float:
        h = hashlib.blake2b(f"{self.seed}:{review_id}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "little") / 2.0**64

    def forward(self, batch: Batch) -> ModelOutput:
        if len(batch.review_ids) != batch.num_reviews:
            raise ValueError("random baseline needs batch.review_ids for its per-review scores")
        scores = torch.tensor([self._score(r) for r in batch.review_ids], dtype=torch.float32,
                              device=batch.labels.device)
        return ModelOutput(scores=scores)


@dataclass(frozen=True)
class TextGRUConfig:
    """Settings of the text-gru baseline."""

    hidden: int = 128  # GRU hidden size per direction
    mlp_hidden: int = 128  # width of the scoring MLP
    dropout: float = 0.1
    finetune_embeddings: bool = False  # train the word vectors (frozen by default); the same
    # name as MCL/MM-SS/SANCL. Old run configs say `freeze_embeddings` (its negation): accepted.
    vocab_size: int | None = None  # only without embeddings: random tables of this size ...
    embed_dim: int = 300  # ... and this width


class _Encoder(nn.Module):
    """Embedding -> bi-GRU -> masked mean pooling: (B, L) ids -> (B, 2H)."""

    def __init__(self, *, table: torch.Tensor, hidden: int, freeze: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding.from_pretrained(table, freeze=freeze, padding_idx=0)
        self.gru = nn.GRU(table.shape[1], hidden, batch_first=True, bidirectional=True)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)  # (B, L, E)
        lengths = mask.sum(1).clamp(min=1).cpu()
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])  # (B, L, 2H)
        m = mask.unsqueeze(-1).to(out.dtype)
        return (out * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, 2H); empty text -> zeros


@register_model("text-gru")
class TextGRU(nn.Module):
    """Text-only matching baseline."""

    @classmethod
    def required_views(cls, model_cfg: Mapping[str, Any]) -> frozenset[str]:
        """Text only: the tokens view (token ids, raw lengths); no image or probe view."""
        return frozenset({"tokens"})

    def __init__(self, *, prd_table: torch.Tensor, rvw_table: torch.Tensor, hidden: int = 128,
                 mlp_hidden: int = 128, dropout: float = 0.1, freeze_embeddings: bool = True) -> None:
        super().__init__()
        self.prd_enc = _Encoder(table=prd_table, hidden=hidden, freeze=freeze_embeddings)
        self.rvw_enc = _Encoder(table=rvw_table, hidden=hidden, freeze=freeze_embeddings)
        d = 2 * hidden
        self.mlp = nn.Sequential(
            nn.Linear(4 * d, mlp_hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(mlp_hidden, 1)
        )

    @classmethod
    def config_record(cls, cfg: Mapping[str, Any]) -> TextGRUConfig:
        """The validated settings; the old key `freeze_embeddings: X` reads as
        `finetune_embeddings: not X` (both at once is an error)."""
        data = dict(cfg)
        if "freeze_embeddings" in data:
            if "finetune_embeddings" in data:
                raise ConfigError("model_cfg: give finetune_embeddings or the old freeze_embeddings, not both")
            old = data.pop("freeze_embeddings")
            if not isinstance(old, bool):
                raise ConfigError(f"model_cfg.freeze_embeddings: expected true or false, got {old!r}")
            data["finetune_embeddings"] = not old
        return from_mapping(TextGRUConfig, data, "model_cfg")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], embeddings: Mapping[str, np.ndarray] | None = None) -> TextGRU:
        c = cls.config_record(cfg)
        if embeddings is not None:
            prd = torch.as_tensor(np.asarray(embeddings["prd"], dtype=np.float32))
            rvw = torch.as_tensor(np.asarray(embeddings["rvw"], dtype=np.float32))
        elif c.vocab_size is not None:
            g = torch.Generator().manual_seed(0)
            prd = torch.empty(c.vocab_size, c.embed_dim).uniform_(-0.25, 0.25, generator=g)
            rvw = torch.empty(c.vocab_size, c.embed_dim).uniform_(-0.25, 0.25, generator=g)
        else:
            raise ConfigError("model_cfg: text-gru needs embedding matrices or model_cfg.vocab_size")
        return cls(prd_table=prd, rvw_table=rvw, hidden=c.hidden, mlp_hidden=c.mlp_hidden,
                   dropout=c.dropout, freeze_embeddings=not c.finetune_embeddings)

    def forward(self, batch: Batch) -> ModelOutput:
        p = self.prd_enc(batch.prod_tokens, batch.prod_token_mask)[batch.rev_product]  # (R, 2H)
        r = self.rvw_enc(batch.rev_tokens, batch.rev_token_mask)  # (R, 2H)
        feats = torch.cat([r, p, r * p, (r - p).abs()], dim=-1)  # (R, 8H)
        return ModelOutput(scores=self.mlp(feats).squeeze(-1))
