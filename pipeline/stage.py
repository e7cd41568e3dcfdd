"""The stage contract shared by `features/` (which implements stages) and `flows/` (which runs them).

A stage turns work items into records. It never sees the store or Prefect: the runner asks the
store which keys are missing for the stage's fingerprint, splits them into chunks and calls
`run(items)` per chunk. Bad input yields a Record with `failure` set, never an exception.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class FieldSpec:
    """One stored array per item. `ragged`: the first axis varies per item (stored flat + offsets)."""

    dtype: str  # numpy dtype name, e.g. "float16", "int32"
    shape: tuple[int, ...] = ()  # per-item shape after the ragged axis (or the whole shape if fixed)
    ragged: bool = False


@dataclass(frozen=True)
class WorkItem:
    """One unit of work: `key` is its content address, `source` what the stage needs to compute it
    (an absolute image path, a text, a (name, review) pair...). `source` must be picklable."""

    key: str
    source: Any


@dataclass
class Record:
    """The result for one item: arrays matching the stage schema, or a failure reason."""

    key: str
    arrays: dict[str, np.ndarray] | None = None
    failure: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # small JSON-able extras (e.g. image h/w)

    @property
    def ok(self) -> bool:
        return self.failure is None


@dataclass
class Plan:
    """What a stage must cover for a dataset: the distinct items by key, and the dataset view
    mapping each dataset item id (image path, review id, ...) to the key holding its result."""

    items: dict[str, WorkItem]
    view: dict[str, str]


@runtime_checkable
class Stage(Protocol):
    name: str  # "rois", "tokens", "embeddings", "probes"
    schema: Mapping[str, FieldSpec]
    depends_on: tuple[str, ...]  # names of stages whose outputs feed this one

    def fingerprint(self) -> str:
        """Hash of code version, parameters and resources (weights sha256, vocabulary hash)."""

    def plan(self) -> Plan:
        """Enumerate the items this stage must have for its dataset (cheap: no pixels, no parsing)."""

    def run(self, items: Sequence[WorkItem]) -> Iterator[Record]:
        """Compute records for a chunk of items, one Record per item, in any order."""


# Fingerprints of outputs computed with random-init weights (demos/tests) start so; `mrhp status`,
# the run records and the comparison tables flag them.
RANDOM_INIT_PREFIX = "random-init-"


def is_random_init(subject: Any, manifest: Any = None) -> bool:
    """The one answer to "was this computed with random-init weights?", for any of:

    - a view or stage fingerprint (str): it starts with RANDOM_INIT_PREFIX; None: False;
    - a mapping of parameters: its `random_init` key;
    - a stage: its own answer (`is_random_init()` or a `random_init` attribute), else a boolean
      `random_init` on the stage or its `params` record, else the manifest's parameters for
      the stage's name when `manifest` is given;
    - a parameter record (e.g. RoisParams): its boolean `random_init`.
    """
    if subject is None:
        return False
    if isinstance(subject, str):
        return subject.startswith(RANDOM_INIT_PREFIX)
    if isinstance(subject, Mapping):
        return bool(subject.get("random_init", False))
    probe = getattr(subject, "is_random_init", None)
    if callable(probe):
        return bool(probe())
    if probe is not None:
        return bool(probe)
    for holder in (subject, getattr(subject, "params", None)):
        value = getattr(holder, "random_init", None)
        if isinstance(value, bool):
            return value
    if manifest is not None:
        params = getattr(manifest, "stages", {}).get(getattr(subject, "name", ""))
        return bool(getattr(params, "random_init", False))
    return False
