"""Which stages exist, where their code lives and in which order they run; what a run asks for.

Each entry names the module exposing `build_stage(manifest, dataset_name) -> Stage`. Modules are
imported only when a stage is built, so listing stages never imports torch or spaCy.

`ExtractRequest` is one extraction run's request (manifest, dataset, stages with their entries,
overrides, force, chunk size), built and checked once (`ExtractRequest.build`, by `mrhp extract`
or `flows.extract.run_extraction`) and handed as it is to the flow and its chunk tasks: a frozen
record of plain fields (Prefect records it as a flow parameter; Dask pickles it to workers).
"""
from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, StageError
from pipeline.manifest import FrozenOverrides, Manifest, freeze_overrides, load_manifest, thaw_overrides


@dataclass(frozen=True)
class StageEntry:
    """Where a stage's code lives and what it needs."""

    module: str  # importable module exposing build_stage(manifest, dataset_name), or "module:function"
    depends_on: tuple[str, ...] = ()  # stages whose outputs this one reads (run first)
    gpu: bool = False  # uses the accelerator: chunks of it never overlap on one GPU


# Order of this mapping is the default run order (dependencies first).
STAGES: dict[str, StageEntry] = {
    "rois": StageEntry(module="features.rois", gpu=True),
    "tokens": StageEntry(module="features.text.tokens"),
    "embeddings": StageEntry(module="features.text.embeddings", depends_on=("tokens",)),
    "probes": StageEntry(module="features.text.probes"),
    "bert": StageEntry(module="features.text.bert", gpu=True),
}


def stage_order(
    names: Iterable[str] | None = None,
    registry: Mapping[str, StageEntry] | None = None,
    *,
    with_dependencies: bool = True,
) -> list[str]:
    """The stages to run for `names` (None: all), dependencies first, in registry order.

    With `with_dependencies`, the stages a requested one depends on are included (a no-op when
    they are up to date), so `--stage embeddings` never reads a stale vocabulary.
    """
    reg = STAGES if registry is None else registry
    wanted = list(reg) if names is None else list(dict.fromkeys(names))
    unknown = [n for n in wanted if n not in reg]
    if unknown:
        raise ConfigError(f"unknown stage(s) {', '.join(unknown)}; valid: {', '.join(reg)}")
    chosen: set[str] = set()

    def visit(name: str, trail: tuple[str, ...]) -> None:
        if name in trail:
            raise ConfigError(f"stage dependency cycle: {' -> '.join((*trail, name))}")
        if name in chosen:
            return
        for dep in reg[name].depends_on:
            if dep not in reg:
                raise ConfigError(f"stage {name!r} depends on unknown stage {dep!r}")
            if with_dependencies:
                visit(dep, (*trail, name))
        chosen.add(name)

    for n in wanted:
        visit(n, ())
    # Registry order, then make sure every dependency precedes its dependents.
    ordered: list[str] = []
    placed: set[str] = set()
    pending = [n for n in reg if n in chosen]
    while pending:
        for n in pending:
            if all(d in placed or d not in chosen for d in reg[n].depends_on):
                ordered.append(n)
                placed.add(n)
                pending.remove(n)
                break
        else:  # pragma: no cover - visit() already rejects cycles
            raise ConfigError(f"stage dependency cycle among {', '.join(pending)}")
    return ordered


def build_stage(manifest: Any, dataset: str, name: str, registry: Mapping[str, StageEntry] | None = None):
    """Import the stage's module and build it for `dataset`; a missing module is a StageError."""
    reg = STAGES if registry is None else registry
    if name not in reg:
        raise ConfigError(f"unknown stage {name!r}; valid: {', '.join(reg)}")
    entry = reg[name]
    module_name, _, func = entry.module.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise StageError(f"stage {name!r}: cannot import {module_name} ({e})") from None
    builder = getattr(module, func or "build_stage", None)
    if builder is None:
        raise StageError(f"stage {name!r}: {module_name} has no {func or 'build_stage'}()")
    stage = builder(manifest, dataset)
    if stage.name != name:
        raise StageError(f"{entry.module}.build_stage returned stage {stage.name!r}, expected {name!r}")
    return stage


def build_stages(
    manifest: Any, dataset: str, names: Iterable[str] | None = None,
    registry: Mapping[str, StageEntry] | None = None,
) -> list:
    """Build the stages `names` (None: all) for `dataset`, dependencies first.

    Stages whose plan reads a dependency's output (embeddings reads the token vocabularies) must
    be planned after that dependency ran; the flows therefore build stages one at a time with
    `build_stage` and use this only where every dependency is already in the store.
    """
    return [build_stage(manifest, dataset, n, registry) for n in stage_order(names, registry)]


@dataclass(frozen=True)
class ExtractRequest:
    """What one extraction run computes; built once by `build`, read everywhere after.

    Plain, immutable fields only: hashable (it keys the per-process stage caches of the flow),
    recorded by Prefect as the flow's `request` parameter, and rebuilt from that record as is."""

    manifest_path: str  # the manifest file, resolved
    dataset: str | None  # one dataset, or None: every dataset of the manifest
    stages: tuple[str, ...] | None  # the stages named (None: all); `entries` adds their dependencies
    entries: tuple[tuple[str, StageEntry], ...]  # every stage to run, in run order, with its entry
    force: bool  # recompute the named stages' items even if stored
    chunk_size: int  # items per chunk task
    overrides: FrozenOverrides = ()  # merged over the manifest file (e.g. --random-init)

    def __post_init__(self) -> None:
        # Rebuilt from Prefect's JSON record, a list-valued override arrives as a list (JSON has
        # no tuples): freeze it again, so that the request stays hashable and equal to the original.
        object.__setattr__(self, "overrides", freeze_overrides(thaw_overrides(tuple(self.overrides))))

    @classmethod
    def build(
        cls,
        manifest_path: str | Path | None = None,
        *,
        dataset: str | None = None,
        stages: Sequence[str] | None = None,
        force: bool = False,
        chunk_size: int | None = None,
        registry: Mapping[str, StageEntry] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> ExtractRequest:
        """Check everything against the manifest and the registry (one-line errors, before any
        Prefect start-up) and resolve the defaults: chunk_size from the manifest's flows."""
        frozen = freeze_overrides(overrides)
        manifest = load_manifest(manifest_path, overrides=thaw_overrides(frozen))
        if dataset is not None:
            manifest.dataset(dataset)  # an unknown dataset is a ManifestError naming the declared ones
        reg = registry or STAGES
        order = stage_order(stages, reg)
        # `is None`, not `or`: an explicit 0 is an error, not the manifest's default
        size = chunk_size if chunk_size is not None else manifest.flows.chunk_size
        if not isinstance(size, int) or isinstance(size, bool):  # int() would truncate 2.5, read True as 1
            raise ConfigError(f"chunk_size must be an integer, got {size!r}")
        if size < 1:
            raise ConfigError(f"chunk_size must be at least 1, got {size}")
        return cls(
            manifest_path=str(manifest.path),
            dataset=dataset,
            stages=tuple(dict.fromkeys(stages)) if stages else None,
            entries=tuple((name, reg[name]) for name in order),
            force=bool(force),
            chunk_size=int(size),
            overrides=frozen,
        )

    def manifest(self) -> Manifest:
        """The manifest with the overrides merged (parsed once per process: see pipeline.manifest)."""
        return load_manifest(self.manifest_path, overrides=thaw_overrides(self.overrides))

    @property
    def order(self) -> tuple[str, ...]:
        """The stages to run, dependencies first."""
        return tuple(name for name, _ in self.entries)

    @property
    def registry(self) -> dict[str, StageEntry]:
        return dict(self.entries)

    def entry(self, stage: str) -> StageEntry:
        for name, entry in self.entries:
            if name == stage:
                return entry
        raise ConfigError(f"stage {stage!r} is not part of this request ({', '.join(self.order)})")

    def forced(self, stage: str) -> bool:
        """Whether `stage`'s stored items are recomputed: --force applies to the stages named
        (all when none were), not to the dependencies run first."""
        return self.force and (self.stages is None or stage in self.stages)

    def datasets(self, manifest: Manifest) -> list[str]:
        return [manifest.dataset(self.dataset).name] if self.dataset else list(manifest.datasets)
