"""`mrhp predict` refuses to featurise new products with other stage settings than the run was
trained on: training records the fingerprint of every store view it read (data.json
`read_views`), predict compares them with the `fingerprint()` of the stages it runs (tokens,
probes, bert) and with the fingerprint of the rois entries it reads; a run folder without the
record gets one warning line and predicts.

The synthetic store carries, for tokens and probes, the fingerprints the manifest's own stages
compute (`make_synthetic(fingerprints=...)`: stand-in arrays under the real settings), so a run
trained on it records what an extraction with this manifest would have written.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mrhp.cli import main
from mrhp.commands.predict import check_fingerprints, recorded_views, short_fp
from pipeline.errors import DataError, TrainingError
from tests.support.manifests import SYNTH_MANIFEST


def stage_fingerprints(manifest_path: str | Path, dataset: str = "synth",
                       stages: tuple[str, ...] = ("tokens",)) -> dict[str, str]:
    """{stage: fingerprint} the manifest's stages compute (the extraction's `Stage.fingerprint()`),
    for synthetic stores that stand in for an extraction with this manifest."""
    from features.text import probes, tokens
    from pipeline.manifest import load_manifest

    manifest = load_manifest(manifest_path)
    builders = {"tokens": tokens.build_stage, "probes": probes.build_stage}
    return {s: builders[s](manifest, dataset).fingerprint() for s in stages}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A synthetic store with the manifest's tokens and probes fingerprints, and a `length` run
    ("len") that reads the tokens view only."""
    from models.synthetic import make_synthetic, write_mrhp_tables

    root = tmp_path_factory.mktemp("predict-fp")
    (root / "data_manifest.yaml").write_text(SYNTH_MANIFEST, encoding="utf-8")
    fps = stage_fingerprints(root / "data_manifest.yaml", stages=("tokens", "probes"))
    data = make_synthetic(root / "store", "synth", n_products=10, reviews_per_product=(3, 4), vocab_size=40,
                          embed_dim=8, roi_dim=2048, max_boxes=2, seed=3, fingerprints=fps)
    write_mrhp_tables(data.records, root / "mrhp")
    m = ["--manifest", str(root / "data_manifest.yaml")]
    assert main([*m, "train", "--model", "length", "--dataset", "synth", "--name", "len"]) == 0
    return root, m, fps


def _edited(root: Path, name: str, stages: str) -> list[str]:
    """--manifest of a copy of the workspace manifest (same folder, same roots) whose `stages:`
    block is `stages`."""
    text = SYNTH_MANIFEST.replace("stages:\n  tokens: {min_freq: 1}\n", f"stages:\n{stages}")
    assert text != SYNTH_MANIFEST
    (root / name).write_text(text, encoding="utf-8")
    return ["--manifest", str(root / name)]


def _predict(m: list[str], run: str, root: Path, *extra: str) -> int:
    return main([*m, "predict", run, "--input", str(root / "mrhp" / "home.prd.test"), *extra])


def test_the_run_records_the_fingerprint_of_every_view_it_read(ws):
    from pipeline.store import FeatureStore

    root, _, fps = ws
    rec = json.loads((root / "runs/len/seed0/data.json").read_text())["read_views"]
    store = FeatureStore(root / "store")
    # `length` reads the tokens view (and the word vectors): not the probes or rois views the store has
    assert set(rec) == {"tokens", "embeddings"}
    assert rec["tokens"] == {"dataset": "synth", "fingerprint": store.view("synth", "tokens").fingerprint}
    assert rec["tokens"]["fingerprint"] == fps["tokens"]
    assert rec["embeddings"] == {"dataset": "synth", "fingerprint": "synthetic0000000"}


def test_unchanged_manifest_predicts_without_a_warning(ws, capsys):
    root, m, _ = ws
    out = root / "same.jsonl"
    assert _predict(m, "len", root, "--output", str(out)) == 0
    assert out.read_text().strip()
    assert "warning" not in capsys.readouterr().err


def test_an_edited_tokens_parameter_is_refused_in_one_line(ws, capsys):
    root, _, fps = ws
    m = _edited(root, "edited-tokens.yaml", "  tokens: {min_freq: 1, max_len: 64}\n")
    assert _predict(m, "len", root, "--output", str(root / "never.jsonl")) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    now = stage_fingerprints(root / "edited-tokens.yaml")["tokens"]
    assert now != fps["tokens"]
    assert f"tokens: run 'len' was trained on tokens fingerprint {fps['tokens'][:8]}, but the manifest" in err
    assert f"edited-tokens.yaml now gives {now[:8]}" in err
    assert "`mrhp extract --dataset synth --stage tokens`) and retrain" in err
    assert "predict with the manifest settings the run was trained with" in err
    assert not (root / "never.jsonl").exists()


def test_a_run_without_the_record_warns_once_and_predicts(ws, capsys):
    root, m, _ = ws
    shutil.copytree(root / "runs" / "len", root / "runs" / "old")
    meta_path = root / "runs/old/seed0/data.json"
    meta = json.loads(meta_path.read_text())
    del meta["read_views"]
    meta_path.write_text(json.dumps(meta))
    out = root / "old.jsonl"
    assert _predict(m, "old", root, "--output", str(out)) == 0
    assert out.read_text().strip()
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning")]
    assert warnings == [
        "warning: run 'old' records no view fingerprints (data.json from before they were recorded): predict "
        "cannot check that it featurises with the stage settings the run was trained on; retrain the run to "
        "get the check"
    ]
    # the check does not depend on the manifest: an edited one is not caught for an old run (warned)
    m2 = _edited(root, "edited-old.yaml", "  tokens: {min_freq: 1, max_len: 64}\n")
    assert _predict(m2, "old", root, "--output", str(out)) == 0
    assert "records no view fingerprints" in capsys.readouterr().err


def test_seeds_that_read_other_views_are_not_averaged(ws, capsys):
    root, m, _ = ws
    two = root / "runs" / "two"
    for k in (0, 1):
        shutil.copytree(root / "runs/len/seed0", two / f"seed{k}")
    meta = json.loads((two / "seed1/data.json").read_text())
    meta["read_views"]["tokens"]["fingerprint"] = "0000000000000000"
    (two / "seed1/data.json").write_text(json.dumps(meta))
    assert _predict(m, "two", root) == 6
    assert "seed1: trained on other data" in capsys.readouterr().err
    assert _predict(m, "two", root, "--seed", "0", "--output", str(root / "two.jsonl")) == 0


@pytest.fixture(scope="module")
def mm_run(ws):
    """A run ("mm") whose model reads tokens, probes and rois (the `length` baseline standing in
    for a multimodal model; required_views is patched for its training only)."""
    import models.data

    root, m, _ = ws
    mp = pytest.MonkeyPatch()
    mp.setattr(models.data, "required_views", lambda model, cfg: frozenset({"tokens", "probes", "rois"}))
    try:
        assert main([*m, "train", "--model", "length", "--dataset", "synth", "--name", "mm"]) == 0
    finally:
        mp.undo()
    return root, m


@pytest.fixture
def reads_mm(monkeypatch):
    import models.data

    monkeypatch.setattr(models.data, "required_views", lambda model, cfg: frozenset({"tokens", "probes", "rois"}))


def test_a_multimodal_run_records_its_probes_and_rois_views(mm_run, ws):
    root, _ = mm_run
    _, _, fps = ws
    rec = json.loads((root / "runs/mm/seed0/data.json").read_text())["read_views"]
    assert set(rec) == {"tokens", "probes", "rois", "embeddings"}
    assert rec["probes"]["fingerprint"] == fps["probes"] and rec["rois"]["fingerprint"] == "synthetic0000000"


def test_an_edited_probes_mode_is_refused(mm_run, reads_mm, capsys):
    root, _ = mm_run
    m = _edited(root, "edited-probes.yaml", "  tokens: {min_freq: 1}\n  probes: {mode: script}\n")
    assert _predict(m, "mm", root, "--allow-missing", "rois") == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "probes: run 'mm' was trained on probes fingerprint" in err
    assert "stages.probes or its resources changed since training" in err
    assert "`mrhp extract --dataset synth --stage probes`" in err


def test_rois_re_extracted_under_other_settings_are_refused(mm_run, reads_mm, capsys):
    """The rois view now points at entries of another fingerprint (what `mrhp extract --stage
    rois` after a rois settings change does): predict reads those entries, so it refuses."""
    from pipeline.stage import FieldSpec, Record
    from pipeline.store import FeatureStore

    root, m = mm_run
    store = FeatureStore(root / "store")
    view = store.view("synth", "rois")
    schema = {
        "features": FieldSpec("float32", (2048,), True), "boxes": FieldSpec("float32", (4,), True),
        "obj_ids": FieldSpec("int32", (), True), "obj_conf": FieldSpec("float32", (), True),
        "attr_ids": FieldSpec("int32", (), True), "attr_conf": FieldSpec("float32", (), True),
        "image_hw": FieldSpec("int32", (2,), False),
    }
    new_fp = "0123456789abcdef"
    writer = store.writer("rois", new_fp, schema)
    done: set[str] = set()
    mapping = {item_id: view.key(item_id) for item_id in view.item_ids()}
    for item_id, key in mapping.items():
        if key not in done:
            writer.add(Record(key=key, arrays=dict(view.get(item_id))))
            done.add(key)
    writer.close()
    store.write_view("synth", "rois", new_fp, mapping)
    try:
        assert _predict(m, "mm", root, "--allow-missing", "rois") == 3
        err = capsys.readouterr().err.strip()
        assert err.splitlines() == [
            "mrhp predict: error: rois: run 'mm' was trained on rois fingerprint syntheti, but the store's rois "
            "view of dataset 'synth' now has 01234567 (re-extracted with other settings since training): "
            "retrain on the current rois (`mrhp train`), or predict from a store holding the rois the run was "
            "trained on"
        ]
    finally:
        store.write_view("synth", "rois", "synthetic0000000", mapping)


# ---- the comparison itself, on hand-made records ---------------------------------------------

def _check(recorded, used):
    said: list[str] = []
    check_fingerprints(recorded, used, run="r", dataset="d", manifest_path="m.yaml", warn=said.append)
    return said


def test_equal_fingerprints_pass_silently_and_unread_views_are_not_compared():
    rec = {"tokens": "aaaaaaaa11111111", "embeddings": "eeeeeeee00000000"}
    assert _check(rec, {"tokens": "aaaaaaaa11111111"}) == []
    assert _check(rec, {}) == []


def test_a_mismatch_names_the_stage_both_short_fingerprints_and_the_fix():
    with pytest.raises(DataError) as e:
        _check({"tokens": "aaaaaaaa11111111", "bert": "cccccccc33333333"},
               {"tokens": "aaaaaaaa11111111", "bert": "dddddddd44444444"})
    assert str(e.value) == (
        "bert: run 'r' was trained on bert fingerprint cccccccc, but the manifest m.yaml now gives dddddddd "
        "(stages.bert or its resources changed since training): re-extract (`mrhp extract --dataset d "
        "--stage bert`) and retrain, or predict with the manifest settings the run was trained with")


def test_short_fingerprints_keep_the_random_init_prefix_and_grow_when_8_digits_tie():
    assert short_fp("random-init-0123456789abcdef") == "random-init-01234567"
    assert short_fp("aaaaaaaa11111111", "aaaaaaaa22222222") == "aaaaaaaa11111111"
    with pytest.raises(DataError, match="fingerprint random-init-aaaaaaaa11111111, but .* gives aaaaaaaa22222222"):
        _check({"probes": "random-init-aaaaaaaa11111111"}, {"probes": "aaaaaaaa22222222"})


def test_a_view_the_run_did_not_read_warns_and_no_record_warns_once():
    said = _check({"tokens": "aaaaaaaa11111111"}, {"tokens": "aaaaaaaa11111111", "rois": "bbbbbbbb22222222"})
    assert said == ["warning: run 'r' was trained without a rois view of dataset 'd', but predict gives the "
                    "model rois features (fingerprint bbbbbbbb) it never saw in training"]
    said = _check(None, {"tokens": "aaaaaaaa11111111", "probes": "x"})
    assert len(said) == 1 and "records no view fingerprints" in said[0]


def test_the_record_is_read_strictly():
    assert recorded_views({"dataset": "d"}, "data.json") is None
    assert recorded_views({"dataset": "d", "read_views": {"tokens": {"dataset": "d", "fingerprint": "ab"}}},
                          "data.json") == {"tokens": "ab"}
    with pytest.raises(TrainingError, match=r"data.json: read_views: expected a mapping"):
        recorded_views({"read_views": ["tokens"]}, "data.json")
    with pytest.raises(TrainingError, match=r"data.json: read_views.tokens: expected \{dataset, fingerprint\}"):
        recorded_views({"read_views": {"tokens": {"dataset": "d"}}}, "data.json")
    with pytest.raises(TrainingError, match="dataset 'e' is not the run's dataset 'd'"):
        recorded_views({"dataset": "d", "read_views": {"tokens": {"dataset": "e", "fingerprint": "ab"}}}, "x")


def test_a_model_that_reads_no_probe_masks_is_not_refused_for_failed_ones(ws, monkeypatch, capsys):
    """`length` reads no probes view (training never opens it, whatever data.probe_failures says):
    predict must not compute probe masks for it, nor warn about or refuse reviews whose mask fails
    (before: the probes stage ran whenever the dataset had a probes view, and its failures stopped
    predict under `data.probe_failures: refuse`)."""
    import mrhp.commands.predict as predict

    root, m, _ = ws
    assert main([*m, "train", "--model", "length", "--dataset", "synth", "--name", "len-refuse",
                 "data.probe_failures=refuse"]) == 0
    real = predict._mask_records

    def all_fail(stage, reviews, products):
        return [(None, "probe mask failed: ValueError: boom") for _ in real(stage, reviews, products)]

    monkeypatch.setattr(predict, "_mask_records", all_fail)
    capsys.readouterr()
    assert _predict(m, "len-refuse", root) == 0
    assert "probe mask" not in capsys.readouterr().err


def test_missing_image_features_are_refused_before_any_text_is_featurised(mm_run, reads_mm, monkeypatch, capsys):
    """A model that needs rois, predicted without an image folder: the refusal needs no input
    text, so it comes before the stages featurise anything (tokens, spaCy probes, a BERT
    encoder over every review), not after."""
    import mrhp.commands.predict as predict

    root, m = mm_run

    def featurised(stage, items):
        raise AssertionError(f"the {stage.name} stage ran before the refusal")

    monkeypatch.setattr(predict, "stage_records", featurised)
    assert _predict(m, "mm", root, "--images", str(root / "no-such-folder")) == 3
    err = capsys.readouterr().err
    assert "the image folder (--images, default <input folder>/pictures) does not exist" in err
    assert "stage ran before" not in err


def test_a_seed_the_run_does_not_have_is_refused_not_swapped(ws, capsys):
    """`--seed 3` on a run whose only seed folder is seed0: refused naming the seeds there (before:
    seed0's scores came back as seed 3's, unsaid). A run folder that is itself one run (no seed<k>
    name) still predicts with any --seed."""
    root, m, _ = ws
    shutil.copytree(root / "runs/len/seed0", root / "runs/one/seed0")
    assert _predict(m, "one", root, "--seed", "3") == 6
    assert "run 'one' has no seed3; found seed0" in capsys.readouterr().err
    shutil.copytree(root / "runs/len/seed0", root / "runs/flat")
    assert _predict(m, "flat", root, "--seed", "3", "--output", str(root / "flat.jsonl")) == 0


def test_evaluate_refuses_a_run_whose_views_were_re_extracted_since_training(ws, capsys):
    """`mrhp evaluate` reads the store's current views: a view the run read (data.json
    `read_views`) whose fingerprint changed since would score the model on features it was not
    trained on, so it is refused in one line naming the stage and both fingerprints; a run
    folder without the record evaluates as before."""
    root, m, _ = ws
    shutil.copytree(root / "runs/len/seed0", root / "runs/ev/seed0")
    meta = json.loads((root / "runs/ev/seed0/data.json").read_text())
    was = meta["read_views"]["tokens"]["fingerprint"]
    meta["read_views"]["tokens"]["fingerprint"] = "0000000000000000"
    (root / "runs/ev/seed0/data.json").write_text(json.dumps(meta))
    assert main([*m, "evaluate", "ev"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tokens" in err[0] and "00000000" in err[0] and was[:8] in err[0]
    del meta["read_views"]
    (root / "runs/ev/seed0/data.json").write_text(json.dumps(meta))
    assert main([*m, "evaluate", "ev"]) == 0


def test_evaluate_refuses_a_run_trained_in_another_vocabulary(ws, capsys):
    """The tokens and embeddings view fingerprints leave the vocabulary out (it is in every item
    key), so a dataset whose train texts changed and were re-extracted keeps them while every
    token id moves: evaluate compares the run's vocabulary (data.json `vocab_fingerprint`) with
    the dataset's now and refuses a difference in one line."""
    root, m, _ = ws
    shutil.copytree(root / "runs/len/seed0", root / "runs/voc/seed0")
    meta = json.loads((root / "runs/voc/seed0/data.json").read_text())
    meta["vocab_fingerprint"] = "feedfacefeedface"
    (root / "runs/voc/seed0/data.json").write_text(json.dumps(meta))
    assert main([*m, "evaluate", "voc"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vocabulary feedface" in err[0]
