"""Reader throughput and builder memory (figures for docs/benchmarks.md, section Readers).

1. MRHP reader: writes a synthetic 100k-review dataset (column-oriented JSON, 3 splits) to a
   temp dir and times `load_dataset` and `validate_dataset(images="skip")`: records/s.
2. Amazon 2018 builder: writes synthetic gzipped JSON-lines dumps shaped like the real ones
   (most reviews without votes, a few long voted ones, a fixed number of products) at several
   sizes and measures, in a fresh process per size, the build time, the peak Python heap
   (tracemalloc) and the peak RSS. Bounded memory = flat as the number of reviews grows.

    .venv/bin/python bench/readers.py [--reviews 100000] [--dump-sizes 75000,150000,300000] [--only reader|builder]
"""
from __future__ import annotations

import argparse
import gzip
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = ("the pan heats evenly and it is easy to clean but the handle gets warm after a while "
         "I bought this for my kitchen and my family loves it because they use it every day").split()


def sentence(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."


def write_mrhp(root: Path, n_reviews: int, per_product: int = 25, seed: int = 0) -> None:
    rng = random.Random(seed)
    n_products = n_reviews // per_product
    splits = {"train": range(0, int(n_products * .64)), "dev": range(int(n_products * .64), int(n_products * .8)),
              "test": range(int(n_products * .8), n_products)}
    for split, prange in splits.items():
        prd = {c: {} for c in ("product_id", "name", "img_url", "keyword", "description", "brand_name")}
        rvw = {c: {} for c in ("product_id", "review_id", "content", "img_url", "title", "time")}
        rel = {c: {} for c in ("product_id", "review_id", "upvotes")}
        k = 0
        for i, p in enumerate(prange):
            pid = f"B{p:09d}"
            for c, v in (("product_id", pid), ("name", sentence(rng, 6)), ("img_url", [f"http://i/{pid}.jpg"]),
                         ("keyword", "home"), ("description", sentence(rng, 60)), ("brand_name", "b")):
                prd[c][str(i)] = v
            for j in range(per_product):
                rid = f"{pid}-{j}"
                row = {"product_id": pid, "review_id": rid, "content": sentence(rng, rng.randint(12, 150)),
                       "img_url": [f"http://i/{rid}.jpg"] if j % 5 == 0 else [], "title": "t", "time": 1}
                for c, v in row.items():
                    rvw[c][str(k)] = v
                for c, v in (("product_id", pid), ("review_id", rid), ("upvotes", rng.choice((1, 1, 2, 3, 5, 9, 20)))):
                    rel[c][str(k)] = v
                k += 1
        for kind, t in (("prd", prd), ("rvw", rvw), ("rel", rel)):
            (root / f"home.{kind}.{split}").write_text(json.dumps(t), encoding="utf-8")


def bench_reader(n_reviews: int) -> None:
    from pipeline.datasets.mrhp import load_dataset, validate_dataset
    from pipeline.manifest import DatasetSpec

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        write_mrhp(root, n_reviews)
        size = sum(p.stat().st_size for p in root.iterdir())
        print(f"synthetic MRHP dataset: {n_reviews:,} reviews, {size / 2**20:.0f} MiB on disk "
              f"(written in {time.perf_counter() - t0:.1f} s)")
        spec = DatasetSpec(raw_root=root, image_root=root / "pictures", categories=("home",), name="bench")
        for label, fn in (("load_dataset", lambda: load_dataset(spec)),
                          ("validate_dataset(images='skip')", lambda: validate_dataset(spec, images="skip"))):
            best = None
            for _ in range(3):
                t0 = time.perf_counter()
                out = fn()
                dt = time.perf_counter() - t0
                best = dt if best is None else min(best, dt)
            n = len(out.reviews) + len(out.products) if label == "load_dataset" else n_reviews + n_reviews // 25
            print(f"  {label:<40} best of 3: {best:6.2f} s  {n / best:>10,.0f} records/s "
                  f"({n_reviews / best:,.0f} reviews/s)")
        del out
        tracemalloc.start()
        records = load_dataset(spec)
        held, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(f"  load_dataset Python heap (tracemalloc): peak {peak / 2**20:.0f} MiB, records held after "
              f"{held / 2**20:.0f} MiB, largest file {max(p.stat().st_size for p in root.iterdir()) / 2**20:.0f} MiB")
        del records


def write_dump(path: Path, n_reviews: int, n_products: int, seed: int = 0) -> None:
    """Amazon-2018-shaped gz dump: ~15% of reviews voted, ~60% at least 64 characters."""
    rng = random.Random(seed)
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as f:
        for i in range(n_reviews):
            asin = f"B{rng.randrange(n_products):09d}"
            o = {"overall": 5.0, "verified": True, "reviewTime": "09 4, 2015", "reviewerID": f"R{i}",
                 "asin": asin, "reviewerName": "x", "reviewText": sentence(rng, rng.randint(3, 120)),
                 "summary": "Five Stars", "unixReviewTime": 1441324800}
            if rng.random() < 0.15:
                o["vote"] = str(rng.choice((1, 2, 3, 5, 12, 1234)))
            f.write(json.dumps(o) + "\n")


CHILD = r"""
import json, sys, time, tracemalloc
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from pipeline.datasets.amazon2018 import build
from pipeline.datasets.build import BuildConfig
import sklearn.model_selection  # imported before measuring: a fixed cost, not the build's
if sys.argv[4] == "heap":
    tracemalloc.start()
t0 = time.perf_counter()
s = build(reviews=Path(sys.argv[1]), meta=None, out=Path(sys.argv[2]), config=BuildConfig(category="b", min_reviews=5))
dt = time.perf_counter() - t0
peak = tracemalloc.get_traced_memory()[1]
# VmHWM: this process's peak RSS (ru_maxrss would carry the parent's peak across fork+exec)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": dt, "heap_peak": peak, "maxrss_kib": hwm,
                  "kept_products": s.products_kept, "kept_reviews": sum(s.reviews.values())}))
"""


def bench_builder(sizes: list[int], n_products: int) -> None:
    root = Path(__file__).resolve().parent.parent
    print(f"amazon2018 builder, synthetic gz dumps over {n_products:,} products (min_reviews=5); time and peak RSS "
          "(VmHWM) from a plain run, heap peak from a second run under tracemalloc:")
    print(f"  {'reviews':>9} {'gz MiB':>7} {'JSON MiB':>9} {'time s':>7} {'reviews/s':>10} {'heap peak MiB':>14} "
          f"{'peak RSS MiB':>13} {'kept prd':>9} {'kept rvw':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            dump = Path(tmp) / f"dump_{n}.json.gz"
            write_dump(dump, n, n_products)
            with gzip.open(dump, "rb") as f:
                raw_size = sum(len(b) for b in iter(lambda: f.read(1 << 20), b""))
            r = {}
            for mode in ("time", "heap"):  # timing and RSS without tracemalloc, heap peak with it
                out = Path(tmp) / f"out_{n}_{mode}"
                res = subprocess.run([sys.executable, "-c", CHILD, str(dump), str(out), str(root), mode],
                                     capture_output=True, text=True, check=True)
                got = json.loads(res.stdout.strip().splitlines()[-1])
                r.update(got if mode == "time" else {"heap_peak": got["heap_peak"]})
            print(f"  {n:>9,} {dump.stat().st_size / 2**20:>7.1f} {raw_size / 2**20:>9.1f} {r['seconds']:>7.1f} "
                  f"{n / r['seconds']:>10,.0f} {r['heap_peak'] / 2**20:>14.1f} {r['maxrss_kib'] / 1024:>13.0f} "
                  f"{r['kept_products']:>9,} {r['kept_reviews']:>9,}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reviews", type=int, default=100_000)
    ap.add_argument("--dump-sizes", default="75000,150000,300000")
    ap.add_argument("--dump-products", type=int, default=20_000)
    ap.add_argument("--only", choices=("reader", "builder"), default=None)
    args = ap.parse_args()
    if args.only != "builder":
        bench_reader(args.reviews)
    if args.only != "reader":
        bench_builder([int(x) for x in args.dump_sizes.split(",")], args.dump_products)
    print(f"(this process maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)")


if __name__ == "__main__":
    main()
