"""LXMERT TSV import: throughput and peak memory as the file grows (streaming = flat memory).

Writes synthetic LXMERT TSVs (random float32 features, `--boxes` boxes per row) of several sizes
to a temp dir and imports each, in a fresh process, into a fresh store with `import_features`
(float32, chunk 256, no dataset images matched). Prints rows/s, source MB/s (including the
sha256 pass that names the fingerprint) and the peak RSS of the importing process.

    .venv/bin/python bench/import_tsv.py [--sizes 250,500,1000] [--boxes 36]
"""
from __future__ import annotations

import argparse
import base64
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def write_tsv(path: Path, rows: int, boxes: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)

    def b64(a: np.ndarray) -> str:
        return base64.b64encode(a.tobytes()).decode("ascii")

    with open(path, "w", newline="") as f:
        for i in range(rows):
            n = boxes
            f.write("\t".join([
                f"img{i:07d}", "480", "640",
                b64(rng.integers(0, 1600, n).astype("<i8")), b64(rng.random(n, dtype=np.float32)),
                b64(rng.integers(0, 400, n).astype("<i8")), b64(rng.random(n, dtype=np.float32)),
                str(n), b64(rng.random((n, 4), dtype=np.float32) * 600),
                b64(rng.random((n, 2048), dtype=np.float32)),
            ]) + "\r\n")


def child(tsv: Path, store_root: Path) -> None:
    from pipeline.ingest.importers import ImportConfig, import_features
    from pipeline.records import DatasetRecords
    from pipeline.store import FeatureStore

    t0 = time.perf_counter()
    report = import_features(FeatureStore(store_root), "bench", store_root / "no-images", DatasetRecords(name="bench"),
                             tsv, ImportConfig(format="lxmert-tsv", chunk_size=256))
    dt = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    size_mb = tsv.stat().st_size / 1e6
    print(f"{report.rows:>6} rows  {size_mb:8.1f} MB  {dt:7.2f} s  {report.rows / dt:8.1f} rows/s  "
          f"{size_mb / dt:7.1f} MB/s  peak RSS {rss_mb:7.1f} MB  (imported {report.imported}, failed {report.failed})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="250,500,1000", help="rows per synthetic TSV, comma-separated")
    ap.add_argument("--boxes", type=int, default=36)
    ap.add_argument("--child", nargs=2, metavar=("TSV", "STORE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]))
        return
    with tempfile.TemporaryDirectory(prefix="mrhp-bench-import-") as tmp:
        for rows in (int(s) for s in args.sizes.split(",")):
            tsv = Path(tmp) / f"rows{rows}.tsv"
            write_tsv(tsv, rows, args.boxes)
            store = Path(tmp) / f"store{rows}"
            subprocess.run([sys.executable, __file__, "--child", str(tsv), str(store)], check=True)
            tsv.unlink()
            subprocess.run(["rm", "-rf", str(store)], check=True)


if __name__ == "__main__":
    main()
