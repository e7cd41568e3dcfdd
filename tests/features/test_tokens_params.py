"""tokens-stage settings that cannot hold are StageErrors before any tokenizing (before: a
max_vocab under mode mcr was ignored, and one below 3 left a vocabulary of PAD and OOV only)."""
from __future__ import annotations

import pytest

from features.text.tokens import build_stage
from features.text.vocab import fit_vocabulary
from pipeline.errors import StageError
from tests.features.test_vocab import manifest, records


@pytest.mark.parametrize("tokens, match", [
    ({"mode": "mcr", "max_vocab": 1000}, r"tokens\.max_vocab: applies to mode 'standard' only"),
    ({"mode": "standard", "max_vocab": 2}, r"tokens\.max_vocab: expected >= 3 .* got 2"),
    ({"mode": "standard", "max_vocab": -5}, r"tokens\.max_vocab: expected >= 3 .* got -5"),
    ({"batch_size": 0}, r"tokens\.batch_size: expected a positive integer, got 0"),
])
def test_impossible_tokens_settings_are_stage_errors(tmp_path, tokens, match):
    with pytest.raises(StageError, match=match):
        build_stage(manifest(tmp_path, tokens), "toy", records=records())


def test_fit_vocabulary_refuses_a_cap_that_leaves_no_word():
    # before: words[:max(0, 2 - 2)] kept none of a, b: every token became OOV
    with pytest.raises(StageError, match="max_vocab: expected >= 3"):
        fit_vocabulary([["a", "b"]], mode="standard", min_freq=1, max_vocab=2)
    assert fit_vocabulary([["a", "b", "b"]], mode="standard", min_freq=1, max_vocab=3).words[2:] == ("b",)


def test_a_standard_vocabulary_cap_loads(tmp_path):
    build_stage(manifest(tmp_path, {"mode": "standard", "max_vocab": 3, "min_freq": 1}), "toy", records=records())
