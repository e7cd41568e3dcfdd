"""Shim: the CLI moved to mrhp/cli.py (`python -m mrhp`); `python -m pipeline.cli` still works."""
from mrhp.cli import build_parser, main  # noqa: F401

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
