"""`mrhp build-dataset {amazon2018,amazon2023}`: a public Amazon review dump -> MRHP-format tables.

The defaults are the published Amazon-MRHP construction rules; every threshold is a flag.
The output folder can then be declared in data_manifest.yaml (raw_root) with `labels: votes`.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from pipeline.datasets import amazon2018, amazon2023
from pipeline.datasets.build import BuildConfig
from pipeline.errors import ConfigError, DataError

BUILDERS = {"amazon2018": amazon2018.build, "amazon2023": amazon2023.build}


def default_category(reviews: Path) -> str:
    """'Home_and_Kitchen_5.json.gz' -> 'home_and_kitchen_5': the file name before its first dot."""
    stem = reviews.name.split(".", 1)[0]
    return re.sub(r"[^a-z0-9_-]+", "_", stem.lower()).strip("_") or "reviews"


def register(subparsers: argparse._SubParsersAction) -> None:
    d = BuildConfig(category="")
    p = subparsers.add_parser(
        "build-dataset",
        help="build MRHP-format tables from an Amazon review dump (2018 or 2023)",
        description="Stream a review dump (gzipped or plain JSON lines, or concatenated JSON objects) "
        "twice and write <out>/<category>.{prd,rvw,rel}.{train,dev,test} plus build_info.json. "
        "Defaults are the published Amazon-MRHP rules.",
    )
    p.add_argument("source", choices=sorted(BUILDERS), help="dump flavour")
    p.add_argument("--reviews", type=Path, required=True, help="reviews file (.json, .json.gz, .jsonl)")
    p.add_argument("--meta", type=Path, default=None,
                   help="product metadata file; without it products are named by their id (warning)")
    p.add_argument("--out", type=Path, required=True, help="output folder (the dataset's raw_root)")
    p.add_argument("--category", default=None,
                   help="output file prefix (default: the reviews file name before its first dot, lowercased)")
    p.add_argument(
        "--min-votes", type=int, default=d.min_votes, help=f"review needs >= this many votes ({d.min_votes})"
    )
    p.add_argument(
        "--min-chars", type=int, default=d.min_chars, help=f"review needs >= this many characters ({d.min_chars})"
    )
    p.add_argument("--min-reviews", type=int, default=d.min_reviews,
                   help=f"product needs >= this many qualifying reviews ({d.min_reviews})")
    p.add_argument("--min-top-votes", type=int, default=d.min_top_votes,
                   help=f"... one of them with >= this many votes ({d.min_top_votes}, i.e. vote > 2)")
    p.add_argument(
        "--test-fraction", type=float, default=d.test_fraction, help=f"share of products in test ({d.test_fraction})"
    )
    p.add_argument("--dev-fraction", type=float, default=d.dev_fraction,
                   help=f"share of the remaining products in dev ({d.dev_fraction})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"random_state of the splits ({d.seed})")
    p.add_argument("--dedupe", action="store_true",
                   help="drop repeats of a review (same product, reviewer and text), which the 2018 dump has "
                   "for product variants; not part of the published rules; memory grows with qualifying reviews")
    p.add_argument("--overwrite", action="store_true", help="replace existing output tables")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for name in ("test_fraction", "dev_fraction"):
        v = getattr(args, name)
        if not 0.0 < v < 1.0:
            raise ConfigError(f"--{name.replace('_', '-')}: expected a number between 0 and 1, got {v}")
    for name in ("min_votes", "min_chars", "min_reviews", "min_top_votes"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')}: expected a non-negative integer, got {getattr(args, name)}")
    config = BuildConfig(
        category=args.category or default_category(args.reviews),
        min_votes=args.min_votes,
        min_chars=args.min_chars,
        min_reviews=args.min_reviews,
        min_top_votes=args.min_top_votes,
        test_fraction=args.test_fraction,
        dev_fraction=args.dev_fraction,
        seed=args.seed,
        dedupe=args.dedupe,
    )
    try:
        summary = BUILDERS[args.source](
            reviews=args.reviews, meta=args.meta, out=args.out, config=config, overwrite=args.overwrite
        )
    except OSError as e:  # output folder not writable, disk full: a message, not a traceback
        raise DataError(f"{e.filename or args.out}: {e.strerror or e}") from None
    print(summary.format())
    print(f"output: {args.out.resolve()} (category {config.category!r})")
    return 0
