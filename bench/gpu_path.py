"""CPU-side figures of the ROI stage's GPU path (issue 16, section 2), measurable without a GPU.

1. Input preparation per image in one decoding worker (1 thread), on the COCO photos of
   ../shared/fixtures/butd/images at 600/1000: the CPU path (decode + resize + normalise to
   float32, what the stage shipped before) against the GPU path (decode + uint8 tensor; resize
   and normalise move to the device), and the bytes each ships per image.
2. Host syncs per forward pass and per packing of a batch: operations that block the host on
   CUDA (scalar reads, data-dependent shapes, tensors from Python data = pageable copies,
   device-to-host copies), counted by features/detector/syncs.py on CPU. R-101 C4 layout,
   random-init, small images (the counts depend on depth and batch, not on image size).

`--code-root` measures another checkout's stage code (e.g. the commit before the change) with
this checkout's counter:

    python bench/gpu_path.py                        # this checkout
    python bench/gpu_path.py --code-root /work/main # before
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
FIXTURES = HERE.parent / "shared" / "fixtures" / "butd" / "images"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--code-root", type=Path, default=HERE)
    ap.add_argument("--images-dir", type=Path, default=FIXTURES)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(args.code_root))
    import torch

    spec = importlib.util.spec_from_file_location("_syncs", HERE / "features" / "detector" / "syncs.py")
    syncs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(syncs)
    from features import rois as R
    from features.detector import bua_caffe_r101, build_detector, prepare_image
    from features.images import decode_image
    from pipeline.params import RoisParams

    torch.set_num_threads(1)
    paths = sorted(args.images_dir.glob("*.jpg"))
    cfg = bua_caffe_r101()
    print(f"# GPU path, CPU-side figures: code from {args.code_root}; {platform.machine()}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, 1 torch thread")
    # 1. input preparation
    dec = prep = raw = 0.0
    mb_f32 = mb_u8 = 0.0
    has_raw = hasattr(R, "raw_image")
    for _ in range(args.repeat):
        for p in paths:
            t0 = time.perf_counter()
            rgb = decode_image(p).rgb
            t1 = time.perf_counter()
            pi = prepare_image(rgb, min_size=600, max_size=1000, pixel_mean=cfg.pixel_mean)
            t2 = time.perf_counter()
            dec += t1 - t0
            prep += t2 - t1
            mb_f32 += pi.tensor.numel() * 4 / 1e6
            if has_raw:
                t3 = time.perf_counter()
                ri = R.raw_image(rgb, min_size=600, max_size=1000)
                raw += time.perf_counter() - t3
                mb_u8 += ri.rgb.numel() / 1e6
    n = args.repeat * len(paths)
    print(
        f"\n| input preparation per image, 1 worker thread ({len(paths)} COCO photos, 600/1000) "
        "| ms/image | MB shipped/image |"
    )
    print("|---|---|---|")
    print(f"| CPU path: decode + resize + normalise, float32 | {1000 * (dec + prep) / n:.1f} | {mb_f32 / n:.2f} |")
    if has_raw:
        print(
            "| GPU path: decode + uint8 tensor (resize/normalise on the device) "
            f"| {1000 * (dec + raw) / n:.1f} | {mb_u8 / n:.2f} |"
        )
    else:
        print("| GPU path | (not in this checkout) | |")

    # 2. host syncs
    model = build_detector(cfg, seed=0)
    params = RoisParams(min_size=128, max_size=200, rpn_post_nms_top_n=300, feature_dtype="float32")
    rgbs = [decode_image(p).rgb for p in paths[:4]]
    print(
        "\n| host syncs (R-101 C4, 300 proposals) | images | per forward | per packing (selection + copies) | kinds |"
    )
    print("|---|---|---|---|---|")
    for k in (1, 4):
        preps = [prepare_image(r, min_size=128, max_size=200, pixel_mean=cfg.pixel_mean) for r in rgbs[:k]]
        with syncs.count_host_syncs() as fwd:
            dets = R.detect_batch(model, preps, params, torch.device("cpu"))
        with syncs.count_host_syncs() as pk:
            R.pack_batch(dets, params, model.cfg)
        kinds = "; ".join(f"{name}: {fwd.get(name, 0)} + {pk.get(name, 0)}" for name in sorted(set(fwd) | set(pk)))
        print(f"| {'batch' if k > 1 else 'single'} | {k} | {sum(fwd.values())} | {sum(pk.values())} | {kinds} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
