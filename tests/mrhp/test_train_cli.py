"""`mrhp train / evaluate / compare / predict` end to end on a synthetic dataset in a real store."""
from __future__ import annotations

import json

import numpy as np
import pytest

from models.config import DataConfig
from models.data import build_datasets, eval_plan, make_loader
from models.synthetic import make_synthetic, write_mrhp_tables
from mrhp.cli import main
from pipeline.manifest import load_manifest
from tests.support.manifests import SYNTH_MANIFEST


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tests.mrhp.test_predict_fingerprints import stage_fingerprints

    root = tmp_path_factory.mktemp("cli")
    (root / "data_manifest.yaml").write_text(SYNTH_MANIFEST, encoding="utf-8")
    # the tokens view carries the manifest's tokens fingerprint: predict checks the run's against it
    data = make_synthetic(root / "store", "synth", n_products=15, reviews_per_product=(4, 7),
                          vocab_size=60, embed_dim=8, roi_dim=2048, max_boxes=2, seed=4,
                          fingerprints=stage_fingerprints(root / "data_manifest.yaml"))
    write_mrhp_tables(data.records, root / "mrhp")
    return root, data


def test_build_datasets_reads_store_views_like_the_in_memory_copy(workspace):
    root, data = workspace
    manifest = load_manifest(root / "data_manifest.yaml")
    bundle = build_datasets(manifest, "synth", DataConfig())
    assert bundle.threshold == 1.0 and set(bundle.splits) == {"train", "dev", "test"}
    assert np.array_equal(bundle.embeddings["rvw"], data.bundle.embeddings["rvw"])
    for split in ("train", "test"):
        a, b = data.bundle.split(split), bundle.split(split)
        assert a.product_ids == b.product_ids
        x, y = a.load(0), b.load(0)
        assert np.array_equal(x.rois, y.rois) and len(x.reviews) == len(y.reviews)
        for r1, r2 in zip(x.reviews, y.reviews, strict=True):
            assert r1.id == r2.id and r1.label == r2.label and r1.length == r2.length
            assert np.array_equal(r1.tokens, r2.tokens) and np.array_equal(r1.rois, r2.rois)
            assert np.array_equal(r1.probe, r2.probe)
    # DataLoader workers open the store lazily in their own process
    src = bundle.split("dev")
    batches = list(make_loader(src, eval_plan(src, batch_products=4, max_reviews=64), DataConfig(), num_workers=2))
    assert sum(b.num_reviews for b in batches) == sum(len(src.labels(i)) for i in range(len(src.product_ids)))
    assert batches[0].rev_rois.shape[-1] == 2048


def test_train_evaluate_compare_predict_end_to_end(workspace, capsys):
    root, _ = workspace
    m = ["--manifest", str(root / "data_manifest.yaml")]
    over = ["epochs=2", "batch_products=4", "lr=3e-3", "device=cpu", "model_cfg.hidden=8", "model_cfg.mlp_hidden=8"]
    assert main([*m, "train", "--model", "text-gru", "--dataset", "synth", "--seeds", "2", "--name", "gru", *over]) == 0
    assert main([*m, "train", "--model", "length", "--dataset", "synth", "--name", "len"]) == 0
    for k in (0, 1):
        d = root / "runs" / "gru" / f"seed{k}"
        assert (d / "checkpoints" / "best.pt").is_file() and (d / "eval_test.json").is_file()
        assert json.loads((d / "data.json").read_text())["vocab_fingerprint"]
    capsys.readouterr()
    assert main([*m, "evaluate", "gru", "--split", "dev"]) == 0
    out = capsys.readouterr().out
    assert "MAP" in out and "NDCG@3" in out and "NDCG@5" in out and "MRR" in out and "mean" in out
    assert (root / "runs/gru/seed1/eval_dev.json").is_file()
    # evaluate prints x100, the scale of compare: seed0's MAP row equals 100 x its eval_dev.json
    seed0 = json.loads((root / "runs/gru/seed0/eval_dev.json").read_text())["metrics"]
    row = next(ln.split() for ln in out.splitlines() if ln.startswith("seed0"))
    assert float(row[1]) == pytest.approx(seed0["MAP"] * 100, abs=0.006)
    assert main([*m, "compare", "len", "gru"]) == 0
    out = capsys.readouterr().out
    assert "±" in out and "p-values against len (over products" in out and "(n=" in out
    assert main([*m, "compare", "gru", "gru", "--paired", "seeds"]) == 0
    pred = root / "pred.jsonl"
    assert main([*m, "predict", "gru", "--input", str(root / "mrhp" / "home.prd.test"), "--output", str(pred)]) == 0
    rows = [json.loads(x) for x in pred.read_text().splitlines()]
    test_reviews = {r["review_id"] for r in rows}
    n_test = len(json.loads((root / "mrhp" / "home.rvw.test").read_text())["review_id"])
    assert len(test_reviews) == len(rows) == n_test
    by_p: dict[str, list] = {}
    for r in rows:
        by_p.setdefault(r["product_id"], []).append(r)
    for rs in by_p.values():
        assert [r["rank"] for r in rs] == list(range(1, len(rs) + 1))
        assert all(a["score"] >= b["score"] for a, b in zip(rs, rs[1:], strict=False))
        assert all("label" in r for r in rs)


def test_cli_errors_are_one_line_messages(workspace, capsys):
    root, _ = workspace
    m = ["--manifest", str(root / "data_manifest.yaml")]
    assert main([*m, "train", "--model", "nope", "--dataset", "synth", "--name", "bad"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main([*m, "train", "--model", "length", "--dataset", "nosuch"]) == 2
    assert main([*m, "train", "--model", "length", "--dataset", "synth", "lr"]) == 2
    assert main([*m, "evaluate", "no-such-run"]) == 6
    assert "no such folder" in capsys.readouterr().err


def test_training_flow_trains_exactly_as_mrhp_train(workspace, tmp_path, monkeypatch):
    """The flow makes `mrhp train`'s two calls with the same config: for the same settings and
    seeds, the same saved config and bit for bit the same test metrics and scores; a missing view
    stops it before any training, with the same one-line error as `mrhp train`."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.training import train_flow
    from pipeline.errors import DataError

    root, _ = workspace
    manifest = str(root / "data_manifest.yaml")
    over = ["epochs=2", "batch_products=4", "lr=3e-3", "device=cpu", "model_cfg.hidden=4", "model_cfg.mlp_hidden=4"]
    assert main(["--manifest", manifest, "train", "--model", "text-gru", "--dataset", "synth", "--seeds", "2",
                 "--name", "twin-cli", *over]) == 0
    empty = tmp_path / "empty.yaml"  # the same dataset over an empty store: no view at all
    empty.write_text(SYNTH_MANIFEST.replace("store: store", f"store: {tmp_path / 'nostore'}")
                     .replace("data: .", f"data: {root}").replace("runs: runs", f"runs: {tmp_path / 'runs'}"))
    with prefect_test_harness():
        out = train_flow("synth", "text-gru", manifest_path=manifest, seeds=2, name="twin-flow", overrides=over)
        with pytest.raises(DataError, match=r"needs the rois view.*`mrhp extract --dataset synth --stage rois`"):
            train_flow("synth", "mcl", manifest_path=str(empty), overrides=["device=cpu"])
        # the task gets the very TrainConfig record the flow resolved (no copy, no mapping round trip)
        import flows.training
        import models.trainer

        resolved, seen = [], []
        real_resolve = flows.training.resolve_train_config
        monkeypatch.setattr(flows.training, "resolve_train_config",
                            lambda *a, **kw: resolved.append(real_resolve(*a, **kw)) or resolved[-1])
        monkeypatch.setattr(models.trainer, "train_seeds", lambda manifest, cfg, **kw: seen.append((cfg, kw)) or [])
        assert train_flow("synth", "text-gru", manifest_path=manifest, seeds=3, name="stub", overrides=over) == []
        assert len(seen) == 1 and seen[0][0] is resolved[0]
        assert seen[0][1]["seeds"] == 3 and seen[0][1]["name"] == "stub"
    assert not (tmp_path / "runs").exists()
    assert [o["seed"] for o in out] == [0, 1]
    for k in (0, 1):
        cli, flw = root / "runs/twin-cli" / f"seed{k}", root / "runs/twin-flow" / f"seed{k}"
        assert (flw / "config.yaml").read_text() == (cli / "config.yaml").read_text()
        a, b = (json.loads((d / "eval_test.json").read_text()) for d in (cli, flw))
        assert set(a["metrics"]) == {"MAP", "NDCG@3", "NDCG@5", "MRR"}
        assert out[k]["test"] == b["metrics"] == a["metrics"]  # == on floats: bitwise equal
        assert b["per_product"] == a["per_product"]
        epochs = [[{k: r[k] for k in ("epoch", "lr", "train_loss", "dev")}
                   for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if r["event"] == "epoch"]
                  for d in (cli, flw)]
        assert len(epochs[0]) == 2 and epochs[1] == epochs[0]
        assert out[k]["run_dir"] == str(flw)
    # across-seed plots, as the CLI draws them for a run of several seeds
    assert sorted(p.name for p in (root / "runs/twin-flow/plots").iterdir()) == \
        sorted(p.name for p in (root / "runs/twin-cli/plots").iterdir())


def test_training_flow_checks_the_views_the_run_needs(workspace, tmp_path):
    """The flow's view check is `mrhp train`'s: the model's own required views after the text
    encoder fallback (MM-SS's paper preset reads bert features, but on a dataset without a
    text_encoder it trains on word vectors and needs no bert view), honouring allow_missing."""
    from flows.training import check_run_views
    from models.config import resolve_train_config
    from models.data import required_views
    from pipeline.errors import DataError

    root, _ = workspace
    manifest = load_manifest(root / "data_manifest.yaml")
    cfg = resolve_train_config(manifest, model="mmss", dataset="synth")
    assert cfg.model_cfg["text_features"] == "bert" and "bert" in required_views("mmss", cfg.model_cfg)
    assert check_run_views.fn(manifest, cfg) == ["rois", "tokens"]
    sancl = resolve_train_config(manifest, model="sancl", dataset="synth")
    assert check_run_views.fn(manifest, sancl) == ["probes", "rois", "tokens"]

    (tmp_path / "m.yaml").write_text(SYNTH_MANIFEST.replace("store: store", f"store: {tmp_path / 'nostore'}")
                                     .replace("data: .", f"data: {root}"))
    bare = load_manifest(tmp_path / "m.yaml")
    with pytest.raises(DataError, match=r"needs the probes view.*also missing: rois, tokens.*--stage probes"):
        check_run_views.fn(bare, sancl)
    gru = resolve_train_config(bare, model="text-gru", dataset="synth")
    with pytest.raises(DataError, match=r"needs the tokens view"):
        check_run_views.fn(bare, gru)
    allowed = resolve_train_config(bare, model="sancl", dataset="synth",
                                   overrides=["allow_missing=[probes, rois]", "model_cfg.probe_mask=false"])
    with pytest.raises(DataError, match=r"needs the tokens view") as e:
        check_run_views.fn(bare, allowed)
    assert "also missing" not in str(e.value)


def test_cli_and_flow_resolve_settings_in_one_place(workspace, tmp_path, capsys):
    """`mrhp train` and the flow resolve through models.config.resolve_train_config: the preset
    given twice, or a YAML naming another model or dataset, is the same one-line ConfigError."""
    from models.config import resolve_train_config
    from pipeline.errors import ConfigError

    root, _ = workspace
    m = ["--manifest", str(root / "data_manifest.yaml")]
    manifest = load_manifest(root / "data_manifest.yaml")
    assert main([*m, "train", "--model", "mcl", "--dataset", "synth", "--preset", "code", "preset=paper"]) == 2
    assert "give the preset once" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="give the preset once"):
        resolve_train_config(manifest, model="mcl", dataset="synth", preset="code", overrides=["preset=paper"])
    other = tmp_path / "other.yaml"
    other.write_text("model: sancl\n")
    assert main([*m, "train", "--model", "mcl", "--dataset", "synth", "--config", str(other)]) == 2
    assert "disagree with the config (sancl, synth)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"\(mcl, synth\) disagree with the config \(sancl, synth\)"):
        resolve_train_config(manifest, model="mcl", dataset="synth", config=other)
    cfg = resolve_train_config(manifest, model="mcl", dataset="synth", preset="code", overrides=["epochs=3"])
    assert (cfg.model, cfg.dataset, cfg.preset, cfg.epochs) == ("mcl", "synth", "code", 3)


def test_training_flow_refuses_bad_parameters_in_one_line():
    from flows.training import train_flow
    from pipeline.errors import ConfigError

    for kw, msg in ((dict(seeds=0), "seeds: expected a positive integer"),
                    (dict(resume=True, overwrite=True), "exclude each other"),
                    (dict(overrides="epochs=3"), "expected a list of key=value strings")):
        with pytest.raises(ConfigError, match=msg):
            train_flow.fn("synth", "text-gru", **kw)


def test_train_refuses_to_clobber_a_run_unless_overwrite(workspace, capsys):
    root, _ = workspace
    m = ["--manifest", str(root / "data_manifest.yaml")]
    assert main([*m, "train", "--model", "length", "--dataset", "synth", "--name", "again"]) == 0
    assert main([*m, "train", "--model", "length", "--dataset", "synth", "--name", "again"]) == 6
    assert "already holds a run" in capsys.readouterr().err
    assert main([*m, "train", "--model", "length", "--dataset", "synth", "--name", "again", "--overwrite"]) == 0


def test_predict_computes_probe_masks_for_new_reviews_like_the_probes_stage(workspace):
    from types import SimpleNamespace

    from mrhp.commands.predict import _aligned_probe, probe_masks

    root, _ = workspace
    manifest = load_manifest(root / "data_manifest.yaml")
    spec = manifest.dataset("synth")
    reviews = ["I bought this pan in Japan. It heats evenly. The handle broke."]
    (mask,) = probe_masks(manifest, spec, "synth", reviews, ["Stainless Steel Frying Pan"])
    # raw tokens: i bought this pan in japan . | it heats evenly . | the handle broke .
    assert mask.tolist() == [1] * 7 + [1] * 4 + [0] * 4
    enc = SimpleNamespace(ids=np.array([5, 6, 7]), pos=np.array([3, 8, 12]), n_raw=15)
    assert _aligned_probe(mask, enc).tolist() == [1.0, 1.0, 0.0]  # pan, heats, handle
    assert _aligned_probe(None, enc).tolist() == [1.0, 1.0, 1.0]
    assert probe_masks(manifest, spec, "no-such-dataset", reviews, ["x"]) == [None]


def test_predict_averages_the_seeds_by_default_and_labels_are_0_to_4(workspace):
    root, _ = workspace
    m = ["--manifest", str(root / "data_manifest.yaml")]
    over = ["epochs=1", "batch_products=4", "device=cpu", "model_cfg.hidden=4", "model_cfg.mlp_hidden=4"]
    assert main([*m, "train", "--model", "text-gru", "--dataset", "synth", "--seeds", "2", "--name", "avg", *over]) == 0
    inp = str(root / "mrhp" / "home.prd.test")
    scores = {}
    for tag, extra in (("all", []), ("s0", ["--seed", "0"]), ("s1", ["--seed", "1"])):
        out = root / f"pred-{tag}.jsonl"
        assert main([*m, "predict", "avg", "--input", inp, "--output", str(out), *extra]) == 0
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        scores[tag] = {r["review_id"]: r["score"] for r in rows}
        assert all(r["label"] in (0, 1, 2, 3, 4) and isinstance(r["label"], int) for r in rows)
        assert all("votes" in r for r in rows)
    assert json.loads((root / "runs/avg/seed0/data.json").read_text())["labels"] in ("labels", "votes")
    for rid, s in scores["all"].items():
        assert s == pytest.approx((scores["s0"][rid] + scores["s1"][rid]) / 2, abs=1e-6)
    assert scores["s0"] != scores["s1"]
