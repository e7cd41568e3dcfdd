"""The prepared GPU check (issue 16, section 3): one table, under 8 minutes on one H100/H200.

ROI extraction (R-101 C4 bottom-up-attention layout, random-init weights, 600/1000 resize, 300
proposals/image, the stage's GPU path: uint8 images in pinned memory resized on the device,
frozen BN folded, cudnn.benchmark with bucketed sizes, batched selection, one device-to-host
copy per batch) over the real COCO photos of ../shared/fixtures/butd/images repeated to 2,000
images: images/s at batch 1, 4, 8, 16 in fp32 and bf16 autocast, the peak GPU memory of each
configuration, and the max feature difference on fixed boxes: batch B vs one image at a time
(fp32 rows), bf16 vs fp32 (bf16 rows, relative to the largest feature). Then one training step
of MCL, MM-SS and SANCL at batch 32 products (synthetic Amazon-home-shaped data): step time and
peak memory. Decoding is timed apart (it runs in the DataLoader workers): ms/image per worker.

Each ROI configuration runs until it has done `--images` images or `--seconds` seconds; a
global budget skips what would not fit (said in the table).

    bench/gpu_check.sh                        # CUDA, the full check
    bench/gpu_check.sh --device cpu --quick   # every code path, CI-sized (tiny net, few images)
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

FIXTURES = ROOT.parent / "shared" / "fixtures" / "butd" / "images"


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)


def _peak_mib(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(dev) / 2**20:.0f}"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} (RSS, process)"


def load_photos(folder: Path, quick: bool) -> list[np.ndarray]:
    from features.images import decode_image

    paths = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        raise SystemExit(f"no images in {folder}")
    rgbs = []
    for p in paths[: 3 if quick else None]:
        r = decode_image(p)
        if not r.ok:
            raise SystemExit(f"cannot decode fixture {p}: {r.failure}")
        rgbs.append(r.rgb)
    return rgbs


def decode_cost(
    folder: Path, quick: bool, min_size: int, max_size: int, pixel_mean
) -> tuple[float, float, float, float]:
    """(decode ms, decode+uint8 ms, decode+resize+normalise ms, MB shipped uint8 / float32 per image)."""
    from features.detector.preprocess import prepare_image, raw_image
    from features.images import decode_image

    paths = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[: 3 if quick else 10]
    torch.set_num_threads(1)  # as a DataLoader worker runs
    t0 = time.perf_counter()
    rgbs = [decode_image(p).rgb for p in paths]
    dec = (time.perf_counter() - t0) / len(paths)
    t0 = time.perf_counter()
    raws = [raw_image(r, min_size=min_size, max_size=max_size) for r in rgbs]
    raw_ms = dec + (time.perf_counter() - t0) / len(paths)
    t0 = time.perf_counter()
    preps = [prepare_image(r, min_size=min_size, max_size=max_size, pixel_mean=pixel_mean) for r in rgbs]
    prep_ms = dec + (time.perf_counter() - t0) / len(paths)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    mb_u8 = sum(r.rgb.numel() for r in raws) / len(raws) / 1e6
    mb_f32 = sum(p.tensor.numel() * 4 for p in preps) / len(preps) / 1e6
    return 1000 * dec, 1000 * raw_ms, 1000 * prep_ms, mb_u8, mb_f32


def roi_rows(args, dev: torch.device, deadline: float) -> list[str]:
    from features.detector import bua_caffe_r101, build_detector, tiny_config
    from features.detector.preprocess import prepare_batch, raw_image
    from features.device import autocast as _autocast
    from features.rois import detect_batch, optimise_for_inference, pack_batch
    from pipeline.params import RoisParams

    cfg = tiny_config() if args.quick else bua_caffe_r101()
    params = RoisParams(min_size=args.min_size, max_size=args.max_size, rpn_post_nms_top_n=args.proposals,
                        feature_dtype="float32", channels_last=dev.type == "cuda")
    model = optimise_for_inference(build_detector(cfg, seed=0).to(dev).eval(), params, dev)
    rgbs = load_photos(args.images_dir, args.quick)
    raws = [raw_image(r, min_size=params.min_size, max_size=params.max_size) for r in rgbs]
    if dev.type == "cuda":
        raws = [r.pin_memory() for r in raws]
    order = sorted(range(len(raws)), key=lambda i: raws[i].size[0] / raws[i].size[1])  # the stage's bucketing
    stream = [raws[order[i % len(order)]] for i in range(args.images)]

    # fixed boxes: the batch-1 fp32 proposals of the first images, for the precision columns
    n_fixed = min(len(raws), max(args.batch_sizes))
    fixed_imgs = [raws[i] for i in order[:n_fixed]]

    def fixed_features(bs: int, precision: str) -> torch.Tensor:
        feats = []
        for s in range(0, n_fixed, bs):
            chunk = fixed_imgs[s:s + bs]
            batch = prepare_batch(chunk, dev, pixel_mean=cfg.pixel_mean, divisibility=cfg.size_divisibility,
                                  bucket=params.pad_bucket if dev.type == "cuda" else 0,
                                  channels_last=params.channels_last)
            with torch.no_grad(), _autocast(dev, precision == "bf16", "bfloat16"):
                dets = model.forward_boxes(batch, [r.scale for r in chunk], [r.orig_hw for r in chunk],
                                           [fixed_boxes[id(r)] for r in chunk])
            feats += [d.features.float().cpu() for d in dets]
        return torch.cat(feats)

    fixed_boxes = {}
    for r in fixed_imgs:
        det = detect_batch(model, [r], params, dev)[0]
        fixed_boxes[id(r)] = det.boxes[:64].detach()
    ref = fixed_features(1, "fp32")
    scale = float(ref.abs().max())

    rows = []
    for precision in ("fp32", "bf16"):
        p = RoisParams(**{**params.__dict__, "autocast": precision == "bf16", "autocast_dtype": "bfloat16",
                          "batch_size": 1})
        for bs in args.batch_sizes:
            if time.perf_counter() > deadline:
                rows.append(f"| rois R-101 C4 | {precision} | {bs} | skipped: time budget | | |")
                continue
            batches = [stream[i:i + bs] for i in range(0, len(stream), bs)]
            for b in batches[: max(1, 2 * len(raws) // bs)]:  # warm-up: cudnn autotunes each bucket shape
                pack_batch(detect_batch(model, b, p, dev), p, cfg)
            _reset_peak(dev)
            t0 = time.perf_counter()
            done = 0
            for b in batches:
                pack_batch(detect_batch(model, b, p, dev), p, cfg)  # ends with the batch's host copy
                done += len(b)
                if time.perf_counter() - t0 > args.seconds:
                    break
            _sync(dev)
            dt = time.perf_counter() - t0
            peak = _peak_mib(dev)
            feats = fixed_features(bs, precision)
            diff = float((feats - ref).abs().max())
            what = "batched vs single" if precision == "fp32" else "bf16 vs fp32"
            rows.append(f"| rois {'tiny' if args.quick else 'R-101 C4'} {args.min_size}/{args.max_size}, "
                        f"{args.proposals} props | {precision} | {bs} | {done / dt:.1f} images/s ({done} images) | "
                        f"{peak} | {diff:.3g} ({what}, relative {diff / scale:.2g}) |")
            print(rows[-1], flush=True)
    return rows


def model_rows(args, dev: torch.device, deadline: float) -> list[str]:
    from models.config import DataConfig
    from models.data import make_loader, train_plan
    from models.losses import ranking_loss
    from models.registry import build_model
    from models.samplers import PairwiseSampler, label_frequency_weights
    from models.synthetic import make_synthetic
    from models.trainer import trainable_parameters

    bp = args.model_batch
    rows = []
    with tempfile.TemporaryDirectory(prefix="mrhp-gpu-check-") as tmp:
        n_products = int((args.model_steps + 2) * bp / 0.8) + 1
        q = args.quick  # quick: the same code paths on small items (Amazon-home shapes otherwise)
        data = make_synthetic(
            tmp, "gpu-check-home", n_products=n_products, reviews_per_product=(3, 5) if q else (10, 40),
            vocab_size=500 if q else 20000, embed_dim=300, n_topics=8 if q else 32, roi_dim=2048,
            max_boxes=4 if q else 36, image_prob=0.5, review_len=(8, 24) if q else (20, 128),
            product_len=24 if q else 128, split_shares=(0.8, 0.1, 0.1), seed=0).store_bundle()
        src = data.split("train")
        plan = train_plan(src, batch_products=bp, max_reviews=64, rng=np.random.default_rng(0))
        batches = list(make_loader(src, plan[: args.model_steps + 1], DataConfig(), num_workers=0))
        sampler = PairwiseSampler(label_weights=label_frequency_weights(data.train_labels))
        for name in args.models:
            if time.perf_counter() > deadline:
                rows.append(f"| {name} train step | bf16 autocast | {bp} products | skipped: time budget | | |")
                continue
            model = None
            try:
                torch.manual_seed(0)
                model = build_model(name, {}, data.embeddings).to(dev)
                hook = getattr(model, "set_dataset_threshold", None)  # as the trainer does (MCL)
                if hook is not None:
                    hook(data.threshold)
                params = trainable_parameters(model)
                opt = torch.optim.Adam(params, lr=1e-4)
                rng = np.random.default_rng(0)
                times, revs = [], 0
                _reset_peak(dev)
                for i, b in enumerate(batches):
                    inst = sampler.sample(b.labels.numpy(), b.rev_product.numpy(), rng)
                    b.instances = torch.from_numpy(inst.index)
                    b.instance_weights = torch.from_numpy(inst.weights)
                    _sync(dev)
                    t0 = time.perf_counter()
                    bd = b.to(dev, non_blocking=True)
                    model.train()
                    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                        out = model(bd)
                    loss = ranking_loss(out.scores.float(), bd.labels, bd.instances, bd.instance_weights)
                    if out.aux_losses:
                        loss = loss + sum(v.float() for v in out.aux_losses.values())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    _sync(dev)
                    if i > 0:  # the first step warms up allocators and autotuning
                        times.append(time.perf_counter() - t0)
                        revs += b.num_reviews
                ms = 1000 * float(np.mean(times))
                rows.append(
                    f"| {name} train step | {'bf16 autocast' if dev.type == 'cuda' else 'fp32'} | {bp} products | "
                    f"{ms:.1f} ms/step ({revs / (sum(times)):.0f} reviews/s, {len(times)} steps) | "
                    f"{_peak_mib(dev)} | |"
                )
            except Exception as e:  # report and go on with the other models
                rows.append(f"| {name} train step | | {bp} products | failed: {type(e).__name__}: {e} | | |")
            print(rows[-1], flush=True)
            model = None
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny net, small images, few of them: CI-sized")
    ap.add_argument("--images-dir", type=Path, default=FIXTURES)
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole check (default 420; quick 90)")
    args = ap.parse_args(argv)
    q = args.quick
    args.images = 8 if q else 2000
    args.seconds = 3.0 if q else 25.0
    args.batch_sizes = [1, 4] if q else [1, 4, 8, 16]
    args.min_size, args.max_size = (96, 160) if q else (600, 1000)
    args.proposals = 30 if q else 300
    args.models = ["mcl", "mmss", "sancl"]
    args.model_batch = 4 if q else 32
    args.model_steps = 1 if q else 6
    budget = args.budget or (90.0 if q else 420.0)
    start = time.perf_counter()

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_check: --device cuda asked for, but CUDA is not available (use --device cpu --quick)")
    dev = torch.device(args.device)
    name = (
        torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{platform.machine()} CPU, {os.cpu_count()} cores"
    )
    tf32 = f", fp32 convolutions in TF32: {torch.backends.cudnn.allow_tf32}" if dev.type == "cuda" else ""
    print(f"# GPU check: {name}; torch {torch.__version__}, CUDA {torch.version.cuda}{tf32}; "
          f"{'QUICK (tiny net, not the real figures)' if q else 'R-101 C4, random-init weights'}", flush=True)
    from features.detector.model import DetectorConfig

    dec, raw_ms, prep_ms, mb_u8, mb_f32 = decode_cost(args.images_dir, q, args.min_size, args.max_size,
                                                      DetectorConfig().pixel_mean)
    rows = roi_rows(args, dev, start + 0.7 * budget)
    rows += model_rows(args, dev, start + budget)
    print()
    print("| what | precision | batch | throughput | peak memory (MiB) | max abs feature difference on fixed boxes |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(r)
    print(f"\nCPU side, per image per decoding worker (1 thread): decode {dec:.1f} ms; GPU path (decode + uint8 "
          f"tensor, resized on the device) {raw_ms:.1f} ms, shipping {mb_u8:.2f} MB; CPU path (decode + resize + "
          f"normalise) {prep_ms:.1f} ms, shipping {mb_f32:.2f} MB. Workers needed for R images/s: R x ms / 1000.")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
