"""Store comparisons shared by the flow tests (crash, Dask, one-writer)."""
from __future__ import annotations

import numpy as np

from pipeline.manifest import load_manifest
from pipeline.store import FeatureStore


def store_content(manifest_path) -> dict:
    """{(stage, item id): (key, {field: array})} over every view of the project's store; a
    recorded failure reads as {"failure": reason}."""
    store = FeatureStore(load_manifest(manifest_path).roots.store)
    out = {}
    for info in store.views():
        view = store.view(info.dataset, info.stage)
        for item_id in view.item_ids():
            failure = view.failure(item_id)
            arrays = {"failure": np.array(failure)} if failure else view.get(item_id)
            out[(info.stage, item_id)] = (view.key(item_id), arrays)
    return out


def assert_same_content(a: dict, b: dict) -> None:
    """Two `store_content` results hold the same items, keys, fields and arrays."""
    assert sorted(a) == sorted(b)
    for k, (key, arrays) in a.items():
        key_b, arrays_b = b[k]
        assert key == key_b and arrays.keys() == arrays_b.keys()
        for name, arr in arrays.items():
            np.testing.assert_array_equal(arr, arrays_b[name])
