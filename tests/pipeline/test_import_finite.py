"""Imported features with NaN/inf, or beyond float16's range when stored as float16, become
failures naming the file (before: stored as they were and handed to the models)."""
from __future__ import annotations

import numpy as np

from pipeline.ingest.importers import ImportConfig, import_features
from pipeline.store import FeatureStore
from tests.pipeline.test_importers import _records


def _write(src, name, x):
    n = len(x)
    np.savez(src / f"{name}.npz", x=np.asarray(x, np.float32), bbox=np.zeros((n, 4), np.float32),
             num_bbox=n, image_h=1, image_w=1)


def test_non_finite_and_float16_overflowing_features_are_failures(tmp_path):
    src = tmp_path / "npz"
    src.mkdir()
    _write(src, "ok", [[1.0, 2.0], [3.0, 4.0]])
    _write(src, "nan", [[1.0, np.nan], [np.inf, 4.0]])  # 2 non-finite values
    _write(src, "big", [[70000.0, 1.0], [1.0, 1.0]])  # finite in float32, inf in float16
    store = FeatureStore(tmp_path / "store")
    refs = ["a/ok.jpg", "a/nan.jpg", "a/big.jpg"]
    cfg16 = ImportConfig(format="bua-npz", feature_dim=2, npz_info="skip", feature_dtype="float16")
    report = import_features(store, "d", tmp_path / "pictures", _records(refs), src, cfg16)
    assert (report.rows, report.imported, report.failed) == (3, 1, 2)
    reasons = sorted(report.failures)
    assert reasons[0].endswith("big.npz: 1 feature value(s) beyond float16's range (|x| > 65504); "
                               "import with --feature-dtype float32")
    assert reasons[1].endswith("nan.npz: 2 non-finite (NaN/inf) feature value(s)")
    view = store.view("d", "rois")
    assert view.failure("a/nan.jpg") is not None and view.failure("a/big.jpg") is not None
    np.testing.assert_array_equal(view.get("a/ok.jpg")["features"], [[1.0, 2.0], [3.0, 4.0]])
    # float32 keeps the large value exactly
    cfg32 = ImportConfig(format="bua-npz", feature_dim=2, npz_info="skip", feature_dtype="float32")
    report = import_features(FeatureStore(tmp_path / "store32"), "d", tmp_path / "pictures", _records(refs), src, cfg32)
    assert (report.imported, report.failed) == (2, 1)
