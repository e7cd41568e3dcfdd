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


MAX_YAML_NODES = 100_000  # a config or manifest expanded through its aliases: far above any real one
MAX_YAML_DEPTH = 100  # nesting levels
MAX_REPR = 200  # characters of a user value quoted in an error message


def short_repr(value: Any, limit: int = MAX_REPR) -> str:
    """repr() cut to `limit` characters, computed without walking a huge or deep value first."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxdict, r.maxlist, r.maxtuple, r.maxset = 3, 8, 8, 8, 8
    r.maxstring, r.maxother, r.maxlong = limit, limit, limit
    try:
        text = r.repr(value)
    except Exception:  # noqa: BLE001 - a message must not fail
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _expanded_size(node: Any, where: str) -> int:
    """Nodes of the YAML node graph counted as if every alias were a copy (aliases share nodes),
    with memoisation so a billion-laughs document is sized in time linear in its text; refuses
    recursive aliases and documents nested deeper than MAX_YAML_DEPTH."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(n: Any, depth: int) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError(f"{where}: a YAML alias refers to itself (recursive document); not loaded")
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"{where}: YAML nested deeper than {MAX_YAML_DEPTH} levels; not loaded")
        active.add(key)
        total = 1
        if isinstance(n, yaml.SequenceNode):
            for child in n.value:
                total += size(child, depth + 1)
        elif isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                total += size(k, depth + 1) + size(v, depth + 1)
        active.discard(key)
        sizes[key] = total
        return total

    return size(node, 0)


def load_yaml(text: str | bytes, where: str, *, error: type[ConfigError] = ConfigError) -> Any:
    """yaml.safe_load for user input (configs, manifests, overrides) with bounds: a document that
    would expand through its aliases to more than MAX_YAML_NODES nodes (a "billion laughs"
    alias bomb), a recursive alias or nesting deeper than MAX_YAML_DEPTH is refused in one line
    before anything is built; parse errors are one line too."""
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            n = _expanded_size(node, where)
            if n > MAX_YAML_NODES:
                raise error(
                    f"{where}: the YAML expands to more than {MAX_YAML_NODES:,} values through its aliases "
                    "(&anchor / *alias); not loaded"
                )
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except ConfigError as e:
        raise error(str(e)) from None
    except RecursionError:
        raise error(f"{where}: YAML nested too deeply; not loaded") from None
    except yaml.YAMLError as e:
        msg = " ".join(str(e).split())
        raise error(f"{where}: not valid YAML: {msg[:300]}") from None


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
        raise ConfigError(f"{keypath}: expected {_describe(tp)}, got {short_repr(value)}")
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
        raise ConfigError(f"{keypath}: expected {_describe(tp)}, got {short_repr(value)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_mapping(tp, value, keypath)
    if origin in (tuple,):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{keypath}: expected a list, got {short_repr(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{keypath}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{keypath}: expected a list of {len(args)} items, got {short_repr(value)}")
        return tuple(_convert(a, v, f"{keypath}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{keypath}: expected a mapping, got {short_repr(value)}")
        vt = args[1] if len(args) == 2 else Any
        return types.MappingProxyType(
            {str(k): _convert(vt, v, f"{keypath}.{k}") for k, v in value.items()}
        )
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{keypath}: expected true or false, got {short_repr(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{keypath}: expected an integer, got {short_repr(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{keypath}: expected a number, got {short_repr(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{keypath}: expected a string, got {short_repr(value)}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{keypath}: expected a path string, got {short_repr(value)}")
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
        raise ConfigError(f"{where}: expected a mapping, got {short_repr(data)}")
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
            raise ConfigError(f"override {short_repr(item)}: expected key=value")
        key, raw = item.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {short_repr(item)}: empty key path")
        value = load_yaml(raw, f"override {short_repr(item)}") if raw != "" else ""
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
                raise ConfigError(f"override {short_repr(item)}: {part} is both a value and a section")
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
