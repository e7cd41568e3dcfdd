"""`mrhp fsck [--repair | --rebuild-index]`: verify the feature store (checksums, index rows,
views, orphan files), repair it, or rebuild its index from the segment files."""
from __future__ import annotations

import argparse

from pipeline.errors import StoreError
from pipeline.manifest import load_manifest
from pipeline.store import FeatureStore, rebuild_index_file


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fsck",
        help="verify the feature store: segment checksums, index rows, view entries, orphan files",
        description=(
            "Recompute every segment's checksum, check that every index row points at an existing "
            "segment row and every view entry resolves, and list files outside the index. Exit 0 when "
            "the store is consistent, 4 otherwise. --rebuild-index recovers from a damaged, emptied "
            "or deleted index.sqlite."
        ),
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--repair",
        action="store_true",
        help=(
            "drop index rows of corrupt or missing segments (their items are recomputed by the next run; "
            "corrupt files move to quarantine/), index valid orphan segments and the pending segments task "
            "workers wrote for runs that ended (verified first; unusable ones move to quarantine/), remove "
            "stale tmp files"
        ),
    )
    mode.add_argument(
        "--rebuild-index",
        action="store_true",
        help=(
            "build a new index.sqlite from the segment files alone (after SQLite errors, or when the "
            "index was emptied or deleted); the old file is kept as index.sqlite.damaged-<time>. "
            "Run it while no other mrhp command uses the store"
        ),
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="skip recomputing checksums (reads only attributes and key lists; misses flipped bytes)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    root = load_manifest(args.manifest).roots.store
    print(f"feature store {root}")
    if getattr(args, "rebuild_index", False):
        if not (root / "segments").is_dir():
            raise StoreError(f"no feature store at {root} (no segments/ folder): nothing to rebuild from")
        report = rebuild_index_file(root)
        print(report.format())
        after = FeatureStore(root, allow_unindexed=True).fsck(checksums=not args.quick)
        print("after rebuild: " + after.format())
        return 0 if after.ok else StoreError.exit_code
    if not (root / "index.sqlite").is_file():
        if any((root / "segments").glob("*/*/*.h5")):
            raise StoreError(
                f"feature store {root} has segment files but no index.sqlite: run `mrhp fsck --rebuild-index`"
            )
        raise StoreError(f"no feature store at {root} (no index.sqlite): nothing has been computed yet")
    store = FeatureStore(root, allow_unindexed=True)
    report = store.fsck(repair=args.repair, checksums=not args.quick)
    print(report.format())
    if not store.stages() and any(p.startswith("segments/") and "orphan" in p for p in report.problems):
        print("  the index lists no segment while segment files exist: run `mrhp fsck --rebuild-index`")
    if args.repair and not report.ok:
        after = store.fsck(checksums=not args.quick)
        print("after repair: " + after.format())
        return 0 if after.ok else StoreError.exit_code
    return 0 if report.ok else StoreError.exit_code
