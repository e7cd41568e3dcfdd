"""Impossible or contradictory training settings are refused in one line before any data is read
(the audit of silent degradation): each value here used to load and then quietly change what a
run trains or reports."""
from __future__ import annotations

import pytest
import torch

from models.config import train_config
from pipeline.errors import ConfigError


def _refused(mapping, match):
    with pytest.raises(ConfigError, match=match) as ei:
        train_config(mapping)
    assert "\n" not in str(ei.value)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_grad_clip_must_be_positive_or_null(value):
    _refused({"grad_clip": value}, r"grad_clip: expected a positive max gradient norm or null")


def test_a_zero_grad_clip_would_zero_every_gradient():
    # Why 0 is refused: clip_grad_norm_ multiplies each gradient by min(1, 0 / (norm + eps)) = 0,
    # so Adam would take no step at all and the run would "train" for its epochs unchanged.
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    (w * torch.tensor([3.0, 4.0])).sum().backward()  # grad = (3, 4), norm 5
    torch.nn.utils.clip_grad_norm_([w], 0.0)
    assert torch.equal(w.grad, torch.zeros(2))


def test_valid_grad_clip_values_load():
    assert train_config({"grad_clip": 5.0}).grad_clip == 5.0
    assert train_config({"grad_clip": None}).grad_clip is None
