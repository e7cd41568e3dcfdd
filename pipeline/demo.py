"""Shim: the demo moved to mrhp/demo.py (`python -m mrhp.demo`); `python -m pipeline.demo` still works."""
from mrhp.demo import main  # noqa: F401

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
