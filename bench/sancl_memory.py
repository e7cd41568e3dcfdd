"""SANCL beside its paper's efficiency claims: parameters without embeddings and peak memory of
a training step at batch 32 (Sec. 5.1: 1.41M parameters, ~2.4 GB GPU memory on Amazon home).

Data: the planted-signal generator at Amazon-home shapes (as bench/train.py): product texts of
128 tokens, reviews of 20..128 tokens, 10..40 reviews per product (at most 64 per product in a
training batch, the trainer's default), 300-d word vectors over a 20k vocabulary, review images
on half the reviews, up to 36 boxes x 2048 per image. One batch = 32 products (the `paper`
preset's `batch_products: 32`) with MCR pairwise instances (7 negatives).

For each configuration a fresh forked process builds the data and the model, records its RSS,
runs two training steps (forward, ranking + kappa * CPC, backward, Adam) on the same batch and
reports the peak RSS and the step's increment over the pre-step RSS.

    OMP_NUM_THREADS=2 .venv/bin/python bench/sancl_memory.py [--products 40] [--batch-products 32]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CONFIGS = {
    "paper (home)": ("paper", {}),
    "code (home)": ("code", {}),
    "paper, text-only": ("paper", {"text_only": True}),
}


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def job(products: int, batch_products: int, preset: str, extra: dict, q) -> None:
    import numpy as np
    import torch

    from models.config import DataConfig
    from models.data import make_loader, train_plan
    from models.layers import count_parameters
    from models.losses import ranking_loss
    from models.registry import build_model
    from models.samplers import PairwiseSampler, label_frequency_weights
    from models.sancl import SANCL
    from models.synthetic import make_synthetic

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    data = make_synthetic(None, "bench-home", n_products=products, reviews_per_product=(10, 40),
                          vocab_size=20000, embed_dim=300, n_topics=32, roi_dim=2048, max_boxes=36,
                          image_prob=0.5, review_len=(20, 128), product_len=128,
                          split_shares=(0.9, 0.05, 0.05), seed=0).bundle
    src = data.split("train")
    plan = train_plan(src, batch_products=batch_products, max_reviews=64, rng=np.random.default_rng(0))
    batch = next(iter(make_loader(src, plan[:1], DataConfig(), num_workers=0)))
    p = SANCL.preset(preset, category="home")
    model = build_model("sancl", {**p["model_cfg"], **extra}, data.embeddings).train()
    sampler = PairwiseSampler(label_weights=label_frequency_weights(data.train_labels))
    inst = sampler.sample(batch.labels.numpy(), batch.rev_product.numpy(), np.random.default_rng(0))
    batch.instances = torch.from_numpy(inst.index)
    batch.instance_weights = torch.from_numpy(inst.weights)
    opt = torch.optim.Adam([q_ for q_ in model.parameters() if q_.requires_grad], lr=p["train"]["lr"])
    before = _rss_mib()
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        out = model(batch)
        loss = ranking_loss(out.scores, batch.labels, batch.instances, batch.instance_weights,
                            margin=p["train"]["margin"], fixed_margin=p["train"].get("fixed_margin", 1.0))
        loss = loss + sum(out.aux_losses.values(), torch.zeros(()))
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    q.put({"params": count_parameters(model), "products": batch.num_products,
           "reviews": batch.num_reviews, "instances": int(inst.count),
           "rois": int(batch.rev_roi_mask.sum() + batch.prod_roi_mask.sum()),
           "before_mib": before, "peak_mib": _peak_mib(), "step_s": times[-1],
           "aux": sorted(out.aux_losses)})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--products", type=int, default=40, help="products in total (90%% train)")
    ap.add_argument("--batch-products", type=int, default=32)
    args = ap.parse_args(argv)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, python {platform.python_version()}, "
          f"load average at start {os.getloadavg()[0]:.1f}")
    print("\n| configuration | params w/o embeddings | products / reviews / instances / ROIs in the batch "
          "| RSS before step MiB | peak RSS MiB | step increment MiB | step s |")
    print("|---|---|---|---|---|---|---|")
    ctx = mp.get_context("fork")
    for label, (preset, extra) in CONFIGS.items():
        q = ctx.Queue()
        proc = ctx.Process(target=job, args=(args.products, args.batch_products, preset, extra, q))
        proc.start()
        r = q.get()
        proc.join()
        print(f"| {label} | {r['params']:,} | {r['products']} / {r['reviews']} / {r['instances']} / "
              f"{r['rois']} | {r['before_mib']:.0f} | {r['peak_mib']:.0f} | "
              f"{r['peak_mib'] - r['before_mib']:.0f} | {r['step_s']:.1f} |")
    print("\npaper (Sec. 5.1): 1,410,000 parameters without the embedding layer; ~2.4 GB average GPU "
          "memory in training on Amazon Home & Kitchen (batch 32, Tesla V100); MCR 2.63M / 13.7 GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
