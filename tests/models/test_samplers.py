"""MCR pairwise sampler rules and the listwise option."""
from __future__ import annotations

import numpy as np
import pytest

from models.samplers import PairwiseSampler, label_frequency_weights


def test_label_frequency_weights_are_one_minus_share():
    w = label_frequency_weights([0, 0, 0, 1, 4])
    assert w == {0.0: pytest.approx(0.4), 1.0: pytest.approx(0.8), 4.0: pytest.approx(0.8)}


def test_positives_are_above_lowest_and_negatives_at_least_two_lower():
    labels = np.array([0, 1, 2, 3, 4, 0])
    s = PairwiseSampler(num_negatives=7)
    rng = np.random.default_rng(0)
    rows = s.sample_product(labels, rng)
    positives = [p for p, _, _ in rows]
    # label 1 has nothing >= 2 lower (lowest is 0): skipped; 2, 3, 4 are positives
    assert positives == [2, 3, 4]
    for p, negs, _w in rows:
        assert len(negs) == 7
        assert np.all(labels[negs] <= labels[p] - 2)
    # label 2's only candidates are the two zeros
    assert set(rows[0][1].tolist()) <= {0, 5}


def test_negatives_drawn_with_replacement_from_same_product_only():
    labels = np.array([3, 0, 2, 3, 0, 1])
    prod = np.array([0, 0, 0, 1, 1, 1])
    inst = PairwiseSampler(num_negatives=7).sample(labels, prod, np.random.default_rng(1))
    assert inst.index.shape == (2, 8) and inst.weights.shape == (2, 7)
    for row in inst.index:
        assert np.all(prod[row[1:]] == prod[row[0]])
        assert np.all(labels[row[1:]] <= labels[row[0]] - 2)
    # product 0 has a single candidate negative: drawn 7 times (with replacement)
    assert np.all(inst.index[0, 1:] == 1)


def test_positives_skip_the_two_lowest_distinct_labels_as_mcr_does():
    # MCR's sampler (relation_building_interval 1): the lowest two distinct labels of a product
    # are never positives, even when the second-lowest is 2 above the lowest
    s = PairwiseSampler(num_negatives=3)
    assert s.sample_product(np.array([0, 3, 0, 3]), np.random.default_rng(0)) == []
    rows = s.sample_product(np.array([0, 2, 4, 2, 0]), np.random.default_rng(0))
    assert [p for p, _, _ in rows] == [2]
    assert set(rows[0][1].tolist()) <= {0, 1, 3, 4}


def test_product_with_all_equal_labels_or_single_review_gives_nothing():
    s = PairwiseSampler()
    assert s.sample_product(np.array([2, 2, 2]), np.random.default_rng(0)) == []
    assert s.sample_product(np.array([4]), np.random.default_rng(0)) == []
    inst = s.sample(np.array([1, 1]), np.array([0, 0]), np.random.default_rng(0))
    assert inst.count == 0 and inst.index.shape == (0, 8)


def test_negative_weights_follow_global_label_frequency():
    weights = {0.0: 0.25, 1.0: 0.5, 4.0: 0.9}
    labels = np.array([4, 0, 1])
    s = PairwiseSampler(num_negatives=5, label_weights=weights)
    inst = s.sample(labels, np.zeros(3, dtype=np.int64), np.random.default_rng(3))
    assert inst.count == 1
    expected = np.array([weights[float(labels[i])] for i in inst.index[0, 1:]], dtype=np.float32)
    assert np.allclose(inst.weights[0], expected)
    unweighted = PairwiseSampler(num_negatives=5, label_weights=weights, weight_mode="none")
    inst2 = unweighted.sample(labels, np.zeros(3, dtype=np.int64), np.random.default_rng(3))
    assert np.all(inst2.weights == 1.0)


def test_sampling_mode_draws_in_proportion_to_weight():
    labels = np.array([4] + [0] * 5 + [1] * 5)
    s = PairwiseSampler(num_negatives=2000, label_weights={0.0: 0.9, 1.0: 0.1, 4.0: 0.5},
                        weight_mode="sampling")
    (_, negs, w), = s.sample_product(labels, np.random.default_rng(0))
    share0 = np.mean(labels[negs] == 0)
    assert 0.85 < share0 < 0.95
    assert np.all(w == 1.0)


def test_same_seed_same_instances_and_new_draws_each_epoch():
    labels = np.array([4, 3, 0, 1, 0, 2, 0])
    prod = np.zeros(7, dtype=np.int64)
    s = PairwiseSampler()
    a = s.sample(labels, prod, np.random.default_rng(7))
    b = s.sample(labels, prod, np.random.default_rng(7))
    assert np.array_equal(a.index, b.index)
    rng = np.random.default_rng(7)
    e1 = s.sample(labels, prod, rng)
    e2 = s.sample(labels, prod, rng)
    assert not np.array_equal(e1.index, e2.index)


def test_listwise_pairs_each_positive_with_every_lower_review_and_pads():
    labels = np.array([4, 0, 1, 2])
    inst = PairwiseSampler(mode="listwise").sample(labels, np.zeros(4, dtype=np.int64),
                                                    np.random.default_rng(0))
    got = {int(r[0]): sorted(int(n) for n, w in zip(r[1:], ws, strict=True) if w > 0)
           for r, ws in zip(inst.index, inst.weights, strict=True)}
    assert got == {0: [1, 2, 3], 3: [1]}
    assert inst.index.shape == (2, 4)
    row3 = [i for i, r in enumerate(inst.index) if r[0] == 3][0]
    assert inst.weights[row3].tolist() == [1.0, 0.0, 0.0]


def test_bad_sampler_settings_are_rejected():
    with pytest.raises(ValueError, match="mode"):
        PairwiseSampler(mode="triplet")
    with pytest.raises(ValueError, match="num_negatives"):
        PairwiseSampler(num_negatives=0)
