"""ROI extraction throughput and precision: images/s and peak memory per batch size.

Runs the bottom-up-attention detector (R-101 C4 layout by default) over real photos (the demo
dataset's, cycled) or synthetic ones, one configuration per child process so that peak memory
is per configuration. Reports:
- images/s of detector + box selection (decoding/resizing is timed separately: it runs in
  DataLoader workers in the stage) and the speedup of each batch size over batch size 1;
- peak memory (CUDA: max allocated; CPU: peak resident set of the child process);
- float16 storage error: max |fp16(feature) - feature| over all stored features;
- batched vs one-at-a-time feature difference (padding changes border activations);
- with --amp: autocast feature error against fp32 over boxes found by both runs.

Without --weights the weights are random (seeded): throughput is the same as with real
weights, but proposals and confidences are not meaningful.

    python bench/extract_rois.py --device cpu --batch-sizes 1 2 4 --images 8 --min-size 224 --max-size 320
    python bench/extract_rois.py --device cuda --batch-sizes 1 2 4 8 16 --images 128 --amp
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from features.detector import (  # noqa: E402
    bua_caffe_r101,
    build_detector,
    load_into,
    pad_batch,
    prepare_image,
    tiny_config,
)
from features.detector.selection import box_iou  # noqa: E402
from features.device import autocast as _autocast  # noqa: E402
from features.images import decode_image  # noqa: E402
from features.rois import detect_batch, pack_batch  # noqa: E402
from pipeline.params import RoisParams  # noqa: E402


def load_images(n: int, source: str) -> list[np.ndarray]:
    """n RGB images: the demo photos cycled, or synthetic 640x480 blocky images."""
    pics = sorted((ROOT / "demo_data" / "pictures").rglob("*.jpg")) if source == "demo" else []
    out = []
    if pics:
        decoded = [r.rgb for r in (decode_image(p) for p in pics) if r.ok]
        while len(out) < n:
            out.extend(decoded)
        return out[:n]
    rng = np.random.RandomState(0)
    for _ in range(n):
        base = rng.randint(0, 255, (61, 81, 3)).astype(np.uint8)
        out.append(np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:480, :640])
    return out


def build(args) -> torch.nn.Module:
    cfg = tiny_config() if args.arch == "tiny" else bua_caffe_r101()
    model = build_detector(cfg, seed=0)
    if args.weights:
        load_into(model, Path(args.weights))
    return model.to(args.device).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_config(args) -> dict:
    """One (batch size, amp) configuration: timing, memory and the packed outputs."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build(args)
    params = RoisParams(min_size=args.min_size, max_size=args.max_size,
                        rpn_post_nms_top_n=args.post_nms, batch_size=args.batch_size,
                        autocast=args.amp, feature_dtype="float32")
    images = load_images(args.images, args.source)
    t0 = time.perf_counter()
    prepared = [prepare_image(im, min_size=params.min_size, max_size=params.max_size,
                              pixel_mean=model.cfg.pixel_mean) for im in images]
    prep_s = time.perf_counter() - t0
    bs = args.batch_size
    # order by aspect ratio as the stage does, so padding waste is what the stage sees
    order = sorted(range(len(prepared)), key=lambda i: prepared[i].size[0] / prepared[i].size[1])
    batches = [order[i:i + bs] for i in range(0, len(order), bs)]
    detect_batch(model, [prepared[i] for i in batches[0]], params, device)  # warm-up
    sync(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    results: dict[int, dict] = {}
    t0 = time.perf_counter()
    for _ in range(args.repeat):
        for b in batches:
            dets = detect_batch(model, [prepared[i] for i in b], params, device)
            for i, arrays in zip(b, pack_batch(dets, params, model.cfg), strict=True):
                results[i] = arrays
    sync(args.device)
    elapsed = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    # features on fixed boxes (the reference run's), this run's batching and precision
    if args.ref_boxes and Path(args.ref_boxes).exists():
        ref_boxes = [
            torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for b in json.loads(Path(args.ref_boxes).read_text())
        ]
    else:
        ref_boxes = [torch.from_numpy(results[i]["boxes"]) for i in range(len(images))]
        if args.ref_boxes:
            Path(args.ref_boxes).write_text(json.dumps([b.tolist() for b in ref_boxes]))
    fixed: dict[int, list] = {}
    for b in batches:
        batch = pad_batch([prepared[i].tensor.to(device) for i in b], model.cfg.size_divisibility)
        with _autocast(device, args.amp):
            dets = model.forward_boxes(batch, [prepared[i].scale for i in b], [prepared[i].orig_hw for i in b],
                                       [ref_boxes[i] for i in b])
        for i, det in zip(b, dets, strict=True):
            fixed[i] = det.features.float().cpu().tolist()
    return {
        "batch_size": bs, "amp": args.amp, "images": len(images) * args.repeat,
        "images_per_s": len(images) * args.repeat / elapsed, "prepare_ms_per_image": 1000 * prep_s / len(images),
        "peak_mb": peak / 2**20,
        "outputs": [{k: results[i][k].tolist() for k in ("boxes", "features")} for i in range(len(images))],
        "fixed_features": [fixed[i] for i in range(len(images))],
    }


def matched_feature_error(a: list[dict], b: list[dict], iou: float = 0.99) -> tuple[float, float]:
    """Max |feature difference| over boxes present in both runs (IoU >= iou), and matched fraction."""
    worst, matched, total = 0.0, 0, 0
    for x, y in zip(a, b, strict=True):
        bx, by = torch.tensor(x["boxes"]).reshape(-1, 4), torch.tensor(y["boxes"]).reshape(-1, 4)
        fx, fy = np.asarray(x["features"], dtype=np.float32), np.asarray(y["features"], dtype=np.float32)
        total += len(bx)
        if len(bx) == 0 or len(by) == 0:
            continue
        ious = box_iou(torch.cat([bx, by]))[: len(bx), len(bx):]
        best, j = ious.max(dim=1)
        for i in torch.nonzero(best >= iou).flatten().tolist():
            matched += 1
            worst = max(worst, float(np.abs(fx[i] - fy[j[i]]).max()))
    return worst, (matched / total if total else 1.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--amp", action="store_true", help="also measure autocast (fp16 on CUDA, bf16 on CPU)")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--min-size", type=int, default=600)
    ap.add_argument("--max-size", type=int, default=1000)
    ap.add_argument("--post-nms", type=int, default=300)
    ap.add_argument("--arch", choices=["r101", "tiny"], default="r101")
    ap.add_argument("--weights", default=None, help="bua .pth / d2 .pkl; default: seeded random weights")
    ap.add_argument("--source", choices=["demo", "synthetic"], default="demo")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1)))
    ap.add_argument("--batch-size", type=int, default=None, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--json-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ref-boxes", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.batch_size is not None:  # child: one configuration
        res = run_config(args)
        Path(args.json_out).write_text(json.dumps(res))
        return 0

    runs = []
    ref_boxes = Path(f"/tmp/extract_rois_bench_{os.getpid()}_ref_boxes.json")
    configs = [(bs, False) for bs in args.batch_sizes] + ([(bs, True) for bs in args.batch_sizes] if args.amp else [])
    for bs, amp in configs:
        out = Path(f"/tmp/extract_rois_bench_{os.getpid()}_{bs}_{int(amp)}.json")
        cmd = [sys.executable, __file__, "--device", args.device, "--images", str(args.images),
               "--repeat", str(args.repeat), "--min-size", str(args.min_size), "--max-size", str(args.max_size),
               "--post-nms", str(args.post_nms), "--arch", args.arch, "--source", args.source,
               "--threads", str(args.threads), "--batch-size", str(bs), "--json-out", str(out),
               "--ref-boxes", str(ref_boxes)]
        if amp:
            cmd.append("--amp")
        if args.weights:
            cmd += ["--weights", args.weights]
        subprocess.run(cmd, check=True)
        runs.append(json.loads(out.read_text()))
        out.unlink()
    ref_boxes.unlink(missing_ok=True)

    dev = (
        torch.cuda.get_device_name(0)
        if args.device.startswith("cuda")
        else f"{platform.machine()} CPU, {args.threads} thread(s)"
    )
    print(
        f"# ROI extraction: {args.arch}, {'weights ' + args.weights if args.weights else 'random-init weights'}, "
        f"resize {args.min_size}/{args.max_size}, {args.post_nms} proposals/image, "
        f"{args.images} {args.source} images x{args.repeat}, {dev}"
    )
    base = {r["amp"]: r for r in runs if r["batch_size"] == min(args.batch_sizes)}
    ref = base[False]
    ref_fixed = np.concatenate(
        [np.asarray(f, dtype=np.float32).reshape(len(f), -1) for f in ref["fixed_features"] if f]
    )
    scale = float(np.abs(ref_fixed).max())
    print(
        "| batch | precision | images/s | speedup vs batch 1 | peak memory (MiB) "
        "| max abs feature diff on fixed boxes (relative) | selected boxes shared with batch-1 fp32 |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        _, frac = matched_feature_error(ref["outputs"], r["outputs"])
        fixed = np.concatenate([np.asarray(f, dtype=np.float32).reshape(len(f), -1) for f in r["fixed_features"] if f])
        err = float(np.abs(fixed - ref_fixed).max())
        prec = ("fp16 autocast" if args.device.startswith("cuda") else "bf16 autocast") if r["amp"] else "fp32"
        speed = r["images_per_s"] / base[r["amp"]]["images_per_s"]
        print(f"| {r['batch_size']} | {prec} | {r['images_per_s']:.2f} | {speed:.2f}x | {r['peak_mb']:.0f} | "
              f"{err:.3g} ({err / scale:.2g}) | {100 * frac:.0f}% |")
    feats = np.concatenate(
        [
            np.asarray(o["features"], dtype=np.float32).reshape(-1, len(o["features"][0]) if o["features"] else 1)
            for o in ref["outputs"]
            if o["features"]
        ]
    )
    f16_err = float(np.abs(feats.astype(np.float16).astype(np.float32) - feats).max())
    rel = f16_err / float(np.abs(feats).max())
    print(
        f"\nfloat16 storage: max abs error {f16_err:.3g} (feature max {np.abs(feats).max():.3g}, relative {rel:.2g}); "
        f"decode+resize done once per image: {ref['prepare_ms_per_image']:.1f} ms/image on this host"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
