"""Ranking metrics: hand-worked products (ties, thresholds, no relevant review) and sklearn."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import ndcg_score

from models.metrics import (
    metric_names,
    paired_ttest,
    per_product_metrics,
    product_metrics,
    ranking_metrics,
)


def test_map_ndcg_mrr_match_hand_computation():
    labels = [3, 0, 2, 1]
    scores = [0.1, 0.9, 0.5, 0.3]  # ranked: 0(label0), 2(label2), 3(label1), 0(label3)
    m = product_metrics(labels, scores, threshold=0.0, ks=(3, 5))
    # relevant (label > 0) at ranks 2, 3, 4: precisions 1/2, 2/3, 3/4
    assert m["MAP"] == pytest.approx((1 / 2 + 2 / 3 + 3 / 4) / 3)
    assert m["MRR"] == pytest.approx(1 / 2)
    dcg3 = 0 + (2**2 - 1) / math.log(3) + (2**1 - 1) / math.log(4)
    idcg3 = (2**3 - 1) / math.log(2) + (2**2 - 1) / math.log(3) + (2**1 - 1) / math.log(4)
    assert m["NDCG@3"] == pytest.approx(dcg3 / idcg3)
    dcg5 = dcg3 + (2**3 - 1) / math.log(5)
    assert m["NDCG@5"] == pytest.approx(dcg5 / idcg3)


def test_ties_keep_input_order():
    # all scores equal: ranking = input order
    m = product_metrics([0, 2, 0], [1.0, 1.0, 1.0], threshold=0.0)
    assert m["MAP"] == pytest.approx(1 / 2)
    assert m["MRR"] == pytest.approx(1 / 2)
    # reversing the input order of tied reviews changes the result
    m2 = product_metrics([2, 0, 0], [1.0, 1.0, 1.0], threshold=0.0)
    assert m2["MAP"] == 1.0 and m2["NDCG@3"] == 1.0


def test_threshold_excludes_low_labels_from_relevance_and_gain():
    labels = [1, 2, 1]
    scores = [3.0, 2.0, 1.0]
    m0 = product_metrics(labels, scores, threshold=0.0)
    m1 = product_metrics(labels, scores, threshold=1.0)
    assert m0["MAP"] == pytest.approx(1.0)
    # threshold 1: only the label-2 review is relevant, at rank 2
    assert m1["MAP"] == pytest.approx(1 / 2)
    assert m1["MRR"] == pytest.approx(1 / 2)
    assert m1["NDCG@3"] == pytest.approx((3 / math.log(3)) / (3 / math.log(2)))


def test_product_without_relevant_review_counts_as_zero():
    pids = ["a", "a", "b", "b"]
    labels = [2, 0, 1, 0]
    scores = [1.0, 0.0, 1.0, 0.0]
    m = ranking_metrics(pids, labels, scores, threshold=1.0)
    # product a is perfect, product b has no label > 1: averaged with equal weight
    for name in metric_names():
        assert m[name] == pytest.approx(0.5)


def test_products_weighted_equally_regardless_of_size():
    pids = ["big"] * 6 + ["small"] * 2
    labels = [0, 0, 0, 0, 0, 3] + [3, 0]
    scores = [6, 5, 4, 3, 2, 1] + [2, 1]
    m = ranking_metrics(pids, labels, scores, threshold=0.0)
    assert m["MAP"] == pytest.approx((1 / 6 + 1.0) / 2)
    per = per_product_metrics(pids, labels, scores, threshold=0.0)
    assert list(per) == ["big", "small"]
    assert per["big"]["MRR"] == pytest.approx(1 / 6)


def test_interleaved_product_ids_are_grouped_in_input_order():
    pids = ["a", "b", "a", "b"]
    labels = [0, 1, 1, 0]
    scores = [0.0, 0.0, 0.0, 0.0]  # ties: a -> [0, 1], b -> [1, 0]
    per = per_product_metrics(pids, labels, scores)
    assert per["a"]["MAP"] == pytest.approx(1 / 2)
    assert per["b"]["MAP"] == pytest.approx(1.0)


def test_extra_k_gives_extra_key():
    m = ranking_metrics(["p"] * 3, [1, 2, 3], [3, 2, 1], ks=(1, 3, 5, 10))
    assert list(m) == ["MAP", "NDCG@1", "NDCG@3", "NDCG@5", "NDCG@10", "MRR"]


@pytest.mark.parametrize("threshold", [0.0, 1.0, 2.0])
def test_ndcg_matches_sklearn_with_exponential_gains_and_distinct_scores(threshold):
    # sklearn: linear gains and log2 discount, ties averaged. Ours: (2^y - 1) gains on relevant
    # reviews and ln discount. With distinct scores and gains g = (2^y - 1) * [y > threshold],
    # the two coincide (the log base cancels in the DCG/IDCG ratio).
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 12))
        y = rng.integers(0, 5, size=n).astype(float)
        s = rng.permutation(n).astype(float) + rng.random(n) * 0.1
        gains = np.where(y > threshold, 2.0**y - 1.0, 0.0)
        for k in (3, 5):
            ours = product_metrics(y, s, threshold=threshold, ks=(k,))[f"NDCG@{k}"]
            if gains.max() == 0:
                assert ours == 0.0
                continue
            ref = ndcg_score(gains[None, :], s[None, :], k=k)
            assert ours == pytest.approx(ref, abs=1e-12)


def test_mismatched_lengths_and_nonfinite_scores_are_rejected():
    with pytest.raises(ValueError, match="same length"):
        ranking_metrics(["a", "a"], [1], [0.1, 0.2])
    with pytest.raises(ValueError, match="non-finite"):
        ranking_metrics(["a", "a"], [1, 0], [float("nan"), 0.2])
    with pytest.raises(ValueError, match="no reviews"):
        ranking_metrics([], [], [])


def test_paired_ttest_identical_constant_and_regular():
    assert paired_ttest([0.1, 0.2, 0.3], [0.1, 0.2, 0.3]) == (0.0, 1.0)
    t, p = paired_ttest([0.2, 0.3, 0.4], [0.1, 0.2, 0.3])
    assert t == math.inf and p == 0.0
    a = [0.61, 0.63, 0.60, 0.64, 0.62]
    b = [0.58, 0.61, 0.59, 0.60, 0.57]
    t, p = paired_ttest(a, b)
    from scipy.stats import ttest_rel

    ref = ttest_rel(a, b)
    assert t == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)
    assert t > 0 and p < 0.05
    with pytest.raises(ValueError, match="at least 2"):
        paired_ttest([1.0], [0.5])
