"""Typed, frozen configuration records built from plain mappings (YAML, CLI overrides).

`from_mapping(cls, data, keypath)` turns a mapping into a frozen dataclass, checking every key:
unknown keys and wrong types raise ConfigError naming the full key path and what was expected.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from pipeline.errors import ConfigError

T = TypeVar("T")

_NONE = type(None)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is _NONE:
        return "null"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, keypath: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{keypath}: expected {_describe(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        if value is None and _NONE in args:
            return None
        errors = []
        for a in args:
            if a is _NONE:
                continue
            try:
                return _convert(a, value, keypath)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{keypath}: expected {_describe(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_mapping(tp, value, keypath)
    if origin in (tuple,):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{keypath}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{keypath}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{keypath}: expected a list of {len(args)} items, got {value!r}")
        return tuple(_convert(a, v, f"{keypath}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{keypath}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return types.MappingProxyType(
            {str(k): _convert(vt, v, f"{keypath}.{k}") for k, v in value.items()}
        )
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{keypath}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{keypath}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{keypath}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{keypath}: expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{keypath}: expected a path string, got {value!r}")
    raise ConfigError(f"{keypath}: unsupported field type {tp!r}")  # programming error


def from_mapping(cls: type[T], data: Any, keypath: str = "") -> T:
    """Build the frozen dataclass `cls` from `data`, validating every key and type.

    Missing keys take the dataclass defaults; a missing key without a default, an unknown key
    or a wrong type raises ConfigError naming `keypath.key`. Unknown-key errors list the valid keys.
    """
    where = keypath or cls.__name__
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, f in fields.items():
        sub = f"{keypath}.{name}" if keypath else name
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{sub}: required key is missing (expected {_describe(hints[name])})")
    return cls(**kwargs)


def to_mapping(obj: Any) -> Any:
    """Plain, YAML-serialisable form of a config record (inverse of from_mapping)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_mapping(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_mapping(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn `a.b=1 c=[1,2]` command-line overrides into a nested mapping (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: empty key path")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-3" as a string; a user means the number
                value = float(value)
            except ValueError:
                pass
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is both a value and a section")
        node[parts[-1]] = value
    return out


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive merge: mappings merge key by key, everything else in `update` wins."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out
