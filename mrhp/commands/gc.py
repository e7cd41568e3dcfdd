"""`mrhp gc [--dry-run]`: delete feature-store segments that no dataset view references."""
from __future__ import annotations

import argparse

from pipeline.errors import StoreError
from pipeline.manifest import load_manifest
from pipeline.store import FeatureStore


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "gc",
        help="delete feature-store segments no dataset view references (run when no flow is writing)",
        description=(
            "Delete the segments of every (stage, fingerprint) that no dataset view references, segments "
            "whose items were all forgotten (--force reruns), and files the index does not know. "
            "Run it when no flow is writing: a stage whose view is not written yet counts as unreferenced."
        ),
    )
    p.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    root = load_manifest(args.manifest).roots.store
    if not (root / "index.sqlite").is_file():
        raise StoreError(f"no feature store at {root} (no index.sqlite): nothing to collect")
    report = FeatureStore(root).gc(dry_run=args.dry_run)
    print(f"feature store {root}")
    for rel in report.segments_removed:
        print(f"  {'would remove' if args.dry_run else 'removed'} {rel}")
    for rel in report.orphans_removed:
        print(f"  {'would remove' if args.dry_run else 'removed'} orphan {rel}")
    print(report.format())
    return 0
