"""`mrhp fsck [--repair]`: verify the feature store (checksums, index rows, views, orphan files)."""
from __future__ import annotations

import argparse

from pipeline.errors import StoreError
from pipeline.manifest import load_manifest
from pipeline.store import FeatureStore


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fsck",
        help="verify the feature store: segment checksums, index rows, view entries, orphan files",
        description=(
            "Recompute every segment's checksum, check that every index row points at an existing "
            "segment row and every view entry resolves, and list files outside the index. Exit 0 when "
            "the store is consistent, 4 otherwise."
        ),
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help=(
            "drop index rows of corrupt or missing segments (their items are recomputed by the next run; "
            "corrupt files move to quarantine/), index valid orphan segments, remove stale tmp files"
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
    if not (root / "index.sqlite").is_file():
        raise StoreError(f"no feature store at {root} (no index.sqlite): nothing has been computed yet")
    store = FeatureStore(root)
    report = store.fsck(repair=args.repair, checksums=not args.quick)
    print(f"feature store {root}")
    print(report.format())
    if args.repair and not report.ok:
        after = store.fsck(checksums=not args.quick)
        print("after repair: " + after.format())
        return 0 if after.ok else StoreError.exit_code
    return 0 if report.ok else StoreError.exit_code
