"""Ranking loss over sampled instances (REFERENCE.md section 4).

For an instance (positive p, negatives n_1..n_K with weights w_k) the loss is
    sum_k w_k * max(0, m_k - (s_p - s_{n_k}))
with the margin m_k = y_p - y_{n_k} (the label difference: what every shipped config uses,
the default) or a fixed m (the papers' equation, m = 1). Weights are the sampler's negative
weights (1 - global label frequency by default; 0 marks padding). The loss is the mean over
instances (`reduction="mean"`, the default) or their sum (`"sum"`: MCL's Eq. 34 as printed,
sum_i max(0, beta - f(p, r+) + f(p, r-))); a batch without instances gives a zero that still
carries a graph.
"""
from __future__ import annotations

from typing import Literal

import torch


def ranking_loss(scores: torch.Tensor, labels: torch.Tensor, instances: torch.Tensor,
                 weights: torch.Tensor | None = None, *, margin: Literal["label", "fixed"] = "label",
                 fixed_margin: float = 1.0, reduction: Literal["mean", "sum"] = "mean") -> torch.Tensor:
    """Hinge ranking loss: scores (R,), labels (R,), instances (I, 1+K), weights (I, K)."""
    if margin not in ("label", "fixed"):
        raise ValueError(f"margin must be 'label' or 'fixed', got {margin!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if instances.numel() == 0 or instances.shape[0] == 0:
        return scores.sum() * 0.0
    s = scores.float()
    pos = instances[:, :1]  # (I, 1)
    neg = instances[:, 1:]  # (I, K)
    diff = s[pos] - s[neg]  # (I, K)
    if margin == "label":
        m = labels.float()[pos] - labels.float()[neg]  # (I, K)
    else:
        m = torch.full_like(diff, float(fixed_margin))
    hinge = torch.clamp(m - diff, min=0.0)  # (I, K)
    if weights is not None:
        hinge = hinge * weights.to(hinge.dtype)
    per_instance = hinge.sum(dim=1)  # (I,)
    return per_instance.sum() if reduction == "sum" else per_instance.mean()
