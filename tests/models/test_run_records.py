"""Run folders explain themselves: run.json provenance (resolved model config, preset, git commit
and dirty flag, package versions, start/end times, store view fingerprints with random-init
flagged), best.pt without optimizer state, plots drawn once at the end (with seed bands, none for
parameter-free baselines), a progress bar per epoch, and the min_gap message."""
from __future__ import annotations

import json
import re
from datetime import datetime

import numpy as np
import pytest
import torch

from models.data import DataBundle, InMemorySource, ProductItem, ReviewItem, bundle_from_records
from models.runs import (
    RunPaths,
    _loss_series,
    _mean_band,
    load_checkpoint,
    run_is_random_init,
    view_fingerprints,
    write_seed_plots,
)
from models.samplers import no_instance_message
from models.synthetic import make_synthetic, synthetic_train_config
from models.trainer import train
from pipeline.errors import TrainingError


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    root = tmp_path_factory.mktemp("rec")
    data = make_synthetic(root / "store", "synth", n_products=12, reviews_per_product=(4, 6), vocab_size=40,
                          embed_dim=8, roi_dim=8, seed=2)
    bundle = bundle_from_records(data.records, store_root=root / "store", dataset="synth", cfg=data.data_cfg,
                                 threshold=1.0, embeddings=data.bundle.embeddings)
    return data, bundle


def _cfg(data, **kw):
    base = {"model_cfg": {"hidden": 4, "mlp_hidden": 4}, "epochs": 2, "batch_products": 4, "device": "cpu"}
    base.update(kw)
    return synthetic_train_config("text-gru", data, base)


def test_run_json_records_provenance_and_view_fingerprints(stored, tmp_path):
    data, bundle = stored
    train(_cfg(data), bundle, tmp_path / "r" / "seed0", progress_bar=False, record={"run": "r"})
    meta = json.loads((tmp_path / "r/seed0/run.json").read_text())
    assert meta["status"] == "done" and meta["preset"] == "paper" and meta["run"] == "r"
    # embed_dim / vocab_size come from the word vectors unless set: recorded as their shapes
    assert meta["model_cfg"] == {"hidden": 4, "mlp_hidden": 4, "dropout": 0.1, "finetune_embeddings": False}
    assert set(meta["word_vectors"]) == {"prd", "rvw"} and len(meta["word_vectors"]["rvw"]) == 2
    assert meta["git"]["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", meta["git"]["commit"])
    assert meta["git"]["dirty"] in (True, False, None)
    assert (
        meta["packages"]["torch"] == torch.__version__.split("+")[0] or meta["packages"]["torch"] == torch.__version__
    )
    assert "python" in meta["packages"] and "numpy" in meta["packages"]
    t0, t1 = datetime.fromisoformat(meta["started_at"]), datetime.fromisoformat(meta["finished_at"])
    assert t0 <= t1
    assert set(meta["views"]) == {"tokens", "rois", "probes", "embeddings"}
    assert meta["views"]["tokens"] == {"fingerprint": "synthetic0000000", "items": meta["views"]["tokens"]["items"],
                                       "random_init": False}
    assert meta["random_init"] is False and not run_is_random_init(meta)
    # the saved config holds every resolved field and the preset
    import yaml

    saved = yaml.safe_load((tmp_path / "r/seed0/config.yaml").read_text())
    assert saved["preset"] == "paper" and saved["model_cfg"] == meta["model_cfg"]


def test_random_init_views_are_flagged(tmp_path):
    from pipeline.stage import FieldSpec, Record
    from pipeline.store import FeatureStore

    store = FeatureStore(tmp_path / "store")
    for stage, fp in (("rois", "random-init-1234"), ("tokens", "abcd")):
        w = store.writer(stage, fp, {"x": FieldSpec("float32", (), True)})
        w.add(Record(key="k1", arrays={"x": np.zeros(2, np.float32)}))
        w.close()
        store.write_view("ds", stage, fp, {"item": "k1"})
    views = view_fingerprints(tmp_path / "store", "ds")
    assert views["rois"]["random_init"] is True and views["tokens"]["random_init"] is False
    assert run_is_random_init({"views": views}) and not run_is_random_init({"views": {"tokens": views["tokens"]}})


def test_views_read_records_dataset_and_view_fingerprint_of_the_stages_read(tmp_path):
    """data.json `read_views` (mrhp predict's check): {stage: {dataset, fingerprint}} for the
    stages asked that the dataset has a view of, the fingerprint the store's view carries."""
    from models.config import DataConfig
    from models.data import StoreSource
    from models.runs import views_read
    from models.trainer import _stages_read
    from pipeline.stage import FieldSpec, Record
    from pipeline.store import FeatureStore

    store = FeatureStore(tmp_path / "store")
    for ds, stage, fp in (("ds", "tokens", "t1"), ("ds", "probes", "p1"), ("other", "rois", "r9")):
        w = store.writer(stage, fp, {"x": FieldSpec("float32", (), True)})
        w.add(Record(key="k1", arrays={"x": np.zeros(2, np.float32)}))
        w.close()
        store.write_view(ds, stage, fp, {"item": "k1"})
    got = views_read(tmp_path / "store", "ds", {"tokens", "rois", "embeddings"})
    # probes not asked; rois and embeddings asked but ds has no view of them (other's rois is not ds's)
    assert got == {"tokens": {"dataset": "ds", "fingerprint": "t1"}}
    assert views_read(tmp_path / "store", "ds", {"tokens", "probes"}) == {
        "probes": {"dataset": "ds", "fingerprint": "p1"}, "tokens": {"dataset": "ds", "fingerprint": "t1"}}

    class Records:  # no products: StoreSource only needs the grouping
        def reviews_by_product(self):
            return {}

    def bundle(views):
        src = StoreSource(store_root=tmp_path / "store", dataset="ds", records=Records(),
                          cfg=DataConfig(), views=views)
        return DataBundle(name="ds", splits={"train": src}, embeddings=None, threshold=1.0)

    # tokens always, the asked views, and the embeddings view the word vectors come from
    assert _stages_read(bundle(("rois",))) == {"tokens", "rois", "embeddings"}
    assert _stages_read(bundle(None)) == {"tokens", "rois", "probes", "bert", "embeddings"}
    assert _stages_read(_bundle([[0, 1]])) == frozenset()  # in memory: no store view read


def test_best_checkpoint_leaves_out_optimizer_state_last_keeps_it(stored, tmp_path):
    data, bundle = stored
    train(_cfg(data), bundle, tmp_path / "c", progress_bar=False)
    p = RunPaths(tmp_path / "c")
    best, last = load_checkpoint(p.best), load_checkpoint(p.last)
    assert best["optimizer"] == {} and best["scheduler"] == {}
    assert last["optimizer"]["state"] and last["scheduler"]
    assert p.best.stat().st_size < p.last.stat().st_size
    for k in best["model"]:  # the weights are all there
        assert best["model"][k].shape == last["model"][k].shape


def test_plots_are_drawn_once_at_the_end_titled_with_run_and_seed(stored, tmp_path, monkeypatch):
    import models.trainer as trainer_mod

    calls = []
    real = trainer_mod.write_plots
    monkeypatch.setattr(trainer_mod, "write_plots", lambda paths, **kw: calls.append(kw) or real(paths, **kw))
    data, bundle = stored
    res = train(_cfg(data, epochs=3), bundle, tmp_path / "myrun" / "seed1", progress_bar=False)
    assert len(calls) == 1  # not once per epoch
    assert calls[0]["title"] == "myrun seed1 (seed 0)"
    assert calls[0]["best_epoch"] == res.best_epoch
    assert (tmp_path / "myrun/seed1/plots/loss.png").is_file() and (tmp_path / "myrun/seed1/plots/dev.png").is_file()
    calls.clear()
    train(synthetic_train_config("length", data), bundle, tmp_path / "len", progress_bar=False)
    assert calls == [] and not list((tmp_path / "len" / "plots").glob("*.png"))  # parameter-free: none


def test_loss_curves_include_auxiliary_losses_and_seed_bands_by_hand(tmp_path):
    epochs = [{"event": "epoch", "epoch": 1, "train_loss": 3.0, "rank_loss": 2.0, "aux": {"cl": 1.0}},
              {"event": "epoch", "epoch": 2, "train_loss": 2.0, "rank_loss": 1.5, "aux": {"cl": 0.5}}]
    assert _loss_series(epochs) == {"total": [3.0, 2.0], "ranking": [2.0, 1.5], "cl": [1.0, 0.5]}
    # two seeds: epochs 1..3 and 1..2; mean over the common epochs 1, 2: (1+3)/2, (2+4)/2; std 1, 1
    x, mean, std = _mean_band([([1, 2, 3], [1.0, 2.0, 3.0]), ([1, 2], [3.0, 4.0])])
    assert x == [1, 2] and list(mean) == [2.0, 3.0] and list(std) == [1.0, 1.0]
    seeds = []
    for k, shift in enumerate((0.0, 1.0)):
        p = RunPaths(tmp_path / f"seed{k}")
        p.root.mkdir()
        p.metrics.write_text("".join(json.dumps({**e, "train_loss": e["train_loss"] + shift,
                                                 "dev": {"MAP": 0.5 + shift / 10}}) + "\n" for e in epochs))
        seeds.append(p)
    out = write_seed_plots(tmp_path, seeds, title="run", best_epochs=[1, 2])
    assert [f.name for f in out] == ["loss.png", "dev.png"] and all(f.stat().st_size > 0 for f in out)
    assert write_seed_plots(tmp_path, seeds[:1], title="run") == []  # one seed: no band


def test_progress_bar_shows_epoch_of_epochs_and_marks_the_best(stored, tmp_path, capsys):
    data, bundle = stored
    lines = []
    train(_cfg(data), bundle, tmp_path / "bar", progress_bar=True, progress=lines.append)
    err = capsys.readouterr().err
    assert "epoch 1/2" in err and "epoch 2/2" in err and "step" in err
    epoch_lines = [ln for ln in lines if ln.startswith("epoch ")]
    assert epoch_lines[0].startswith("epoch 1/2: loss") and epoch_lines[0].endswith("(best)")


def _product(pid, labels):
    return ProductItem(id=pid, tokens=np.array([1, 2], np.int64), rois=np.zeros((0, 4), np.float32), reviews=[
        ReviewItem(id=f"{pid}-{i}", tokens=np.array([1, 2, 3], np.int64), rois=np.zeros((0, 4), np.float32),
                   probe=np.ones(3, np.float32), label=float(y), length=3.0) for i, y in enumerate(labels)])


def _bundle(labels_per_product):
    prods = [_product(f"p{i}", ys) for i, ys in enumerate(labels_per_product)]
    src = InMemorySource(prods, roi_dim=4)
    return DataBundle(name="tiny", splits={"train": src, "dev": src}, embeddings=None, threshold=1.0,
                      train_labels=[y for ys in labels_per_product for y in ys])


def test_no_instance_message_names_min_gap_and_suggests_min_gap_1():
    # labels {0, 1} and {1, 3}: min_gap 2 excludes the 2 lowest distinct labels -> no positive;
    # min_gap 1 makes label 1 (over 0) and 3 (over 1) positives -> suggested
    msg = no_instance_message([np.array([0, 1, 1]), np.array([1, 3])], min_gap=2.0)
    assert "min_gap=2" in msg and "set min_gap=1" in msg and "at least 3 distinct labels" in msg
    assert "2 products would give instances" in msg
    same = no_instance_message([np.array([2, 2]), np.array([1])], min_gap=2.0)
    assert "equal labels" in same and "min_gap=1" not in same


def test_training_without_ranking_instances_stops_with_the_min_gap_message(tmp_path):
    from models.config import train_config

    # a trainable model is needed for the loop to run: text-gru with a small random vocabulary
    cfg = train_config({"model": "text-gru", "dataset": "tiny", "data": {"roi_dim": 4}, "device": "cpu",
                        "model_cfg": {"vocab_size": 8, "embed_dim": 4, "hidden": 2, "mlp_hidden": 2}})
    with pytest.raises(TrainingError, match=r"min_gap=2.*set min_gap=1"):
        train(cfg, _bundle([[0, 1, 1], [1, 3]]), tmp_path / "g", progress_bar=False)


def test_resume_refuses_a_store_view_re_extracted_since_the_run_was_trained(stored, tmp_path, monkeypatch):
    """--resume after the tokens view was re-extracted under other settings (its fingerprint
    changed since run.json recorded it): refused in one line naming the view and both
    fingerprints, before any epoch trains on the new features; unchanged views resume."""
    import models.trainer

    data, bundle = stored
    cfg = synthetic_train_config("text-gru", data, {"model_cfg": {"hidden": 8, "mlp_hidden": 8}, "epochs": 1,
                                                    "batch_products": 4})
    train(cfg, bundle, tmp_path / "r")
    real = models.trainer.view_fingerprints

    def re_extracted(root, dataset, *a, **kw):
        out = real(root, dataset, *a, **kw)
        out["tokens"] = {**out["tokens"], "fingerprint": "0123456789abcdef"}
        return out

    monkeypatch.setattr(models.trainer, "view_fingerprints", re_extracted)
    more = synthetic_train_config("text-gru", data, {"model_cfg": {"hidden": 8, "mlp_hidden": 8}, "epochs": 2,
                                                     "batch_products": 4})
    with pytest.raises(TrainingError) as ei:
        train(more, bundle, tmp_path / "r", resume=True)
    msg = str(ei.value)
    assert "\n" not in msg and "cannot resume" in msg
    assert f"tokens {view_fingerprints(data.store_root, 'synth')['tokens']['fingerprint']} -> 0123456789abcdef" in msg
    assert load_checkpoint(RunPaths(tmp_path / "r").last)["epoch"] == 1
    monkeypatch.setattr(models.trainer, "view_fingerprints", real)
    assert train(more, bundle, tmp_path / "r", resume=True).epochs_run == 2
