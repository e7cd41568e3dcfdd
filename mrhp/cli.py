"""The `mrhp` command line. `main(argv)` is the entry point; tests call it directly.

Each subcommand lives in its own module under `mrhp/commands/` exposing
`register(subparsers)`, which adds a parser and sets `func=run(args) -> int`.
Errors of the MRHPError hierarchy become a one-line message and their class's exit code.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from pipeline.errors import MRHPError

# Order = order in `mrhp --help`.
COMMANDS: tuple[str, ...] = (
    "mrhp.commands.validate",
    "mrhp.commands.build_dataset",
    "mrhp.commands.fetch_images",
    "mrhp.commands.import_features",
    "mrhp.commands.extract",
    "mrhp.commands.status",
    "mrhp.commands.deploy",
    "mrhp.commands.serve",
    "mrhp.commands.fsck",
    "mrhp.commands.gc",
    "mrhp.commands.train",
    "mrhp.commands.evaluate",
    "mrhp.commands.predict",
    "mrhp.commands.compare",
    "mrhp.commands.distances",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mrhp",
        description="Multimodal review helpfulness prediction: feature extraction and training.",
    )
    parser.add_argument(
        "--manifest",
        default=None,
        help="path to data_manifest.yaml (default: $MRHP_MANIFEST or ./data_manifest.yaml)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except MRHPError as e:
        print(f"mrhp {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"mrhp {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
