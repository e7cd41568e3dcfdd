"""Prefect flows wiring the `features/` stages to the feature store in chunked tasks.

- `extract_flow` (flow `mrhp-extract`) runs the requested stages (all by default) of one or every
  dataset, dependencies first; `extract_rois`, `extract_tokens`, `extract_embeddings`,
  `extract_probes` and `extract_bert` run one stage each (plus its dependencies, a no-op when they are up to date).
- Each stage is planned in the flow (content keys, cheap); the flow claims the keys the store
  lacks, splits them into chunks of `chunk_size` items, and one task per chunk computes them into
  segment files under `<store>/pending/` (`pipeline.runner.compute_chunk`). The flow process is the
  index's only writer: it verifies and commits the segments each task reports
  (`FeatureStore.commit_segment`), sweeps the pending segments of attempts that raised or were
  killed (`commit_pending`) and releases its claims; task workers never open the index for
  writing. Task retries cover transient errors; bad inputs are failure records, stored once
  and not retried; a chunk that still raises after its retries is reported in the summary with
  its keys and item ids, and the other chunks' results are kept.
- Every flow returns (and logs) one summary per dataset and stage (`StageSummary.to_json()`).

`run_request()` is the Python entry point (`mrhp extract` calls it with the `ExtractRequest` it
built; `run_extraction()` builds one from keyword arguments): it picks the task runner (threads, a
local Dask cluster, or an existing one) and makes Dask workers report to the flow's own Prefect
API instead of each starting a temporary server.

One path from the manifest to a stage: the request (features.registry.ExtractRequest: manifest
path, dataset, stages with their registry entries, overrides, force, chunk size) is built once and
handed as it is to the flow (its `request` parameter) and, inside a `StageRef`, to every chunk
task; any process turns it into the manifest through one memo (pipeline.manifest.load_manifest,
parsed once per process) and into the stage through `build_stage`. The flow plans each stage it
runs itself (the up-to-date check's plans are not kept: planning again costs what
docs/benchmarks.md says, "Planning twice").
"""
from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.context import FlowRunContext
from prefect.futures import as_completed

from features.registry import ExtractRequest, StageEntry, build_stage
from flows.caching import ContentChunkCache, forget_stage_results, result_storage
from pipeline.errors import ConfigError, DataError, ResourceError, StageError
from pipeline.manifest import Manifest
from pipeline.runner import (
    ChunkOutcome,
    StageSummary,
    compute_chunk,
    finish_stage,
    is_random_init,
    item_ids_by_key,
    plan_stage,
    stage_state,
)
from pipeline.stage import WorkItem
from pipeline.store import claim_owner

GPU_LIMIT_TAG = "mrhp-gpu"  # task tag of GPU chunks (a tag concurrency limit can target it)


@dataclass(frozen=True)
class StageRef:
    """Everything a worker process needs to rebuild a stage (stage objects are not shipped):
    the run's request and which of its stages, for which dataset."""

    request: ExtractRequest
    dataset: str
    stage: str
    store_root: str  # the flow's store (the flow commits what the task writes there)
    run_token: str  # the flow run id: stages are rebuilt for each run, once per process

    @property
    def entry(self) -> StageEntry:
        return self.request.entry(self.stage)


# Per-process caches: the flow process puts the stages it built here, so thread tasks reuse
# them; a Dask worker builds each stage once per flow run and reuses it for all its chunks.
_lock = threading.Lock()
_stage_cache: dict[StageRef, Any] = {}
_store_cache: dict[str, tuple[Any, tuple[tuple[int, int] | None, ...]]] = {}  # root -> (store, identity)
_gpu_lock = threading.Lock()  # GPU chunks of one process never overlap
_stage_locks: dict[StageRef, threading.Lock] = {}  # chunks of a non-thread-safe stage, one at a time


def _file_id(path: Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of `path`, None when it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def _store_identity(root: Path) -> tuple[tuple[int, int] | None, ...]:
    """Which store folder and index file `root` names now: a store deleted and recreated (or
    just deleted) under a cached FeatureStore gets another identity."""
    return (_file_id(root), _file_id(root / "index.sqlite"))


def open_store(root: str | Path):
    """One FeatureStore per process and root, shared by the threads of that process.

    The cached store is reopened when the folder or its index file is no longer the one it
    opened (deleted, or deleted and recreated, e.g. a scratch store wiped under a served flow or
    a Dask worker): its connections would otherwise read and write the deleted index file and
    every row committed through them would be lost, unsaid. The old store is closed when it has
    a `close`."""
    from pipeline.store import FeatureStore

    key = str(Path(root).resolve())
    with _lock:
        cached = _store_cache.get(key)
        if cached is not None:
            store, identity = cached
            if _store_identity(Path(key)) == identity:
                return store
            close = getattr(store, "close", None)
            if callable(close):
                close()
        store = FeatureStore(key)
        _store_cache[key] = (store, _store_identity(Path(key)))
        return store


def resolve_stage(ref: StageRef) -> Any:
    """The stage `ref` names, built once per process and flow run (the flow process put its own)."""
    with _lock:
        cached = _stage_cache.get(ref)
    if cached is not None:
        return cached
    stage = build_stage(ref.request.manifest(), ref.dataset, ref.stage, {ref.stage: ref.entry})
    return remember_stage(ref, stage, replace=False)


def remember_stage(ref: StageRef, stage: Any, *, replace: bool = True) -> Any:
    """Cache `stage` for `ref` in this process (the one cached wins unless `replace`) and drop,
    closing them, the stages of other runs: a process lives across many runs (a served flow, a
    Dask worker, `run_extraction` called again), and a rois stage holds a detector and decoding
    workers. Returns the stage cached for `ref`."""
    with _lock:
        for old in [r for r in _stage_cache if r.run_token != ref.run_token]:
            close = getattr(_stage_cache.pop(old), "close", None)
            if callable(close):  # e.g. the rois stage's persistent decoding workers
                close()
        if replace:
            _stage_cache[ref] = stage
            return stage
        return _stage_cache.setdefault(ref, stage)


@contextmanager
def _gpu_slot(ref: StageRef, gpu_limit: str | None) -> Iterator[None]:
    """Hold the process's GPU lock and, when deployed, a slot of the global limit `gpu_limit`."""
    if not ref.entry.gpu:
        yield
        return
    if gpu_limit:
        from prefect.concurrency.sync import concurrency

        ctx = concurrency(gpu_limit, occupy=1)
    else:
        ctx = nullcontext()
    with ctx, _gpu_lock:
        yield


def _stage_lock(ref: StageRef, stage: Any):
    """Threads of one process share a stage object; unless the stage says `thread_safe = True`
    (the synthetic stages do), its chunks run one at a time in that process (spaCy pipelines
    and lazily loaded models are not safe to share between threads)."""
    if getattr(stage, "thread_safe", False):
        return nullcontext()
    with _lock:
        for old in [r for r in _stage_locks if r.run_token != ref.run_token]:
            del _stage_locks[old]
        return _stage_locks.setdefault(ref, threading.Lock())


@task(
    name="extract-chunk",
    cache_policy=ContentChunkCache(),
    persist_result=True,
    result_serializer="json",
)
def extract_chunk(
    ref: StageRef, items: list[WorkItem], fingerprint: str, gpu_limit: str | None = None, owner: str = "",
    commit_every: int = 500,
) -> dict[str, Any]:
    """Compute one chunk of a stage into segments under `<store>/pending/<owner>/`; returns its
    `ChunkOutcome` as JSON, with the segments' descriptors, which the flow commits into the
    index. In a Dask worker the process is flagged a task worker first: it never opens the index
    for writing (any attempt is a StoreError)."""
    if _in_dask_worker():
        from pipeline.store import mark_worker_process

        mark_worker_process()
    stage = resolve_stage(ref)
    actual = stage.fingerprint()
    if actual != fingerprint:
        raise StageError(
            f"stage {ref.stage}: this worker computes fingerprint {actual}, the flow planned "
            f"{fingerprint} (different code, parameters or resources on this host?)"
        )
    with _gpu_slot(ref, gpu_limit), _stage_lock(ref, stage):
        return compute_chunk(stage, ref.store_root, items, owner=owner or claim_owner(), fingerprint=fingerprint,
                             commit_every=commit_every).to_json()


def _in_dask_worker() -> bool:
    """True when this code runs in a Dask worker (a task worker: see pipeline.store)."""
    try:
        from distributed import get_worker

        get_worker()
        return True
    except (ImportError, ValueError):
        return False


def commit_every() -> int:
    """Records per segment a chunk writes (and so at most lost by a killed worker): 500, or
    MRHP_COMMIT_EVERY (tests)."""
    value = os.environ.get("MRHP_COMMIT_EVERY", "")
    try:
        n = int(value) if value else 500
    except ValueError:
        raise ConfigError(f"MRHP_COMMIT_EVERY must be a positive integer, got {value!r}") from None
    if n < 1:
        raise ConfigError(f"MRHP_COMMIT_EVERY must be a positive integer, got {value!r}")
    return n


def is_deterministic(exc: BaseException | None) -> bool:
    """Errors that a retry cannot fix: bad configuration, bad data, missing resources (weights,
    side environments) and a fingerprint mismatch between hosts. Store errors and anything
    foreign (out of memory, a lost worker, I/O) may be transient and keep their retries."""
    if isinstance(exc, (ConfigError, DataError, ResourceError)):
        return True
    return isinstance(exc, StageError) and "fingerprint" in str(exc)


def retry_transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry a failed chunk unless its error is deterministic."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - the result could not be read: keep the retry policy
        return True
    return not (isinstance(exc, BaseException) and is_deterministic(exc))


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item", disable=not enabled or None, leave=True)


def _run_stage(
    request: ExtractRequest, manifest: Manifest, dataset: str, name: str, *,
    gpu_limit: str | None, run_token: str, progress: bool,
) -> StageSummary:
    logger = get_run_logger()
    store_root = str(manifest.roots.store)
    store = open_store(store_root)
    ref = StageRef(request=request, dataset=dataset, stage=name, store_root=store_root, run_token=run_token)
    entry = ref.entry
    force = request.forced(name)
    chunk_size = request.chunk_size
    stage = build_stage(manifest, dataset, name, {name: entry})
    work = plan_stage(stage, store, force=force)
    remember_stage(ref, stage)  # thread tasks of this run reuse it; earlier runs' stages go
    if force:
        forget_stage_results(store_root, name)
    chunk_task = extract_chunk.with_options(
        name=f"extract-{name}",
        retries=manifest.flows.retries,
        retry_delay_seconds=manifest.flows.retry_delay_seconds,
        retry_condition_fn=retry_transient_only,
        result_storage=result_storage(store_root),
        refresh_cache=force,
        tags=[f"mrhp-stage:{name}", *([GPU_LIMIT_TAG] if entry.gpu else [])],
    )
    outcomes: list[tuple[frozenset[str], ChunkOutcome]] = []  # (chunk keys, its outcome)
    errors: dict[str, str] = {}
    n_chunks = 0
    # The flow process is the index's only writer: it claims the keys before submitting (keys a
    # concurrent live run claimed are left to it; finish_stage waits for them), commits the
    # segments each chunk reports, sweeps what chunks wrote without reporting, then releases.
    owner = claim_owner()
    every = commit_every()
    claimed: list[str] = []

    def chunks_of(keys: Sequence[str]) -> list[list[WorkItem]]:
        return [[work.plan.items[k] for k in keys[i:i + chunk_size]] for i in range(0, len(keys), chunk_size)]

    def run_chunks(chunks: Sequence[list[WorkItem]], the_task: Any) -> None:
        nonlocal n_chunks
        n_chunks += len(chunks)
        futures = {the_task.submit(ref, chunk, work.fingerprint, gpu_limit, owner, every): chunk
                   for chunk in chunks}
        with _progress(sum(map(len, chunks)), f"{dataset}/{name}", progress) as bar:
            for fut in as_completed(list(futures)):
                chunk = futures[fut]
                try:
                    outcome = ChunkOutcome.from_json(fut.result())
                    for desc in outcome.segments:
                        store.commit_segment(desc)
                    outcomes.append((frozenset(it.key for it in chunk), outcome))
                except Exception as exc:  # noqa: BLE001 - the chunk failed after its retries
                    msg = f"{type(exc).__name__}: {exc}"
                    logger.error("%s/%s: chunk of %d item(s) failed: %s", dataset, name, len(chunk), msg)
                    errors.update({it.key: msg for it in chunk})
                bar.update(len(chunk))

    def sweep() -> None:
        added, problems = store.commit_pending(owner)
        if added:
            logger.info("%s/%s: committed %d item(s) from segments whose chunk did not report them "
                        "(a raising or killed attempt)", dataset, name, added)
        for line in problems:
            logger.error("%s/%s: %s", dataset, name, line)

    adopted, problems = store.adopt_abandoned()  # what workers of a killed run wrote, verified
    if adopted:
        logger.info("%s/%s: indexed %d item(s) from segments a run that ended had left pending",
                    dataset, name, adopted)
    for line in problems:
        logger.error("%s/%s: %s", dataset, name, line)
    try:
        claimed = store.claim(name, work.fingerprint, work.todo, owner=owner) if work.todo else []
        run_chunks(chunks_of(claimed), chunk_task)
        sweep()
        # A cached outcome whose results the store no longer holds: recompute those keys once.
        lost = sorted(
            set(store.missing(name, work.fingerprint, claimed)) - set(errors)
        ) if claimed else []
        if lost:
            logger.warning("%s/%s: %d key(s) reported done are not in the store; recomputing", dataset, name,
                           len(lost))
            # A cache hit needs the very same keys scheduled, i.e. the whole chunk lost: its cached
            # outcome no longer counts; the recomputation's does.
            lost_set = set(lost)
            outcomes[:] = [(keys, o) for keys, o in outcomes if not keys & lost_set]
            again = store.claim(name, work.fingerprint, lost, owner=owner)
            claimed += again
            run_chunks(chunks_of(again), chunk_task.with_options(refresh_cache=True))
            sweep()
    finally:
        if claimed:
            store.release(name, work.fingerprint, claimed, owner=owner)
    summary = finish_stage(
        work, store, dataset, [o for _, o in outcomes], errors,
        random_init=is_random_init(stage, manifest), chunks=n_chunks,
    )
    logger.info(
        "%s/%s fingerprint %s%s: %d total, %d done, %d reused, %d failed",
        dataset, name, summary.fingerprint, " (random-init)" if summary.random_init else "",
        summary.total, summary.done, summary.reused, summary.failed,
    )
    return summary


def _extract(request: ExtractRequest, *, gpu_limit: str | None, progress: bool) -> list[dict[str, Any]]:
    manifest = request.manifest()
    ctx = FlowRunContext.get()
    run_token = str(ctx.flow_run.id) if ctx and ctx.flow_run else "local"
    summaries: list[dict[str, Any]] = []
    for ds in request.datasets(manifest):
        def one(name: str, ds: str = ds) -> dict[str, Any]:
            return _run_stage(
                request, manifest, ds, name, gpu_limit=gpu_limit, run_token=run_token, progress=progress,
            ).to_json()

        summaries += _run_alongside(request.order, request.registry, one)
    publish_summary([StageSummary.from_json(x) for x in summaries])
    return summaries


def _run_alongside(order: Sequence[str], reg: Mapping[str, StageEntry], run_one: Any) -> list[Any]:
    """Run `order`'s stages, a GPU stage that nothing in `order` depends on (and that depends on
    nothing in it) in its own thread alongside the others: the text stages need only the CPU and
    no longer wait for the ROI stage. Results come back in `order`; the first error (in `order`)
    is raised after both sides finished."""
    import contextvars

    independent = {n for n in order if reg[n].gpu and not set(reg[n].depends_on) & set(order)
                   and not any(n in reg[m].depends_on for m in order)}
    side = [n for n in order if n in independent]
    main = [n for n in order if n not in independent]
    if not side or not main:
        return [run_one(n) for n in order]
    results: dict[str, Any] = {}
    errors: dict[str, BaseException] = {}

    def run(names: Sequence[str]) -> None:
        for n in names:
            try:
                results[n] = run_one(n)
            except BaseException as e:  # noqa: BLE001 - re-raised below, in stage order
                errors[n] = e
                return

    ctx = contextvars.copy_context()  # the flow run context (logger, task runner) for the thread
    thread = threading.Thread(target=ctx.run, args=(run, side), name="mrhp-gpu-stages", daemon=True)
    thread.start()
    try:
        run(main)
    finally:
        thread.join()
    for n in order:
        if n in errors:
            raise errors[n]
    return [results[n] for n in order]


def flow_run_name() -> str:
    """`{dataset}-{stages}` for a flow run (e.g. `amazon-home-rois`, `all-all`)."""
    from prefect.runtime import flow_run

    params = dict(flow_run.parameters or {})
    request = params.get("request")
    if request is not None:  # the request object, or its recorded form (a mapping)
        fields = request if isinstance(request, Mapping) else vars(request)
        params.update(dataset=fields.get("dataset"), stages=fields.get("stages"))
    stages = params.get("stages")
    if not stages:  # a per-stage flow (mrhp-extract-rois) names its stage; the others run all
        suffix = (flow_run.flow_name or "").removeprefix("mrhp-extract").strip("-")
        stages = [suffix] if suffix and suffix != "dask" else ["all"]
    return f"{params.get('dataset') or 'all'}-{'+'.join(stages)}"


def publish_summary(summaries: Sequence[StageSummary]) -> None:
    """The summary table and the failure list as Prefect table artifacts of the flow run (shown in
    the UI). Never fails the run: an artifact that cannot be written is a warning."""
    from prefect.artifacts import create_table_artifact

    from pipeline.runner import failure_lines

    rows = [{"dataset": s.dataset, "stage": s.stage, "fingerprint": s.fingerprint,
             "random_init": s.random_init, "total": s.total, "done": s.done, "reused": s.reused,
             "failed": s.failed} for s in summaries]
    try:
        create_table_artifact(table=rows, key="mrhp-extract-summary",
                              description="per dataset and stage: total, done, reused, failed")
        failures = failure_lines(summaries, limit=200)
        if failures:
            create_table_artifact(table=[{"failure": line} for line in failures], key="mrhp-extract-failures",
                                  description="failed items (ids and reason), at most 200 per stage")
    except Exception as exc:  # noqa: BLE001 - the UI's copy is a convenience, the store is the truth
        get_run_logger().warning("could not publish the summary artifact: %s", exc)


@flow(name="mrhp-extract", log_prints=False, flow_run_name=flow_run_name)
def extract_flow(
    dataset: str | None = None,
    stages: list[str] | None = None,
    force: bool = False,
    chunk_size: int | None = None,
    manifest_path: str | None = None,
    gpu_limit: str | None = None,
    progress: bool = True,
    on_dask: bool = False,
    overrides: dict[str, Any] | None = None,
    request: ExtractRequest | None = None,
) -> list[dict[str, Any]]:
    """Run `stages` (default: all) for `dataset` (default: every dataset in the manifest).

    Either `request` (an `ExtractRequest`, as `run_request` passes it) or its fields one by one
    (as deployments and the UI do: the request is then built here, once); not both. `gpu_limit`
    names a Prefect global concurrency limit GPU chunks hold a slot of (set by `mrhp deploy`);
    `on_dask` runs the chunks on the manifest's Dask cluster (`flows.dask_address`, or a local
    one) in a subflow: deployments use it, since a deployed flow keeps its default task runner.
    """
    if request is None:
        request = ExtractRequest.build(manifest_path, dataset=dataset, stages=stages, force=force,
                                       chunk_size=chunk_size, overrides=overrides)
    else:
        given = [k for k, v in (("dataset", dataset), ("stages", stages), ("force", force),
                                ("chunk_size", chunk_size), ("manifest_path", manifest_path),
                                ("overrides", overrides)) if v]
        if given:
            raise ConfigError(f"extract_flow: give a request or its fields, not both (also got {', '.join(given)})")
    if on_dask:
        manifest = request.manifest()
        runner = make_task_runner("dask", dask_address=manifest.flows.dask_address,
                                  dask_workers=manifest.flows.dask_workers)
        return extract_on_dask.with_options(task_runner=runner)(request=request, gpu_limit=gpu_limit,
                                                                progress=progress)
    return _extract(request, gpu_limit=gpu_limit, progress=progress)


@flow(name="mrhp-extract-dask", flow_run_name=flow_run_name)
def extract_on_dask(request: ExtractRequest, gpu_limit: str | None = None,
                    progress: bool = True) -> list[dict[str, Any]]:
    """The extraction as a subflow, given a Dask task runner by its parent."""
    return _extract(request, gpu_limit=gpu_limit, progress=progress)


def _stage_flow_body(stage: str, dataset: str | None, force: bool, chunk_size: int | None,
                     manifest_path: str | None, gpu_limit: str | None, progress: bool,
                     on_dask: bool) -> list[dict[str, Any]]:
    return extract_flow.fn(
        manifest_path=manifest_path, dataset=dataset, stages=[stage], force=force,
        chunk_size=chunk_size, gpu_limit=gpu_limit, progress=progress, on_dask=on_dask,
    )


# One flow per stage (module-level functions so deployments can name them as entrypoints).
@flow(name="mrhp-extract-rois", flow_run_name=flow_run_name)
def extract_rois(dataset: str | None = None, force: bool = False, chunk_size: int | None = None,
                 manifest_path: str | None = None, gpu_limit: str | None = None,
                 progress: bool = True, on_dask: bool = False) -> list[dict[str, Any]]:
    """ROI features and boxes of every image (GPU chunks hold the GPU slot)."""
    return _stage_flow_body("rois", dataset, force, chunk_size, manifest_path, gpu_limit, progress, on_dask)


@flow(name="mrhp-extract-tokens", flow_run_name=flow_run_name)
def extract_tokens(dataset: str | None = None, force: bool = False, chunk_size: int | None = None,
                   manifest_path: str | None = None, gpu_limit: str | None = None,
                   progress: bool = True, on_dask: bool = False) -> list[dict[str, Any]]:
    """Token ids and vocabularies of product and review texts."""
    return _stage_flow_body("tokens", dataset, force, chunk_size, manifest_path, gpu_limit, progress, on_dask)


@flow(name="mrhp-extract-embeddings", flow_run_name=flow_run_name)
def extract_embeddings(dataset: str | None = None, force: bool = False, chunk_size: int | None = None,
                       manifest_path: str | None = None, gpu_limit: str | None = None,
                       progress: bool = True, on_dask: bool = False) -> list[dict[str, Any]]:
    """Embedding matrices of the vocabularies (tokens first when out of date)."""
    return _stage_flow_body("embeddings", dataset, force, chunk_size, manifest_path, gpu_limit, progress, on_dask)


@flow(name="mrhp-extract-probes", flow_run_name=flow_run_name)
def extract_probes(dataset: str | None = None, force: bool = False, chunk_size: int | None = None,
                   manifest_path: str | None = None, gpu_limit: str | None = None,
                   progress: bool = True, on_dask: bool = False) -> list[dict[str, Any]]:
    """SANCL probe masks of review texts."""
    return _stage_flow_body("probes", dataset, force, chunk_size, manifest_path, gpu_limit, progress, on_dask)


@flow(name="mrhp-extract-bert")
def extract_bert(dataset: str | None = None, force: bool = False, chunk_size: int | None = None,
                 manifest_path: str | None = None, gpu_limit: str | None = None,
                 progress: bool = True, on_dask: bool = False) -> list[dict[str, Any]]:
    """Text-encoder token features of product and review texts (GPU chunks hold the GPU slot)."""
    return _stage_flow_body("bert", dataset, force, chunk_size, manifest_path, gpu_limit, progress, on_dask)


STAGE_FLOWS = {
    "rois": extract_rois, "tokens": extract_tokens,
    "embeddings": extract_embeddings, "probes": extract_probes, "bert": extract_bert,
}


def _api_url_for_workers() -> str:
    """The Prefect API the flow uses: the configured one, else the temporary server (started
    here, once, so that Dask workers share it instead of each starting their own)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if url:
        return str(url)
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url  # this process's own flow uses it too
    return server.api_url


def make_task_runner(kind: str, *, dask_address: str | None = None, dask_workers: int = 2):
    """The task runner for `kind`: threads, or Dask (an existing scheduler, or a local cluster of
    `dask_workers` processes with one thread each; one worker per GPU on a GPU box)."""
    if kind == "thread":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=max(1, min(4, os.cpu_count() or 1)))
    if kind != "dask":
        raise ConfigError(f"task runner: expected 'thread' or 'dask', got {kind!r}")
    from prefect_dask import DaskTaskRunner

    if dask_address:
        return DaskTaskRunner(address=dask_address)
    env = {
        "MRHP_STORE_WORKER": "1",  # the workers never open the store index for writing
        "PREFECT_API_URL": _api_url_for_workers(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    for name in ("PREFECT_HOME", "PREFECT_LOGGING_LEVEL", "PREFECT_SERVER_ANALYTICS_ENABLED", "MRHP_MANIFEST"):
        if name in os.environ:
            env[name] = os.environ[name]
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": dask_workers, "processes": True, "threads_per_worker": 1,
        "env": env, "dashboard_address": None,
    })


def up_to_date(request: ExtractRequest) -> list[StageSummary] | None:
    """Summaries of a run with nothing to do, or None as soon as one stage has work.

    Planning only hashes inputs, so `mrhp extract` on an unchanged project answers without
    starting Prefect at all. When a stage has work, the flow plans it again (the hash caches make
    that cheap; see docs/benchmarks.md, "Planning twice")."""
    manifest = request.manifest()
    store = open_store(manifest.roots.store)
    out: list[StageSummary] = []
    for ds in request.datasets(manifest):
        for name in request.order:
            stage = build_stage(manifest, ds, name, {name: request.entry(name)})
            work = plan_stage(stage, store)
            if work.todo:  # (later stages may depend on this one: stop)
                return None
            state = stage_state(store, ds, name, work.fingerprint, work.plan, missing=())
            if not state.current:
                return None
            earlier = state.failures
            out.append(StageSummary(
                dataset=ds, stage=name, fingerprint=work.fingerprint,
                random_init=is_random_init(stage, manifest), total=work.total,
                reused=work.total - len(earlier), failures=earlier,
                failed_items=item_ids_by_key(work.plan.view, earlier), view_written=True,
            ))
    return out


def run_request(
    request: ExtractRequest,
    *,
    task_runner: str | None = None,
    dask_address: str | None = None,
    progress: bool = True,
) -> list[StageSummary]:
    """Run the extraction flow for `request` (Prefect's temporary server unless PREFECT_API_URL
    is set) and return one summary per dataset and stage. The task runner defaults to the
    manifest's `flows:`.

    When every requested stage is already complete (nothing missing, views current) the answer
    comes from planning alone and no flow runs (`force` always runs the flow)."""
    if not request.force:
        done = up_to_date(request)
        if done is not None:
            return done
    manifest = request.manifest()
    kind = task_runner or manifest.flows.task_runner
    address = dask_address or manifest.flows.dask_address
    runner = make_task_runner(kind, dask_address=address, dask_workers=manifest.flows.dask_workers)
    result = extract_flow.with_options(task_runner=runner)(request=request, progress=progress)
    return [StageSummary.from_json(s) for s in result]


def run_extraction(
    manifest_path: str | Path | None = None,
    *,
    dataset: str | None = None,
    stages: Sequence[str] | None = None,
    force: bool = False,
    task_runner: str | None = None,
    dask_address: str | None = None,
    chunk_size: int | None = None,
    registry: Mapping[str, StageEntry] | None = None,
    progress: bool = True,
    overrides: Mapping[str, Any] | None = None,
) -> list[StageSummary]:
    """`run_request` of the request these arguments make (`ExtractRequest.build`: defaults from
    the manifest; `registry` replaces the stage registry; `overrides` is merged over the manifest
    file, e.g. `{"stages": {"rois": {"random_init": True}}}`)."""
    request = ExtractRequest.build(manifest_path, dataset=dataset, stages=stages, force=force,
                                   chunk_size=chunk_size, registry=registry, overrides=overrides)
    return run_request(request, task_runner=task_runner, dask_address=dask_address, progress=progress)
