"""`mrhp compare RUN [RUN ...]`: a paper-style table of mean +- std over seeds per metric, with
paired t-test p-values of every run against the first one.

Reads `eval_<split>.json` of every seed (written at the end of training for the test split, or
by `mrhp evaluate`). The t-test pairs either per-product metrics (default `--paired products`:
each product's metric averaged over the run's seeds, paired by product id, so it works with a
single seed) or per-seed values (`--paired seeds`: seed k of one run against seed k of the
other, needs at least 2 seeds each).
"""
from __future__ import annotations

import argparse

import numpy as np

from models.metrics import paired_ttest
from models.runs import RunPaths, read_json, resolve_run, seed_dirs
from pipeline.errors import TrainingError
from pipeline.manifest import load_manifest


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare", help="mean +- std over seeds per metric, with paired t-tests between runs",
        description="Compare runs on a split: mean +- std over seeds (x100, as in the papers) and "
        "paired t-test p-values of each run against the first.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run names (or folders); the first is the reference")
    p.add_argument("--split", default="test")
    p.add_argument("--paired", choices=("products", "seeds"), default="products",
                   help="t-test over per-product metrics (default) or over per-seed values")
    p.set_defaults(func=run)


def _load(run_dir, split: str) -> list[dict]:
    out = []
    for d in seed_dirs(run_dir):
        f = RunPaths(d).eval_file(split)
        if not f.is_file():
            raise TrainingError(f"{d}: no {f.name}; run `mrhp evaluate {d} --split {split}` first")
        out.append(read_json(f))
    return out


def compare_table(named: list[tuple[str, list[dict]]], paired: str) -> str:
    """The formatted table for runs given as (name, per-seed eval records)."""
    metrics = list(named[0][1][0]["metrics"])
    width = max(12, max(len(n) for n, _ in named) + 2)
    lines = [f"{'run':<{width}}{'seeds':>6}" + "".join(f"{m:>16}" for m in metrics)]
    ref_name, ref = named[0]
    pvals: list[str] = []
    for name, evals in named:
        cells = []
        for m in metrics:
            vals = np.array([e["metrics"][m] for e in evals]) * 100
            std = np.std(vals, ddof=1) if len(vals) > 1 else 0.0
            cells.append(f"{vals.mean():7.2f} ± {std:5.2f}")
        lines.append(f"{name:<{width}}{len(evals):>6}" + "".join(f"{c:>16}" for c in cells))
    for name, evals in named[1:]:
        row = []
        for m in metrics:
            if paired == "seeds":
                if len(evals) != len(ref) or len(ref) < 2:
                    raise TrainingError(
                        f"--paired seeds needs the same number (>= 2) of seeds: {ref_name} has {len(ref)}, "
                        f"{name} has {len(evals)}"
                    )
                a = [e["metrics"][m] for e in evals]
                b = [e["metrics"][m] for e in ref]
            else:
                pa = _per_product_mean(evals, m)
                pb = _per_product_mean(ref, m)
                common = sorted(set(pa) & set(pb))
                if len(common) < 2:
                    raise TrainingError(f"{name} and {ref_name} share fewer than 2 evaluated products")
                a = [pa[p] for p in common]
                b = [pb[p] for p in common]
            t, p = paired_ttest(a, b)
            row.append(f"{p:.3g}")
        pvals.append(f"{name:<{width}}{'':>6}" + "".join(f"{c:>16}" for c in row))
    if pvals:
        lines.append("")
        lines.append(f"paired t-test p-values against {ref_name} (over {paired}):")
        lines.extend(pvals)
    return "\n".join(lines)


def _per_product_mean(evals: list[dict], metric: str) -> dict[str, float]:
    acc: dict[str, list[float]] = {}
    for e in evals:
        for pid, m in e["per_product"].items():
            acc.setdefault(pid, []).append(m[metric])
    return {p: float(np.mean(v)) for p, v in acc.items()}


def run(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.manifest)
    named = [(r, _load(resolve_run(manifest.roots.runs, r), args.split)) for r in args.runs]
    print(f"split {args.split}; metrics x100, mean ± std over seeds")
    print(compare_table(named, args.paired))
    return 0
