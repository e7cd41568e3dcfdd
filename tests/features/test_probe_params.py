"""Each probes mode reads one of two knobs: `keyword_test` (script) and `near_root` (paper). A value
set for the other mode is a StageError (before: ignored, and left out of the fingerprint, so the
masks were those of the default without a word)."""
from __future__ import annotations

import pytest

from features.text.probes import ProbeMasker
from pipeline.errors import StageError


def test_keyword_test_under_mode_paper_is_refused():
    with pytest.raises(StageError, match=r"probes\.keyword_test: 'word' applies to mode script only"):
        ProbeMasker(language="en", mode="paper", coref="rules", keyword_test="word")


def test_near_root_under_mode_script_is_refused():
    with pytest.raises(StageError, match=r"probes\.near_root: 2 applies to mode paper only"):
        ProbeMasker(language="en", mode="script", coref="rules", near_root=2)


def test_each_knob_loads_under_its_own_mode():
    assert ProbeMasker(language="en", mode="script", coref="rules", keyword_test="word").keyword_test == "word"
    assert ProbeMasker(language="en", mode="paper", coref="rules", near_root=2).near_root == 2
