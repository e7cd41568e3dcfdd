"""Models by name: `build_model(name, cfg, embeddings)`; a bad name lists the valid ones."""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch.nn as nn

from pipeline.errors import ConfigError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

# Modules that register models when imported; listed here so build_model finds every name.
MODEL_MODULES: tuple[str, ...] = ("models.baselines", "models.mcl", "models.mmss", "models.sancl")


def register_model(name: str) -> Callable:
    """Class decorator: `@register_model("sancl")`. The class must offer
    `from_config(cfg: Mapping, embeddings: Mapping[str, np.ndarray] | None) -> nn.Module`, where
    embeddings maps "prd" and "rvw" to the (V, dim) matrices of the two vocabularies."""

    def deco(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model name {name!r} registered twice")
        _REGISTRY[name] = cls
        cls.registry_name = name
        return cls

    return deco


def _load_all() -> None:
    for m in MODEL_MODULES:
        importlib.import_module(m)


def available_models() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def model_class(name: str):
    _load_all()
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown model {name!r}; available: {', '.join(sorted(_REGISTRY)) or '(none)'}"
        )
    return _REGISTRY[name]


def build_model(name: str, cfg: Mapping[str, Any] | None = None,
                embeddings: Mapping[str, np.ndarray] | None = None) -> nn.Module:
    """Build the model registered as `name` from a plain config mapping (validated by the model)."""
    return model_class(name).from_config(dict(cfg or {}), embeddings)
