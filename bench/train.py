"""Training throughput on a synthetic dataset shaped like Amazon-MRHP home (scaled down in count).

Per-item shapes follow the real data: product texts of 128 tokens, reviews of 20..128 tokens,
10..40 reviews per product (home averages ~26), 300-d word vectors over a 20k vocabulary,
1..2 product images and review images on half the reviews, up to 36 boxes x 2048 per image
(the loader keeps 32 per image, 128 per item). The data is written to a real feature store
and read back through the store views, as in training.

Prints, for the data loader alone (0 and 2 workers; start-up to the first batch reported apart
from the steady rate) and for a training step of every
registered model (fed pre-loaded batches, so the step excludes loading): batches/s,
reviews/s, step time and the peak RSS of a fresh process; plus every model's parameter count
without its embedding tables.

    OMP_NUM_THREADS=2 .venv/bin/python bench/train.py [--products 40] [--steps 4] [--models text-gru,sancl]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _make(store_root: str, products: int):
    from models.synthetic import make_synthetic

    return make_synthetic(
        store_root, "bench-home", n_products=products, reviews_per_product=(10, 40), vocab_size=20000,
        embed_dim=300, n_topics=32, roi_dim=2048, max_boxes=36, image_prob=0.5, review_len=(20, 128),
        product_len=128, split_shares=(0.8, 0.1, 0.1), seed=0,
    )


def _plan(source, batch_products: int):
    import numpy as np

    from models.data import train_plan

    return train_plan(source, batch_products=batch_products, max_reviews=64, rng=np.random.default_rng(0))


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def loader_job(store_root: str, products: int, workers: int, batch_products: int, q) -> None:
    import torch

    from models.config import DataConfig
    from models.data import make_loader

    torch.set_num_threads(1)
    data = _make(store_root, products).store_bundle()
    src = data.split("train")
    plan = _plan(src, batch_products)
    t0 = time.perf_counter()
    n_rev = n_b = 0
    t_first = None
    for b in make_loader(src, plan, DataConfig(), num_workers=workers):
        if t_first is None:
            t_first = time.perf_counter()  # worker start-up and the first batch
        else:
            n_rev += b.num_reviews
            n_b += 1
    dt = time.perf_counter() - t_first
    q.put({"workers": workers, "batches": n_b, "reviews": n_rev, "seconds": dt, "first_s": t_first - t0,
           "peak_mib": _peak_mib()})


def step_job(store_root: str, products: int, model_name: str, steps: int, batch_products: int, q) -> None:
    import numpy as np
    import torch

    from models.config import DataConfig
    from models.data import make_loader
    from models.losses import ranking_loss
    from models.registry import build_model
    from models.samplers import PairwiseSampler, label_frequency_weights
    from models.trainer import trainable_parameters

    try:
        data = _make(store_root, products).store_bundle()
        src = data.split("train")
        plan = _plan(src, batch_products)[: steps + 1]
        batches = list(make_loader(src, plan, DataConfig(), num_workers=0))
        model = build_model(model_name, {}, data.embeddings)
        params = trainable_parameters(model)
        emb = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
        n_params = sum(p.numel() for p in model.parameters()) - emb
        sampler = PairwiseSampler(label_weights=label_frequency_weights(data.train_labels))
        rng = np.random.default_rng(0)
        opt = torch.optim.Adam(params, lr=1e-4) if params else None
        times, revs = [], 0
        for i, b in enumerate(batches):
            inst = sampler.sample(b.labels.numpy(), b.rev_product.numpy(), rng)
            b.instances = torch.from_numpy(inst.index)
            b.instance_weights = torch.from_numpy(inst.weights)
            t0 = time.perf_counter()
            model.train()
            out = model(b)
            if opt is not None:
                loss = ranking_loss(out.scores, b.labels, b.instances, b.instance_weights)
                loss = loss + sum(out.aux_losses.values()) if out.aux_losses else loss
                opt.zero_grad()
                loss.backward()
                opt.step()
            dt = time.perf_counter() - t0
            if i > 0:  # first step warms up allocators
                times.append(dt)
                revs += b.num_reviews
        q.put({"model": model_name, "steps": len(times), "step_s": float(np.mean(times)),
               "reviews_per_s": revs / sum(times), "params_wo_emb": n_params,
               "trainable": sum(p.numel() for p in params), "peak_mib": _peak_mib()})
    except Exception as e:  # report and go on with the other models
        q.put({"model": model_name, "error": f"{type(e).__name__}: {e}"})


def run_child(target, *args):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    res = q.get()
    p.join()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--products", type=int, default=40, help="products in total (80%% train)")
    ap.add_argument("--steps", type=int, default=4, help="timed training steps per model")
    ap.add_argument("--batch-products", type=int, default=2)
    ap.add_argument("--models", default=None, help="comma-separated (default: every registered model); "
                    "'none' measures the loader only")
    args = ap.parse_args(argv)

    from models.registry import available_models

    models = (
        ([] if args.models == "none" else args.models.split(","))
        if args.models
        else [m for m in available_models() if not m.startswith("test-")]
    )
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads from OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, python {platform.python_version()}, "
          f"load average at start {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="mrhp-bench-train-") as tmp:
        t0 = time.perf_counter()
        data = _make(tmp, args.products)
        n_rev = len(data.records.reviews)
        print(f"synthetic Amazon-home-shaped data: {args.products} products, {n_rev} reviews, "
              f"written to a store in {time.perf_counter() - t0:.1f} s")
        del data
        print(f"\n| data loader (batches of {args.batch_products} products) | first batch s | batches after it | "
              f"reviews/s | batches/s | peak RSS MiB |")
        print("|---|---|---|---|---|---|")
        for w in (0, 2):
            r = run_child(loader_job, tmp, args.products, w, args.batch_products)
            print(f"| {w} workers | {r['first_s']:.2f} | {r['batches']} | {r['reviews'] / r['seconds']:.0f} | "
                  f"{r['batches'] / r['seconds']:.2f} | {r['peak_mib']:.0f} |")
        print(f"\n| model (train step, batch of {args.batch_products} products) | step s | reviews/s | "
              f"params w/o embeddings | trainable | peak RSS MiB |")
        print("|---|---|---|---|---|---|")
        for m in models:
            r = run_child(step_job, tmp, args.products, m, args.steps, args.batch_products)
            if "error" in r:
                print(f"| {m} | failed: {r['error']} | | | | |")
                continue
            print(f"| {m} | {r['step_s']:.2f} | {r['reviews_per_s']:.0f} | {r['params_wo_emb']:,} | "
                  f"{r['trainable']:,} | {r['peak_mib']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
