"""The helpers that had two or three copies and now have one: `pipeline.stage.is_random_init`
(was in pipeline/runner.py, features/rois.py, models/runs.py) and `features.device.autocast`
(was `_autocast` in features/rois.py and models/trainer.py)."""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from features.device import autocast
from pipeline.params import RoisParams
from pipeline.stage import is_random_init


def test_is_random_init_on_fingerprints_mappings_and_params():
    assert is_random_init("random-init-0123abcd") and not is_random_init("0123abcd")
    assert not is_random_init(None)  # a view without a fingerprint (models.runs.view_fingerprints)
    assert is_random_init({"random_init": True}) and not is_random_init({"random_init": False})
    assert not is_random_init({})
    assert is_random_init(RoisParams(random_init=True)) and not is_random_init(RoisParams())


def test_is_random_init_on_stages_and_the_manifest_fallback():
    class Asks:
        name = "rois"

        def is_random_init(self):
            return True

    @dataclass
    class Plain:
        name: str = "rois"

    assert is_random_init(Asks())
    assert is_random_init(SimpleNamespace(name="x", params=RoisParams(random_init=True)))
    manifest = SimpleNamespace(stages={"rois": RoisParams(random_init=True)})
    assert is_random_init(Plain(), manifest) and not is_random_init(Plain())
    assert not is_random_init(Plain("tokens"), manifest)


def test_autocast_off_auto_and_named():
    cpu = torch.device("cpu")
    with autocast(cpu, False):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(cpu, True):  # "auto" on CPU: bf16
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with autocast(cpu, True, "float16"):
        assert torch.get_autocast_dtype("cpu") == torch.float16


class _FakeStore:
    """The four index queries stage_state asks, answered from dicts."""

    def __init__(self, missing, failures, view_fp=None, view_map=None):
        self._missing, self._failures, self._view_fp, self._view_map = missing, failures, view_fp, view_map

    def missing(self, stage, fingerprint, keys):
        return [k for k in keys if k in self._missing]

    def failures(self, stage, fingerprint):
        return dict(self._failures)

    def views(self):
        return [] if self._view_fp is None else [SimpleNamespace(dataset="d", stage="s", fingerprint=self._view_fp)]

    def view(self, dataset, stage):
        m = self._view_map
        return SimpleNamespace(fingerprint=self._view_fp, item_ids=lambda: list(m), key=m.__getitem__)


def test_stage_state_counts_what_status_flows_and_finish_stage_share():
    from pipeline.runner import stage_state
    from pipeline.stage import Plan, WorkItem

    plan = Plan(items={k: WorkItem(k, None) for k in ("k1", "k2", "k3")}, view={"a": "k1", "b": "k2", "c": "k3"})
    # k3 missing; k2 a stored failure (kX: a failure of a key outside the plan, not counted);
    # the view lacks c: stale 1. done = 3 planned - 1 missing - 1 failed = 1.
    st = stage_state(_FakeStore({"k3"}, {"kX": "x", "k2": "bad"}, "fp", {"a": "k1", "b": "k2"}), "d", "s", "fp", plan)
    assert (st.missing, st.failures, st.done, st.view_fingerprint, st.stale) == ({"k3"}, {"k2": "bad"}, 1, "fp", 1)
    assert not st.current
    full = _FakeStore(set(), {"k2": "bad"}, "fp", {"a": "k1", "b": "k2", "c": "k3"})
    st = stage_state(full, "d", "s", "fp", plan)
    assert (st.done, st.stale, st.current) == (2, 0, True)  # a failure is settled: still current
    # A view under another fingerprint: every id of the view or the plan is stale (3).
    st = stage_state(_FakeStore(set(), {}, "old", {"a": "k1", "b": "k2", "c": "k3"}), "d", "s", "fp", plan)
    assert (st.stale, st.current) == (3, False)
    st = stage_state(_FakeStore(set(), {}), "d", "s", "fp", plan)  # no view yet
    assert (st.view_fingerprint, st.stale, st.current, st.done) == (None, None, False, 3)
    # missing given by the caller is trusted; with_view=False never reads the view
    st = stage_state(full, "d", "s", "fp", plan, missing={"k1"}, with_view=False)
    assert (st.missing, st.done, st.stale) == ({"k1"}, 1, None)
