"""Duplicate source rows of one image key: a good row wins over a failed one (whichever comes
first), identical good rows are duplicates, and two good rows that differ stop the import
naming the file, the key and both rows (before: the first row won, even a failed one)."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import DataError
from pipeline.ingest.importers import ImportConfig, export_lxmert_tsv, import_features
from pipeline.store import FeatureStore
from tests.pipeline.test_importers import _records

CFG = ImportConfig(format="lxmert-tsv", feature_dim=2, chunk_size=1)


def _arrays(feats) -> dict[str, np.ndarray]:
    n = len(feats)
    return {"image_hw": np.array([4, 5], np.int32), "obj_ids": np.arange(n, dtype=np.int32),
            "obj_conf": np.full(n, 0.5, np.float32), "attr_ids": np.zeros(n, np.int32),
            "attr_conf": np.full(n, 0.25, np.float32), "boxes": np.zeros((n, 4), np.float32),
            "features": np.asarray(feats, np.float32)}


def _import(tmp_path, rows, refs=("a/x.jpg", "a/y.jpg")):
    tmp_path.mkdir(parents=True, exist_ok=True)
    tsv = tmp_path / "src.tsv"
    export_lxmert_tsv(rows, tsv)
    store = FeatureStore(tmp_path / "store")
    return store, import_features(store, "d", tmp_path / "pictures", _records(list(refs)), tsv, CFG)


GOOD = [[1.0, 2.0], [3.0, 4.0]]
BAD = [[1.0, np.nan], [3.0, 4.0]]  # a failure: 1 non-finite value


def test_a_good_row_after_a_failed_one_of_the_same_key_wins(tmp_path):
    # line 1: x failed, line 2: y good, line 3: x good -> x stored from line 3, nothing failed
    store, report = _import(tmp_path, [("x", _arrays(BAD)), ("y", _arrays(GOOD)), ("x", _arrays(GOOD))])
    assert (report.rows, report.imported, report.duplicates, report.failed) == (3, 2, 1, 0)
    assert report.failures == [] and (report.matched_images, report.failed_images) == (2, 0)
    view = store.view("d", "rois")
    assert view.failure("a/x.jpg") is None
    np.testing.assert_array_equal(view.get("a/x.jpg")["features"], GOOD)


def test_a_failed_row_after_a_good_one_is_a_duplicate_and_a_lone_failure_still_fails(tmp_path):
    store, report = _import(tmp_path, [("x", _arrays(GOOD)), ("x", _arrays(BAD)), ("y", _arrays(BAD))])
    assert (report.rows, report.imported, report.duplicates, report.failed) == (3, 1, 1, 1)
    assert len(report.failures) == 1 and report.failures[0].startswith("src.tsv line 3")
    view = store.view("d", "rois")
    np.testing.assert_array_equal(view.get("a/x.jpg")["features"], GOOD)
    assert view.failure("a/y.jpg") is not None


def test_identical_good_duplicates_are_counted_and_differing_ones_stop_the_import(tmp_path):
    _, report = _import(tmp_path / "same", [("x", _arrays(GOOD)), ("x", _arrays(GOOD))])
    assert (report.rows, report.imported, report.duplicates, report.failed) == (2, 1, 1, 0)
    other = [[1.0, 2.0], [3.0, 4.5]]
    with pytest.raises(DataError, match=r"^src\.tsv line 3: image key import:lxmert-tsv:x \(img_id 'x'\) was "
                                        r"already read from src\.tsv line 1 with different arrays"):
        _import(tmp_path / "differ", [("x", _arrays(GOOD)), ("y", _arrays(GOOD)), ("x", _arrays(other))])
