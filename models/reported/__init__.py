"""The papers' reported numbers as data: `models/reported/<model>.yaml`, schema in README.md.

`load_reported(folder)` reads every `*.yaml` of the folder with `yaml.safe_load` and validates
the schema: a wrong or missing key, a dataset other than amazon/lazada, a metric that is not a
number, or an unknown metric name is a ConfigError naming the file and `results[i].key`. Values
stay as printed (x100). `mrhp compare --reported` prints them beside a run's numbers.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError

FOLDER = Path(__file__).resolve().parent
TOP_KEYS = ("paper", "model", "source", "results", "extra")
REQUIRED_TOP = ("paper", "model", "results")
ROW_TEXT_KEYS = ("table", "method", "setting", "dataset", "category")
DATASETS = ("amazon", "lazada")
_METRIC = re.compile(r"^(MAP|MRR|NDCG@[1-9][0-9]*)$")


@dataclass(frozen=True)
class ReportedRow:
    model: str  # registered model name
    paper: str
    table: str
    method: str
    setting: str  # "" for the main row
    dataset: str  # amazon | lazada
    category: str
    metrics: Mapping[str, float] = field(default_factory=dict)  # as printed, x100
    file: str = ""


def _text(value: Any, where: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise ConfigError(f"{where}: expected a {'string' if allow_empty else 'non-empty string'}, got {value!r}")
    return value


def parse_reported(data: Any, source: str) -> list[ReportedRow]:
    """Rows of one reported-numbers mapping (the parsed YAML of `source`), validated."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping with keys {', '.join(TOP_KEYS)}, got {type(data).__name__}")
    unknown = sorted(set(map(str, data)) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(TOP_KEYS)}")
    for k in REQUIRED_TOP:
        if k not in data:
            raise ConfigError(f"{source}: {k}: required key is missing")
    paper = _text(data["paper"], f"{source}: paper")
    model = _text(data["model"], f"{source}: model")
    if "source" in data:
        _text(data["source"], f"{source}: source")
    extra = data.get("extra", {})
    if extra is not None and not isinstance(extra, Mapping):
        raise ConfigError(f"{source}: extra: expected a mapping, got {extra!r}")
    results = data["results"]
    if not isinstance(results, list) or not results:
        raise ConfigError(f"{source}: results: expected a non-empty list of records, got {results!r}")
    rows = []
    for i, r in enumerate(results):
        where = f"{source}: results[{i}]"
        if not isinstance(r, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {r!r}")
        for k in ROW_TEXT_KEYS:
            if k not in r:
                raise ConfigError(f"{where}.{k}: required key is missing")
        text = {k: _text(r[k], f"{where}.{k}", allow_empty=(k == "setting")) for k in ROW_TEXT_KEYS}
        if text["dataset"] not in DATASETS:
            raise ConfigError(f"{where}.dataset: expected one of {', '.join(DATASETS)}, got {text['dataset']!r}")
        metrics: dict[str, float] = {}
        for k, v in r.items():
            if k in ROW_TEXT_KEYS:
                continue
            if not _METRIC.match(str(k)):
                raise ConfigError(f"{where}: unknown key {k!r}; valid keys: {', '.join(ROW_TEXT_KEYS)} "
                                  f"and metrics MAP, MRR, NDCG@k")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"{where}.{k}: expected a number (as printed, x100), got {v!r}")
            if not 0 <= v <= 100:
                raise ConfigError(f"{where}.{k}: expected a value in 0..100 (x100), got {v!r}")
            metrics[str(k)] = float(v)
        if not metrics:
            raise ConfigError(f"{where}: no metric value (MAP, NDCG@3, ...)")
        rows.append(ReportedRow(model=model, paper=paper, metrics=metrics, file=source, **text))
    return rows


def load_reported(folder: str | Path | None = None) -> list[ReportedRow]:
    """Every row of every `*.yaml` under `folder` (default: this package's folder)."""
    folder = Path(folder) if folder is not None else FOLDER
    rows: list[ReportedRow] = []
    for f in sorted(folder.glob("*.yaml")):
        try:
            data = yaml.safe_load(f.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{f}: not valid YAML ({e})") from None
        rows.extend(parse_reported(data, str(f)))
    return rows


def reported_for(rows: Iterable[ReportedRow], *, model: str, dataset: str, category: str,
                 setting: str | None = "") -> list[ReportedRow]:
    """The rows of `model` on (dataset source, category); `setting` "" = the main rows, None = all."""
    return [r for r in rows if r.model == model and r.dataset == dataset and r.category == category
            and (setting is None or r.setting == setting)]
