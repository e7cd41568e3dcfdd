"""Behaviour every paper model shares (MCL, MM-SS, SANCL), pinned with tiny configs and tiny
hand-built batches: output shapes, gradients, overfitting one batch, empty items, config errors.

`make_batch` is the helper the per-model test files import."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from models.batch import Batch
from models.layers import count_parameters
from models.losses import ranking_loss
from models.registry import available_models, build_model
from pipeline.errors import ConfigError

ROI_DIM = 2048
VOCAB = 30
TINY = {
    "mcl": {"vocab_size": VOCAB, "embed_dim": 8, "hidden": 8, "heads": 2,
            "interaction_layers": 2, "dropout": 0.0, "finetune_embeddings": False,
            "helpful_threshold": 1.0},
    "mmss": {"vocab_size": VOCAB, "embed_dim": 8, "hidden": 8, "heads": 2, "dropout": 0.0},
    "sancl": {"vocab_size": VOCAB, "embed_dim": 8, "hidden": 8, "heads": 2, "dropout": 0.0},
}
MODELS = sorted(TINY)


def make_batch(*, products: int = 2, reviews_per_product: int = 4, lp: int = 6, lr: int = 5,
               np_: int = 3, nr: int = 2, seed: int = 0, empty_review_rois: tuple[int, ...] = (),
               empty_review_tokens: tuple[int, ...] = (), empty_product_rois: tuple[int, ...] = (),
               empty_product_tokens: tuple[int, ...] = ()) -> Batch:
    """A tiny batch: random left-aligned tokens and ROIs, labels 0..4 per review, pairwise
    instances (each review against every review of its product at least 2 labels lower)."""
    g = torch.Generator().manual_seed(seed)
    P, R = products, products * reviews_per_product

    def tokens(n, L, empty):
        lengths = torch.randint(1, L + 1, (n,), generator=g)
        for i in empty:
            lengths[i] = 0
        mask = torch.arange(L)[None, :] < lengths[:, None]  # (n, L)
        ids = torch.randint(2, VOCAB, (n, L), generator=g) * mask
        return ids.long(), mask

    def rois(n, N, empty):
        counts = torch.randint(1, N + 1, (n,), generator=g)
        for i in empty:
            counts[i] = 0
        mask = torch.arange(N)[None, :] < counts[:, None]  # (n, N)
        feats = torch.rand(n, N, ROI_DIM, generator=g) * mask.unsqueeze(-1)
        return feats, mask

    pt, ptm = tokens(P, lp, empty_product_tokens)
    rt, rtm = tokens(R, lr, empty_review_tokens)
    pv, pvm = rois(P, np_, empty_product_rois)
    rv, rvm = rois(R, nr, empty_review_rois)
    labels = torch.tensor([float(i % 5) for i in range(R)])
    rev_product = torch.arange(P).repeat_interleave(reviews_per_product)
    inst, w = [], []
    for i in range(R):
        negs = [j for j in range(R) if rev_product[j] == rev_product[i] and labels[j] <= labels[i] - 2]
        if negs:
            inst.append([i] + [negs[k % len(negs)] for k in range(3)])
            w.append([1.0] * 3)
    return Batch(
        prod_tokens=pt, prod_token_mask=ptm, prod_rois=pv, prod_roi_mask=pvm,
        rev_tokens=rt, rev_token_mask=rtm, rev_rois=rv, rev_roi_mask=rvm,
        rev_probe_mask=(torch.rand(R, lr, generator=g) > 0.5).float() * rtm,
        rev_product=rev_product, labels=labels, rev_length=rtm.sum(1).float(),
        instances=torch.tensor(inst, dtype=torch.long).reshape(-1, 4),
        instance_weights=torch.tensor(w).reshape(-1, 3),
        product_ids=[f"p{i}" for i in range(P)], review_ids=[f"r{i}" for i in range(R)],
    )


def tiny(name: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, {**TINY[name], **extra})


def total_loss(model, batch: Batch) -> torch.Tensor:
    out = model(batch)
    loss = ranking_loss(out.scores, batch.labels, batch.instances, batch.instance_weights)
    return loss + sum(out.aux_losses.values(), torch.zeros(()))


def test_every_paper_model_is_registered():
    assert set(MODELS) <= set(available_models())


@pytest.mark.parametrize("name", MODELS)
def test_scores_have_one_value_per_review(name):
    batch = make_batch(products=3, reviews_per_product=4)
    model = tiny(name)
    out = model(batch)
    assert out.scores.shape == (12,)
    assert torch.isfinite(out.scores).all()
    for key, v in out.aux_losses.items():
        assert v.shape == (), key
        assert torch.isfinite(v), key


@pytest.mark.parametrize("name", MODELS)
def test_backward_reaches_every_trainable_parameter_and_not_the_frozen_tables(name):
    model = tiny(name)
    model.train()
    batch = make_batch()
    if hasattr(model, "on_epoch_start"):
        model.on_epoch_start(0)
        model(batch)  # first epoch: pseudo labels equal the global label (MM-SS)
        model.on_epoch_start(1)
    total_loss(model, batch).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient reaches {missing}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients in {bad}"
    for n, p in model.named_parameters():
        if n.startswith("emb_"):
            assert not p.requires_grad and p.grad is None, n


@pytest.mark.parametrize("name", MODELS)
def test_finetune_embeddings_makes_the_tables_trainable(name):
    model = tiny(name, finetune_embeddings=True)
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("emb_"))


@pytest.mark.parametrize("name", MODELS)
def test_items_without_rois_or_tokens_get_finite_scores_and_gradients(name):
    batch = make_batch(empty_review_rois=(0, 1, 5), empty_review_tokens=(2, 5),
                       empty_product_rois=(1,), empty_product_tokens=(0,))
    model = tiny(name)
    model.train()
    loss = total_loss(model, batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(batch).scores).all()


@pytest.mark.parametrize("name", MODELS)
def test_a_batch_where_nothing_has_images_gives_finite_scores(name):
    batch = make_batch(empty_review_rois=tuple(range(8)), empty_product_rois=(0, 1))
    model = tiny(name)
    loss = total_loss(model, batch)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", MODELS)
def test_bf16_autocast_with_empty_items_stays_finite(name):
    batch = make_batch(empty_review_rois=(0, 1), empty_review_tokens=(2,), empty_product_rois=(1,))
    model = tiny(name)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    loss = ranking_loss(out.scores.float(), batch.labels, batch.instances, batch.instance_weights)
    loss = loss + sum((v.float() for v in out.aux_losses.values()), torch.zeros(()))
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.gpu
@pytest.mark.parametrize("name", MODELS)
def test_cuda_bf16_forward_backward_is_finite(name):
    batch = make_batch(empty_review_rois=(0,), empty_review_tokens=(2,)).to("cuda")
    model = tiny(name).cuda().train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(batch)
    loss = ranking_loss(out.scores.float(), batch.labels, batch.instances, batch.instance_weights)
    loss = loss + sum((v.float() for v in out.aux_losses.values()), torch.zeros((), device="cuda"))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", MODELS)
def test_one_small_batch_can_be_overfitted(name):
    batch = make_batch(products=2, reviews_per_product=5)
    model = tiny(name)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for step in range(150):
        if hasattr(model, "on_epoch_start"):
            model.on_epoch_start(step)
        out = model(batch)
        rank = ranking_loss(out.scores, batch.labels, batch.instances, batch.instance_weights)
        loss = rank + sum(out.aux_losses.values(), torch.zeros(()))
        first = float(rank.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        final = float(ranking_loss(model(batch).scores, batch.labels, batch.instances,
                                   batch.instance_weights))
    assert first > 0.5
    assert final < 0.05 * first, (first, final)


@pytest.mark.parametrize("name", MODELS)
def test_unknown_config_key_raises_config_error_naming_it(name):
    with pytest.raises(ConfigError, match="hiden"):
        build_model(name, {**TINY[name], "hiden": 3})


@pytest.mark.parametrize("name", MODELS)
def test_embedding_matrices_are_used_as_given(name):
    rng = np.random.default_rng(0)
    emb = {"prd": rng.normal(size=(11, 8)).astype(np.float32),
           "rvw": rng.normal(size=(13, 8)).astype(np.float32)}
    cfg = {k: v for k, v in TINY[name].items() if k != "vocab_size"}
    model = build_model(name, cfg, emb)
    assert torch.equal(model.emb_p.weight, torch.from_numpy(emb["prd"]))
    assert torch.equal(model.emb_r.weight, torch.from_numpy(emb["rvw"]))
    with pytest.raises(ConfigError, match="embed_dim"):
        build_model(name, {**cfg, "embed_dim": 5}, emb)


@pytest.mark.parametrize("name", MODELS)
def test_embed_dim_defaults_to_the_width_of_the_given_matrices(name):
    rng = np.random.default_rng(0)
    emb = {"prd": rng.normal(size=(VOCAB, 6)).astype(np.float32),
           "rvw": rng.normal(size=(VOCAB, 6)).astype(np.float32)}
    cfg = {k: v for k, v in TINY[name].items() if k not in ("vocab_size", "embed_dim")}
    model = build_model(name, cfg, emb)
    assert model.config.embed_dim == 6
    assert model(make_batch()).scores.shape == (8,)


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_round_trip_gives_identical_scores(name):
    batch = make_batch()
    a, b = tiny(name), tiny(name)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.1)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.allclose(a(batch).scores, b(batch).scores)


@pytest.mark.parametrize("name", MODELS)
def test_parameter_count_at_paper_dims_is_reported(name, capsys):
    model = build_model(name, {"vocab_size": 10})
    n = count_parameters(model)
    print(f"{name}: {n / 1e6:.3f}M parameters without embeddings")
    assert n > 100_000 and math.isfinite(n)


# --- learning check on the trainer's planted-signal data (models.synthetic) ------------------
# Each model file calls `learning_check` (one model per file keeps every file well under a
# minute on a shared 2-core machine).
@functools.lru_cache(maxsize=1)
def _planted():
    from models.synthetic import make_synthetic, train_and_evaluate

    data = make_synthetic(n_products=60, seed=0)
    return data, {name: train_and_evaluate(name, data) for name in ("length", "random")}


def learning_check(name: str, **extra_cfg) -> None:
    """Train `name` with tiny dims on the planted-signal data; assert it beats `length` and
    `random` on held-out products by 0.1 in MAP and NDCG@3."""
    from models.synthetic import train_and_evaluate

    torch.set_num_threads(1)
    data, base = _planted()
    cfg = {"embed_dim": 16, "roi_dim": 32, "hidden": 16, "heads": 2, "dropout": 0.0, **extra_cfg}
    got = train_and_evaluate(name, data, {"model_cfg": cfg})
    for metric in ("MAP", "NDCG@3"):
        best_baseline = max(base["length"][metric], base["random"][metric])
        assert got[metric] > best_baseline + 0.1, (metric, got, base)
