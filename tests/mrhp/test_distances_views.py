"""`mrhp distances` checks the views the run's model needs, as `mrhp train` and `mrhp evaluate` do."""
from __future__ import annotations

from models.config import config_to_yaml, train_config
from models.synthetic import make_synthetic, write_mrhp_tables
from mrhp.cli import main
from pipeline.store import FeatureStore
from tests.support.manifests import write_synth_manifest


def test_mrhp_distances_refuses_an_mcl_run_on_a_store_without_rois(tmp_path, capsys):
    # Before: `mrhp distances` read whatever views the store had, so MCL's Table 7-8 distances were
    # computed without image features when the rois view was gone, without a word.
    data = make_synthetic(tmp_path / "store", "synth", n_products=4, reviews_per_product=(3, 4),
                          vocab_size=40, embed_dim=8, roi_dim=2048, max_boxes=2, seed=5)
    write_mrhp_tables(data.records, tmp_path / "mrhp")
    write_synth_manifest(tmp_path / "m.yaml")
    run = tmp_path / "runs" / "mcl-synth" / "seed0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(config_to_yaml(train_config({"model": "mcl", "dataset": "synth"})),
                                     encoding="utf-8")
    FeatureStore(tmp_path / "store").drop_view("synth", "rois")
    assert main(["--manifest", str(tmp_path / "m.yaml"), "distances", "mcl-synth"]) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "needs the rois view" in err and "mrhp extract --dataset synth --stage rois" in err
