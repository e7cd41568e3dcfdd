"""MM-SS training-step time and parameter counts, both text paths, at the paper's dimensions.

A synthetic in-memory batch shaped like Amazon-MRHP home (as bench/train.py): `--products`
products with `--reviews` reviews each, product texts of 128 tokens, reviews of 20..128 tokens,
two product images and images on half the reviews at 32 boxes x 2048 per image. The `glove`
preset reads 300-d word vectors (20k vocabulary, frozen) through the GRU; the `paper` preset
reads 768-d BERT-base token features (one extra [CLS] position) through the projection. The
step is forward + Eq. 13 ranking loss + Eq. 14-15 subtask loss + backward + Adam, timed in
epoch 2 (SSP-Label and EWMA active) after one warm-up step.

    OMP_NUM_THREADS=2 .venv/bin/python bench/mmss_step.py [--products 2] [--reviews 24] [--steps 4]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.batch import Batch  # noqa: E402
from models.layers import count_parameters  # noqa: E402
from models.losses import ranking_loss  # noqa: E402
from models.mmss import MMSS  # noqa: E402
from models.samplers import PairwiseSampler  # noqa: E402

VOCAB, EMB, BERT_DIM, ROI = 20000, 300, 768, 2048


def make_batch(P: int, per: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    R = P * per

    def text(n, L, lo):
        lengths = torch.randint(lo, L + 1, (n,), generator=g)
        mask = torch.arange(L)[None, :] < lengths[:, None]
        return torch.randint(1, VOCAB, (n, L), generator=g) * mask, mask

    def rois(n, N, p_img):
        has = torch.rand(n, generator=g) < p_img
        mask = (torch.arange(N)[None, :] < N) & has[:, None]
        return torch.randn(n, N, ROI, generator=g).abs() * mask.unsqueeze(-1), mask

    pt, ptm = text(P, 128, 128)
    rt, rtm = text(R, 128, 20)
    pv, pvm = rois(P, 64, 1.0)
    rv, rvm = rois(R, 32, 0.5)
    labels = torch.randint(0, 5, (R,), generator=g).float()
    rev_product = torch.arange(P).repeat_interleave(per)
    inst = PairwiseSampler(mode="pairwise", num_negatives=7, min_gap=1.0, label_weights={},
                           weight_mode="none").sample(labels.numpy(), rev_product.numpy(),
                                                      np.random.default_rng(seed))

    def feats(mask):  # BERT-style: [CLS] + tokens
        m = torch.cat([torch.ones(mask.shape[0], 1, dtype=torch.bool), mask], 1)
        return torch.randn(*m.shape, BERT_DIM, generator=g) * m.unsqueeze(-1), m

    pf, pfm = feats(ptm)
    rf, rfm = feats(rtm)
    return Batch(prod_tokens=pt, prod_token_mask=ptm, prod_rois=pv, prod_roi_mask=pvm,
                 rev_tokens=rt, rev_token_mask=rtm, rev_rois=rv, rev_roi_mask=rvm,
                 rev_probe_mask=rtm.float(), rev_product=rev_product, labels=labels,
                 rev_length=rtm.sum(1).float(), instances=torch.from_numpy(inst.index),
                 instance_weights=torch.from_numpy(inst.weights),
                 product_ids=[f"p{i}" for i in range(P)], review_ids=[f"r{i}" for i in range(R)],
                 prod_text_feats=pf, prod_text_feat_mask=pfm, rev_text_feats=rf, rev_text_feat_mask=rfm)


def run(preset: str, batch: Batch, steps: int) -> tuple[int, float]:
    torch.manual_seed(0)
    p = MMSS.preset(preset)
    cfg = {**p["model_cfg"], "vocab_size": VOCAB, "embed_dim": EMB, "text_feat_dim": BERT_DIM}
    model = MMSS.from_config(cfg).train()
    opt = torch.optim.Adam(model.parameter_groups(p["train"]["lr"]), lr=p["train"]["lr"])

    def step():
        out = model(batch)
        loss = ranking_loss(out.scores, batch.labels, batch.instances, batch.instance_weights,
                            margin="fixed", fixed_margin=1.0) + sum(out.aux_losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.on_epoch_start(0)
    step()  # epoch 1 (warm-up; fills the anchor sums)
    t0 = time.perf_counter()
    for k in range(steps):
        model.on_epoch_start(1 + k)  # one epoch per step: a review's pseudo labels move once per epoch
        step()
    return count_parameters(model), (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--products", type=int, default=2)
    ap.add_argument("--reviews", type=int, default=24)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    batch = make_batch(args.products, args.reviews)
    print(f"batch: {args.products} products x {args.reviews} reviews, {int(batch.instances.shape[0])} instances")
    print(f"{'preset':8s} {'params w/o embeddings':>22s} {'step s':>8s} {'reviews/s':>10s}")
    for preset in ("paper", "glove"):
        n, dt = run(preset, batch, args.steps)
        print(f"{preset:8s} {n:22,d} {dt:8.2f} {batch.num_reviews / dt:10.1f}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
