"""`mrhp build-dataset`: Amazon 2018/2023 dumps -> MRHP tables the reader accepts, with the published rules."""
from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from mrhp.cli import main
from pipeline.datasets import tables
from pipeline.datasets.amazon2018 import parse_vote
from pipeline.datasets.build import BuildConfig, split_products
from pipeline.datasets.mrhp import load_dataset, validate_dataset
from pipeline.errors import DataError
from pipeline.manifest import DatasetSpec


def spec_for(out: Path, category: str) -> DatasetSpec:
    return DatasetSpec(raw_root=out, image_root=out / "pictures", categories=(category,), name="built",
                       labels="votes")


def write_jsonl_gz(path: Path, objs: list[dict]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for o in objs:
            f.write(json.dumps(o) + "\n")
    return path


LONG = "This pan heats evenly and the handle stays cool; I use it every single morning for oatmeal."
assert len(LONG) >= 64


def review18(asin: str, vote, text: str = LONG, **extra) -> dict:
    o = {"asin": asin, "reviewText": text, "summary": "s", "unixReviewTime": 1, "reviewerID": "R", **extra}
    if vote is not None:
        o["vote"] = vote
    return o


def synthetic_2018(tmp_path: Path) -> tuple[Path, Path]:
    reviews = []
    # 6 products that pass: 20 qualifying reviews, one with vote "1,234" (> 2)
    for p in range(6):
        asin = f"A{p:03d}"
        reviews += [review18(asin, "1,234" if i == 0 else "1", image=["http://img/x.jpg"] if i == 1 else None)
                    for i in range(20)]
        reviews += [review18(asin, None), review18(asin, "0"), review18(asin, "5", text="too short")]
    # only 19 qualifying reviews -> dropped
    reviews += [review18("B019", "9") for _ in range(19)]
    # 20 qualifying reviews but no vote above 2 -> dropped
    reviews += [review18("B002", "2") for _ in range(20)]
    for r in reviews:
        if r.get("image") is None:
            r.pop("image", None)
    meta = [{"asin": f"A{p:03d}", "title": f"Pan {p}", "description": ["Steel.", "Two quart."],
             "imageURLHighRes": [f"http://img/{p}.jpg"], "brand": "B", "category": ["Home", "Pans"]}
            for p in range(5)]  # A005 has no metadata
    meta.append({"asin": "A000", "title": "duplicate record, ignored"})
    return write_jsonl_gz(tmp_path / "reviews.json.gz", reviews), write_jsonl_gz(tmp_path / "meta.json.gz", meta)


def test_vote_strings_with_thousands_separators_parse():
    assert parse_vote("1,234") == 1234 and parse_vote(None) == 0 and parse_vote("7") == 7
    with pytest.raises(ValueError):
        parse_vote("lots")


def test_published_thresholds_on_synthetic_gz_dump(tmp_path, capsys):
    reviews, meta = synthetic_2018(tmp_path)
    out = tmp_path / "out"
    rc = main(["build-dataset", "amazon2018", "--reviews", str(reviews), "--meta", str(meta),
               "--out", str(out), "--category", "home"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "1 product(s) have no metadata record" in printed
    ds = load_dataset(spec_for(out, "home"))
    assert sorted(ds.products) == [f"A{p:03d}" for p in range(6)]  # B019 and B002 dropped
    per_product = Counter(r.product_id for r in ds.reviews)
    assert set(per_product.values()) == {20}  # vote 0 / missing / short reviews dropped
    a0 = [r for r in ds.reviews if r.product_id == "A000"]
    assert [r.id for r in a0] == [f"A000-{i}" for i in range(20)]
    assert a0[0].votes == 1234 and a0[0].label == 4 and a0[1].label == 0
    assert [i.url for i in a0[1].images] == ["http://img/x.jpg"]
    p0 = ds.products["A000"]
    assert p0.name == "Pan 0" and p0.text == "Pan 0 Steel. Two quart." and p0.images[0].url == "http://img/0.jpg"
    assert ds.products["A005"].name == "A005" and ds.products["A005"].description == ""
    assert validate_dataset(spec_for(out, "home")).ok
    info = json.loads((out / "build_info.json").read_text())
    assert info["products_kept"] == 6 and info["config"]["min_reviews"] == 20


def test_products_split_by_two_successive_80_20_splits_with_seed_0():
    from sklearn.model_selection import train_test_split

    ids = [f"P{i:03d}" for i in range(100)]
    split = split_products(list(reversed(ids)), BuildConfig(category="x"))
    assert Counter(split.values()) == {"train": 64, "dev": 16, "test": 20}
    rest, test = train_test_split(ids, test_size=0.2, random_state=0)
    train, dev = train_test_split(rest, test_size=0.2, random_state=0)
    assert {p for p, s in split.items() if s == "test"} == set(test)
    assert {p for p, s in split.items() if s == "dev"} == set(dev)


def test_too_few_products_is_a_clear_error(tmp_path, capsys):
    reviews, meta = synthetic_2018(tmp_path)
    rc = main(["build-dataset", "amazon2018", "--reviews", str(reviews), "--out", str(tmp_path / "o"),
               "--min-reviews", "500"])
    assert rc == DataError.exit_code
    assert "only 0 product(s) pass the thresholds (min_reviews=500" in capsys.readouterr().err


def test_real_2018_fixture_slice_with_lowered_thresholds(shared_fixtures, tmp_path, capsys):
    src = shared_fixtures / "amazon2018" / "AMAZON_FASHION_5.json"  # concatenated pretty-printed objects
    out = tmp_path / "out"
    rc = main(["build-dataset", "amazon2018", "--reviews", str(src), "--out", str(out), "--category", "clothing",
               "--min-reviews", "5", "--min-chars", "32", "--min-top-votes", "2"])
    assert rc == 0
    assert "no --meta file given" in capsys.readouterr().out
    # recompute the rules independently from the raw objects
    dec, text, pos, objs = json.JSONDecoder(), src.read_text(encoding="utf-8"), 0, []
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            break
        o, pos = dec.raw_decode(text, pos)
        objs.append(o)
    assert len(objs) == 3176
    q = [
        o for o in objs if int(o.get("vote", "0").replace(",", "")) >= 1 and len(o.get("reviewText", "").strip()) >= 32
    ]
    per = Counter(o["asin"] for o in q)
    top = {a: max(int(o["vote"].replace(",", "")) for o in q if o["asin"] == a) for a in per}
    expected = {a for a, n in per.items() if n >= 5 and top[a] >= 2}
    ds = load_dataset(spec_for(out, "clothing"))
    assert set(ds.products) == expected
    assert len(ds.reviews) == sum(per[a] for a in expected)
    assert {p.split for p in ds.products.values()} == {"train", "dev", "test"}
    assert validate_dataset(spec_for(out, "clothing")).ok


def test_amazon2023_groups_by_parent_asin_and_reads_image_objects(tmp_path, capsys):
    reviews, meta = [], []
    for p in range(4):
        for i in range(3):
            reviews.append(
                {
                    "rating": 5.0,
                    "title": "t",
                    "text": LONG,
                    "asin": f"C{p}-{i}",
                    "parent_asin": f"P{p}",
                    "user_id": "U",
                    "timestamp": 1_700_000_000_000,
                    "helpful_vote": 3 if i == 0 else 1,
                    "images": [{"small_image_url": "s", "medium_image_url": "m", "large_image_url": f"L{p}{i}"}],
                    "verified_purchase": True,
                }
            )
        meta.append({"parent_asin": f"P{p}", "title": f"Lamp {p}", "description": ["Warm light."],
                     "features": ["LED", "Dimmable"], "images": [{"thumb": "t", "large": "l", "hi_res": f"H{p}"}],
                     "store": "S", "main_category": "Home"})
    r = write_jsonl_gz(tmp_path / "r.jsonl.gz", reviews)
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps(o) + "\n" for o in meta))  # plain, not gzipped
    out = tmp_path / "out"
    assert main(["build-dataset", "amazon2023", "--reviews", str(r), "--meta", str(m), "--out", str(out),
                 "--category", "home", "--min-reviews", "3"]) == 0
    ds = load_dataset(spec_for(out, "home"))
    assert sorted(ds.products) == ["P0", "P1", "P2", "P3"]
    assert ds.products["P1"].text == "Lamp 1 Warm light. LED Dimmable"
    assert ds.products["P1"].images[0].url == "H1"
    rv = [x for x in ds.reviews if x.product_id == "P2"]
    assert [x.id for x in rv] == ["P2-0", "P2-1", "P2-2"] and rv[0].images[0].url == "L20" and rv[0].votes == 3


def test_dedupe_drops_repeated_reviews(tmp_path):
    reviews = []
    for p in range(3):
        reviews += [review18(f"A{p}", "3", text=LONG + f" {i}") for i in range(3)]
        reviews.append(review18(f"A{p}", "3", text=LONG + " 0"))  # repeat of review 0
    r = write_jsonl_gz(tmp_path / "r.gz", reviews)
    args = ["build-dataset", "amazon2018", "--reviews", str(r), "--category", "x", "--min-reviews", "3"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert main([*args, "--out", str(tmp_path / "dd"), "--dedupe"]) == 0
    assert len(load_dataset(spec_for(tmp_path / "plain", "x")).reviews) == 12
    assert len(load_dataset(spec_for(tmp_path / "dd", "x")).reviews) == 9


def test_malformed_line_names_file_and_line(tmp_path, capsys):
    p = tmp_path / "r.json"
    p.write_text(
        json.dumps(review18("A", "3")) + "\n" + '{"asin": "A", "vote": \n' + json.dumps(review18("A", "3")) + "\n"
    )
    rc = main(["build-dataset", "amazon2018", "--reviews", str(p), "--out", str(tmp_path / "o")])
    assert rc == DataError.exit_code
    err = capsys.readouterr().err
    assert "r.json: malformed JSON in the object starting at line 2" in err and "Traceback" not in err


def test_corrupt_gzip_is_a_data_error(tmp_path, capsys):
    p = write_jsonl_gz(tmp_path / "r.json.gz", [review18("A", "3")] * 2000)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    rc = main(["build-dataset", "amazon2018", "--reviews", str(p), "--out", str(tmp_path / "o")])
    assert rc == DataError.exit_code
    assert "r.json.gz" in capsys.readouterr().err


def test_existing_output_needs_overwrite(tmp_path, capsys):
    reviews, meta = synthetic_2018(tmp_path)
    args = ["build-dataset", "amazon2018", "--reviews", str(reviews), "--out", str(tmp_path / "o"), "--category", "h"]
    assert main(args) == 0
    assert main(args) == DataError.exit_code
    assert "already exist" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


def test_unreadable_records_are_skipped_and_listed(tmp_path, capsys):
    reviews, meta = synthetic_2018(tmp_path)
    objs = [json.loads(line) for line in gzip.open(reviews, "rt")]
    objs.insert(3, {"asin": "A000", "vote": "lots", "reviewText": LONG})
    objs.insert(5, {"vote": "3", "reviewText": LONG})
    write_jsonl_gz(reviews, objs)
    assert main(["build-dataset", "amazon2018", "--reviews", str(reviews), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "line 4: review skipped (vote 'lots' is not a count)" in out
    assert "line 6: review skipped (no asin)" in out


def test_bad_threshold_flag_is_a_config_error(tmp_path, capsys):
    rc = main(["build-dataset", "amazon2018", "--reviews", "x", "--out", str(tmp_path), "--test-fraction", "1.5"])
    assert rc == 2 and "--test-fraction" in capsys.readouterr().err


# --- streaming primitives --------------------------------------------------------------------

@pytest.mark.parametrize("pretty", [False, True])
def test_json_object_stream_crosses_chunk_boundaries(tmp_path, monkeypatch, pretty):
    monkeypatch.setattr(tables, "_READ_CHUNK", 7)
    objs = [{"i": i, "t": "x" * (i % 13), "n": 10 ** i} for i in range(40)]
    p = tmp_path / "a.json"
    p.write_text("".join(json.dumps(o, indent=2 if pretty else None) + "\n" for o in objs))
    got = list(tables.iter_json_objects(p))
    assert [o for _, o in got] == objs
    lines_per = (len(json.dumps(objs[0], indent=2).splitlines()) if pretty else 1)
    assert got[1][0] == 1 + lines_per


def test_column_table_writer_writes_what_the_reader_reads(tmp_path):
    rows = [{"a": i, "b": f"t{i}é", "c": [i, {"url": "u"}]} for i in range(5)]
    w = tables.ColumnTableWriter(tmp_path / "t.json", ["a", "b", "c"])
    for r in rows:
        w.add(r)
    w.close()
    expected = {c: {str(i): r[c] for i, r in enumerate(rows)} for c in "abc"}
    assert json.loads((tmp_path / "t.json").read_text(encoding="utf-8")) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]  # spool removed


def test_byte_order_mark_and_crlf_line_ends_are_tolerated(tmp_path):
    p = tmp_path / "bom.json"
    p.write_bytes(b"\xef\xbb\xbf" + b'{"a": 1}\r\n{"a": 2}\r\n')
    assert [o for _, o in tables.iter_json_objects(p)] == [{"a": 1}, {"a": 2}]
    t = tmp_path / "t.json"
    t.write_bytes(b"\xef\xbb\xbf" + json.dumps({"x": {"0": 1}}).encode())
    assert tables.read_column_table(t, ["x"]) == (["0"], {"x": {"0": 1}})
