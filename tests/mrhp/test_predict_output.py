"""`mrhp predict` output: `label` is the 0-4 label (raw votes in `votes`), scores averaged over seeds."""
from __future__ import annotations

import math

import pytest

from mrhp.commands.predict import average_seeds, ranked, rel_labels
from pipeline.errors import DataError, TrainingError


def test_votes_map_to_labels_as_the_reader_does():
    # auto: 16 is not a label 0..4 -> votes: v -> min(floor(log2 v), 4); 0 votes -> no label
    labels, votes = rel_labels({"a": 0.0, "b": 1.0, "c": 3.0, "d": 5.0, "e": 16.0, "f": 40.0}, "auto", "x.rel.test")
    assert labels == {"b": 0.0, "c": 1.0, "d": 2.0, "e": 4.0, "f": 4.0}
    assert votes["a"] == 0.0 and votes["e"] == 16.0
    # every value an integer 0..4 -> read as labels as they are
    labels, _ = rel_labels({"a": 0.0, "b": 4.0, "c": 2.0}, "auto", "x")
    assert labels == {"a": 0.0, "b": 4.0, "c": 2.0}
    # forced vote mode reads the same column as votes: 4 votes -> label 2
    assert rel_labels({"a": 4.0}, "votes", "x")[0] == {"a": 2.0}
    with pytest.raises(DataError, match="not a label 0..4"):
        rel_labels({"a": 7.0}, "labels", "x.rel.test")


def test_ranked_rows_carry_the_label_and_the_raw_votes():
    preds = [{"product_id": "p", "review_id": "r1", "label": 1.0, "score": 0.2},
             {"product_id": "p", "review_id": "r2", "label": math.nan, "score": 0.9}]
    rows = ranked(preds, {"r1": 3.0, "r2": 0.0})
    assert rows == [{"product_id": "p", "rank": 1, "review_id": "r2", "score": 0.9, "votes": 0},
                    {"product_id": "p", "rank": 2, "review_id": "r1", "score": 0.2, "label": 1, "votes": 3}]


def test_scores_average_over_seeds():
    s0 = [{"product_id": "p", "review_id": "r1", "label": 1.0, "score": 1.0},
          {"product_id": "p", "review_id": "r2", "label": 0.0, "score": 0.0}]
    s1 = [{**s0[0], "score": 0.0}, {**s0[1], "score": 3.0}]
    avg = average_seeds([s0, s1])
    assert [r["score"] for r in avg] == [0.5, 1.5]  # (1 + 0) / 2, (0 + 3) / 2
    with pytest.raises(TrainingError, match="different reviews"):
        average_seeds([s0, s0[::-1]])
