"""The MRHP reader: label interpretation, img_url conventions, product text, image refs, bad input."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.datasets.mrhp import load_dataset, resolve_image, validate_dataset, votes_to_label
from pipeline.errors import DataError
from pipeline.manifest import DatasetSpec
from pipeline.records import ImageRef


def table(rows: list[dict]) -> dict:
    cols = list(rows[0]) if rows else []
    return {c: {str(i): r[c] for i, r in enumerate(rows)} for c in cols}


def write(path: Path, rows: list[dict]) -> None:
    path.write_text(json.dumps(table(rows)), encoding="utf-8")


def make_dataset(tmp_path: Path, *, votes=(1, 5, 20), source="amazon", category="home",
                 prd_img=None, rvw_img=None, splits=("train",)) -> DatasetSpec:
    raw = tmp_path / "raw"
    raw.mkdir(exist_ok=True)
    for split in splits:
        pid = f"P{split}"
        write(raw / f"{category}.prd.{split}", [{
            "product_id": pid, "name": "Steel Pan", "description": "A two quart pan.",
            "img_url": prd_img if prd_img is not None else [], "keyword": "pan", "brand_name": "B",
        }])
        rvws, rels = [], []
        for i, v in enumerate(votes):
            rid = f"{pid}-{i}"
            rvws.append({"product_id": pid, "review_id": rid, "content": f"review {i} about it",
                         "img_url": rvw_img if rvw_img is not None else []})
            rels.append({"product_id": pid, "review_id": rid, "upvotes": v})
        write(raw / f"{category}.rvw.{split}", rvws)
        write(raw / f"{category}.rel.{split}", rels)
    return DatasetSpec(raw_root=raw, image_root=tmp_path / "pictures", categories=(category,),
                       name="t", source=source, splits=tuple(splits))


def test_votes_map_to_log2_labels_capped_at_4():
    assert [votes_to_label(v) for v in (1, 2, 3, 4, 7, 8, 15, 16, 1000)] == [0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_auto_reads_raw_votes_when_values_exceed_4_and_drops_zero_votes(tmp_path):
    spec = make_dataset(tmp_path, votes=(0, 1, 3, 9, 40))
    ds = load_dataset(spec)
    assert ds.label_interpretation == "votes"
    assert [(r.votes, r.label) for r in ds.reviews] == [(1, 0), (3, 1), (9, 3), (40, 4)]


def test_auto_reads_labels_when_all_values_are_integers_in_0_to_4(tmp_path):
    spec = make_dataset(tmp_path, votes=(0, 1, 4, 2.0))
    ds = load_dataset(spec)
    assert ds.label_interpretation == "labels"
    assert [r.label for r in ds.reviews] == [0, 1, 4, 2]
    assert all(r.votes is None for r in ds.reviews)


def test_forced_votes_mode_reads_small_values_as_votes(tmp_path):
    import dataclasses

    spec = dataclasses.replace(make_dataset(tmp_path, votes=(1, 2, 4)), labels="votes")
    ds = load_dataset(spec)
    assert ds.label_interpretation == "votes"
    assert [r.label for r in ds.reviews] == [0, 1, 2]


def test_label_out_of_range_in_labels_mode_names_file_and_row(tmp_path):
    import dataclasses

    spec = dataclasses.replace(make_dataset(tmp_path, votes=(1, 7)), labels="labels")
    with pytest.raises(DataError, match=r"home\.rel\.train: row '1' column 'upvotes': label 7"):
        load_dataset(spec)


def test_negative_votes_are_rejected_with_file_and_row(tmp_path):
    spec = make_dataset(tmp_path, votes=(1, -3, 9))
    with pytest.raises(DataError, match=r"home\.rel\.train: row '1'.*vote count -3"):
        load_dataset(spec)


def test_product_text_is_name_plus_description(tmp_path):
    ds = load_dataset(make_dataset(tmp_path))
    assert ds.products["Ptrain"].text == "Steel Pan A two quart pan."


def test_lazada_clothing_product_text_is_name_alone(tmp_path):
    ds = load_dataset(make_dataset(tmp_path, source="lazada", category="clothing"))
    assert ds.products["Ptrain"].text == "Steel Pan"


def test_lazada_other_categories_use_name_plus_description(tmp_path):
    ds = load_dataset(make_dataset(tmp_path, source="lazada", category="home"))
    assert ds.products["Ptrain"].text == "Steel Pan A two quart pan."


def test_lazada_img_url_json_strings_for_products_and_reviews(tmp_path):
    spec = make_dataset(
        tmp_path, source="lazada",
        prd_img=json.dumps(["https://x/a.jpg", "https://x/b.jpg"]),
        rvw_img=json.dumps([{"url": "https://x/r.jpg"}]),
    )
    ds = load_dataset(spec)
    p = ds.products["Ptrain"]
    assert [(i.path, i.url) for i in p.images] == [
        ("train/prd/Ptrain/pic_0_0.jpg", "https://x/a.jpg"),
        ("train/prd/Ptrain/pic_1_0.jpg", "https://x/b.jpg"),
    ]
    assert [(i.path, i.url) for i in ds.reviews[0].images] == [("train/rvw/Ptrain-0/pic_0_0.jpg", "https://x/r.jpg")]


def test_amazon_img_url_lists_and_files_on_disk_sorted_by_url_index(tmp_path):
    spec = make_dataset(tmp_path, prd_img=["u0", "u1", "u2"])
    folder = tmp_path / "pictures" / "train" / "prd" / "Ptrain"
    folder.mkdir(parents=True)
    for name in ("pic_2_0.jpg", "pic_0_1.jpg", "pic_0_0.jpg", "notes.txt"):
        (folder / name).write_bytes(b"x")
    refs = load_dataset(spec).products["Ptrain"].images
    # files present sorted by (n, i); URL 1 has no file so its derived name is listed
    assert [(r.path.rsplit("/", 1)[1], r.url) for r in refs] == [
        ("pic_0_0.jpg", "u0"), ("pic_0_1.jpg", "u0"), ("pic_1_0.jpg", "u1"), ("pic_2_0.jpg", "u2"),
    ]


def test_malformed_img_url_json_string_names_file_and_row(tmp_path):
    spec = make_dataset(tmp_path, source="lazada", rvw_img='[{"url": "https://x/r.jpg"')
    with pytest.raises(DataError, match=r"home\.rvw\.train: row '0' column 'img_url'"):
        load_dataset(spec)


def test_resolve_image_refuses_paths_escaping_the_image_root(tmp_path):
    spec = make_dataset(tmp_path)
    (tmp_path / "pictures").mkdir()
    assert resolve_image(spec, ImageRef("train/prd/P/pic_0_0.jpg")) == (
        tmp_path / "pictures" / "train" / "prd" / "P" / "pic_0_0.jpg").resolve()
    with pytest.raises(DataError, match="outside the image root"):
        resolve_image(spec, ImageRef("../raw/home.prd.train"))
    os.symlink(tmp_path / "raw", tmp_path / "pictures" / "link")
    with pytest.raises(DataError, match="outside the image root"):
        resolve_image(spec, ImageRef("link/home.prd.train"))


def test_review_id_that_would_escape_the_image_root_is_an_error(tmp_path):
    spec = make_dataset(tmp_path, rvw_img=["u"])
    rvw = tmp_path / "raw" / "home.rvw.train"
    rel = tmp_path / "raw" / "home.rel.train"
    for p in (rvw, rel):
        t = json.loads(p.read_text())
        t["review_id"]["0"] = "../../etc"
        p.write_text(json.dumps(t))
    with pytest.raises(DataError, match=r"home\.rvw\.train: row '0' column 'review_id'.*escape"):
        load_dataset(spec)


# --- malformed tables: each names the file and, where there is one, the row ---------------------

def _edit(path: Path, fn) -> None:
    t = json.loads(path.read_text())
    fn(t)
    path.write_text(json.dumps(t))


BROKEN = {
    "malformed JSON": ("home.rvw.train", lambda p: p.write_text(p.read_text()[:-5]),
                       r"home\.rvw\.train: malformed JSON at line 1"),
    "missing column": ("home.prd.train", lambda p: _edit(p, lambda t: t.pop("description")),
                       r"home\.prd\.train: missing column\(s\) description"),
    "missing cell": ("home.rvw.train", lambda p: _edit(p, lambda t: t["content"].pop("1")),
                     r"home\.rvw\.train: row '1': no value in column 'content'"),
    "duplicate review id": ("home.rvw.train", lambda p: _edit(p, lambda t: t["review_id"].update({"2": "Ptrain-0"})),
                            r"home\.rvw\.train: row '2': duplicate review_id 'Ptrain-0'"),
    "duplicate rel row": ("home.rel.train", lambda p: _edit(p, lambda t: t["review_id"].update({"2": "Ptrain-0"})),
                          r"home\.rel\.train: row '2': duplicate review_id"),
    "unknown review in rel": ("home.rel.train", lambda p: _edit(p, lambda t: t["review_id"].update({"1": "ghost"})),
                              r"home\.rel\.train: row '1': unknown review 'ghost'"),
    "unknown product in rel": ("home.rel.train", lambda p: _edit(p, lambda t: t["product_id"].update({"1": "nope"})),
                               r"home\.rel\.train: row '1'.*'nope'"),
    "review of unknown product": ("home.rvw.train", lambda p: _edit(p, lambda t: t["product_id"].update({"1": "nope"})),
                                  r"home\.rvw\.train: row '1': review 'Ptrain-1' names product 'nope'"),
    "non-UTF-8": ("home.rvw.train", lambda p: p.write_bytes(p.read_bytes().replace(b"review 1", b"review \xff1")),
                  r"home\.rvw\.train: not UTF-8: byte 0xff at offset \d+, row '1' column 'content'"),
    "not a column table": ("home.prd.train", lambda p: p.write_text("[1, 2]"),
                           r"home\.prd\.train: expected a column-oriented JSON object"),
    "missing file": ("home.prd.train", lambda p: p.unlink(), r"home\.prd\.train: file not found"),
    "upvotes not a number": ("home.rel.train", lambda p: _edit(p, lambda t: t["upvotes"].update({"0": "many"})),
                             r"home\.rel\.train: row '0' column 'upvotes': expected a number"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_table_raises_data_error_naming_file_and_row(tmp_path, case):
    name, breaker, pattern = BROKEN[case]
    spec = make_dataset(tmp_path, votes=(1, 5, 20))
    breaker(tmp_path / "raw" / name)
    with pytest.raises(DataError, match=pattern):
        load_dataset(spec)
    report = validate_dataset(spec)
    assert not report.ok
    assert any(name in e for e in report.errors), report.errors


def test_validate_collects_every_error_instead_of_stopping_at_the_first(tmp_path):
    spec = make_dataset(tmp_path, votes=(1, 5, 20))
    _edit(tmp_path / "raw" / "home.rel.train", lambda t: t["review_id"].update({"1": "ghost"}))
    _edit(tmp_path / "raw" / "home.rvw.train", lambda t: t["product_id"].update({"2": "nope"}))
    report = validate_dataset(spec)
    assert len(report.errors) == 2
    assert "ERRORS" in report.format()


def test_review_without_rel_row_is_skipped_with_a_warning(tmp_path):
    spec = make_dataset(tmp_path, votes=(1, 5, 20))
    _edit(tmp_path / "raw" / "home.rel.train", lambda t: [t[c].pop("2") for c in t])
    assert [r.id for r in load_dataset(spec).reviews] == ["Ptrain-0", "Ptrain-1"]
    report = validate_dataset(spec)
    assert report.ok and any("no row in home.rel.train" in w for w in report.warnings)


def test_splits_and_categories_can_be_narrowed(tmp_path):
    spec = make_dataset(tmp_path, splits=("train", "dev"))
    ds = load_dataset(spec, splits=["dev"])
    assert set(ds.products) == {"Pdev"} and {r.split for r in ds.reviews} == {"dev"}
    with pytest.raises(DataError, match="no split 'test'"):
        load_dataset(spec, splits=["test"])
    with pytest.raises(DataError, match="no category 'toys'"):
        load_dataset(spec, categories=["toys"])


def test_product_in_two_splits_is_a_duplicate(tmp_path):
    spec = make_dataset(tmp_path, splits=("train", "dev"))
    for kind in ("prd", "rvw", "rel"):
        p = tmp_path / "raw" / f"home.{kind}.dev"
        p.write_text((tmp_path / "raw" / f"home.{kind}.train").read_text())
    with pytest.raises(DataError, match=r"home\.prd\.dev: row '0': duplicate product_id 'Ptrain'"):
        load_dataset(spec)


def test_product_without_reviews_is_a_warning_not_an_error(tmp_path):
    spec = make_dataset(tmp_path)

    def add_lonely_product(t):
        for col in t:
            t[col]["1"] = t[col]["0"]
        t["product_id"]["1"] = "Plonely"

    _edit(tmp_path / "raw" / "home.prd.train", add_lonely_product)
    assert "Plonely" in load_dataset(spec).products
    report = validate_dataset(spec)
    assert report.ok and any("product 'Plonely' has no reviews" in w for w in report.warnings)


def test_left_out_reviews_are_counted_on_the_records_and_said_once(tmp_path, caplog):
    # 4 rvw rows, votes (0, 1, 5, 20), the rel row of review 3 removed: (0, 1, 5) is vote mode (5 > 4).
    # Review 0 has 0 votes (dropped), review 3 has no rel row (skipped): 2 reviews kept.
    spec = make_dataset(tmp_path, votes=(0, 1, 5, 20))
    _edit(tmp_path / "raw" / "home.rel.train", lambda t: [t[c].pop("3") for c in t])
    with caplog.at_level("WARNING", logger="pipeline.datasets.mrhp"):
        ds = load_dataset(spec)
    assert [r.id for r in ds.reviews] == ["Ptrain-1", "Ptrain-2"]
    assert ds.dropped == {"reviews without a rel row (skipped)": 1, "reviews with 0 votes (dropped)": 1}
    said = [r.getMessage() for r in caplog.records]
    assert said == ["dataset 't': 1 reviews without a rel row (skipped), 1 reviews with 0 votes (dropped)"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.datasets.mrhp"):
        again = load_dataset(spec)  # read again in this process (extraction, then training): said once
    assert again.dropped == ds.dropped and not caplog.records
    report = validate_dataset(spec, images="skip")
    assert report.stats["reviews without a rel row (skipped)"] == 1
    assert report.stats["reviews with 0 votes (dropped)"] == 1


def test_nothing_left_out_means_no_count_and_no_warning(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="pipeline.datasets.mrhp"):
        ds = load_dataset(make_dataset(tmp_path, votes=(1, 5, 20)))
    assert ds.dropped == {} and not caplog.records


@pytest.mark.parametrize("unreadable", ["train/prd", "train/prd/Ptrain"])
def test_an_image_folder_that_cannot_be_listed_is_an_error_not_no_images(tmp_path, monkeypatch, unreadable):
    # Before: an OSError listing the folder read as "no files", so the refs fell back to the
    # derived names and the crawled pic_0_1.jpg silently went missing from the product.
    import pipeline.datasets.mrhp as reader

    spec = make_dataset(tmp_path, prd_img=["u0"])
    folder = tmp_path / "pictures" / "train" / "prd" / "Ptrain"
    folder.mkdir(parents=True)
    for name in ("pic_0_0.jpg", "pic_0_1.jpg"):
        (folder / name).write_bytes(b"x")
    real = os.listdir
    target = tmp_path / "pictures" / unreadable

    def listdir(path):
        if Path(path) == target:
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(reader.os, "listdir", listdir)
    with pytest.raises(DataError, match=rf"{unreadable}: image folder cannot be listed \(Permission denied\)"):
        load_dataset(spec)
    report = validate_dataset(spec, images="skip")
    assert any("cannot be listed" in e for e in report.errors)
    monkeypatch.setattr(reader.os, "listdir", real)
    assert [r.path.rsplit("/", 1)[1] for r in load_dataset(spec).products["Ptrain"].images] == [
        "pic_0_0.jpg", "pic_0_1.jpg"]
