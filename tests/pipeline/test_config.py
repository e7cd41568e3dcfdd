"""pipeline.config: typed records from mappings, with key paths in every error."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from pipeline.config import deep_merge, from_mapping, parse_overrides, to_mapping
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class Inner:
    size: int = 3
    kind: Literal["a", "b"] = "a"


@dataclass(frozen=True)
class Outer:
    name: str
    rate: float = 0.5
    inner: Inner = Inner()
    tags: tuple[str, ...] = ()
    extra: Mapping[str, int] = field(default_factory=dict)
    path: Path | None = None


def test_defaults_fill_missing_keys_and_ints_become_floats():
    cfg = from_mapping(Outer, {"name": "x", "rate": 1, "inner": {"kind": "b"}})
    assert cfg == Outer(name="x", rate=1.0, inner=Inner(size=3, kind="b"))
    assert isinstance(cfg.rate, float)


def test_unknown_key_names_full_path_and_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"inner: unknown key\(s\) sise; valid keys: kind, size"):
        from_mapping(Outer, {"name": "x", "inner": {"sise": 2}})


def test_wrong_type_names_key_path_and_expectation():
    with pytest.raises(ConfigError, match=r"inner\.size: expected an integer, got 'big'"):
        from_mapping(Outer, {"name": "x", "inner": {"size": "big"}})
    with pytest.raises(ConfigError, match=r"inner\.kind: expected one of 'a', 'b', got 'c'"):
        from_mapping(Outer, {"name": "x", "inner": {"kind": "c"}})
    with pytest.raises(ConfigError, match=r"extra\.k: expected an integer"):
        from_mapping(Outer, {"name": "x", "extra": {"k": 1.5}})


def test_bool_is_not_accepted_as_int():
    with pytest.raises(ConfigError, match="inner.size"):
        from_mapping(Outer, {"name": "x", "inner": {"size": True}})


def test_missing_required_key_is_an_error():
    with pytest.raises(ConfigError, match=r"name: required key is missing"):
        from_mapping(Outer, {})


def test_optional_path_and_tuple_conversion_round_trip():
    cfg = from_mapping(Outer, {"name": "x", "tags": ["a", "b"], "path": "p/q"})
    assert cfg.tags == ("a", "b") and cfg.path == Path("p/q")
    assert from_mapping(Outer, to_mapping(cfg)) == cfg


def test_overrides_parse_yaml_values_into_nested_keys():
    out = parse_overrides(["lr=1e-3", "model.hidden=64", "model.name=sancl", "tags=[1, 2]"])
    assert out == {"lr": 1e-3, "model": {"hidden": 64, "name": "sancl"}, "tags": [1, 2]}
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["lr"])


def test_deep_merge_merges_sections_and_overrides_values():
    assert deep_merge({"a": {"b": 1, "c": 2}, "d": 1}, {"a": {"b": 5}, "d": 2}) == {
        "a": {"b": 5, "c": 2},
        "d": 2,
    }
