"""The batch every model consumes and the output every model returns (the trainer contract).

A batch holds P products and R reviews; each review points at its product by index. ROI
features are padded per item with a mask; text is padded token ids with a mask.
Shapes: P products, R reviews, Lp/Lr tokens, Np/Nr ROIs, D = 2048 ROI feature size.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class Batch:
    prod_tokens: torch.Tensor  # (P, Lp) int64, 0 = PAD
    prod_token_mask: torch.Tensor  # (P, Lp) bool, True = real token
    prod_rois: torch.Tensor  # (P, Np, D) float32; an item without images has one all-zero ROI row... masked
    prod_roi_mask: torch.Tensor  # (P, Np) bool; all False when the product has no image features
    rev_tokens: torch.Tensor  # (R, Lr) int64
    rev_token_mask: torch.Tensor  # (R, Lr) bool
    rev_rois: torch.Tensor  # (R, Nr, D) float32
    rev_roi_mask: torch.Tensor  # (R, Nr) bool
    rev_probe_mask: torch.Tensor  # (R, Lr) float32 in {0,1}: SANCL probe mask aligned with rev_tokens
    rev_product: torch.Tensor  # (R,) int64 index into the product axis
    labels: torch.Tensor  # (R,) float32 helpfulness 0..4
    rev_length: torch.Tensor  # (R,) float32 number of words in the raw review text
    # Pairwise instances (training only): column 0 the positive, columns 1.. its negatives,
    # all indices into the review axis; weights per negative (1 - global label frequency).
    instances: torch.Tensor | None = None  # (I, 1 + K) int64
    instance_weights: torch.Tensor | None = None  # (I, K) float32
    # The word-piece ids the text encoder was fed ([CLS] .. [SEP], stage "bert"), for a model
    # that fine-tunes the encoder itself (models/text_encoder.py); 0-padded, None when not read.
    prod_text_ids: torch.Tensor | None = None  # (P, Lp'') int64
    prod_text_ids_mask: torch.Tensor | None = None  # (P, Lp'') bool, True = real piece
    rev_text_ids: torch.Tensor | None = None  # (R, Lr'') int64
    rev_text_ids_mask: torch.Tensor | None = None  # (R, Lr'') bool, True = real piece
    product_ids: list[str] = field(default_factory=list)  # (P,) dataset ids
    review_ids: list[str] = field(default_factory=list)  # (R,) dataset ids
    # Precomputed text-encoder token features (stage "bert"), None when the stage is not read.
    prod_text_feats: torch.Tensor | None = None  # (P, Lp', H) float32
    prod_text_feat_mask: torch.Tensor | None = None  # (P, Lp') bool, True = real token
    rev_text_feats: torch.Tensor | None = None  # (R, Lr', H) float32
    rev_text_feat_mask: torch.Tensor | None = None  # (R, Lr') bool, True = real token

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The batch on `device`. float16 tensors (ROI features stored as float16, carried so by
        a loader with `half_rois`) are upcast to float32 there, after the copy: half the bytes
        over the bus and no float32 conversion pass on the host."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device, non_blocking=non_blocking)
                if v.dtype == torch.float16:
                    v = v.float()
            kw[f.name] = v
        return Batch(**kw)

    def pin_memory(self) -> Batch:
        """The batch in page-locked memory (called by a DataLoader with pin_memory=True), so
        that `to(cuda, non_blocking=True)` copies asynchronously."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.pin_memory() if isinstance(v, torch.Tensor) else v
        return Batch(**kw)

    @property
    def num_reviews(self) -> int:
        return int(self.rev_tokens.shape[0])

    @property
    def num_products(self) -> int:
        return int(self.prod_tokens.shape[0])


@dataclass
class ModelOutput:
    scores: torch.Tensor  # (R,) one helpfulness score per review in the batch
    # Auxiliary losses, already weighted by the model's own coefficients (e.g. kappa * CPC);
    # the trainer adds their sum to the ranking loss. Empty for eval-only models.
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
