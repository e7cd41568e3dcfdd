"""A model never trains in silence without a view it needs, nor on a damaged store (issues 13, 14).

Each test builds a small synthetic store (models.synthetic writes tokens, rois, probes and
embeddings views) and damages or removes one part of it."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from models.config import TrainConfig, train_config
from models.data import bundle_from_records, required_views
from models.synthetic import make_synthetic
from models.trainer import Trainer
from pipeline.errors import ConfigError, DataError, StoreError
from pipeline.store import FeatureStore
from tests.support.manifests import write_synth_manifest


@pytest.fixture
def synth(tmp_path: Path):
    return make_synthetic(tmp_path / "store", "synth", n_products=8, reviews_per_product=(3, 5),
                          vocab_size=40, embed_dim=8, roi_dim=16, max_boxes=2, image_prob=1.0, seed=3)


def _bundle(data, **kw):
    return bundle_from_records(data.records, store_root=data.store_root, dataset=data.dataset,
                               cfg=data.data_cfg, threshold=1.0, **kw)


def _load_all(bundle) -> list:
    out = []
    for src in bundle.splits.values():
        out += [src.load(i) for i in range(len(src.product_ids))]
    return out


def test_required_views_of_each_model():
    assert required_views("length") == {"tokens"}
    assert required_views("text-gru") == {"tokens"}
    # classes that do not say (yet) fall back: sancl needs probes too, the others the image features
    assert required_views("sancl") >= {"tokens", "rois"}
    assert required_views("mcl") >= {"tokens", "rois"}
    assert required_views("mmss") >= {"tokens", "rois"}


@pytest.mark.parametrize("stage", ["rois", "probes"])
def test_a_missing_required_view_stops_the_run_with_the_command_that_builds_it(synth, stage):
    FeatureStore(synth.store_root).drop_view("synth", stage)
    with pytest.raises(DataError) as ei:
        _bundle(synth, required=frozenset({"tokens", "rois", "probes"}))
    msg = str(ei.value)
    assert f"needs the {stage} view" in msg and f"mrhp extract --dataset synth --stage {stage}" in msg
    assert f"allow_missing: [{stage}]" in msg and "\n" not in msg


def test_allow_missing_opts_in_and_the_run_records_it(synth, tmp_path):
    FeatureStore(synth.store_root).drop_view("synth", "rois")
    bundle = _bundle(synth, required=frozenset({"tokens", "rois"}), allow_missing=("rois",))
    assert bundle.missing_views == ("rois",)
    assert all(len(p.rois) == 0 and all(len(r.rois) == 0 for r in p.reviews) for p in _load_all(bundle))
    cfg = train_config({"model": "length", "allow_missing": ["rois"], "epochs": 1})
    Trainer(cfg, bundle, tmp_path / "run").run()
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["allow_missing"] == ["rois"] and meta["missing_views"] == ["rois"]
    assert "allow_missing:\n- rois" in (tmp_path / "run" / "config.yaml").read_text()


def test_a_view_the_model_does_not_need_may_be_absent(synth):
    FeatureStore(synth.store_root).drop_view("synth", "rois")
    bundle = _bundle(synth, required=required_views("text-gru"))
    assert bundle.missing_views == () and _load_all(bundle)


def test_allow_missing_names_are_checked():
    with pytest.raises(ConfigError, match="allow_missing: unknown view.*'roi'.*valid: tokens, rois, probes, bert"):
        train_config({"allow_missing": ["roi"]})
    with pytest.raises(ConfigError, match="'tokens' cannot be missing"):
        train_config({"allow_missing": ["tokens"]})
    assert train_config({"allow_missing": ["rois", "probes"]}).allow_missing == ("rois", "probes")


def test_old_run_configs_with_require_probes_still_load():
    cfg = train_config({"model": "sancl", "data": {"require_probes": False, "max_rois": 64}})
    assert cfg.data.max_rois == 64 and isinstance(cfg, TrainConfig)


def _rois_segments(root: Path) -> list[Path]:
    return sorted((root / "segments" / "rois").glob("*/*.h5"))


@pytest.mark.parametrize("damage", ["deleted", "truncated", "header-zeroed"])
def test_damaged_rois_segments_are_an_error_not_a_text_only_run(synth, damage):
    bundle = _bundle(synth, required=frozenset({"tokens", "rois", "probes"}))
    for seg in _rois_segments(synth.store_root):
        if damage == "deleted":
            seg.unlink()
        elif damage == "truncated":
            with open(seg, "r+b") as f:
                f.truncate(seg.stat().st_size // 2)
        else:
            with open(seg, "r+b") as f:
                f.write(b"\x00" * 512)
    with pytest.raises(StoreError, match=r"segments/rois/.*fsck --repair"):
        _load_all(bundle)


def test_flipped_rois_bytes_are_an_error_and_the_item_becomes_missing(synth):
    import h5py

    bundle = _bundle(synth, required=frozenset({"tokens", "rois"}))
    (seg,) = _rois_segments(synth.store_root)
    with h5py.File(seg, "r") as f:
        ds = f["fields/features/data"]
        off = ds.id.get_offset()
        n_rows = ds.shape[0]
    with open(seg, "r+b") as f:  # 64 bytes in the middle of the features
        f.seek(off + (n_rows // 2) * 16 * 2)
        f.write(b"\xff" * 64)
    with pytest.raises(StoreError, match="checksum"):
        _load_all(bundle)
    store = FeatureStore(synth.store_root)
    fp = store.fingerprints("rois")[0]
    view = store.view("synth", "rois")
    keys = sorted({view.key(i) for i in view.item_ids()})
    assert store.missing("rois", fp, keys)  # the next extract recomputes them


def test_a_scribbled_index_is_an_error_naming_the_rebuild(synth):
    bundle = _bundle(synth, required=frozenset({"tokens", "rois"}))
    conn = sqlite3.connect(synth.store_root / "index.sqlite")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    p = synth.store_root / "index.sqlite"
    b = bytearray(p.read_bytes())
    b[4096:] = b"\x5a" * (len(b) - 4096)
    p.write_bytes(bytes(b))
    with pytest.raises(StoreError, match="mrhp fsck --rebuild-index"):
        _load_all(bundle)
    with pytest.raises(StoreError, match="mrhp fsck --rebuild-index"):
        _bundle(synth, required=frozenset({"tokens", "rois"}))


def test_an_item_missing_from_a_view_is_named(synth):
    store = FeatureStore(synth.store_root)
    view = store.view("synth", "rois")
    fp = view.fingerprint
    ids = view.item_ids()
    store.write_view("synth", "rois", fp, {i: view.key(i) for i in ids[1:]})  # a stale view
    bundle = _bundle(synth, required=frozenset({"tokens", "rois"}))
    with pytest.raises(DataError, match=rf"rois view has no item '{ids[0]}'.*--stage rois"):
        _load_all(bundle)


def test_a_crash_between_the_epoch_record_and_last_pt_loses_no_record(tmp_path, monkeypatch):
    """The epoch's metrics record is written before last.pt; a crash in between is healed by
    --resume (the epoch is rerun and its record replaced), so every epoch has exactly one record."""
    import models.trainer as trainer_mod
    from models.synthetic import synthetic_train_config

    tiny = make_synthetic(n_products=10, reviews_per_product=(4, 6), vocab_size=40, embed_dim=8,
                          roi_dim=8, seed=1)
    cfg = synthetic_train_config("text-gru", tiny, {"model_cfg": {"hidden": 4, "mlp_hidden": 4},
                                                    "epochs": 3, "batch_products": 4})
    real_save = trainer_mod.save_checkpoint
    calls = {"last": 0}

    def crash_on_second_last(path, state):
        if Path(path).name == "last.pt":
            calls["last"] += 1
            if calls["last"] == 2:
                raise KeyboardInterrupt("killed while saving last.pt")
        return real_save(path, state)

    monkeypatch.setattr(trainer_mod, "save_checkpoint", crash_on_second_last)
    with pytest.raises(KeyboardInterrupt):
        trainer_mod.train(cfg, tiny.bundle, tmp_path / "r")
    records = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]  # epoch 2's record was written before the crash
    monkeypatch.setattr(trainer_mod, "save_checkpoint", real_save)
    trainer_mod.train(cfg, tiny.bundle, tmp_path / "r", resume=True)
    records = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["event"] == "epoch"] == [1, 2, 3]


def test_mrhp_train_refuses_a_multimodal_model_without_rois_in_one_line(tmp_path, capsys):
    from models.synthetic import write_mrhp_tables
    from mrhp.cli import main

    data = make_synthetic(tmp_path / "store", "synth", n_products=6, reviews_per_product=(3, 4),
                          vocab_size=40, embed_dim=8, roi_dim=2048, max_boxes=2, seed=5)
    write_mrhp_tables(data.records, tmp_path / "mrhp")
    write_synth_manifest(tmp_path / "m.yaml")
    FeatureStore(tmp_path / "store").drop_view("synth", "rois")
    m = ["--manifest", str(tmp_path / "m.yaml")]
    assert main([*m, "train", "--model", "mcl", "--dataset", "synth"]) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "needs the rois view" in err and "mrhp extract --dataset synth --stage rois" in err
    assert not (tmp_path / "runs" / "mcl-synth").exists()  # refused before any run folder
