"""`mrhp fetch-images --dataset D`: crawl a dataset's image URLs into its image root."""
from __future__ import annotations

import argparse

from pipeline.errors import ConfigError, DataError
from pipeline.manifest import load_manifest


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fetch-images",
        help="download a dataset's image URLs into its image root (resumable)",
        description="Download every product and review image URL of a dataset to its canonical "
        "path under the dataset's image_root. Files already present are skipped; failures are "
        "listed as JSON lines in <image_root>/fetch_failures.jsonl.",
    )
    p.add_argument("--dataset", required=True, help="dataset name in the manifest")
    p.add_argument("--concurrency", type=int, default=8, help="downloads in flight (default 8)")
    p.add_argument("--retries", type=int, default=3, help="retries on transient errors (default 3)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per connect/read (default 30)")
    p.add_argument("--backoff", type=float, default=1.0, help="first retry wait in seconds, doubling (default 1)")
    p.add_argument("--no-verify", action="store_true", help="keep bodies without decoding them as images")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.datasets.mrhp import load_dataset
    from pipeline.ingest.fetch import FetchConfig, dataset_jobs, fetch_images, summarize

    manifest = load_manifest(args.manifest)
    spec = manifest.dataset(args.dataset)
    try:
        config = FetchConfig(
            concurrency=args.concurrency, retries=args.retries, timeout=args.timeout,
            backoff=args.backoff, verify_image=not args.no_verify,
        )
    except ValueError as e:
        raise ConfigError(f"fetch-images: {e}") from None
    records = load_dataset(spec)
    jobs, no_url = dataset_jobs(records)
    if not jobs:
        raise DataError(
            f"dataset {args.dataset!r}: none of its {no_url} image refs has a URL "
            f"(raw tables under {spec.raw_root})"
        )
    print(f"fetch-images: {len(jobs)} images for dataset {args.dataset!r} into {spec.image_root}")
    summary = fetch_images(jobs, spec.image_root, config)
    print(f"fetch-images: {summarize(summary, no_url)}")
    if summary.failed:  # a crawl with failures is not a success, even when most images came
        where = f"; see {summary.failures_path}" if summary.failures_path is not None else ""
        raise DataError(f"fetch-images: {summary.failed} of {len(jobs)} image(s) could not be "
                        f"downloaded{where}; rerun to retry them")
    return 0
