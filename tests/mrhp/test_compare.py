"""`mrhp compare`: one wide table across datasets, x100 means, n behind every p-value, marks for
significance / best / random-init, four formats, and the papers' reported numbers beside a run's.
Eval records are written by hand (no training), so every figure below is computed by hand."""
from __future__ import annotations

import csv
import io
import json

import pytest
import yaml

from models.reported import load_reported, parse_reported
from mrhp.cli import main
from mrhp.commands.compare import build_comparison, load_run_evals, render, reported_table
from pipeline.errors import ConfigError

MANIFEST = """\
version: 1
roots: {data: ., resources: ., store: store, runs: runs}
datasets: {}
"""


def _write_run(root, name, *, model, dataset, category, source, seeds, random_init=False):
    """seeds: list of (metrics, per_product) per seed."""
    for k, (metrics, per) in enumerate(seeds):
        d = root / "runs" / name / f"seed{k}"
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(yaml.safe_dump({"model": model, "dataset": dataset}), encoding="utf-8")
        fp = ("random-init-" if random_init else "") + "abc123"
        (d / "run.json").write_text(json.dumps({
            "model": model, "dataset": dataset, "categories": [category], "source": source, "preset": "paper",
            "views": {"rois": {"fingerprint": fp, "items": 3, "random_init": random_init}},
            "random_init": random_init,
        }), encoding="utf-8")
        (d / "eval_test.json").write_text(json.dumps({"split": "test", "metrics": metrics, "per_product": per}),
                                          encoding="utf-8")


def _pp(values):
    return {f"p{i}": {"MAP": v, "MRR": v} for i, v in enumerate(values, 1)}


@pytest.fixture()
def runs(tmp_path):
    (tmp_path / "m.yaml").write_text(MANIFEST, encoding="utf-8")
    # dataset d1: reference A (length) and B (text-gru), 2 seeds each, 3 products.
    # per-product MAP means: A (.5, .6, .7), B (.6, .8, .9) -> differences (.1, .2, .2)
    _write_run(tmp_path, "A", model="length", dataset="d1", category="home", source="amazon", seeds=[
        ({"MAP": 0.60, "MRR": 0.50}, _pp([0.5, 0.6, 0.7])), ({"MAP": 0.62, "MRR": 0.50}, _pp([0.5, 0.6, 0.7]))])
    _write_run(tmp_path, "B", model="text-gru", dataset="d1", category="home", source="amazon", seeds=[
        ({"MAP": 0.75, "MRR": 0.70}, _pp([0.6, 0.8, 0.9])), ({"MAP": 0.79, "MRR": 0.70}, _pp([0.6, 0.8, 0.9]))])
    # dataset d2: C (length) reference, D (text-gru) trained on random-init features, 1 seed
    _write_run(tmp_path, "C", model="length", dataset="d2", category="clothing", source="lazada", seeds=[
        ({"MAP": 0.40, "MRR": 0.30}, _pp([0.4] * 12))])
    _write_run(tmp_path, "D", model="text-gru", dataset="d2", category="clothing", source="lazada", seeds=[
        ({"MAP": 0.30, "MRR": 0.35}, _pp([0.3, 0.5] * 6))], random_init=True)
    return tmp_path


def _load(root, names):
    return [load_run_evals(n, root / "runs" / n, "test") for n in names]


def test_means_std_p_values_with_n_and_marks_by_hand(runs):
    cmp = build_comparison(_load(runs, ["A", "B"]), paired="products", alpha=0.05)
    a, b = cmp.cells[("A", "d1", "MAP")], cmp.cells[("B", "d1", "MAP")]
    # A: seeds .60, .62 -> 61.00 +- 100 * sqrt(((-.01)^2 + .01^2) / 1) = 1.414
    assert a.mean == pytest.approx(61.0) and a.std == pytest.approx(1.41421, abs=1e-4) and a.seeds == 2
    assert b.mean == pytest.approx(77.0) and b.std == pytest.approx(2.82843, abs=1e-4)
    # paired over 3 products, d = (.1, .2, .2): mean 1/6, sd sqrt(1/300), t = 5.0 with df 2;
    # two-sided p (df 2) = 1 - t / sqrt(2 + t^2) = 1 - 5 / sqrt(27) = 0.037750
    assert b.n == 3 and b.p == pytest.approx(0.037750, abs=1e-5) and b.significant
    assert a.p is None and not a.significant  # the reference has no test against itself
    assert b.best and not a.best
    assert cmp.warnings and "n=3 products (< 10)" in cmp.warnings[0]
    text = render(cmp, "table")
    assert "77.00 ± 2.83* ▲" in text and "61.00 ± 1.41" in text
    assert "0.0377 (n=3)" in text and "warning: B vs A on d1: p-values rest on n=3" in text
    # over seeds: d = (.15, .17): t = .16 / (sqrt(.0002) / sqrt 2) = 16, df 1:
    # p = 1 - 2/pi * atan(16) = 2/pi * atan(1/16) = 2/pi * 0.0624188 = 0.039737
    seeds = build_comparison(_load(runs, ["A", "B"]), paired="seeds")
    assert seeds.cells[("B", "d1", "MAP")].n == 2
    assert seeds.cells[("B", "d1", "MAP")].p == pytest.approx(0.039737, abs=1e-5)


def test_one_wide_table_across_datasets_rows_by_model_random_init_marked(runs):
    cmp = build_comparison(_load(runs, ["A", "B", "C", "D"]))
    assert cmp.datasets == ["d1", "d2"]
    assert cmp.rows == ["length", "text-gru", "text-gru [random-init]"]
    assert cmp.references == {"d1": "length", "d2": "length"}
    d = cmp.cells[("text-gru [random-init]", "d2", "MAP")]
    # 12 products: differences .3 - .4 = -.1 and .5 - .4 = +.1 alternate: mean 0 -> p = 1
    assert d.n == 12 and d.p == pytest.approx(1.0) and not d.significant
    assert cmp.cells[("length", "d2", "MAP")].best and cmp.cells[("text-gru [random-init]", "d2", "MRR")].best
    assert not cmp.warnings[1:] and len(cmp.warnings) == 1  # only d1 (n=3) is below 10
    text = render(cmp, "table")
    first = text.splitlines()[0]
    assert "d1 (home)" in first and "d2 (clothing)" in first  # one header row over both datasets
    assert "[random-init]: trained on features from random-init weights" in text
    md = render(cmp, "md")
    assert "**77.00 ± 2.83\\***" in md and "| d1 (home) |" in md and "[random-init]" in md
    latex = render(cmp, "latex")
    assert "\\textbf{77.00 $\\pm$ 2.83$^{*}$}" in latex and "\\multicolumn{2}{c}{d1 (home)}" in latex
    assert "[random-init]" in latex
    rows = list(csv.DictReader(io.StringIO(render(cmp, "csv"))))
    assert len(rows) == 4 * 2
    b_map = next(r for r in rows if r["run"] == "B" and r["metric"] == "MAP")
    assert b_map["mean_x100"] == "77.0000" and b_map["n"] == "3" and b_map["significant"] == "1"
    assert b_map["best"] == "1" and b_map["random_init"] == "0"
    assert next(r for r in rows if r["run"] == "D")["random_init"] == "1"


def test_compare_cli_formats_and_reported(runs, capsys):
    m = ["--manifest", str(runs / "m.yaml")]
    for fmt in ("table", "md", "csv", "latex"):
        assert main([*m, "compare", "A", "B", "--format", fmt]) == 0
    out = capsys.readouterr()
    assert "\\begin{tabular}" in out.out and "mean_x100" in out.out
    assert "warning" in out.err  # the csv run warns on stderr about n=3
    assert main([*m, "compare", "A", "B", "--reported"]) == 0
    assert "no reported numbers for model 'length' on amazon/home" in capsys.readouterr().out


REPORTED = {
    "paper": "Test et al. 2024", "model": "text-gru", "source": "papers/x.txt",
    "results": [
        {"table": "Table 2", "method": "GRU", "setting": "", "dataset": "amazon", "category": "home",
         "MAP": 70.0, "NDCG@3": 60.0},
        {"table": "Table 4", "method": "GRU text-only", "setting": "text-only", "dataset": "amazon",
         "category": "home", "MAP": 65.0},
    ],
    "extra": {"params_m": 1.2},
}


def test_reported_numbers_load_validate_and_print_beside_the_run(runs, tmp_path):
    folder = tmp_path / "reported"
    folder.mkdir()
    (folder / "gru.yaml").write_text(yaml.safe_dump(REPORTED), encoding="utf-8")
    rows = load_reported(folder)
    assert [(r.table, r.setting, r.metrics) for r in rows] == [
        ("Table 2", "", {"MAP": 70.0, "NDCG@3": 60.0}), ("Table 4", "text-only", {"MAP": 65.0})]
    cmp = build_comparison(_load(runs, ["A", "B"]))
    text = reported_table(cmp, rows)
    # B reproduces 77.00 against the main row's 70.00: +7.00; the text-only row is not a main row
    assert "Table 2 GRU (reported)" in text and "70.00 (+7.00)" in text and "Table 4" not in text
    assert "77.00 ± 2.83" in text and "amazon/home" in text
    assert "no reported numbers for model 'length' on amazon/home" in text


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"results": [{**REPORTED["results"][0], "dataset": "ebay"}]},
            r"results\[0\].dataset: expected one of amazon, lazada",
        ),
        ({"results": [{**REPORTED["results"][0], "MAP": "70"}]}, r"results\[0\].MAP: expected a number"),
        ({"results": [{**REPORTED["results"][0], "MAP": 0.7, "map": 1}]}, r"results\[0\]: unknown key 'map'"),
        (
            {"results": [{k: v for k, v in REPORTED["results"][0].items() if k != "category"}]},
            r"results\[0\].category: required",
        ),
        ({"results": [{**REPORTED["results"][0], "MAP": 140}]}, r"results\[0\].MAP: expected a value in 0..100"),
        ({"modle": "x"}, r"unknown key\(s\) modle"),
        ({"results": []}, r"results: expected a non-empty list"),
    ],
)
def test_reported_schema_errors_name_the_file_and_key(change, message):
    with pytest.raises(ConfigError, match=message):
        parse_reported({**REPORTED, **change}, "x.yaml")


def test_the_shipped_reported_files_validate():
    load_reported()  # every models/reported/*.yaml of the checkout follows the schema


def test_evaluate_marks_a_run_on_random_init_features(runs):
    from models.runs import seed_dirs
    from mrhp.commands.evaluate import random_init_note

    assert random_init_note(seed_dirs(runs / "runs" / "D")) == " [random-init]"
    assert random_init_note(seed_dirs(runs / "runs" / "B")) == ""


def test_runs_evaluated_on_different_products_or_thresholds_are_refused(tmp_path):
    # Before: A's mean over p1..p3 stood beside B's over p1..p4, and the products-paired t-test
    # silently kept the 3 shared products; a threshold mismatch went unnoticed entirely.
    from pipeline.errors import TrainingError

    (tmp_path / "m.yaml").write_text(MANIFEST, encoding="utf-8")
    _write_run(tmp_path, "A", model="length", dataset="d1", category="home", source="amazon",
               seeds=[({"MAP": 0.6, "MRR": 0.5}, _pp([0.5, 0.6, 0.7]))])
    _write_run(tmp_path, "B", model="text-gru", dataset="d1", category="home", source="amazon",
               seeds=[({"MAP": 0.7, "MRR": 0.6}, _pp([0.6, 0.8, 0.9, 0.5]))])
    runs = [load_run_evals(n, tmp_path / "runs" / n, "test") for n in ("A", "B")]
    with pytest.raises(TrainingError, match=r"B \(evaluation 1 of 1\) covers 4 products, A 3 \(1 only in the "
                                            r"first, 0 only in the second\)"):
        build_comparison(runs)
    runs[1].evals[0]["per_product"] = _pp([0.6, 0.8, 0.9])
    runs[1].evals[0]["threshold"] = 0.0
    with pytest.raises(TrainingError, match=r"B \(evaluation 1 of 1\) was evaluated at threshold 0.0, A at None"):
        build_comparison(runs)
    runs[1].evals[0].pop("threshold")
    assert build_comparison(runs).cells[("B", "d1", "MAP")].n == 3
