"""Box features with NaN/inf (fp16 autocast, or the float16 cast overflowing) become failure
records (before: stored, and read by the models as image features)."""
from __future__ import annotations

import numpy as np

import features.rois as rois
from pipeline.stage import WorkItem
from tests.features.test_rois_stage import _manifest, _stage, demo  # noqa: F401 - the fixture


def test_non_finite_box_features_are_a_failure_record(demo, monkeypatch):  # noqa: F811
    real = rois.pack_batch

    def poisoned(dets, params, cfg):
        out = []
        for arrays in real(dets, params, cfg):
            feats = arrays["features"].copy()
            feats[0, 0] = np.inf  # one overflowed value
            out.append({**arrays, "features": feats})
        return out

    monkeypatch.setattr(rois, "pack_batch", poisoned)
    photo = demo / "demo_data" / "pictures" / "train" / "prd" / "B0DEMOHM01" / "pic_0_0.jpg"
    (rec,) = _stage(_manifest(demo)).run([WorkItem(key="k-inf", source=str(photo))])
    assert not rec.arrays
    assert rec.failure.startswith("1 non-finite (NaN/inf) box feature value(s) in float16")
    monkeypatch.setattr(rois, "pack_batch", real)
    (rec,) = _stage(_manifest(demo)).run([WorkItem(key="k-ok", source=str(photo))])
    assert rec.failure is None and np.isfinite(rec.arrays["features"]).all()
