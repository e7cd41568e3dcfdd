"""`mrhp import-features --format F PATH --dataset D`: load ROI features extracted elsewhere."""
from __future__ import annotations

import argparse

from pipeline.errors import ConfigError, DataError
from pipeline.manifest import load_manifest


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "import-features",
        help="import existing ROI features (LXMERT TSV, bottom-up-attention npz, torch files) as stage rois",
        description="Load ROI features extracted elsewhere into the feature store under stage 'rois' "
        "(fingerprint import-<format>-<source sha256>) and point the dataset's rois view at them. "
        "Source images are matched to dataset images by file stem (default) or by path relative "
        "to the image root without suffix (--match path; needed for MRHP's pic_<n>_<i> names).",
    )
    p.add_argument("path", help="the TSV file, or the folder (or single file) of .npz / .pt files")
    p.add_argument("--format", required=True, choices=("lxmert-tsv", "bua-npz", "mcr-pth"),
                   help="source layout (see pipeline/ingest/importers.py)")
    p.add_argument("--dataset", required=True, help="dataset name in the manifest")
    p.add_argument("--match", choices=("stem", "path"), default="stem",
                   help="match img_ids to dataset images by file stem or by relative path (default stem)")
    p.add_argument("--feature-dtype", choices=("float32", "float16"), default="float32",
                   help="stored feature precision (default float32: exact round trip)")
    p.add_argument("--feature-dim", type=int, default=2048, help="features per box (default 2048)")
    p.add_argument("--npz-info", choices=("safe", "skip"), default="safe",
                   help="bua-npz: read object/attribute ids from `info` with a numpy-only unpickler "
                   "(safe), or ignore it and store -1 ids (skip)")
    p.add_argument("--chunk-size", type=int, default=256, help="records per store commit (default 256)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.datasets.mrhp import load_dataset
    from pipeline.ingest.importers import ImportConfig, import_features
    from pipeline.store import FeatureStore

    manifest = load_manifest(args.manifest)
    spec = manifest.dataset(args.dataset)
    try:
        config = ImportConfig(
            format=args.format, feature_dtype=args.feature_dtype, feature_dim=args.feature_dim,
            match=args.match, npz_info=args.npz_info, chunk_size=args.chunk_size,
        )
    except ValueError as e:
        raise ConfigError(f"import-features: {e}") from None
    records = load_dataset(spec)
    store = FeatureStore(manifest.store_root)
    report = import_features(store, spec.name, spec.image_root, records, args.path, config)
    print(report.format_text())
    if not report.view_written:
        raise DataError(
            f"{args.path}: none of the {report.rows} source images matched an image of dataset "
            f"{args.dataset!r} by {args.match} (the features are stored, the rois view is unchanged); "
            + ("MRHP images need --match path with img_ids relative to the image root"
               if args.match == "stem" else "img_ids must equal image paths relative to the image root")
        )
    if report.rows and report.failed == report.rows:
        raise DataError(f"{args.path}: every one of the {report.rows} source images failed to import "
                        f"(first: {report.failures[0]})")
    return 0
