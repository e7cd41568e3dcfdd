"""`mrhp train` / `mrhp evaluate` of SANCL on a store whose probes view holds two failed records:
the warning line at load and run.json's `probe_fallback` (default `data.probe_failures: ones`),
or a one-line refusal naming the review (`refuse`)."""
from __future__ import annotations

import json

import pytest

from models.synthetic import make_synthetic, write_mrhp_tables
from mrhp.cli import main
from tests.models.test_probe_failures import REASON, _fail
from tests.support.manifests import SYNTH_MANIFEST

TINY = ["epochs=1", "batch_products=4", "device=cpu", "model_cfg.hidden=8", "model_cfg.image_ffn=8",
        "model_cfg.proj_dim=4", "model_cfg.heads=2"]


@pytest.fixture
def workspace(tmp_path):
    from tests.mrhp.test_predict_fingerprints import stage_fingerprints

    (tmp_path / "data_manifest.yaml").write_text(SYNTH_MANIFEST, encoding="utf-8")
    data = make_synthetic(tmp_path / "store", "synth", n_products=8, reviews_per_product=(3, 4),
                          vocab_size=40, embed_dim=8, roi_dim=2048, max_boxes=1, seed=6,
                          fingerprints=stage_fingerprints(tmp_path / "data_manifest.yaml"))
    write_mrhp_tables(data.records, tmp_path / "mrhp")
    train = [r.id for r in data.records.reviews if r.split == "train"]
    _fail(data, [train[0], train[2]])
    return tmp_path, train


def test_mrhp_train_warns_and_records_failed_probe_masks(workspace, capsys):
    root, train = workspace
    m = ["--manifest", str(root / "data_manifest.yaml")]
    assert main([*m, "train", "--model", "sancl", "--dataset", "synth", "--name", "s", *TINY]) == 0
    out = capsys.readouterr()
    said = [ln for ln in (out.out + out.err).splitlines() if "have no probe mask" in ln]
    assert len(said) == 1 and f"2 of {len(train)} reviews in split 'train'" in said[0]
    meta = json.loads((root / "runs/s/seed0/run.json").read_text())
    assert meta["probe_fallback"]["train"]["probes_failed"] == 2
    assert meta["probe_fallback"]["train"]["first_failed"] == [[train[0], REASON], [train[2], REASON]]
    assert meta["probe_fallback"]["dev"]["probes_failed"] == 0


def test_mrhp_train_refuses_failed_probe_masks_in_one_line(workspace, capsys):
    root, train = workspace
    m = ["--manifest", str(root / "data_manifest.yaml")]
    assert main([*m, "train", "--model", "sancl", "--dataset", "synth", "--name", "s", *TINY,
                 "data.probe_failures=refuse"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"review {train[0]!r} has no probe mask" in err[0] and REASON in err[0]
    assert not (root / "runs/s/seed0/run.json").exists()
