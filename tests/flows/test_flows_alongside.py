"""The text stages run alongside the ROI stage in one extraction (they need only the CPU)."""
from __future__ import annotations

import threading

import pytest

from features.registry import StageEntry
from flows.extract import _run_alongside

REG = {
    "rois": StageEntry("m", (), True),
    "tokens": StageEntry("m", (), False),
    "embeddings": StageEntry("m", ("tokens",), False),
    "probes": StageEntry("m", (), False),
}


def test_the_gpu_stage_overlaps_the_cpu_stages_and_results_keep_stage_order():
    tokens_started = threading.Event()
    seen: list[str] = []

    def run_one(name):
        if name == "rois":  # would time out if rois ran before or after the text stages
            assert tokens_started.wait(timeout=10), "rois did not run alongside tokens"
        if name == "tokens":
            tokens_started.set()
        seen.append(name)
        return f"summary:{name}"

    out = _run_alongside(list(REG), REG, run_one)
    assert out == ["summary:rois", "summary:tokens", "summary:embeddings", "summary:probes"]
    assert seen.index("tokens") < seen.index("embeddings")  # dependencies still first


def test_errors_are_raised_in_stage_order_after_both_sides_finish():
    done = []

    def run_one(name):
        done.append(name)
        if name in ("rois", "embeddings"):
            raise RuntimeError(f"{name} broke")
        return name

    with pytest.raises(RuntimeError, match="rois broke"):
        _run_alongside(list(REG), REG, run_one)
    assert "probes" not in done and {"rois", "tokens", "embeddings"} <= set(done)  # main side stops at its error


def test_a_gpu_stage_others_depend_on_runs_in_order():
    reg = {"rois": StageEntry("m", (), True), "fused": StageEntry("m", ("rois",), False)}
    order = []
    assert _run_alongside(["rois", "fused"], reg, lambda n: order.append(n) or n) == ["rois", "fused"]
    assert order == ["rois", "fused"]
