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
