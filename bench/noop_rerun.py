"""No-op rerun cost of image keys on an Amazon-home-sized image set (issue 16, section 4).

The rois stage keys every image by the sha256 of its bytes. Before, every `mrhp extract` /
`mrhp status` hashed every image; now `features.images.ImageHashCache` re-hashes only files
whose (size, mtime_ns, inode, ctime_ns) changed. This writes N synthetic image files (default
570,000, the image count the issue gives for Amazon home; sizes 2-40 KB, so hashing is I/O
and sha256, as with real JPEGs of a crawl's thumbnails) and times:
- cold: no cache, every file hashed (= every run before the change), 8 threads;
- no-op rerun: cache warm, nothing changed (stat + one SELECT);
- rerun after touching 1% of the files.

    python bench/noop_rerun.py [--images 570000] [--dir /tmp/x]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=570_000)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args(argv)
    from features.images import ImageHashCache

    root = args.dir or Path(tempfile.mkdtemp(prefix="mrhp-noop-"))
    rnd = os.urandom(40_000)
    t0 = time.perf_counter()
    paths = []
    for i in range(args.images):
        d = root / "pictures" / f"{i // 1000:04d}"
        if i % 1000 == 0:
            d.mkdir(parents=True, exist_ok=True)
        p = d / f"pic_{i}.jpg"
        size = 2_000 + (i * 7919) % 38_000
        with open(p, "wb") as f:
            f.write(i.to_bytes(8, "little") + rnd[:size])
        paths.append(p)
    write_s = time.perf_counter() - t0
    total_mb = sum(2_008 + (i * 7919) % 38_000 for i in range(args.images)) / 1e6
    time.sleep(2.1)  # past the racy window, so the first run may cache every file
    rows = []
    db = root / "store" / "cache" / "image-hashes.sqlite"
    cache = ImageHashCache(db)
    t0 = time.perf_counter()
    cache.keys(paths)
    rows.append(("cold: every file hashed (every run before the change)", time.perf_counter() - t0, cache.hashed))
    t0 = time.perf_counter()
    cache.keys(paths)
    rows.append(("no-op rerun: cache warm, nothing changed", time.perf_counter() - t0, cache.hashed))
    for p in paths[:: 100]:
        os.utime(p, ns=(time.time_ns() - 10**10, time.time_ns() - 10**10))
    time.sleep(2.1)
    t0 = time.perf_counter()
    cache.keys(paths)
    rows.append(("rerun after touching 1% of the files", time.perf_counter() - t0, cache.hashed))
    print(f"# image keys, {args.images:,} files ({total_mb / 1e3:.1f} GB, written in {write_s:.0f} s); "
          f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
          f"cache {db.stat().st_size / 1e6:.0f} MB")
    print("| run | seconds | files hashed |")
    print("|---|---|---|")
    for name, s, n in rows:
        print(f"| {name} | {s:.1f} | {n:,} |")
    if args.dir is None:
        shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
