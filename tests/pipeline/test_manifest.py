"""data_manifest.yaml loading: typed frozen records, key paths in errors, paths kept under their roots."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from pipeline.errors import ManifestError
from pipeline.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[2]

BASE = {
    "version": 1,
    "roots": {"data": "data", "resources": "res", "store": "store", "runs": "runs"},
    "datasets": {
        "d": {"raw_root": "mrhp", "image_root": "mrhp/pictures", "categories": ["home"],
              "word_vectors": "wv", "detector": "det"},
    },
    "resources": {
        "word_vectors": {"wv": {"format": "glove", "path": "vectors/glove.txt"}},
        "detectors": {"det": {"path": "weights/bua.pth"}},
    },
}


def write_manifest(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "data_manifest.yaml"
    p.write_text(yaml.safe_dump(data), encoding="utf-8")
    return p


def variant(**edits) -> dict:
    """BASE with `a.b.c=value` style edits (value None deletes the key)."""
    data = yaml.safe_load(yaml.safe_dump(BASE))
    for path, value in edits.items():
        *parents, last = path.split("__")
        node = data
        for k in parents:
            node = node[k]
        if value is None:
            node.pop(last)
        else:
            node[last] = value
    return data


def test_repository_manifest_loads_and_declares_the_demo():
    m = load_manifest(ROOT / "data_manifest.yaml")
    demo = m.dataset("demo")
    assert demo.raw_root == (ROOT / "demo_data" / "mrhp").resolve()
    assert demo.image_root == (ROOT / "demo_data" / "pictures").resolve()
    assert demo.categories == ("home",) and demo.labels == "auto" and demo.source == "amazon"
    assert m.word_vectors(demo.word_vectors).format == "kumo"


def test_relative_paths_resolve_against_manifest_folder_and_declared_roots(tmp_path):
    m = load_manifest(write_manifest(tmp_path, BASE))
    root = tmp_path.resolve()
    assert m.folder == root
    assert m.roots.data == root / "data" and m.store_root == root / "store"
    d = m.dataset("d")
    assert d.name == "d"
    assert d.raw_root == root / "data" / "mrhp" and d.image_root == root / "data" / "mrhp" / "pictures"
    assert m.word_vectors("wv").path == root / "res" / "vectors" / "glove.txt"
    assert m.detector("det").path == root / "res" / "weights" / "bua.pth"


def test_records_are_frozen(tmp_path):
    m = load_manifest(write_manifest(tmp_path, BASE))
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.dataset("d").threshold = 0.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        m.datasets["e"] = m.dataset("d")  # type: ignore[index]


@pytest.mark.parametrize("edits, pattern", [
    ({"datasets__d__colour": "blue"}, r"datasets\.d: unknown key\(s\) colour; valid keys: .*categories"),
    ({"roots__cache": "c"}, r"roots: unknown key\(s\) cache"),
    ({"surprise": 1}, r"unknown top-level key\(s\) surprise; valid keys: .*datasets"),
    ({"resources__detectors__det__arch": "x"}, r"resources\.detectors\.det: unknown key\(s\) arch"),
    ({"stages": {"rois": {"min_sise": 3}}}, r"stages\.rois: unknown key\(s\) min_sise"),
    ({"stages": {"ocr": {}}}, r"stages: unknown stage\(s\) ocr"),
])
def test_unknown_keys_are_errors_naming_the_key_path(tmp_path, edits, pattern):
    with pytest.raises(ManifestError, match=pattern):
        load_manifest(write_manifest(tmp_path, variant(**edits)))


@pytest.mark.parametrize("edits, pattern", [
    ({"datasets__d__threshold": "high"}, r"datasets\.d\.threshold: expected a number, got 'high'"),
    ({"datasets__d__categories": "home"}, r"datasets\.d\.categories: expected a list, got 'home'"),
    ({"datasets__d__source": "ebay"}, r"datasets\.d\.source: expected one of 'amazon', 'lazada', got 'ebay'"),
    ({"datasets__d__labels": True}, r"datasets\.d\.labels: expected one of 'auto', 'votes', 'labels'"),
    ({"datasets__d__raw_root": None}, r"datasets\.d\.raw_root: required key is missing"),
    ({"datasets__d__categories": []}, r"datasets\.d\.categories: expected at least one category"),
    ({"version": 2}, r"version: expected 1, got 2"),
    ({"version": "1"}, r"version: expected an integer, got '1'"),
    ({"stages": {"tokens": {"min_freq": True}}}, r"stages\.tokens\.min_freq: expected an integer, got True"),
    ({"resources__word_vectors__wv__path": None}, r"resources\.word_vectors\.wv\.path: required for format 'glove'"),
    ({"flows": {"task_runner": "celery"}}, r"flows\.task_runner: expected one of 'thread', 'dask'"),
])
def test_wrong_types_are_errors_naming_the_key_path_and_expectation(tmp_path, edits, pattern):
    with pytest.raises(ManifestError, match=pattern):
        load_manifest(write_manifest(tmp_path, variant(**edits)))


def test_errors_name_the_manifest_file(tmp_path):
    p = write_manifest(tmp_path, variant(datasets__d__threshold="high"))
    with pytest.raises(ManifestError, match=str(p).replace(".", r"\.")):
        load_manifest(p)


@pytest.mark.parametrize(
    "edits, pattern",
    [
        (
            {"datasets__d__raw_root": "../../etc"},
            r"datasets\.d\.raw_root: path '\.\./\.\./etc' resolves to .* outside its declared root",
        ),
        ({"datasets__d__image_root": "mrhp/../../pictures"}, r"datasets\.d\.image_root: .*outside its declared root"),
        ({"resources__word_vectors__wv__path": "../x.txt"}, r"resources\.word_vectors\.wv\.path: .*outside"),
        ({"resources__detectors__det__path": "/etc/passwd"}, r"resources\.detectors\.det\.path: .*outside"),
    ],
)
def test_paths_escaping_their_root_via_dotdot_or_absolute_are_refused(tmp_path, edits, pattern):
    with pytest.raises(ManifestError, match=pattern):
        load_manifest(write_manifest(tmp_path, variant(**edits)))


def test_paths_escaping_their_root_via_symlink_are_refused(tmp_path):
    (tmp_path / "data").mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.symlink(outside, tmp_path / "data" / "mrhp")
    with pytest.raises(ManifestError, match=r"datasets\.d\.raw_root: .*outside its declared root"):
        load_manifest(write_manifest(tmp_path, BASE))


def test_symlink_staying_inside_the_root_is_fine(tmp_path):
    (tmp_path / "data" / "real").mkdir(parents=True)
    os.symlink(tmp_path / "data" / "real", tmp_path / "data" / "mrhp")
    m = load_manifest(write_manifest(tmp_path, BASE))
    assert m.dataset("d").raw_root == (tmp_path / "data" / "real").resolve()


@pytest.mark.parametrize(
    "edits, pattern",
    [
        (
            {"datasets__d__word_vectors": "glove-300"},
            r"datasets\.d\.word_vectors: 'glove-300' is not declared under resources\.word_vectors \(wv\)",
        ),
        (
            {"datasets__d__detector": "frcnn"},
            r"datasets\.d\.detector: 'frcnn' is not declared under resources\.detectors \(det\)",
        ),
    ],
)
def test_dataset_referencing_an_undeclared_resource_is_an_error(tmp_path, edits, pattern):
    with pytest.raises(ManifestError, match=pattern):
        load_manifest(write_manifest(tmp_path, variant(**edits)))


def test_lookups_of_undeclared_names_list_what_is_declared(tmp_path):
    m = load_manifest(write_manifest(tmp_path, BASE))
    with pytest.raises(ManifestError, match=r"no dataset 'x'; declared: d"):
        m.dataset("x")
    with pytest.raises(ManifestError, match=r"word_vectors has no 'x'; declared: wv"):
        m.word_vectors("x")
    with pytest.raises(ManifestError, match=r"detectors has no 'x'; declared: det"):
        m.detector("x")


def test_unreadable_manifest_files_are_manifest_errors(tmp_path):
    with pytest.raises(ManifestError, match="manifest file not found"):
        load_manifest(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets: [unclosed\n")
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifest(bad)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"version: 1\nroots: {data: \xff}\n")
    with pytest.raises(ManifestError, match="not UTF-8"):
        load_manifest(binary)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ManifestError, match="expected a mapping"):
        load_manifest(listy)


def test_yaml_tags_are_not_executed(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("version: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifest(p)


def test_default_manifest_comes_from_environment(tmp_path, monkeypatch):
    p = write_manifest(tmp_path, BASE)
    monkeypatch.setenv("MRHP_MANIFEST", str(p))
    assert load_manifest().path == p.resolve()


def test_empty_manifest_is_valid_and_declares_nothing(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("")
    m = load_manifest(p)
    assert dict(m.datasets) == {} and m.roots.data == tmp_path.resolve()
    assert m.stage_params("tokens").min_freq == 5


def test_overrides_merge_over_the_file_and_are_validated_like_it(tmp_path):
    path = write_manifest(tmp_path, variant())
    m = load_manifest(path, overrides={"stages": {"rois": {"random_init": True}}})
    assert m.stages["rois"].random_init is True
    assert load_manifest(path).stages["rois"].random_init is False
    with pytest.raises(ManifestError, match=r"stages\.rois: unknown key\(s\) random_int"):
        load_manifest(path, overrides={"stages": {"rois": {"random_int": True}}})


@pytest.mark.parametrize("rois, expected", [
    ({"fixed_k": 36, "rpn_post_nms_top_n": 20}, "stages.rois.fixed_k: 36 boxes cannot come from rpn_post_nms_top_n 20"),
    ({"min_boxes": 25, "rpn_post_nms_top_n": 20}, "stages.rois.min_boxes: 25 boxes cannot come from"),
    ({"min_boxes": 50, "max_boxes": 36}, "stages.rois.min_boxes: 50 is larger than max_boxes 36"),
    ({"rpn_pre_nms_top_n": 100, "rpn_post_nms_top_n": 300}, "stages.rois.rpn_pre_nms_top_n: 100 is below"),
    ({"min_size": 800, "max_size": 600}, "stages.rois.min_size/max_size"),
])
def test_impossible_box_settings_refused_at_load(tmp_path, rois, expected):
    data = variant(stages={"rois": rois})
    with pytest.raises(ManifestError) as err:
        load_manifest(write_manifest(tmp_path, data))
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_box_settings_checked_after_overrides(tmp_path):
    path = write_manifest(tmp_path, variant(stages={"rois": {"rpn_post_nms_top_n": 20, "fixed_k": 10}}))
    assert load_manifest(path).stages["rois"].fixed_k == 10
    with pytest.raises(ManifestError, match="fixed_k: 36"):
        load_manifest(path, overrides={"stages": {"rois": {"fixed_k": 36}}})


# --------------------------------------------------------------------------- one parse per process


def test_a_manifest_is_parsed_once_per_content_and_overrides(tmp_path):
    import pipeline.manifest as pm

    path = write_manifest(tmp_path, variant(stages={"rois": {"rpn_post_nms_top_n": 50}}))
    before = pm.parses
    first = load_manifest(path)
    again = load_manifest(str(path))  # same file by another spelling: no second parse
    assert again is first and pm.parses == before + 1
    assert first.stage_params("rois").rpn_post_nms_top_n == 50

    # other overrides: another record (and a parse), the file's own record unchanged
    over = load_manifest(path, overrides={"stages": {"rois": {"rpn_post_nms_top_n": 40}}})
    assert over.stage_params("rois").rpn_post_nms_top_n == 40 and pm.parses == before + 2
    assert load_manifest(path, overrides={"stages": {"rois": {"rpn_post_nms_top_n": 40}}}) is over
    assert load_manifest(path).stage_params("rois").rpn_post_nms_top_n == 50

    # an edited file (same size: 50 -> 60) is a new content: parsed again, the new value read
    path.write_text(path.read_text(encoding="utf-8").replace("50", "60"), encoding="utf-8")
    edited = load_manifest(path)
    assert edited.stage_params("rois").rpn_post_nms_top_n == 60 and pm.parses == before + 3


def test_a_bad_manifest_is_refused_every_time_not_remembered(tmp_path):
    path = write_manifest(tmp_path, variant(stages={"rois": {"rpn_post_nms_top_n": 20, "fixed_k": 30}}))
    for _ in range(2):
        with pytest.raises(ManifestError, match="stages.rois.fixed_k: 30 boxes cannot come from"):
            load_manifest(path)


def test_overrides_freeze_to_sorted_leaves_and_thaw_back():
    from pipeline.manifest import freeze_overrides, thaw_overrides

    nested = {"stages": {"rois": {"random_init": True, "seed": 3}}, "datasets": {"d": {"splits": ["train"]}}}
    frozen = freeze_overrides(nested)
    assert frozen == (
        (("datasets", "d", "splits"), ("train",)),
        (("stages", "rois", "random_init"), True),
        (("stages", "rois", "seed"), 3),
    )
    hash(frozen)  # hashable: it keys the memo and travels in a frozen request
    assert thaw_overrides(frozen) == nested
    assert freeze_overrides(None) == () and thaw_overrides(()) is None
    with pytest.raises(ManifestError, match=r"overrides: stages.rois.seed: expected a plain value .* got object"):
        freeze_overrides({"stages": {"rois": {"seed": object()}}})


@pytest.mark.parametrize("value", [4, 10.0, -1, ".nan"])
def test_a_relevance_threshold_outside_the_label_range_is_refused(tmp_path, value):
    # labels are 0..4 and relevant means label > threshold: at 4 or above no review is relevant
    # (every metric 0), below 0 every review is (MAP 1 whatever the ranking)
    data = variant(datasets__d__threshold=value)
    text = yaml.safe_dump(data).replace("'.nan'", ".nan")  # a YAML NaN, not the string
    p = tmp_path / "data_manifest.yaml"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(ManifestError, match=r"datasets\.d\.threshold: expected a relevance threshold in \[0, 4\)"):
        load_manifest(p)


def test_thresholds_0_and_1_load(tmp_path):
    for value in (0, 1):
        m = load_manifest(write_manifest(tmp_path, variant(datasets__d__threshold=value)))
        assert m.dataset("d").threshold == value


def test_overrides_equal_in_python_but_of_another_type_are_validated_on_their_own(tmp_path):
    # True == 1 == 1.0 in Python (same hash), but a bool field refuses 1 and an int field refuses
    # true or 1.0: the memo must not hand the record of one spelling to the other.
    path = write_manifest(tmp_path, BASE)
    assert load_manifest(path, overrides={"stages": {"rois": {"random_init": True}}}).stage_params(
        "rois").random_init is True
    with pytest.raises(ManifestError, match=r"stages\.rois\.random_init: expected true or false, got 1"):
        load_manifest(path, overrides={"stages": {"rois": {"random_init": 1}}})
    assert load_manifest(path, overrides={"flows": {"chunk_size": 1}}).flows.chunk_size == 1
    for wrong in (True, 1.0):
        with pytest.raises(ManifestError, match=r"flows\.chunk_size: expected an integer"):
            load_manifest(path, overrides={"flows": {"chunk_size": wrong}})


def test_a_symlink_repointed_while_the_process_lives_is_followed_not_remembered(tmp_path):
    # A served flow (mrhp deploy) or a Dask worker outlives many runs: a link below a root that
    # is repointed between two loads of an unchanged manifest file must be resolved again, and a
    # link repointed outside its root refused, as a fresh process would.
    data = tmp_path / "data"
    for d in ("v1", "v2"):
        (data / d).mkdir(parents=True)
    os.symlink(data / "v1", data / "mrhp")
    path = write_manifest(tmp_path, BASE)
    assert load_manifest(path).dataset("d").raw_root == (data / "v1").resolve()
    (data / "mrhp").unlink()
    os.symlink(data / "v2", data / "mrhp")
    assert load_manifest(path).dataset("d").raw_root == (data / "v2").resolve()
    (data / "mrhp").unlink()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", data / "mrhp")
    with pytest.raises(ManifestError, match=r"datasets\.d\.raw_root: .*outside its declared root"):
        load_manifest(path)


def test_a_root_symlink_repointed_is_followed(tmp_path):
    (tmp_path / "store_a").mkdir()
    (tmp_path / "store_b").mkdir()
    os.symlink(tmp_path / "store_a", tmp_path / "store")
    path = write_manifest(tmp_path, BASE)
    assert load_manifest(path).roots.store == (tmp_path / "store_a").resolve()
    (tmp_path / "store").unlink()
    os.symlink(tmp_path / "store_b", tmp_path / "store")
    assert load_manifest(path).roots.store == (tmp_path / "store_b").resolve()
