"""Word vectors that cover none of a vocabulary stop the embeddings stage (before: the matrix was
built from random rows only, and the run trained on noise with one info line saying 0.0%)."""
from __future__ import annotations

import pytest

from features.text.embeddings import build_stage
from pipeline.errors import StageError
from tests.features.test_embeddings_stage import manifest, records, run_all


def test_vectors_that_cover_no_vocabulary_word_are_a_stage_error(tmp_path):
    # Indonesian words only: the English vocabularies (steel, pan / great, pan, qqxx) find none
    (tmp_path / "id.txt").write_text("panci 1 0\nbagus 0 1\n", encoding="utf-8")
    stage = build_stage(manifest(tmp_path, vectors={"format": "glove", "path": "id.txt"}), "toy", records=records())
    with pytest.raises(StageError, match=r"embeddings toy/prd: none of the 2 vocabulary words is in the word "
                                         r"vectors 'wv', so every row would be random"):
        run_all(stage)


def test_partial_coverage_still_builds(tmp_path):
    (tmp_path / "g.txt").write_text("pan 1 0\n", encoding="utf-8")  # 1 of 2 prd words, 1 of 3 rvw words
    stage = build_stage(manifest(tmp_path, vectors={"format": "glove", "path": "g.txt"}), "toy", records=records())
    plan, recs = run_all(stage)
    assert sorted(r.meta["found"] for r in recs.values()) == [1, 1]
