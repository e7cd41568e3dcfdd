"""Issue 13 "bad input that still escapes" and issue 14's predict rule: YAML alias bombs,
deeply nested JSON, predict's id/path checks, and predict refusing to rank text-only in silence."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from models.config import load_train_config
from mrhp.cli import main
from pipeline.config import MAX_YAML_NODES, load_yaml, parse_overrides, short_repr
from pipeline.errors import ConfigError, DataError, ManifestError
from pipeline.manifest import load_manifest
from tests.support.manifests import SYNTH_MANIFEST

BOMB = "\n".join(
    ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
) + "\n"


def test_an_alias_bomb_config_is_refused_quickly_in_one_short_line(tmp_path):
    p = tmp_path / "bomb.yaml"
    p.write_text(BOMB, encoding="utf-8")
    assert len(BOMB) < 600  # 9 ** 9 = 387 million strings once expanded
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as ei:
        load_train_config(p)
    assert time.perf_counter() - t0 < 2.0
    msg = str(ei.value)
    assert "aliases" in msg and str(p) in msg and len(msg) < 300 and "\n" not in msg


def test_an_alias_bomb_manifest_is_refused(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("version: 1\ndatasets:\n" + "".join("  " + line + "\n" for line in BOMB.splitlines()),
                 encoding="utf-8")
    with pytest.raises(ManifestError, match="aliases"):
        load_manifest(p)


def test_aliases_within_the_cap_still_work_and_recursion_or_depth_are_refused():
    assert load_yaml("base: &b {lr: 0.1}\nrun: *b\n", "x") == {"base": {"lr": 0.1}, "run": {"lr": 0.1}}
    with pytest.raises(ConfigError, match="refers to itself"):
        load_yaml("a: &a [1, *a]\n", "x")
    with pytest.raises(ConfigError, match="nested deeper"):
        load_yaml("[" * 200 + "]" * 200, "x")
    wide = "[" + ", ".join(["&x [1, 2, 3, 4, 5, 6, 7, 8, 9]"] + ["*x"] * (MAX_YAML_NODES // 10)) + "]"
    with pytest.raises(ConfigError, match="aliases"):  # many plain aliases add up too
        load_yaml(wide, "x")


def test_overrides_are_bounded_too():
    value = "{" + ", ".join(BOMB.strip().splitlines()) + "}"  # the bomb as one flow mapping
    with pytest.raises(ConfigError, match="override .*aliases"):
        parse_overrides([f"model_cfg={value}"])


def test_messages_quote_user_values_boundedly():
    huge = ["x" * 50] * 10_000
    assert len(short_repr(huge)) <= 200
    with pytest.raises(ConfigError) as ei:
        from models.config import train_config

        train_config({"epochs": huge})
    assert len(str(ei.value)) < 300


def test_deeply_nested_json_table_is_one_line_naming_the_file(tmp_path):
    from pipeline.datasets.tables import read_column_table

    p = tmp_path / "home.prd.test"
    p.write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    with pytest.raises(DataError) as ei:
        read_column_table(p, ["product_id"])
    assert str(p) in str(ei.value) and "nested too deeply" in str(ei.value)


# ---- predict -----------------------------------------------------------------------------



@pytest.fixture(scope="module")
def run_ws(tmp_path_factory):
    from models.synthetic import make_synthetic, write_mrhp_tables
    from tests.mrhp.test_predict_fingerprints import stage_fingerprints

    root = tmp_path_factory.mktemp("predict")
    (root / "data_manifest.yaml").write_text(SYNTH_MANIFEST, encoding="utf-8")
    # the tokens view carries the manifest's tokens fingerprint: predict checks the run's against it
    data = make_synthetic(root / "store", "synth", n_products=6, reviews_per_product=(3, 4),
                          vocab_size=40, embed_dim=8, roi_dim=2048, max_boxes=2, seed=2,
                          fingerprints=stage_fingerprints(root / "data_manifest.yaml"))
    write_mrhp_tables(data.records, root / "mrhp")
    m = ["--manifest", str(root / "data_manifest.yaml")]
    assert main([*m, "train", "--model", "length", "--dataset", "synth", "--name", "len"]) == 0
    return root, m


def _input(root: Path, name: str, edit=None) -> Path:
    """A copy of the test split's tables, optionally edited (edit(prd, rvw) on the parsed JSON)."""
    d = root / name
    d.mkdir(exist_ok=True)
    prd = json.loads((root / "mrhp" / "home.prd.test").read_text())
    rvw = json.loads((root / "mrhp" / "home.rvw.test").read_text())
    if edit:
        edit(prd, rvw)
    (d / "home.prd.test").write_text(json.dumps(prd))
    (d / "home.rvw.test").write_text(json.dumps(rvw))
    return d


def test_predict_refuses_a_null_review_id(run_ws, capsys):
    root, m = run_ws

    def null_id(prd, rvw):
        first = next(iter(rvw["review_id"]))
        rvw["review_id"][first] = None

    d = _input(root, "null-id", null_id)
    assert main([*m, "predict", "len", "--input", str(d)]) == 3
    err = capsys.readouterr().err
    assert "column 'review_id': expected an id string, got None" in err and "home.rvw.test" in err


def test_predict_refuses_ids_that_climb_out_of_the_image_root(run_ws, capsys):
    root, m = run_ws

    def climb(prd, rvw):
        first = next(iter(prd["product_id"]))
        old = prd["product_id"][first]
        prd["product_id"][first] = "../../etc"
        for k, v in rvw["product_id"].items():
            if v == old:
                rvw["product_id"][k] = "../../etc"

    d = _input(root, "climb", climb)
    assert main([*m, "predict", "len", "--input", str(d)]) == 3
    assert "holds a path separator" in capsys.readouterr().err


def test_predict_refuses_an_image_symlinked_out_of_the_root(run_ws, capsys, tmp_path):
    root, m = run_ws
    d = _input(root, "symlink")
    prd = json.loads((d / "home.prd.test").read_text())
    pid = next(iter(prd["product_id"].values()))
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(b"not yours")
    folder = d / "pictures" / "test" / "prd" / pid
    folder.mkdir(parents=True)
    (folder / "pic_0_0.jpg").symlink_to(outside)
    assert main([*m, "predict", "len", "--input", str(d)]) == 3
    assert "outside the image root" in capsys.readouterr().err


def test_predict_nested_json_input_is_one_line(run_ws, capsys):
    root, m = run_ws
    d = root / "nested"
    d.mkdir(exist_ok=True)
    (d / "home.prd.test").write_text("[" * 100_000 + "]" * 100_000)
    (d / "home.rvw.test").write_text("{}")
    assert main([*m, "predict", "len", "--input", str(d)]) == 3
    err = capsys.readouterr().err.strip()
    assert "nested too deeply" in err and len(err.splitlines()) == 1


def test_predict_without_image_features_refuses_a_model_that_needs_them(run_ws, capsys, monkeypatch):
    import models.data

    root, m = run_ws
    # the length run stands in for a multimodal one: its model now "needs" rois (predict imports
    # required_views from models.data when it runs)
    monkeypatch.setattr(models.data, "required_views", lambda model, cfg: frozenset({"tokens", "rois"}))
    d = _input(root, "no-images")
    assert main([*m, "predict", "len", "--input", str(d)]) == 3
    err = capsys.readouterr().err
    assert "needs image features" in err and "--allow-missing rois" in err
    assert main([*m, "predict", "len", "--input", str(d), "--images", str(root)]) == 3
    assert "holds no <split>/{prd,rvw}/<id>/pic_* file" in capsys.readouterr().err
    out = root / "no-images.jsonl"
    assert main([*m, "predict", "len", "--input", str(d), "--allow-missing", "rois", "--output", str(out)]) == 0
    assert "allowed missing: rois" in capsys.readouterr().err and out.read_text()


def test_predict_counts_images_never_extracted_as_missing(run_ws, capsys, monkeypatch):
    import models.data

    root, m = run_ws
    monkeypatch.setattr(models.data, "required_views", lambda model, cfg: frozenset({"tokens", "rois"}))
    d = _input(root, "new-images")
    prd = json.loads((d / "home.prd.test").read_text())
    pid = next(iter(prd["product_id"].values()))
    folder = d / "pictures" / "test" / "prd" / pid
    folder.mkdir(parents=True)
    (folder / "pic_0_0.jpg").write_bytes(b"an image nobody extracted")
    assert main([*m, "predict", "len", "--input", str(d)]) == 3
    err = capsys.readouterr().err
    assert "1 of 1 input images have no features in the store" in err and "--stage rois" in err
