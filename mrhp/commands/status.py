"""`mrhp status`: per dataset and stage, what the store holds for the current plan.

Columns (counts of distinct content keys of the current plan unless said otherwise):
- `total`: keys the stage's plan covers (`plan()` only hashes files: no pixel is decoded);
- `done`: keys with a stored result under the current fingerprint;
- `failed`: keys with a stored failure record under the current fingerprint (bad input);
- `missing`: keys with neither (what `mrhp extract` would compute);
- `stale`: dataset item ids whose view entry is out of date: the view was written under another
  fingerprint, maps the id to another key (its data changed), or the id is no longer in the plan;
  plus planned ids the view lacks. 0 when the view matches the plan exactly; `-` when no view;
- `fingerprint`: the stage's current fingerprint, `(random-init)` when its detector weights
  are random (demo/test only, never for reported results).
Below the table, a line per stage note: `<dataset>/probes: coreference <backend>: <why>`, the
backend `coref: auto` resolves to (neuralcoref when its side environment is built, else rules).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from pipeline.errors import MRHPError


@dataclass
class StageStatus:
    """One row of `mrhp status`."""

    dataset: str
    stage: str
    fingerprint: str = ""
    random_init: bool = False
    total: int = 0
    done: int = 0
    failed: int = 0
    missing: int = 0
    stale: int | None = None  # None: no view written yet
    view_fingerprint: str | None = None
    error: str | None = None  # why the stage could not be planned (e.g. a dependency not extracted)
    note: str = ""  # the stage's summary note (probes: the coreference backend it uses)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "status",
        help="per dataset and stage: items total, done, stale, failed, missing; fingerprints",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", help="one dataset of the manifest (default: all)")
    p.add_argument("--stage", dest="stages", action="extend", nargs="+", metavar="S", help="default: all stages")
    p.add_argument("--random-init", action="store_true",
                   help="status of the features `mrhp extract --random-init` made")
    p.set_defaults(func=run)


def stage_status(manifest: Any, store: Any, dataset: str, name: str, registry: Any = None) -> StageStatus:
    """Plan the stage and compare with the store; planning errors become the row's `error`."""
    from features.registry import build_stage
    from pipeline.runner import is_random_init, stage_state

    row = StageStatus(dataset=dataset, stage=name)
    try:
        stage = build_stage(manifest, dataset, name, registry)
        row.random_init = is_random_init(stage, manifest)
        row.fingerprint = stage.fingerprint()
        note = getattr(stage, "summary_note", None)
        row.note = str(note()) if callable(note) else ""
        plan = stage.plan()
    except MRHPError as e:
        row.error = str(e)
        return row
    state = stage_state(store, dataset, name, row.fingerprint, plan)
    row.total = len(plan.items)
    row.missing = len(state.missing)
    row.failed = len(state.failures)
    row.done = state.done
    row.view_fingerprint = state.view_fingerprint
    row.stale = state.stale
    return row


def status_table(rows: list[StageStatus]) -> str:
    from pipeline.runner import format_table

    body = []
    for r in rows:
        if r.error:
            body.append((r.dataset, r.stage, "-", "-", "-", "-", "-", "-", f"not planned: {r.error}"))
            continue
        fp = r.fingerprint + (" (random-init)" if r.random_init else "")
        note = ""
        if r.view_fingerprint and r.view_fingerprint != r.fingerprint:
            note = f"view built with {r.view_fingerprint}"
            from pipeline.stage import is_random_init

            if is_random_init(r.view_fingerprint):
                note += " (random-init)"
        body.append((r.dataset, r.stage, r.total, r.done, "-" if r.stale is None else r.stale,
                     r.failed, r.missing, fp, note))
    return format_table(
        ("dataset", "stage", "total", "done", "stale", "failed", "missing", "fingerprint", "note"), body,
    )


def run(args: argparse.Namespace) -> int:
    from features.registry import stage_order
    from mrhp.commands.extract import disk_error, random_init_overrides
    from pipeline.manifest import load_manifest
    from pipeline.store import FeatureStore, read_only

    manifest = load_manifest(args.manifest, overrides=random_init_overrides(args.random_init))
    datasets = [manifest.dataset(args.dataset).name] if args.dataset else list(manifest.datasets)
    # Status only looks: nothing is written under the store (no index created, no vocabulary
    # fit or word-vector hash saved; read_only() makes those caches compute in memory).
    with read_only():
        store = FeatureStore(manifest.roots.store)
        try:
            rows = [
                stage_status(manifest, store, ds, name)
                for ds in datasets
                for name in stage_order(args.stages, with_dependencies=False)
            ]
        except OSError as e:
            raise disk_error(e, "mrhp status") from None
    print(status_table(rows))
    for r in rows:  # e.g. which coreference backend the probes stage uses (coref: auto)
        if r.note:
            print(f"{r.dataset}/{r.stage}: {r.note}")
    return 0
