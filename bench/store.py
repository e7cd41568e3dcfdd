"""Feature-store throughput: segment writes, shuffled per-item reads, batched reads, and the cost
of verifying every read (per-item CRC-32C; zlib's CRC-32 timed beside it for the choice).

Items look like ROI features: `--boxes` boxes x 2048 float16 per image (ragged), plus, with
`--schema rois`, the other fields of the rois stage (boxes, object/attribute ids and scores,
image size). Reads are shuffled over all items, warm page cache (the files were just written),
as a DataLoader worker sees them.

    .venv/bin/python bench/store.py --items 8000 --schema features
    .venv/bin/python bench/store.py --items 8000 --schema rois
    .venv/bin/python bench/store.py --items 8000 --compare --flow-commit   # LMDB / npz / .pth beside it
    .venv/bin/python bench/store.py --items 2000 --index-keys 1000000      # the index at 1M keys

`--compare` needs `lmdb` for its LMDB row (not a project dependency; skipped with a message
when absent).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.schema import rois_schema  # noqa: E402
from pipeline.stage import FieldSpec, Record  # noqa: E402
from pipeline.store import FeatureStore  # noqa: E402

SCHEMAS = {
    "features": {"features": FieldSpec("float16", (2048,), ragged=True)},
    "rois": rois_schema("float16", 2048),
}


def make_records(n_items: int, boxes: int, schema: str, seed: int = 0) -> list[Record]:
    """Synthetic records (built before timing so only the store is measured)."""
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal((boxes * 4, 2048)).astype(np.float16)
    out = []
    for i in range(n_items):
        start = int(rng.integers(0, boxes * 3))
        arrays = {"features": pool[start : start + boxes]}
        if schema == "rois":
            arrays |= {
                "boxes": rng.uniform(0, 600, (boxes, 4)).astype(np.float32),
                "obj_ids": rng.integers(0, 1600, boxes, dtype=np.int32),
                "obj_conf": rng.uniform(0, 1, boxes).astype(np.float32),
                "attr_ids": rng.integers(0, 400, boxes, dtype=np.int32),
                "attr_conf": rng.uniform(0, 1, boxes).astype(np.float32),
                "image_hw": np.array([480, 640], dtype=np.int32),
            }
        out.append(Record(f"{i:064x}", arrays))
    return out


def best_of(repeat: int, fn) -> float:
    """Shortest wall time of `repeat` calls of fn (the machine's 2 cores are shared)."""
    times = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_index(n_keys: int, root: Path) -> None:
    """Index operations at dataset scale: missing() over n_keys, reader and view opening."""
    store = FeatureStore(root)
    schema = {"n_raw": FieldSpec("int32", ())}
    keys = [f"{i:064x}" for i in range(n_keys)]
    t0 = time.perf_counter()
    with store.writer("tokens", "bench", schema, chunk_size=5000) as w:
        for i, k in enumerate(keys[::2]):
            w.add(Record(k, {"n_raw": i}))
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    missing = store.missing("tokens", "bench", keys)
    t_missing = time.perf_counter() - t0
    assert len(missing) == n_keys - len(keys[::2])
    t0 = time.perf_counter()
    reader = store.reader("tokens", "bench")
    t_reader = time.perf_counter() - t0
    t0 = time.perf_counter()
    store.write_view("bench", "tokens", "bench", {f"rvw:{i}": k for i, k in enumerate(keys[::2])})
    t_write_view = time.perf_counter() - t0
    t0 = time.perf_counter()
    view = store.view("bench", "tokens")
    t_view = time.perf_counter() - t0
    order = np.random.default_rng(2).permutation(len(view))
    ids = [f"rvw:{i}" for i in order]
    t0 = time.perf_counter()
    for item_id in ids:
        view.get(item_id)
    t_get = time.perf_counter() - t0
    n = len(reader)
    print(f"index: {n_keys} keys queried, {n} stored (scalar int32 items, 5000 per segment)")
    print(f"{'write tiny items':<36}{n / t_write:9.0f} items/s")
    print(f"{f'missing() over {n_keys} keys':<36}{t_missing * 1e3:9.0f} ms")
    print(f"{f'open reader ({n} items)':<36}{t_reader * 1e3:9.0f} ms")
    print(f"{f'write_view ({n} items)':<36}{t_write_view * 1e3:9.0f} ms")
    print(f"{f'open view ({n} items)':<36}{t_view * 1e3:9.0f} ms")
    print(f"{'shuffled view.get, tiny items':<36}{n / t_get:9.0f} items/s")


def bench_compare(records: list[Record], root: Path, repeat: int, max_files: int) -> None:
    """The same items in LMDB (one value per item), one .npz per item and one .pth per item
    (torch.load weights_only=True), read in the same shuffled order as the store."""
    n = len(records)
    order = np.random.default_rng(1).permutation(n)
    names = sorted(records[0].arrays)

    def encode(r: Record) -> bytes:  # header: per field dtype, shape; then the raw bytes
        head, body = [], []
        for name in names:
            a = np.ascontiguousarray(r.arrays[name])
            head.append(f"{name}:{a.dtype.str}:{','.join(map(str, a.shape))}")
            body.append(a.tobytes())
        h = ";".join(head).encode()
        return len(h).to_bytes(4, "little") + h + b"".join(body)

    def decode(buf: bytes) -> dict[str, np.ndarray]:
        hl = int.from_bytes(buf[:4], "little")
        pos = 4 + hl
        out = {}
        for spec in buf[4:pos].decode().split(";"):
            name, dt, shape = spec.split(":")
            dims = tuple(int(x) for x in shape.split(",") if x)
            dtype = np.dtype(dt)
            size = dtype.itemsize * int(np.prod(dims, dtype=np.int64))
            out[name] = np.frombuffer(buf, dtype=dtype, count=size // dtype.itemsize, offset=pos).reshape(dims)
            pos += size
        return out

    try:
        import lmdb
    except ImportError:
        print("lmdb not installed: LMDB skipped (pip install lmdb, for this bench only)")
    else:
        env = lmdb.open(str(root / "lmdb"), map_size=1 << 36, subdir=True, lock=True, readahead=False)
        with env.begin(write=True) as txn:
            for r in records:
                txn.put(r.key.encode(), encode(r))
        env.sync()
        keys = [records[i].key.encode() for i in order]

        def pass_lmdb() -> None:
            with env.begin(buffers=False) as txn:
                for k in keys:
                    decode(txn.get(k))

        t = best_of(repeat, pass_lmdb)
        print(f"{'shuffled LMDB get + decode':<36}{n / t:9.0f} items/s")
        env.close()
    m = min(n, max_files)
    sub = [records[i] for i in order[:m]]
    (root / "npz").mkdir()
    for r in sub:
        np.savez(root / "npz" / f"{r.key}.npz", **r.arrays)

    def pass_npz() -> None:
        for r in sub:
            with np.load(root / "npz" / f"{r.key}.npz") as z:
                {k: z[k] for k in z.files}

    t = best_of(repeat, pass_npz)
    print(f"{f'npz per item ({m} files)':<36}{m / t:9.0f} items/s")
    try:
        import torch
    except ImportError:
        print("torch not installed: .pth skipped")
        return
    (root / "pth").mkdir()
    for r in sub:
        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in r.arrays.items()},
                   root / "pth" / f"{r.key}.pth")

    def pass_pth() -> None:
        for r in sub:
            torch.load(root / "pth" / f"{r.key}.pth", weights_only=True)

    t = best_of(repeat, pass_pth)
    print(f"{f'.pth per item ({m} files)':<36}{m / t:9.0f} items/s")


def bench_flow_commit(records: list[Record], schema: str, chunk_size: int, root: Path) -> None:
    """Issue 16 s.1: a worker writes pending segments (no index), the flow verifies (sha256 of
    the whole file) and commits them; against the single-process writer that indexes directly."""
    from pipeline.store import pending_writer

    store = FeatureStore(root)
    n = len(records)
    mb = n * sum(a.nbytes for a in records[0].arrays.values()) / 1e6
    t0 = time.perf_counter()
    w = pending_writer(root, "rois", "bench", SCHEMAS[schema], owner="bench", chunk_size=chunk_size)
    for r in records:
        w.add(r)
    w.close()
    t_worker = time.perf_counter() - t0
    t0 = time.perf_counter()
    for desc in w.descriptors:
        store.commit_segment(desc)
    t_commit = time.perf_counter() - t0
    print(f"{'worker: pending segments (no index)':<36}{n / t_worker:9.0f} items/s  {mb / t_worker:7.0f} MB/s")
    print(f"{'flow: verify + move + index':<36}{n / t_commit:9.0f} items/s  {mb / t_commit:7.0f} MB/s  "
          f"({t_commit / len(w.descriptors) * 1e3:.0f} ms per {chunk_size}-item segment)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=8000, help="items (images) to write and read")
    ap.add_argument("--boxes", type=int, default=32, help="boxes per image")
    ap.add_argument("--schema", choices=sorted(SCHEMAS), default="features")
    ap.add_argument("--chunk-size", type=int, default=500, help="records per segment")
    ap.add_argument("--batch", type=int, default=64, help="keys per get_many call")
    ap.add_argument("--repeat", type=int, default=3, help="read passes; the best is reported (shared CPUs)")
    ap.add_argument("--index-keys", type=int, default=0,
                    help="also time missing()/reader/view over this many keys (e.g. 200000)")
    ap.add_argument("--compare", action="store_true",
                    help="also read the same items from LMDB, one .npz and one .pth per item")
    ap.add_argument("--max-files", type=int, default=2000, help="items written as .npz / .pth files")
    ap.add_argument("--flow-commit", action="store_true",
                    help="also time worker pending writes and the flow's verified commit")
    ap.add_argument("--dir", default=None, help="store folder (default: a fresh temp folder, removed after)")
    args = ap.parse_args(argv)

    records = make_records(args.items, args.boxes, args.schema)
    mb_per_item = sum(a.nbytes for a in records[0].arrays.values()) / 1e6
    tmp = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="mrhp-bench-store-"))
    try:
        store = FeatureStore(tmp / "store")
        t0 = time.perf_counter()
        with store.writer("rois", "bench", SCHEMAS[args.schema], chunk_size=args.chunk_size) as w:
            for r in records:
                w.add(r)
        t_write = time.perf_counter() - t0
        if args.flow_commit:
            bench_flow_commit(records, args.schema, args.chunk_size, tmp / "flow-store")
        if args.compare:
            bench_compare(records, tmp, args.repeat, args.max_files)
        del records

        t0 = time.perf_counter()
        reader = store.reader("rois", "bench")
        t_open = time.perf_counter() - t0
        keys = reader.keys()
        order = np.random.default_rng(1).permutation(len(keys))
        shuffled = [keys[i] for i in order]
        reader.get(shuffled[0])

        def pass_get() -> None:
            total = 0
            for k in shuffled:
                total += reader.get(k)["features"].shape[0]
            assert total == args.items * args.boxes

        def pass_many() -> None:
            for i in range(0, len(shuffled), args.batch):
                reader.get_many(shuffled[i : i + args.batch])

        t_get = best_of(args.repeat, pass_get)
        t_many = best_of(args.repeat, pass_many)
        # The cost of verifying every read (per-item CRC-32 and key check): the same pass with
        # the CRC comparison switched off, passes interleaved so both see the same machine load.
        import pipeline.store as store_mod

        real_crc_ok = store_mod._OpenSegment._crc_ok
        t_on, t_off = [], []
        for _ in range(max(1, args.repeat)):
            t_on.append(best_of(1, pass_get))
            store_mod._OpenSegment._crc_ok = lambda self, key, row, arrays: True
            try:
                t_off.append(best_of(1, pass_get))
            finally:
                store_mod._OpenSegment._crc_ok = real_crc_ok
        t_on_best, t_off_best = min(t_on), min(t_off)

        store.write_view("bench", "rois", "bench", {f"img/{i}.jpg": k for i, k in enumerate(keys)})
        view = store.view("bench", "rois")
        ids = view.item_ids()
        ids = [ids[i] for i in order]
        def pass_view() -> None:
            for item_id in ids:
                view.get(item_id)

        t_view = best_of(args.repeat, pass_view)

        t0 = time.perf_counter()
        report = store.fsck()
        t_fsck = time.perf_counter() - t0
        assert report.ok, report.format()

        n = args.items
        print(f"items: {n} x {args.boxes} boxes, schema {args.schema} ({mb_per_item * 1e3:.0f} kB/item), "
              f"chunk {args.chunk_size}")
        rate, mbs = n / t_write, n * mb_per_item / t_write
        print(f"{'write (segments + fsync + index)':<36}{rate:9.0f} items/s  {mbs:7.0f} MB/s")
        print(f"{'open reader (index -> memory)':<36}{t_open * 1e3:9.1f} ms")
        print(f"{'shuffled reader.get':<36}{n / t_get:9.0f} items/s  {n * mb_per_item / t_get:7.0f} MB/s")
        print(f"{f'shuffled get_many (batch {args.batch})':<36}{n / t_many:9.0f} items/s  "
              f"{n * mb_per_item / t_many:7.0f} MB/s")
        print(f"{'shuffled view.get':<36}{n / t_view:9.0f} items/s")
        print(f"{'reader.get, CRC verified (interleaved)':<36}{n / t_on_best:9.0f} items/s")
        print(f"{'reader.get, CRC check off':<36}{n / t_off_best:9.0f} items/s")
        item = np.ascontiguousarray(make_records(1, args.boxes, args.schema)[0].arrays["features"])
        import zlib

        import crc32c

        t_c = best_of(5, lambda: [crc32c.crc32c(item) for _ in range(500)]) / 500
        t_z = best_of(5, lambda: [zlib.crc32(item) for _ in range(500)]) / 500
        print(f"{'checksum of one item: crc32c':<36}{t_c * 1e6:9.1f} us  {item.nbytes / t_c / 1e9:7.1f} GB/s")
        print(f"{'checksum of one item: zlib.crc32':<36}{t_z * 1e6:9.1f} us  {item.nbytes / t_z / 1e9:7.1f} GB/s")
        print(f"{'CRC verification cost per item':<36}{(t_on_best - t_off_best) / n * 1e6:9.1f} us "
              f"({(t_on_best / t_off_best - 1) * 100:+.0f}% read time)")
        print(f"{'fsck (checksums of all segments)':<36}{n * mb_per_item / t_fsck:9.0f} MB/s")
        if args.index_keys:
            bench_index(args.index_keys, tmp / "index-store")
    finally:
        if not args.dir:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
