"""Benchmark of the extraction flows on a synthetic dataset (figures in docs/benchmarks.md).

Measures, through `flows.extract.run_extraction` against one Prefect server started up front:
- full run: every item computed;
- no-op rerun: nothing changed (plan = hashing the files; the stage's `run` is never called, and
  `run_extraction` answers from planning alone without creating a flow run);
- rerun after changing 1% of the items;
- Prefect overhead per chunk: the same zero-cost stage with many small chunks vs few large ones.

The stage is `tests.support.synthetic` with a simulated per-item cost (`--item-ms`, default 5 ms: cheap
next to ROI extraction's ~50-100 ms per image on a GPU). Usage:

    .venv/bin/python bench/flows.py [--items 3000] [--item-ms 5] [--chunk-size 500]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=3000)
    ap.add_argument("--item-ms", type=float, default=5.0, help="simulated compute per item (ms)")
    ap.add_argument("--chunk-size", type=int, default=500)
    ap.add_argument("--small-chunk", type=int, default=50, help="chunk size of the overhead run")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="mrhp-bench-flows-"))
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    log = work / "calls.log"
    os.environ["MRHP_SYNTH_LOG"] = str(log)

    t = time.perf_counter()
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(timeout=180)
    os.environ["PREFECT_API_URL"] = server.api_url
    t_server = time.perf_counter() - t

    from flows.extract import run_extraction
    from tests.support.synthetic import ENTRY, text_file, write_project

    registry = {"synthetic": ENTRY}

    def calls() -> int:
        return len(log.read_text().splitlines()) if log.exists() else 0

    def timed(manifest: Path, **kw):
        before = calls()
        t0 = time.perf_counter()
        (s,) = run_extraction(manifest, dataset="syn", registry=registry, progress=False, **kw)
        return time.perf_counter() - t0, s, calls() - before

    manifest = write_project(work / "main", args.items, chunk_size=args.chunk_size)
    os.environ["MRHP_SYNTH_DELAY"] = str(args.item_ms / 1000)
    rows = []
    t_full, s, n = timed(manifest)
    rows.append(("full run", t_full, s.done, s.reused, n, s.chunks))
    t_noop, s, n = timed(manifest)
    rows.append(("no-op rerun", t_noop, s.done, s.reused, n, s.chunks))
    changed = max(1, args.items // 100)
    for i in range(changed):
        text_file(work / "main", i * (args.items // changed)).write_text(f"changed {i}", encoding="utf-8")
    t_change, s, n = timed(manifest)
    rows.append((f"rerun, {changed} items changed (1%)", t_change, s.done, s.reused, n, s.chunks))

    # Overhead per chunk: zero-cost stage, few big chunks vs many small ones (fresh stores).
    os.environ["MRHP_SYNTH_DELAY"] = "0"
    big = write_project(work / "big", args.items, chunk_size=args.chunk_size)
    small = write_project(work / "small", args.items, chunk_size=args.small_chunk)
    t_big, s_big, _ = timed(big)
    t_small, s_small, _ = timed(small)
    per_chunk = (t_small - t_big) / max(1, s_small.chunks - s_big.chunks)

    print(f"machine: {os.cpu_count()} CPUs; items {args.items}, simulated {args.item_ms} ms/item, "
          f"chunk size {args.chunk_size}")
    print(f"Prefect temporary server start: {t_server:.1f} s (once per `mrhp extract` without PREFECT_API_URL)")
    print(f"{'run':36s} {'seconds':>8s} {'% full':>7s} {'done':>6s} {'reused':>7s} {'stage calls':>11s} {'chunks':>6s}")
    for name, secs, done, reused, ncalls, chunks in rows:
        print(f"{name:36s} {secs:8.2f} {100 * secs / t_full:6.1f}% {done:6d} {reused:7d} {ncalls:11d} {chunks:6d}")
    print(f"zero-cost stage: {s_big.chunks} chunks {t_big:.2f} s, {s_small.chunks} chunks {t_small:.2f} s "
          f"-> Prefect overhead {1000 * per_chunk:.0f} ms per chunk")
    time.sleep(2)  # let the server flush its event queue before it stops
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
