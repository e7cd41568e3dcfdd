"""Held-out metrics of every model on the planted-signal synthetic data (the tests' learning check).

Usage: OMP_NUM_THREADS=1 .venv/bin/python bench/learning_check.py [--products 60] [--seed 0]
Prints MAP / NDCG@3 / NDCG@5 on the test products for the baselines and the paper models,
trained with the tiny dimensions the tests use.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.synthetic import make_synthetic, train_and_evaluate  # noqa: E402

TINY = {"embed_dim": 16, "roi_dim": 32, "hidden": 16, "heads": 2, "dropout": 0.0}
CONFIGS = {
    "length": {},
    "random": {},
    "text-gru": {"model_cfg": {"hidden": 16, "mlp_hidden": 32}},
    "mcl": {"model_cfg": TINY},
    "mmss": {"model_cfg": TINY},
    "sancl": {"model_cfg": TINY},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--products", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = make_synthetic(n_products=args.products, seed=args.seed)
    print(f"planted-signal data: {args.products} products, seed {args.seed}")
    print(f"{'model':10s} {'MAP':>7s} {'NDCG@3':>7s} {'NDCG@5':>7s} {'train s':>8s}")
    for name, cfg in CONFIGS.items():
        t0 = time.perf_counter()
        m = train_and_evaluate(name, data, cfg)
        print(f"{name:10s} {m['MAP']:7.3f} {m['NDCG@3']:7.3f} {m['NDCG@5']:7.3f} "
              f"{time.perf_counter() - t0:8.1f}")


if __name__ == "__main__":
    main()
