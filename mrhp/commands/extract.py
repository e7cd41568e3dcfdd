"""`mrhp extract`: run the feature stages through the Prefect flows, recomputing only what changed."""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from pipeline.errors import MRHPError, StageError, StoreError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "extract",
        help="extract features (rois, tokens, embeddings, probes, bert) into the store",
        description=(
            "Run the stages in dependency order through Prefect flows (a temporary local Prefect "
            "server unless PREFECT_API_URL is set). Only items whose content or stage fingerprint "
            "changed are computed; a summary table ends the run: per dataset and stage, total "
            "items, done (computed now), reused (already stored, results or failures) and failed "
            "(failures recorded now plus items whose chunk raised; `mrhp status` counts every "
            "stored failure)."
        ),
    )
    p.add_argument("--dataset", help="one dataset of the manifest (default: all)")
    p.add_argument(
        "--stage", dest="stages", action="extend", nargs="+", metavar="S",
        help="stage(s) to run (rois, tokens, embeddings, probes, bert; default: all); "
        "their dependencies run first when out of date",
    )
    p.add_argument("--force", action="store_true", help="recompute the named stages' items even if stored")
    p.add_argument("--task-runner", choices=("thread", "dask"), help="default: the manifest's flows.task_runner")
    p.add_argument("--dask-address", help="scheduler of an existing Dask cluster (default: start a local one)")
    p.add_argument("--chunk-size", type=int, help="items per task (default: the manifest's flows.chunk_size)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--random-init", action="store_true",
        help="ROI features from seeded random detector weights (demos and tests only: the "
             "fingerprint says random-init and `mrhp status --random-init` flags it)",
    )
    p.set_defaults(func=run)


def disk_error(e: OSError, command: str) -> StoreError:
    """An OSError that reached a command: one line (exit 4) naming the file and the cause."""
    reason = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e).splitlines()[0])
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    return StoreError(f"{command}: {reason}{where}; free some space or fix the file, then rerun")


def random_init_overrides(random_init: bool) -> dict | None:
    """Manifest overrides for `--random-init` (None when not asked)."""
    return {"stages": {"rois": {"random_init": True}}} if random_init else None


def run(args: argparse.Namespace) -> int:
    from features.registry import ExtractRequest
    from pipeline.prefect_env import apply_prefect_defaults, orchestration_error

    # The request, checked once (unknown dataset or stage, bad chunk size: one line, before any
    # Prefect start-up); everything after reads it and the manifest it names (parsed once).
    request = ExtractRequest.build(
        args.manifest, dataset=args.dataset, stages=args.stages, force=args.force,
        chunk_size=args.chunk_size, overrides=random_init_overrides(args.random_init),
    )
    manifest = request.manifest()
    # Prefect reads its settings on import: apply the CLI's defaults first (store-local home,
    # analytics off, a start-up timeout fit for a busy machine) unless the user set them.
    apply_prefect_defaults(manifest.roots.store)
    from flows.extract import run_request
    from pipeline.runner import failure_lines, summary_table

    if not getattr(args, "verbose", False):
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call
        from pipeline.prefect_env import quiet_task_states

        quiet_task_states()

    from pipeline.store import FeatureStore

    try:
        store = FeatureStore(manifest.roots.store)
        # The lease tells a concurrent `mrhp gc` that this run's stage outputs, not yet in a
        # view, are work in progress (it would otherwise delete them as unreferenced).
        # Its id also owns this run's chunk claims (MRHP_STORE_OWNER, inherited by task workers):
        # a second extract on the same store takes the other chunks and waits for these.
        with store.lease(f"mrhp extract {args.dataset or '(all datasets)'}") as lease_id:
            before = os.environ.get("MRHP_STORE_OWNER")
            os.environ["MRHP_STORE_OWNER"] = lease_id
            try:
                summaries = run_request(
                    request, task_runner=args.task_runner, dask_address=args.dask_address,
                    progress=not args.no_progress,
                )
            finally:
                if before is None:
                    os.environ.pop("MRHP_STORE_OWNER", None)
                else:
                    os.environ["MRHP_STORE_OWNER"] = before
    except OSError as e:
        # A full disk (or another file-system error) outside the store's own commit path: one
        # line, exit 4; segments are only ever renamed into place complete, so nothing is
        # half-written and a rerun continues where this one stopped.
        raise disk_error(e, "mrhp extract") from None
    except MRHPError:
        raise
    except Exception as exc:
        mapped = orchestration_error(exc)
        if mapped is None:
            raise
        raise mapped from None
    print(summary_table(summaries))
    for line in failure_lines(summaries):
        print(line)
    n_errors = sum(len(s.errors) for s in summaries)
    if n_errors:
        raise StageError(
            f"{n_errors} item(s) could not be computed (errors above); their views were not "
            "written: rerun `mrhp extract` to retry them"
        )
    sys.stdout.flush()
    return 0
