"""Training instances per product: the MCR pairwise sampler and a listwise option.

Pairwise (REFERENCE.md section 4): within a product, every review whose label is above the
product's lowest labels is a positive: as MCR's sampler (distinct labels of the product, the
lowest `ceil(min_gap)` of them excluded: with the shipped gap 2 neither the lowest nor the
second-lowest distinct label is a positive, e.g. labels {0, 3} give no instance); each positive
gets `num_negatives` (7) negatives of the same product drawn with replacement from the reviews
whose label is at least `min_gap` (2) lower. A positive with no review at least `min_gap` lower
yields no instance: it is skipped, since no negative satisfies the rule. Negatives carry the
weight 1 - (global frequency of their label), computed once over the training reviews; with
`weight_mode="sampling"` (the trainer's default, `TrainConfig.negative_weights`, as MCR's code
ships: `weighted_sampling: true`) negatives are drawn with probability proportional to it and
weigh 1 in the loss; with `"loss"` (this class's default) the weight multiplies the negative's
hinge term instead; with `"none"` all weigh 1. Instances are re-drawn every epoch from a seeded numpy Generator that the
trainer owns, so a run is reproducible and resumable.

Listwise: each positive is paired with *every* review of its product at least `min_gap`
lower, no sampling; rows are padded to the widest instance with weight 0.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np


def label_frequency_weights(labels: Iterable[float]) -> dict[float, float]:
    """label -> 1 - (share of reviews with that label), over all given (training) reviews."""
    counts = Counter(float(x) for x in labels)
    total = sum(counts.values())
    if total == 0:
        return {}
    return {lab: 1.0 - c / total for lab, c in sorted(counts.items())}


@dataclass(frozen=True)
class Instances:
    """Instances over a review axis: column 0 the positive, columns 1.. its negatives."""

    index: np.ndarray  # (I, 1 + K) int64 indices into the review axis
    weights: np.ndarray  # (I, K) float32 weight of each negative (0 = padding)

    @property
    def count(self) -> int:
        return int(self.index.shape[0])


class PairwiseSampler:
    """Draws MCR-style instances for the reviews of a batch (grouped by product)."""

    def __init__(self, *, mode: Literal["pairwise", "listwise"] = "pairwise", num_negatives: int = 7,
                 min_gap: float = 2.0, label_weights: Mapping[float, float] | None = None,
                 weight_mode: Literal["loss", "sampling", "none"] = "loss") -> None:
        if mode not in ("pairwise", "listwise"):
            raise ValueError(f"sampler mode must be 'pairwise' or 'listwise', got {mode!r}")
        if weight_mode not in ("loss", "sampling", "none"):
            raise ValueError(f"weight_mode must be 'loss', 'sampling' or 'none', got {weight_mode!r}")
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
        self.mode = mode
        self.num_negatives = num_negatives
        self.min_gap = float(min_gap)
        self.label_weights = dict(label_weights or {})
        self.weight_mode = weight_mode

    def _weight(self, labels: np.ndarray) -> np.ndarray:
        if not self.label_weights:
            return np.ones(len(labels), dtype=np.float64)
        # a label never seen in training (e.g. only in dev) weighs like the rarest, i.e. 1
        return np.array([self.label_weights.get(float(x), 1.0) for x in labels], dtype=np.float64)

    def sample_product(self, labels: np.ndarray, rng: np.random.Generator) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """(positive, negatives, negative weights) for one product, indices local to `labels`."""
        y = np.asarray(labels, dtype=np.float64)
        if len(y) < 2:
            return []
        distinct = np.unique(y)  # ascending
        excluded = max(1, math.ceil(self.min_gap))  # the product's lowest distinct labels
        if len(distinct) <= excluded:
            return []
        out = []
        for pos in np.flatnonzero(y > distinct[excluded - 1]):
            cand = np.flatnonzero(y <= y[pos] - self.min_gap)
            if len(cand) == 0:
                continue  # no negative at least min_gap lower: the positive is skipped
            w = self._weight(y[cand])
            if self.mode == "listwise":
                negs = cand
                nw = w if self.weight_mode == "loss" else np.ones(len(cand))
            else:
                if self.weight_mode == "sampling" and w.sum() > 0:
                    negs = rng.choice(cand, size=self.num_negatives, replace=True, p=w / w.sum())
                else:
                    negs = rng.choice(cand, size=self.num_negatives, replace=True)
                nw = self._weight(y[negs]) if self.weight_mode == "loss" else np.ones(len(negs))
            out.append((int(pos), negs.astype(np.int64), nw.astype(np.float32)))
        return out

    def sample(self, labels: np.ndarray, rev_product: np.ndarray, rng: np.random.Generator) -> Instances:
        """Instances for a batch: `labels[i]` and `rev_product[i]` describe review i."""
        y = np.asarray(labels, dtype=np.float64)
        prod = np.asarray(rev_product, dtype=np.int64)
        rows: list[tuple[int, np.ndarray, np.ndarray]] = []
        for p in np.unique(prod):  # sorted product order: deterministic given the batch
            members = np.flatnonzero(prod == p)
            for pos, negs, w in self.sample_product(y[members], rng):
                rows.append((int(members[pos]), members[negs], w))
        width = self.num_negatives if self.mode == "pairwise" else max((len(n) for _, n, _ in rows), default=1)
        index = np.zeros((len(rows), 1 + width), dtype=np.int64)
        weights = np.zeros((len(rows), width), dtype=np.float32)
        for i, (pos, negs, w) in enumerate(rows):
            index[i, 0] = pos
            index[i, 1:] = pos  # padding points at the positive itself, weight 0
            index[i, 1:1 + len(negs)] = negs
            weights[i, :len(w)] = w
        return Instances(index=index, weights=weights)


def no_instance_message(product_labels: Iterable[np.ndarray], *, min_gap: float, mode: str = "pairwise") -> str:
    """Why a training split gave no ranking instance, naming `min_gap` and suggesting
    `min_gap=1` when a gap of 1 would give instances (products with two distinct labels but not
    the `ceil(min_gap) + 1` distinct labels, `min_gap` apart, that the current gap needs)."""
    labels = [np.asarray(y, dtype=np.float64) for y in product_labels]
    rng = np.random.default_rng(0)
    distinct = [len(np.unique(y)) for y in labels if len(y) >= 2]
    if min_gap > 1:
        relaxed = PairwiseSampler(mode=mode, num_negatives=1, min_gap=1.0)
        usable = sum(1 for y in labels if relaxed.sample_product(y, rng))
        if usable:
            need = max(1, math.ceil(min_gap)) + 1
            return (
                f"training split gave no ranking instance with min_gap={min_gap:g}: a product needs "
                f"at least {need} distinct labels (its lowest {need - 1} are never positives) and a "
                f"negative at least {min_gap:g} below a positive, and none of the "
                f"{len(labels)} training products has that (at most {max(distinct, default=0)} "
                f"distinct labels each); set min_gap=1 ({usable} products would give instances)"
            )
    return (
        f"training split gave no ranking instance (min_gap={min_gap:g}): every one of the "
        f"{len(labels)} training products has reviews with equal labels (or a single review)"
    )
