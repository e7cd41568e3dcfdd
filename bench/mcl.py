"""MCL's two presets at the paper's sizes: parameters without embeddings, CPU training-step time
and peak memory.

Data: the synthetic Amazon-home-shaped store of bench/train.py (product texts of 128 tokens,
reviews of 20..128 tokens, 10..40 reviews per product capped at 64, 300-d vectors over a 20k
vocabulary, up to 36 boxes x 2048 per image, images on half the reviews), read back through the
store views. Each preset runs in a fresh forked process: batches are loaded first, then
`--steps` timed training steps (forward, ranking + contrastive loss, backward, Adam) after one
warm-up step, with the preset's model config and its ranking margin. Prints step time,
reviews/s, the peak RSS of the process and how much it grew during the steps (activations,
gradients, Adam state), then the mean time of an inference forward (eval mode, no graph) over
the same batches. Wall-clock step times on the shared 2-core VM swing several-fold with the
other jobs' load; the CPU seconds of the process (time.process_time, all threads) are the
load-independent figure: wall ~ CPU s / (cores this process actually gets).

    OMP_NUM_THREADS=2 .venv/bin/python bench/mcl.py [--products 24] [--steps 3] [--batch-products 2]

`--learning-check` instead trains on the planted-signal data of bench/learning_check.py (60
products, seed 0, tiny widths) the baselines, the paper model and its Table 6 ablations, and
prints their held-out MAP / NDCG@3 / NDCG@5; then the paper and code presets with their whole
protocol (the preset's `train` overrides too).
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


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _make(store_root: str, products: int):
    from models.synthetic import make_synthetic

    return make_synthetic(
        store_root, "bench-home", n_products=products, reviews_per_product=(10, 40), vocab_size=20000,
        embed_dim=300, n_topics=32, roi_dim=2048, max_boxes=36, image_prob=0.5, review_len=(20, 128),
        product_len=128, split_shares=(0.8, 0.1, 0.1), seed=0,
    )


def step_job(store_root: str, products: int, preset: str, steps: int, batch_products: int, q) -> None:
    import numpy as np
    import torch

    from models.config import DataConfig
    from models.data import make_loader, train_plan
    from models.layers import count_parameters
    from models.losses import ranking_loss
    from models.mcl import MCL
    from models.samplers import PairwiseSampler, label_frequency_weights
    from models.trainer import trainable_parameters

    try:
        data = _make(store_root, products).store_bundle()
        src = data.split("train")
        plan = train_plan(src, batch_products=batch_products, max_reviews=64,
                          rng=np.random.default_rng(0))[: steps + 1]
        batches = list(make_loader(src, plan, DataConfig(), num_workers=0))
        p = MCL.preset(preset)
        torch.manual_seed(0)
        model = MCL.from_config(p["model_cfg"], data.embeddings)
        model.set_dataset_threshold(data.threshold)
        params = trainable_parameters(model)
        opt = torch.optim.Adam(params, lr=1e-4)
        t = p["train"]
        sampler = PairwiseSampler(label_weights=label_frequency_weights(data.train_labels),
                                  min_gap=t.get("min_gap", 2.0),
                                  weight_mode=t.get("negative_weights", "sampling"))
        rng = np.random.default_rng(0)
        times, cpu, revs = [], [], 0
        rss0 = _rss_mib()
        for i, b in enumerate(batches):
            inst = sampler.sample(b.labels.numpy(), b.rev_product.numpy(), rng)
            b.instances = torch.from_numpy(inst.index)
            b.instance_weights = torch.from_numpy(inst.weights)
            t0, c0 = time.perf_counter(), time.process_time()
            model.train()
            out = model(b)
            loss = ranking_loss(out.scores, b.labels, b.instances, b.instance_weights,
                                margin=t.get("margin", "label"), fixed_margin=t.get("fixed_margin", 1.0),
                                reduction=t.get("ranking_reduction", "mean"))
            loss = loss + sum(out.aux_losses.values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if i > 0:  # the first step warms up allocators
                times.append(dt)
                cpu.append(dc)
                revs += b.num_reviews
        grew_train = _peak_mib() - rss0
        model.eval()  # inference forwards (no dropout, no graph) over the same batches
        with torch.no_grad():
            model(batches[0])
            c0 = time.process_time()
            for b in batches[1:]:
                model(b)
            eval_cpu = (time.process_time() - c0) / max(len(batches) - 1, 1)
        q.put({"preset": preset, "steps": len(times), "step_s": float(np.mean(times)),
               "step_cpu_s": float(np.mean(cpu)), "eval_cpu_s": eval_cpu,
               "reviews_per_s": revs / sum(times), "params_wo_emb": count_parameters(model),
               "trainable": sum(x.numel() for x in params), "peak_mib": _peak_mib(),
               "grew_mib": grew_train, "layers": model.config.interaction_layers})
    except Exception as e:  # report and go on
        q.put({"preset": preset, "error": f"{type(e).__name__}: {e}"})


def run_child(*args):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=step_job, args=(*args, q))
    p.start()
    res = q.get()
    p.join()
    return res


def learning_check() -> None:
    import torch

    from models.mcl import MCL
    from models.synthetic import make_synthetic, train_and_evaluate

    torch.set_num_threads(1)
    data = make_synthetic(n_products=60, seed=0)
    tiny = {"embed_dim": 16, "roi_dim": 32, "hidden": 16, "heads": 2, "dropout": 0.0}
    runs = [("length", "length", {}), ("random", "random", {}), ("mcl paper model", "mcl", {"model_cfg": tiny})]
    runs += [(f"mcl {name}", "mcl", {"model_cfg": {**tiny, **switch}})
             for name, switch in MCL.ABLATIONS.items()]
    runs += [(f"mcl {name} preset, whole protocol", "mcl",  # tiny widths over the preset's
              {**MCL.preset(name)["train"], "model_cfg": {**MCL.preset(name)["model_cfg"], **tiny}})
             for name in ("paper", "code")]
    print("| model | MAP | NDCG@3 | NDCG@5 | train s |\n|---|---|---|---|---|")
    for label, model, cfg in runs:
        t0 = time.perf_counter()
        m = train_and_evaluate(model, data, cfg)
        print(f"| {label} | {m['MAP']:.3f} | {m['NDCG@3']:.3f} | {m['NDCG@5']:.3f} | "
              f"{time.perf_counter() - t0:.0f} |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--products", type=int, default=24, help="products in total (80%% train)")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per preset")
    ap.add_argument("--batch-products", type=int, default=2)
    ap.add_argument("--presets", default="paper,code")
    ap.add_argument("--learning-check", action="store_true")
    args = ap.parse_args(argv)
    if args.learning_check:
        learning_check()
        return 0
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, python {platform.python_version()}, "
          f"load average at start {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="mrhp-bench-mcl-") as tmp:
        t0 = time.perf_counter()
        data = _make(tmp, args.products)
        print(f"synthetic Amazon-home-shaped data: {args.products} products, {len(data.records.reviews)} "
              f"reviews, store written in {time.perf_counter() - t0:.1f} s")
        del data
        print(
            f"\n| MCL preset (train step, {args.batch_products} products per batch) | D | step s | reviews/s | "
            "params w/o embeddings | trainable | peak RSS MiB | RSS growth in steps MiB | step CPU s | "
            "eval forward CPU s |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for preset in args.presets.split(","):
            r = run_child(tmp, args.products, preset, args.steps, args.batch_products)
            if "error" in r:
                print(f"| {preset} | failed: {r['error']} | | | | | | | | |")
                continue
            print(f"| {preset} | {r['layers']} | {r['step_s']:.2f} | {r['reviews_per_s']:.0f} | "
                  f"{r['params_wo_emb']:,} | {r['trainable']:,} | {r['peak_mib']:.0f} | {r['grew_mib']:.0f} | "
                  f"{r['step_cpu_s']:.2f} | {r['eval_cpu_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
