"""Ranking metrics with the exact semantics of the MRHP evaluation code (REFERENCE.md section 5).

Per product: reviews sorted by predicted score, descending and *stable* (ties keep input
order); a review is relevant when its label exceeds `threshold`. MAP averages precision over
relevant positions; DCG@k sums (2^label - 1) / ln(2 + i) over relevant reviews among the first
k (i from 0), IDCG@k is the same over the reviews sorted by true label; MRR is 1 / rank of the
first relevant review. A product without a relevant review scores 0 on every metric and still
counts: products are averaged with equal weight.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def metric_names(ks: Sequence[int] = (3, 5)) -> list[str]:
    """The metric keys `ranking_metrics` returns, in table order."""
    return ["MAP", *[f"NDCG@{k}" for k in ks], "MRR"]


def _dcg(labels_in_order: np.ndarray, threshold: float, k: int) -> float:
    top = labels_in_order[:k]
    disc = np.log(2.0 + np.arange(len(top)))  # natural log, as the shared evaluation code
    gains = np.where(top > threshold, np.power(2.0, top) - 1.0, 0.0)
    return float(np.sum(gains / disc))


def product_metrics(labels: Sequence[float], scores: Sequence[float], threshold: float = 0.0,
                    ks: Sequence[int] = (3, 5)) -> dict[str, float]:
    """The metrics of one product's reviews (labels and scores aligned, in input order)."""
    y = np.asarray(labels, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"labels and scores must be 1-d and aligned, got {y.shape} and {s.shape}")
    bad = [k for k in ks if k < 1]
    if bad:  # k = 0 gives 0 for every product and a negative k would slice from the end
        raise ValueError(f"NDCG cut-offs must be >= 1, got {bad[0]}")
    order = np.argsort(-s, kind="stable")  # descending, ties keep input order
    ranked = y[order]
    rel = ranked > threshold
    out: dict[str, float] = {}
    if rel.any():
        hits = np.cumsum(rel)
        positions = np.arange(1, len(ranked) + 1)
        out["MAP"] = float(np.mean(hits[rel] / positions[rel]))
        out["MRR"] = 1.0 / float(np.argmax(rel) + 1)
    else:
        out["MAP"] = 0.0
        out["MRR"] = 0.0
    ideal = y[np.argsort(-y, kind="stable")]
    for k in ks:
        idcg = _dcg(ideal, threshold, k)
        out[f"NDCG@{k}"] = _dcg(ranked, threshold, k) / idcg if idcg > 0 else 0.0
    return {name: out[name] for name in metric_names(ks)}


def _group(product_ids: Sequence, labels: Sequence[float], scores: Sequence[float]):
    pids = list(product_ids)
    y = np.asarray(labels, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if not (len(pids) == len(y) == len(s)):
        raise ValueError(
            f"product_ids, labels and scores must have the same length, got {len(pids)}, "
            f"{len(y)} and {len(s)}"
        )
    if not np.all(np.isfinite(s)):
        raise ValueError(f"scores contain {int(np.sum(~np.isfinite(s)))} non-finite value(s)")
    groups: dict = {}
    for i, p in enumerate(pids):  # first-appearance order; input order kept within a product
        groups.setdefault(p, []).append(i)
    return groups, y, s


def per_product_metrics(product_ids: Sequence, labels: Sequence[float], scores: Sequence[float],
                        threshold: float = 0.0, ks: Sequence[int] = (3, 5)) -> dict[str, dict[str, float]]:
    """product id -> its metrics, products in order of first appearance."""
    groups, y, s = _group(product_ids, labels, scores)
    return {p: product_metrics(y[idx], s[idx], threshold, ks) for p, idx in groups.items()}


def ranking_metrics(product_ids: Sequence, labels: Sequence[float], scores: Sequence[float],
                    threshold: float = 0.0, ks: Sequence[int] = (3, 5)) -> dict[str, float]:
    """MAP, NDCG@k for each k, and MRR, averaged over products with equal weight.

    `product_ids[i]`, `labels[i]`, `scores[i]` describe review i; reviews of a product keep their
    input order for tie-breaking. No review at all raises ValueError (nothing to average)."""
    per = per_product_metrics(product_ids, labels, scores, threshold, ks)
    if not per:
        raise ValueError("ranking_metrics: no reviews to evaluate")
    names = metric_names(ks)
    return {n: float(np.mean([m[n] for m in per.values()])) for n in names}


def paired_ttest(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Paired two-sided t-test of a against b (scipy.stats.ttest_rel) -> (t, p).

    Identical samples (all differences zero) give (0.0, 1.0) instead of scipy's NaN; a constant
    non-zero difference (up to float rounding) gives (+-inf, 0.0). Needs at least two pairs."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired_ttest needs two aligned 1-d samples, got {x.shape} and {y.shape}")
    if len(x) < 2:
        raise ValueError(f"paired_ttest needs at least 2 pairs, got {len(x)}")
    d = x - y
    tol = 1e-12 * max(1.0, float(np.max(np.abs(d))))
    if np.all(np.abs(d) <= tol):
        return 0.0, 1.0
    if float(np.ptp(d)) <= tol:  # constant difference up to rounding: zero variance
        return math.copysign(math.inf, d[0]), 0.0
    res = stats.ttest_rel(x, y)
    return float(res.statistic), float(res.pvalue)
