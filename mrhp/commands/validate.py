"""`mrhp validate`: check the manifest and the raw data of each dataset it declares.

Prints one report per dataset (rows per file, products and reviews per split, label reading,
image counts, errors and warnings). Exit 0 when every dataset is usable; DataError's exit code
when any has errors; ManifestError's when the manifest itself is invalid.
"""
from __future__ import annotations

import argparse
import importlib.util

from pipeline.datasets.mrhp import validate_dataset
from pipeline.errors import DataError
from pipeline.manifest import Manifest, load_manifest


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "validate",
        help="check data_manifest.yaml and the raw data it points to",
        description="Check the manifest and each dataset's raw MRHP tables and images; "
        "exit 0 when usable, non-zero on errors. Missing or unreadable images are counted warnings.",
    )
    p.add_argument("--dataset", action="append", default=None,
                   help="dataset to check (repeatable; default: every declared dataset)")
    p.add_argument("--images", choices=("verify", "exists", "skip"), default="verify",
                   help="verify: open each image with PIL (default); exists: only check the files are "
                   "there (fast on the real datasets); skip: no image checks")
    p.set_defaults(func=run)


def _resource_notes(manifest: Manifest) -> list[str]:
    """Warnings about declared resources that are not present (needed only by later stages)."""
    notes = []
    for name, wv in manifest.resources.word_vectors.items():
        if wv.path is not None and not wv.path.is_file():
            notes.append(f"resources.word_vectors.{name}: file {wv.path} not found")
        if wv.package and importlib.util.find_spec(wv.package) is None:
            notes.append(f"resources.word_vectors.{name}: python package {wv.package!r} not installed")
    for name, det in manifest.resources.detectors.items():
        if det.path is not None and not det.path.is_file():
            notes.append(f"resources.detectors.{name}: file {det.path} not found")
    return notes


def run(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.manifest)
    names = args.dataset or list(manifest.datasets)
    specs = [manifest.dataset(n) for n in names]  # ManifestError for an undeclared name
    print(f"manifest {manifest.path}: OK ({len(manifest.datasets)} dataset(s))")
    for note in _resource_notes(manifest):
        print(f"  warning: {note}")
    failed = []
    for spec in specs:
        report = validate_dataset(spec, images=args.images)
        print(report.format())
        if not report.ok:
            failed.append(spec.name)
    if failed:
        print(f"validate: {len(failed)} dataset(s) with errors: {', '.join(failed)}")
        return DataError.exit_code
    print(f"validate: {len(specs)} dataset(s) usable")
    return 0
