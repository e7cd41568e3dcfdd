"""Run a stage against the feature store, without any orchestrator.

The flows (`flows/extract.py`) call these functions from Prefect tasks; they work the same from
a plain script. Single-process (`run_chunk`, `run_stage`): the chunk claims, computes, commits
and releases in this process. Flows (`compute_chunk`): the flow process claims the keys before
submitting, the task only writes pending segments and returns their descriptors, and the flow
commits them (it is the index's only writer; task workers never open it for writing). The
runner asks the store which keys are missing for the stage's fingerprint, splits them into
chunks, runs each chunk through `stage.run` into a segment writer, and writes the dataset view
once every planned key is either computed or recorded as a failure.

Counting (the summary every flow returns), from the index once the chunks are done:
- `reused`: planned keys whose result the store already held before the run;
- `done`: keys missing when the run planned that now have a stored result (computed by this
  run, or by a concurrent run that had claimed them: chunks claim their keys in the index, so
  two runs on one store split the work, and a run waits for the keys another run holds);
- `failed`: planned keys with a failure record (bad input: recorded by this run or an earlier
  one, so a rerun still reports them) plus keys whose chunk raised after its retries (`errors`;
  not stored, so a later run tries them again).
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.errors import StageError
from pipeline.stage import Plan, Stage, WorkItem, is_random_init  # noqa: F401 (flows and status import it from here)

log = logging.getLogger(__name__)


@dataclass
class ChunkOutcome:
    """What one chunk did. JSON-able: it is the Prefect task result persisted under the store."""

    stage: str
    fingerprint: str
    keys: int  # keys the chunk was given
    done: int = 0  # records written with a result
    skipped: int = 0  # keys already in the store when the chunk started (a retry or a rerun)
    failures: dict[str, str] = field(default_factory=dict)  # key -> reason, failure records written
    # `compute_chunk`: descriptors of the segments written under pending/ (the flow commits them)
    segments: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ChunkOutcome:
        return cls(**dict(data))


@dataclass
class StageWork:
    """A planned stage: its plan, fingerprint and the keys this run must compute."""

    stage: Stage
    fingerprint: str
    plan: Plan
    todo: list[str]  # keys to compute, sorted

    @property
    def total(self) -> int:
        return len(self.plan.items)

    @property
    def reused(self) -> int:
        return self.total - len(self.todo)

    def chunks(self, chunk_size: int) -> list[list[WorkItem]]:
        """The work items to compute, in chunks of at most `chunk_size`."""
        return [
            [self.plan.items[k] for k in self.todo[i:i + chunk_size]]
            for i in range(0, len(self.todo), chunk_size)
        ]


@dataclass
class StageSummary:
    """The outcome of one stage for one dataset (a row of the summary table)."""

    dataset: str
    stage: str
    fingerprint: str
    random_init: bool  # the stage ran with random-init weights (demos/tests only)
    total: int  # distinct keys in the plan
    done: int = 0
    reused: int = 0
    failures: dict[str, str] = field(default_factory=dict)  # key -> reason (stored failure records)
    errors: dict[str, str] = field(default_factory=dict)  # key -> exception of its chunk (not stored)
    failed_items: dict[str, list[str]] = field(default_factory=dict)  # key -> dataset item ids
    view_written: bool = False
    chunks: int = 0  # chunks run (tasks submitted)
    note: str = ""  # the stage's `summary_note()` when it has one (probes: the coreference backend used)

    @property
    def failed(self) -> int:
        return len(self.failures) + len(self.errors)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["failed"] = self.failed
        return d

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StageSummary:
        d = dict(data)
        d.pop("failed", None)
        return cls(**d)


def stage_params(stage: Any) -> dict[str, Any]:
    """The stage's parameters (JSON-able) for segment attributes; empty when it exposes none."""
    params = getattr(stage, "params", None)
    if params is None:
        return {}
    from pipeline.config import to_mapping

    value = to_mapping(params)
    return json.loads(json.dumps(value if isinstance(value, dict) else {"params": value}, default=str))


CLAIM_POLL_S = 1.0  # finish_stage polls this often for keys a concurrent run is computing


def plan_stage(stage: Stage, store: Any, *, force: bool = False) -> StageWork:
    """Plan `stage` and find the keys to compute: the missing ones, or all of them with `force`
    (which first makes the store forget this fingerprint's results and failures for them)."""
    plan = stage.plan()
    fp = stage.fingerprint()
    keys = sorted(plan.items)
    bad = sorted(set(plan.view.values()) - set(plan.items))
    if bad:
        raise StageError(
            f"stage {stage.name}: plan view maps item(s) to key(s) not in plan.items, e.g. {bad[0]}"
        )
    if force:
        store.forget(stage.name, fp, keys)
        todo = keys
    else:
        todo = sorted(store.missing(stage.name, fp, keys))
    return StageWork(stage=stage, fingerprint=fp, plan=plan, todo=todo)


def run_chunk(
    stage: Stage, store: Any, items: Sequence[WorkItem], *, fingerprint: str | None = None,
    commit_every: int = 500,
) -> ChunkOutcome:
    """Compute one chunk into a new segment and commit it.

    Keys the store already holds are skipped (so a retried or rerun chunk redoes only what a
    crash lost). If `stage.run` raises, the records it produced are still committed and the
    exception propagates (the task's retries cover transient errors). The writer commits a
    segment every `commit_every` records, so a killed process loses at most that many. A stage that yields a key
    it was not given, or no record for a key it was given, is a StageError.
    """
    fp = fingerprint or stage.fingerprint()
    given = [it.key for it in items]
    # Claim the missing keys in the index: keys another live run is computing are left to it.
    claim = getattr(store, "claim", None)
    todo_keys = set(claim(stage.name, fp, given) if claim else store.missing(stage.name, fp, given))
    todo = [it for it in items if it.key in todo_keys]
    out = ChunkOutcome(stage=stage.name, fingerprint=fp, keys=len(given), skipped=len(given) - len(todo))
    if not todo:
        return out
    try:
        writer = store.writer(stage.name, fp, stage.schema, attrs=stage_params(stage), chunk_size=commit_every)
    except BaseException:
        if claim:
            store.release(stage.name, fp, sorted(todo_keys))
        raise
    try:
        _write_records(stage, writer, todo, todo_keys, out)
    finally:
        if claim:
            store.release(stage.name, fp, sorted(todo_keys))
    return out


def _write_records(stage: Stage, writer: Any, todo: Sequence[WorkItem], todo_keys: set[str],
                   out: ChunkOutcome) -> None:
    """Run `stage` on `todo` into `writer` (closed at the end, so what was produced is written
    even when the stage raises), counting into `out`; a missing or foreign record is a StageError."""
    seen: set[str] = set()
    try:
        for rec in stage.run(todo):
            if rec.key not in todo_keys:
                raise StageError(f"stage {stage.name} returned a record for key {rec.key}, which it was not given")
            if rec.key in seen:
                continue
            seen.add(rec.key)
            writer.add(rec)
            if rec.ok:
                out.done += 1
            else:
                out.failures[rec.key] = str(rec.failure)
    finally:
        writer.close()  # writes what was produced, even when the stage raised
    lost = todo_keys - seen
    if lost:
        raise StageError(
            f"stage {stage.name} yielded no record for {len(lost)} of {len(todo)} item(s), "
            f"e.g. {sorted(lost)[0]}"
        )


def compute_chunk(
    stage: Stage, store_root: Any, items: Sequence[WorkItem], *, owner: str, fingerprint: str | None = None,
    commit_every: int = 500,
) -> ChunkOutcome:
    """The task-worker half of a chunk: compute it into segments under `<store>/pending/<owner>/`
    (a new one every `commit_every` records and at the end) and return their descriptors in
    `ChunkOutcome.segments`. The index is not opened: the flow claimed the keys before
    submitting the chunk and commits the descriptors (`FeatureStore.commit_segment`). When the
    stage raises, the segments written so far stay pending and the flow's end-of-stage sweep
    (`FeatureStore.commit_pending(owner)`) commits them."""
    from pipeline.store import pending_writer

    fp = fingerprint or stage.fingerprint()
    todo_keys = {it.key for it in items}
    todo = list({it.key: it for it in items}.values())
    out = ChunkOutcome(stage=stage.name, fingerprint=fp, keys=len(items))
    if not todo:
        return out
    writer = pending_writer(store_root, stage.name, fp, stage.schema, owner=owner, attrs=stage_params(stage),
                            chunk_size=commit_every)
    _write_records(stage, writer, todo, todo_keys, out)
    out.segments = list(writer.descriptors)
    return out


def item_ids_by_key(view: Mapping[str, str], keys: Iterable[str]) -> dict[str, list[str]]:
    """The dataset item ids mapped to each of `keys` (several ids can share one content key)."""
    wanted = set(keys)
    out: dict[str, list[str]] = {k: [] for k in wanted}
    for item_id, key in view.items():
        if key in wanted:
            out[key].append(item_id)
    return {k: sorted(v) for k, v in out.items()}


def prior_failures(work: StageWork, store: Any) -> dict[str, str]:
    """Failure records the store held for planned keys this run did not have to compute."""
    if work.reused == 0:
        return {}
    todo = set(work.todo)
    return {k: r for k, r in store.failures(work.stage.name, work.fingerprint).items()
            if k in work.plan.items and k not in todo}


@dataclass
class StageState:
    """What the store holds for one planned stage of one dataset, counted from the index.

    The one computation behind `mrhp status`, the flows' up-to-date check and `finish_stage`."""

    fingerprint: str
    missing: set[str]  # planned keys with neither a stored result nor a failure record
    failures: dict[str, str]  # planned keys stored as failures -> reason (the store's order)
    done: int  # planned keys with a stored result
    view_fingerprint: str | None = None  # fingerprint of the (dataset, stage) view; None: no view
    stale: int | None = None  # view item ids out of date (see count_stale); None: no view

    @property
    def current(self) -> bool:
        """Nothing left to compute and the view maps exactly the plan under this fingerprint."""
        return not self.missing and self.view_fingerprint == self.fingerprint and self.stale == 0


def count_stale(plan_view: Mapping[str, str], fingerprint: str, view: Any) -> int | None:
    """View item ids out of date: the view was written under another fingerprint (all of them),
    maps an id to another key or holds an id the plan lacks, plus planned ids the view lacks.
    0 when the view matches the plan exactly; None when there is no view."""
    if view is None:
        return None
    mapping = {item_id: view.key(item_id) for item_id in view.item_ids()}
    if view.fingerprint != fingerprint:
        return len(set(mapping) | set(plan_view))
    changed = sum(1 for item_id, key in mapping.items() if plan_view.get(item_id) != key)
    absent = sum(1 for item_id in plan_view if item_id not in mapping)
    return changed + absent


def stage_state(
    store: Any, dataset: str, stage: str, fingerprint: str, plan: Plan, *,
    missing: Iterable[str] | None = None, with_view: bool = True,
) -> StageState:
    """Compare a stage's plan with the store. `missing`: the planned keys already found missing
    (saves asking the index again); `with_view=False` skips reading the dataset's view."""
    keys = sorted(plan.items)
    gone = set(store.missing(stage, fingerprint, keys) if missing is None else missing)
    present = [k for k in keys if k not in gone]
    present_set = set(present)
    failures = ({k: r for k, r in store.failures(stage, fingerprint).items() if k in present_set}
                if present else {})
    state = StageState(fingerprint=fingerprint, missing=gone, failures=failures, done=len(present) - len(failures))
    if with_view and any(v.dataset == dataset and v.stage == stage for v in store.views()):
        view = store.view(dataset, stage)
        state.view_fingerprint = view.fingerprint
        state.stale = count_stale(plan.view, fingerprint, view)
    return state


def finish_stage(
    work: StageWork, store: Any, dataset: str, outcomes: Iterable[ChunkOutcome],
    errors: Mapping[str, str], *, random_init: bool = False, chunks: int = 0,
) -> StageSummary:
    """Sum the chunks' outcomes and write the dataset view when no planned key is missing.

    `errors` maps keys of chunks that raised to the error; keys among them that the store holds
    anyway (committed before the exception) are not reported.
    """
    earlier = prior_failures(work, store)
    summary = StageSummary(
        dataset=dataset, stage=work.stage.name, fingerprint=work.fingerprint,
        random_init=random_init, total=work.total, reused=work.reused - len(earlier),
        failures=earlier, chunks=chunks, note=stage_note(work.stage),
    )
    # `outcomes` (the chunks' own counts) are not trusted: everything below counts from the index.
    still_missing = set(store.missing(work.stage.name, work.fingerprint, sorted(work.plan.items)))
    others = getattr(store, "claimed_by_others", None)
    waited = 0.0
    while still_missing and others:
        # Keys a concurrent run claimed: wait for it to commit them (its claims expire if it died).
        held = others(work.stage.name, work.fingerprint, sorted(still_missing))
        if not held:
            # No claim left: a run that held some of these keys may have committed them (claims
            # are released after the commit) since `still_missing` was read; read it once more.
            still_missing = set(store.missing(work.stage.name, work.fingerprint, sorted(still_missing)))
            break
        if waited == 0.0:
            log.info("%s/%s: waiting for %d key(s) another run is computing (%s)", dataset,
                     work.stage.name, len(held), sorted(set(held.values()))[0])
        time.sleep(CLAIM_POLL_S)
        waited += CLAIM_POLL_S
        still_missing = set(store.missing(work.stage.name, work.fingerprint, sorted(still_missing)))
    for key in sorted(still_missing):
        summary.errors[key] = errors.get(key, "not computed (no chunk reported it)")
    # Count from the index, not from what the chunks said: every key this run had to compute is
    # now stored as a result (done) or a failure record, whoever committed it (a retried chunk,
    # an erroring chunk before it raised, or a concurrent run), so a stored failure is never
    # reported as done.
    settled = [k for k in work.todo if k not in still_missing]
    state = stage_state(store, dataset, work.stage.name, work.fingerprint, work.plan,
                        missing=still_missing, with_view=False) if settled else None
    for key in settled:
        if key in state.failures:
            summary.failures[key] = state.failures[key]
        else:
            summary.done += 1
    summary.failed_items = item_ids_by_key(work.plan.view, [*summary.failures, *summary.errors])
    if not still_missing:
        store.write_view(dataset, work.stage.name, work.fingerprint, dict(work.plan.view))
        summary.view_written = True
    else:
        log.warning(
            "%s/%s: %d key(s) not computed; view not written (rerun to retry them)",
            dataset, work.stage.name, len(still_missing),
        )
    return summary


def run_stage(
    stage: Stage, store: Any, dataset: str, *, chunk_size: int = 500, force: bool = False,
    random_init: bool | None = None,
) -> StageSummary:
    """Run a whole stage in this process, chunk by chunk (the orchestrator-free path)."""
    if chunk_size < 1:
        raise StageError(f"chunk_size must be at least 1, got {chunk_size}")
    work = plan_stage(stage, store, force=force)
    outcomes: list[ChunkOutcome] = []
    errors: dict[str, str] = {}
    chunks = work.chunks(chunk_size)
    for chunk in chunks:
        try:
            outcomes.append(run_chunk(stage, store, chunk, fingerprint=work.fingerprint))
        except Exception as e:  # noqa: BLE001 - one chunk's error must not lose the others
            msg = f"{type(e).__name__}: {e}"
            log.error("%s/%s: chunk of %d item(s) failed: %s", dataset, stage.name, len(chunk), msg)
            errors.update({it.key: msg for it in chunk})
    return finish_stage(
        work, store, dataset, outcomes, errors,
        random_init=is_random_init(stage) if random_init is None else random_init, chunks=len(chunks),
    )


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain left-aligned text table (numbers right-aligned)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [all(isinstance(r[i], int) for r in rows) and bool(rows) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        cols = zip(r, widths, numeric, strict=True)
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in cols).rstrip()

    return "\n".join([line(cells[0]), line(["-" * w for w in widths]), *map(line, cells[1:])])


def stage_note(stage: Any) -> str:
    """A stage's one-line `summary_note()` (what the table cannot show), or ""."""
    note = getattr(stage, "summary_note", None)
    return str(note()) if callable(note) else ""


def summary_table(summaries: Sequence[StageSummary]) -> str:
    """The end-of-run table: dataset, stage, fingerprint (random-init flagged) and counts;
    then one line per stage note."""
    rows = [
        (s.dataset, s.stage, s.fingerprint + (" (random-init)" if s.random_init else ""),
         s.total, s.done, s.reused, s.failed)
        for s in summaries
    ]
    table = format_table(("dataset", "stage", "fingerprint", "total", "done", "reused", "failed"), rows)
    notes = [f"{s.dataset}/{s.stage}: {s.note}" for s in summaries if getattr(s, "note", "")]
    return "\n".join([table, *notes])


def failure_lines(summaries: Sequence[StageSummary], limit: int = 20) -> list[str]:
    """One line per failed key (item ids and reason), at most `limit` per stage."""
    out: list[str] = []
    for s in summaries:
        bad = [(k, r, "failed") for k, r in s.failures.items()] + [(k, r, "error") for k, r in s.errors.items()]
        for key, reason, kind in bad[:limit]:
            ids = ", ".join(s.failed_items.get(key, [])) or key
            out.append(f"{s.dataset}/{s.stage} {kind}: {ids}: {reason}")
        if len(bad) > limit:
            out.append(f"{s.dataset}/{s.stage}: ... and {len(bad) - limit} more")
    return out
