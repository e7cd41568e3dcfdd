"""MM-SS training-step time and parameter counts, both text paths, at the paper's dimensions.

A synthetic in-memory batch shaped like Amazon-MRHP home (as bench/train.py): `--products`
products with `--reviews` reviews each, product texts of 128 tokens, reviews of 20..128 tokens,
two product images and images on half the reviews at 32 boxes x 2048 per image. The `glove`
preset reads 300-d word vectors (20k vocabulary, frozen) through the GRU; the `paper` preset
reads 768-d BERT-base token features (one extra [CLS] position) through the projection. The
step is forward + Eq. 13 ranking loss + Eq. 14-15 subtask loss + backward + Adam, timed in
epoch 2 (SSP-Label and EWMA active) after one warm-up step.

`--finetune` compares the `paper` preset reading frozen encoder features with the same preset
fine-tuning the encoder (`finetune_text_encoder: true`): the encoder (`--encoder tiny`: a random
2-layer BERT, hidden 128, 2 heads; `--encoder minilm`: all-MiniLM-L6-v2's shape, 6 layers,
hidden 384, 12 heads; random weights either way, the step time does not depend on them) runs
on the batch's word-piece ids ([CLS] pieces [SEP]) inside the step and trains at the text-encoder
lr; the frozen row reads features of the encoder's width. The encoder is attached to the model
directly (`models.text_encoder.TextEncoder`), without a manifest resource.

    OMP_NUM_THREADS=2 .venv/bin/python bench/mmss_step.py [--products 2] [--reviews 24] [--steps 4]
    OMP_NUM_THREADS=2 .venv/bin/python bench/mmss_step.py --finetune [--encoder tiny|minilm]
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
WP_VOCAB, CLS, SEP = 30522, 101, 102  # bert-base-uncased's WordPiece vocabulary size and ids
ENCODERS = {  # random-weight BertConfig shapes for --finetune
    "tiny": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 512},
    "minilm": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536},
}


def make_batch(P: int, per: int, seed: int = 0, bert_dim: int = BERT_DIM) -> Batch:
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
        return torch.randn(*m.shape, bert_dim, generator=g) * m.unsqueeze(-1), m

    def ids(mask):  # the word pieces the encoder is fed: [CLS] pieces [SEP] (the bert view's input_ids)
        n = mask.sum(1)
        m = torch.arange(mask.shape[1] + 2)[None, :] < (n + 2)[:, None]
        x = torch.randint(1000, WP_VOCAB, m.shape, generator=g) * m
        x[:, 0] = CLS
        x[torch.arange(len(n)), n + 1] = SEP
        return x, m

    pf, pfm = feats(ptm)
    rf, rfm = feats(rtm)
    pi, pim = ids(ptm)
    ri, rim = ids(rtm)
    return Batch(prod_tokens=pt, prod_token_mask=ptm, prod_rois=pv, prod_roi_mask=pvm,
                 rev_tokens=rt, rev_token_mask=rtm, rev_rois=rv, rev_roi_mask=rvm,
                 rev_probe_mask=rtm.float(), rev_product=rev_product, labels=labels,
                 rev_length=rtm.sum(1).float(), instances=torch.from_numpy(inst.index),
                 instance_weights=torch.from_numpy(inst.weights),
                 product_ids=[f"p{i}" for i in range(P)], review_ids=[f"r{i}" for i in range(R)],
                 prod_text_feats=pf, prod_text_feat_mask=pfm, rev_text_feats=rf, rev_text_feat_mask=rfm,
                 prod_text_ids=pi, prod_text_ids_mask=pim, rev_text_ids=ri, rev_text_ids_mask=rim)


def tiny_encoder(name: str):
    """A TextEncoder over a random-weight BERT of shape ENCODERS[name]."""
    import transformers

    from models.text_encoder import TextEncoder

    torch.manual_seed(1)
    cfg = transformers.BertConfig(vocab_size=WP_VOCAB, max_position_embeddings=512, **ENCODERS[name])
    return TextEncoder(transformers.BertModel(cfg), sep_id=SEP).train()


def prepare(preset: str, batch: Batch, *, encoder: str | None = None, bert_dim: int = BERT_DIM):
    """(parameters w/o embeddings, timed_step): the model of `preset` after its warm-up step
    (epoch 1, fills the anchor sums); timed_step(k) runs epoch 2 + k's step and returns seconds."""
    torch.manual_seed(0)
    p = MMSS.preset(preset)
    cfg = {**p["model_cfg"], "vocab_size": VOCAB, "embed_dim": EMB, "text_feat_dim": bert_dim}
    model = MMSS.from_config(cfg).train()
    if encoder is not None:  # finetune_text_encoder: true, the encoder attached without a manifest
        model.text_encoder = tiny_encoder(encoder)
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

    def timed_step(k: int) -> float:
        model.on_epoch_start(1 + k)  # one epoch per step: a review's pseudo labels move once per epoch
        t0 = time.perf_counter()
        step()
        return time.perf_counter() - t0

    return count_parameters(model), timed_step


def run(preset: str, batch: Batch, steps: int) -> tuple[int, float]:
    n, timed_step = prepare(preset, batch)
    return n, sum(timed_step(k) for k in range(steps)) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--products", type=int, default=2)
    ap.add_argument("--reviews", type=int, default=24)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--finetune", action="store_true",
                    help="paper preset: frozen encoder features vs fine-tuning the encoder in the step")
    ap.add_argument("--encoder", choices=sorted(ENCODERS), default="tiny")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    if args.finetune:
        # both models built, then their steps alternated (frozen, finetune, frozen, ...) so that
        # a change in the machine's load falls on both; the median step is reported
        dim = ENCODERS[args.encoder]["hidden_size"]
        batch = make_batch(args.products, args.reviews, bert_dim=dim)
        print(f"batch: {args.products} products x {args.reviews} reviews, {int(batch.instances.shape[0])} "
              f"instances; encoder {args.encoder} {ENCODERS[args.encoder]}")
        rows = [(f"frozen {dim}-d features", *prepare("paper", batch, bert_dim=dim)),
                (f"finetune {args.encoder}", *prepare("paper", batch, encoder=args.encoder, bert_dim=dim))]
        times: list[list[float]] = [[], []]
        for k in range(args.steps):
            for i, (_, _, timed_step) in enumerate(rows):
                times[i].append(timed_step(k))
        print(f"{'paper preset':26s} {'params w/o embeddings':>22s} {'median step s':>14s} {'min':>6s} "
              f"{'max':>6s} {'reviews/s':>10s}")
        for (label, n, _), ts in zip(rows, times, strict=True):
            med = float(np.median(ts))
            print(f"{label:26s} {n:22,d} {med:14.2f} {min(ts):6.2f} {max(ts):6.2f} {batch.num_reviews / med:10.1f}")
        print(f"finetune / frozen: {np.median(times[1]) / np.median(times[0]):.2f}x (medians), "
              f"{min(times[1]) / min(times[0]):.2f}x (fastest steps); load average at the end "
              f"{os.getloadavg()[0]:.1f}")
        return
    batch = make_batch(args.products, args.reviews)
    print(f"batch: {args.products} products x {args.reviews} reviews, {int(batch.instances.shape[0])} instances")
    print(f"{'preset':8s} {'params w/o embeddings':>22s} {'step s':>8s} {'reviews/s':>10s}")
    for preset in ("paper", "glove"):
        n, dt = run(preset, batch, args.steps)
        print(f"{preset:8s} {n:22,d} {dt:8.2f} {batch.num_reviews / dt:10.1f}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
