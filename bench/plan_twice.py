"""What planning a stage twice costs on the demo data (issue 15, "one path from the manifest to a stage").

`mrhp extract` first asks whether anything is to do (`flows.extract.up_to_date` plans every
requested stage: hashes inputs, asks the store what is missing); when a stage has work, the flow
plans that stage again instead of receiving the first plan through a module-level cache (the
`_planned` dict it had before). This times, per demo stage, in one process as the thread runner
does: the first plan (build_stage + plan_stage: the up-to-date check's), and the second (the
flow's, the cost the change adds), with every input already hashed once (the image hash cache
and the per-process records cache warm, as after any earlier run). Also the manifest: a parse
and validation against a memo hit (`pipeline.manifest.load_manifest`).

    python bench/plan_twice.py [--repeat 5]

Works on a copy of the repository's manifest and demo_data in a temporary folder (its own
store); the tokens stage is extracted there first (embeddings plans from its vocabularies).
"""
from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--stages", nargs="+", default=["rois", "tokens", "embeddings", "probes", "bert"])
    args = ap.parse_args(argv)

    import pipeline.manifest as pm
    from features.registry import build_stage
    from pipeline.runner import plan_stage, run_stage
    from pipeline.store import FeatureStore

    tmp = Path(tempfile.mkdtemp(prefix="mrhp-plan-twice-"))
    shutil.copy(ROOT / "data_manifest.yaml", tmp / "data_manifest.yaml")
    shutil.copytree(ROOT / "demo_data", tmp / "demo_data")
    path = tmp / "data_manifest.yaml"

    parse = []
    for _ in range(args.repeat):
        pm.clear_manifest_memo()
        t = time.perf_counter()
        pm.load_manifest(path)
        parse.append(time.perf_counter() - t)
    hit = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        manifest = pm.load_manifest(path)
        hit.append(time.perf_counter() - t)
    store = FeatureStore(manifest.roots.store)
    run_stage(build_stage(manifest, "demo", "tokens"), store, "demo")  # embeddings plans from its vocabularies

    print(f"machine: {platform.machine()}, {platform.system()}, python {platform.python_version()}")
    print(f"manifest: parse+validate {1e3 * statistics.median(parse):.2f} ms, memo hit "
          f"{1e3 * statistics.median(hit):.3f} ms (median of {args.repeat})")
    print(f"{'stage':<11} {'items':>6} {'todo':>5} {'first plan ms':>14} {'plan again ms (median)':>23}")
    total_again = 0.0
    for name in args.stages:
        t = time.perf_counter()
        work = plan_stage(build_stage(manifest, "demo", name), store)  # the up-to-date check's plan
        first = time.perf_counter() - t
        again = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            work = plan_stage(build_stage(manifest, "demo", name), store)  # the flow's plan
            again.append(time.perf_counter() - t)
        med = statistics.median(again)
        total_again += med
        print(f"{name:<11} {work.total:>6} {len(work.todo):>5} {1e3 * first:>14.1f} {1e3 * med:>23.1f}")
    print(f"planning every demo stage again: {1e3 * total_again:.0f} ms")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
