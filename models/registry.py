"""Models by name: `build_model(name, cfg, embeddings)`; a bad name lists the valid ones.

Importing this module does not import torch: `MODEL_NAMES` (a static list, tested to equal
`available_models()`) lets `mrhp train --help` list the models in about a second.

Each model's settings are a frozen dataclass record (`model_config_class(name)`), built from the
`model_cfg` mapping with `pipeline.config.from_mapping`; `model_config(name, cfg)` validates it
when the training config loads, before any data is read, so a typo fails at once naming the
valid keys. Presets (`model_preset`) follow the shared contract: a model class may define
`preset(name, *, category=None) -> {"model_cfg": {...}, "train": {...}}` and `PRESET_NAMES`
(first = default, "paper"); a model without them accepts only "paper", meaning no overrides.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch.nn as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

# Modules that register models when imported; listed here so build_model finds every name.
MODEL_MODULES: tuple[str, ...] = ("models.baselines", "models.mcl", "models.mmss", "models.sancl")

# The names those modules register (static, so `--help` needs no torch import); a test pins it
# to available_models().
MODEL_NAMES: tuple[str, ...] = ("length", "mcl", "mmss", "random", "sancl", "text-gru")

# The config record of each model that does not name its own with a `config_class` attribute or
# a `config_record(cfg)` classmethod: "module:Class".
CONFIG_CLASSES: dict[str, str] = {
    "length": "models.baselines:NoConfig",
    "random": "models.baselines:NoConfig",
    "text-gru": "models.baselines:TextGRUConfig",
    "mcl": "models.mcl:MCLConfig",
    "mmss": "models.mmss:MMSSConfig",
    "sancl": "models.sancl:SANCLConfig",
}

DEFAULT_PRESET = "paper"


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
    if name not in _REGISTRY:
        _load_all()
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown model {name!r}; available: {', '.join(sorted(_REGISTRY)) or '(none)'}"
        )
    return _REGISTRY[name]


def model_config_class(name: str) -> type | None:
    """The dataclass holding the settings of model `name`, or None when it declares none."""
    cls = model_class(name)
    own = getattr(cls, "config_class", None)
    if own is not None:
        return own
    ref = CONFIG_CLASSES.get(name)
    if ref is None:
        return None
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def model_config(name: str, cfg: Mapping[str, Any] | None) -> Any | None:
    """Model `name`'s config record built from `cfg` (ConfigError naming the key and the valid
    ones on a typo), or None for a model that declares no record (its from_config validates)."""
    cls = model_class(name)
    hook = getattr(cls, "config_record", None)
    if callable(hook):
        return hook(dict(cfg or {}))
    ccls = model_config_class(name)
    if ccls is None:
        return None
    from pipeline.config import from_mapping

    return from_mapping(ccls, dict(cfg or {}), "model_cfg")


def preset_names(name: str) -> tuple[str, ...]:
    """The presets model `name` offers (first = default); ("paper",) for a model without any."""
    names = tuple(getattr(model_class(name), "PRESET_NAMES", ()) or ())
    return names or (DEFAULT_PRESET,)


def model_preset(name: str, preset: str, *, category: str | None = None) -> dict[str, dict[str, Any]]:
    """{"model_cfg": {...}, "train": {...}} of preset `preset` of model `name`; an unknown preset
    is a ConfigError listing the valid ones."""
    cls = model_class(name)
    valid = preset_names(name)
    if preset not in valid:
        raise ConfigError(f"preset: model {name!r} has no preset {preset!r}; valid: {', '.join(valid)}")
    fn = getattr(cls, "preset", None)
    if not callable(fn):
        return {"model_cfg": {}, "train": {}}
    out = fn(preset, category=category)
    if not isinstance(out, Mapping) or set(out) - {"model_cfg", "train"}:
        raise ConfigError(f"preset {preset!r} of model {name!r}: expected a mapping with keys "
                          f"model_cfg and train, got {out!r}")
    model_cfg = dict(out.get("model_cfg") or {})
    train = dict(out.get("train") or {})
    bad = sorted(set(train) & {"model", "dataset", "preset", "model_cfg"})
    if bad:
        raise ConfigError(f"preset {preset!r} of model {name!r}: train may not set {', '.join(bad)}")
    return {"model_cfg": model_cfg, "train": train}


def build_model(name: str, cfg: Mapping[str, Any] | None = None,
                embeddings: Mapping[str, np.ndarray] | None = None) -> nn.Module:
    """Build the model registered as `name` from a plain config mapping (validated by the model)."""
    return model_class(name).from_config(dict(cfg or {}), embeddings)
