"""An explicit chunk size of 0 is refused (before: `chunk_size or manifest default` read 0 as
"not given" and ran with the manifest's flows.chunk_size, unsaid)."""
from __future__ import annotations

import pytest

from features.registry import ExtractRequest
from pipeline.errors import ConfigError
from tests.support.synthetic import REGISTRY, write_project


def test_a_zero_chunk_size_is_an_error_not_the_default(tmp_path):
    manifest = write_project(tmp_path, 1, chunk_size=7)
    with pytest.raises(ConfigError, match="chunk_size must be at least 1, got 0"):
        ExtractRequest.build(manifest, chunk_size=0, registry=REGISTRY)
    assert ExtractRequest.build(manifest, registry=REGISTRY).chunk_size == 7  # not given: the manifest's
    assert ExtractRequest.build(manifest, chunk_size=3, registry=REGISTRY).chunk_size == 3


@pytest.mark.parametrize("size", [2.5, True, "3"])
def test_a_chunk_size_that_is_not_an_integer_is_an_error_not_truncated(tmp_path, size):
    # int(2.5) would run chunks of 2 and int(True) chunks of 1, unsaid (the Python API and a
    # deployment's JSON parameters take any value)
    manifest = write_project(tmp_path, 1, chunk_size=7)
    with pytest.raises(ConfigError, match=r"chunk_size must be an integer, got "):
        ExtractRequest.build(manifest, chunk_size=size, registry=REGISTRY)
