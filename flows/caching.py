"""Prefect caching that follows content, not paths.

Prefect's default cache key hashes a task's inputs; for a path that is the string, so a changed
file at the same path would look unchanged. A chunk task's key here is built from the store's
content addresses instead: the stage name, the stage fingerprint (code version, parameters,
weights and vocabulary hashes) and the sorted content keys of the chunk's items (image sha256,
text hashes). Results are small JSON documents (`ChunkOutcome`) persisted under the project's
store (`<store>/flows/results/<stage>-<fingerprint>-<digest>`), never pickles.

The store remains the authority: a chunk is only scheduled for keys the store lacks, and the
flow checks the store after each stage, so a cached outcome for results that were since lost
(e.g. removed by `mrhp gc`) is detected and recomputed with the cache refreshed.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy

RESULTS_DIR = Path("flows") / "results"  # under the store root


def chunk_cache_key(stage: str, fingerprint: str, keys: Iterable[str]) -> str:
    """`<stage>-<fingerprint>-<sha256 of the sorted item keys>`: stable across runs and hosts."""
    h = hashlib.sha256()
    for k in sorted(keys):
        h.update(k.encode("utf-8"))
        h.update(b"\x00")
    return f"{stage}-{fingerprint}-{h.hexdigest()[:32]}"


@dataclass
class ContentChunkCache(CachePolicy):
    """Cache policy of the extraction chunk task: key from the chunk's content keys.

    Expects the task inputs `ref` (with `.stage`), `items` (WorkItems with `.key`) and
    `fingerprint`; anything else in the inputs (paths, worker settings) does not enter the key.
    """

    def compute_key(
        self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        ref = inputs.get("ref")
        items = inputs.get("items")
        fingerprint = inputs.get("fingerprint")
        if ref is None or items is None or not fingerprint:
            return None
        return chunk_cache_key(ref.stage, fingerprint, (it.key for it in items))


def results_dir(store_root: str | Path) -> Path:
    return Path(store_root) / RESULTS_DIR


def result_storage(store_root: str | Path) -> Path:
    """Prefect result storage under the store, `<store>/flows/results` (a Path: Prefect makes a
    local file system of it without a server-side block, so it works on any API server)."""
    path = results_dir(store_root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def forget_stage_results(store_root: str | Path, stage: str, fingerprint: str | None = None) -> int:
    """Delete the persisted chunk results of `stage` (one fingerprint or all); returns how many.

    `--force` calls this (and refreshes the task cache) so no earlier outcome is reused.
    """
    d = results_dir(store_root)
    if not d.is_dir():
        return 0
    prefix = f"{stage}-{fingerprint}-" if fingerprint else f"{stage}-"
    n = 0
    for p in d.iterdir():
        if p.name.startswith(prefix) and p.is_file():
            p.unlink(missing_ok=True)
            n += 1
    return n
