"""`mrhp compare RUN [RUN ...]`: one paper-style table of mean +- std over seeds per metric,
with paired t-tests against a reference run, across datasets and categories.

Reads `eval_<split>.json` of every seed (written at the end of training for the test split, or
by `mrhp evaluate`) and `run.json` (model, dataset, categories, preset, random-init flag).

- Scale: x100, two decimals, as the papers print and as `mrhp evaluate` prints.
- One wide table: a column group per dataset (its categories in the header), the metrics
  inside it. With runs of one dataset the rows are the runs; across datasets the rows are the
  models (a run of the same model per dataset), falling back to run names when two runs of one
  model share a dataset.
- Tests: in each dataset, every run against the first run given on that dataset, paired over
  products (`--paired products`, default: each product's metric averaged over the run's seeds,
  paired by product id) or over seeds (`--paired seeds`: seed k against seed k). The p-values
  print with the n behind each (products or seeds); n < 10 is warned about.
- Marks: `*` p < --alpha against the reference; the best mean per column in bold (md, latex) or
  with `▲` (table); runs trained on random-init features carry `[random-init]` in every format.
- `--format table|md|csv|latex`; `--reported` adds the papers' numbers (models/reported/*.yaml)
  beside each run's, per dataset and category.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RANDOM_INIT_MARK = "[random-init]"
BEST_MARK = "▲"
SIG_MARK = "*"
MIN_N = 10  # fewer pairs than this behind a p-value: warned


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare", help="mean +- std over seeds per metric, with paired t-tests between runs",
        description="Compare runs on a split in one table across datasets/categories: mean +- std "
        "over seeds (x100, as in the papers and `mrhp evaluate`), paired t-test p-values against "
        "the first run of each dataset with the n behind them, significant cells and the best per "
        "column marked.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run names (or folders); the first run of each dataset is the reference")
    p.add_argument("--split", default="test", help="split whose eval_<split>.json is compared (default test)")
    p.add_argument("--paired", choices=("products", "seeds"), default="products",
                   help="t-test over per-product metrics (default) or over per-seed values")
    p.add_argument("--format", choices=("table", "md", "csv", "latex"), default="table",
                   help="output format (default table: aligned text)")
    p.add_argument("--alpha", type=float, default=0.05,
                   help="significance level of the * mark (default 0.05)")
    p.add_argument("--reported", action="store_true",
                   help="also print the papers' reported numbers (models/reported/*.yaml) beside each run's")
    p.set_defaults(func=run)


@dataclass
class RunEvals:
    """One run (all its seeds) on one split."""

    name: str
    evals: list[dict[str, Any]]  # eval_<split>.json per seed
    model: str = ""
    dataset: str = ""
    categories: tuple[str, ...] = ()
    source: str = ""  # amazon | lazada (the dataset's manifest source)
    preset: str = "paper"
    random_init: bool = False
    row: str = ""  # row label in the table
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.row + (f" {RANDOM_INIT_MARK}" if self.random_init else "")


def load_run_evals(name: str, run_dir: Path, split: str) -> RunEvals:
    import yaml

    from models.runs import RunPaths, read_json, run_is_random_init, seed_dirs
    from pipeline.errors import TrainingError

    evals, metas = [], []
    for d in seed_dirs(run_dir):
        paths = RunPaths(d)
        f = paths.eval_file(split)
        if not f.is_file():
            raise TrainingError(f"{d}: no {f.name}; run `mrhp evaluate {d} --split {split}` first")
        evals.append(read_json(f))
        meta = read_json(paths.meta) if paths.meta.is_file() else {}
        if not meta.get("model"):
            cfg = yaml.safe_load(paths.config.read_text(encoding="utf-8")) or {}
            meta = {**meta, "model": cfg.get("model", ""), "dataset": cfg.get("dataset", "")}
        metas.append(meta)
    m = metas[0]
    return RunEvals(
        name=name, evals=evals, model=str(m.get("model", "")), dataset=str(m.get("dataset", "")),
        categories=tuple(m.get("categories") or ()), source=str(m.get("source", "")),
        preset=str(m.get("preset", "paper")), random_init=any(run_is_random_init(x) for x in metas),
    )


def _per_product_mean(evals: list[dict], metric: str) -> dict[str, float]:
    import numpy as np

    acc: dict[str, list[float]] = {}
    for e in evals:
        for pid, m in e["per_product"].items():
            acc.setdefault(pid, []).append(m[metric])
    return {p: float(np.mean(v)) for p, v in acc.items()}


def ttest(run: RunEvals, ref: RunEvals, metric: str, paired: str) -> tuple[float, int]:
    """(p-value, n pairs) of `run` against `ref` on `metric`."""
    from models.metrics import paired_ttest
    from pipeline.errors import TrainingError

    if paired == "seeds":
        if len(run.evals) != len(ref.evals) or len(ref.evals) < 2:
            raise TrainingError(
                f"--paired seeds needs the same number (>= 2) of seeds: {ref.name} has {len(ref.evals)}, "
                f"{run.name} has {len(run.evals)}"
            )
        a = [e["metrics"][metric] for e in run.evals]
        b = [e["metrics"][metric] for e in ref.evals]
    else:
        pa, pb = _per_product_mean(run.evals, metric), _per_product_mean(ref.evals, metric)
        common = sorted(set(pa) & set(pb))
        if len(common) < 2:
            raise TrainingError(f"{run.name} and {ref.name} share fewer than 2 evaluated products")
        a, b = [pa[p] for p in common], [pb[p] for p in common]
    _, p = paired_ttest(a, b)
    return float(p), len(a)


@dataclass
class Cell:
    mean: float | None = None  # x100
    std: float | None = None
    seeds: int = 0
    p: float | None = None
    n: int | None = None
    significant: bool = False
    best: bool = False


@dataclass
class Comparison:
    """The wide table: rows x (dataset, metric) cells, plus what the marks refer to."""

    datasets: list[str]
    dataset_header: dict[str, str]
    metrics: list[str]
    rows: list[str]  # row labels (random-init marked)
    cells: dict[tuple[str, str, str], Cell]  # (row, dataset, metric)
    references: dict[str, str]  # dataset -> label of its reference row
    runs: list[RunEvals]
    warnings: list[str]


def build_comparison(runs: list[RunEvals], *, paired: str = "products", alpha: float = 0.05) -> Comparison:
    import numpy as np

    from pipeline.errors import TrainingError

    datasets: list[str] = []
    for r in runs:
        if r.dataset not in datasets:
            datasets.append(r.dataset)
    metrics = list(runs[0].evals[0]["metrics"])
    for r in runs:
        missing = [m for m in metrics if m not in r.evals[0]["metrics"]]
        if missing:
            raise TrainingError(f"{r.name}: its evaluation lacks {', '.join(missing)}; re-run `mrhp evaluate`")
    # row labels: runs for one dataset; models across datasets unless a model repeats in one
    if len(datasets) > 1:
        for r in runs:
            r.row = r.model + (f" ({r.preset})" if r.preset not in ("", "paper") else "")
        seen = [(r.row, r.dataset) for r in runs]
        if len(set(seen)) != len(seen) or any(not r.model for r in runs):
            for r in runs:
                r.row = r.name
    else:
        for r in runs:
            r.row = r.name
        if len({r.name for r in runs}) != len(runs):  # the same run twice: number them
            for i, r in enumerate(runs, 1):
                r.row = f"{r.name} #{i}"
    rows: list[str] = []
    for r in runs:
        if r.label not in rows:
            rows.append(r.label)
    cells: dict[tuple[str, str, str], Cell] = {}
    references: dict[str, str] = {}
    warnings: list[str] = []
    for ds in datasets:
        group = [r for r in runs if r.dataset == ds]
        ref = group[0]
        _check_comparable(group)
        references[ds] = ref.label
        for r in group:
            for m in metrics:
                vals = np.array([e["metrics"][m] for e in r.evals], dtype=np.float64) * 100
                cell = Cell(mean=float(vals.mean()), std=float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                            seeds=len(vals))
                if r is not ref:
                    cell.p, cell.n = ttest(r, ref, m, paired)
                    cell.significant = bool(cell.p < alpha)
                cells[(r.label, ds, m)] = cell
            if r is not ref:
                n = cells[(r.label, ds, metrics[0])].n
                if n is not None and n < MIN_N:
                    warnings.append(f"{r.label} vs {ref.label} on {ds}: p-values rest on n={n} "
                                    f"{paired} (< {MIN_N}); treat them as unreliable")
        for m in metrics:
            col = [cells[(r.label, ds, m)] for r in group]
            top = max(c.mean for c in col)
            if len(col) > 1:
                for c in col:
                    c.best = bool(np.isclose(c.mean, top))
    header = {}
    for ds in datasets:
        cats = next((r.categories for r in runs if r.dataset == ds and r.categories), ())
        header[ds] = ds + (f" ({'+'.join(cats)})" if cats else "")
    return Comparison(datasets=datasets, dataset_header=header, metrics=metrics, rows=rows, cells=cells,
                      references=references, runs=runs, warnings=warnings)


def _check_comparable(group: list[RunEvals]) -> None:
    """The evaluations of one dataset's runs cover the same products at the same threshold, or a
    TrainingError naming the two (before: means over different product sets stood side by side,
    and a products-paired t-test quietly kept the shared products only)."""
    from pipeline.errors import TrainingError

    base_run, base = group[0], group[0].evals[0]
    base_products, base_threshold = set(base["per_product"]), base.get("threshold")
    for r in group:
        for k, e in enumerate(r.evals, 1):
            where = f"{r.name} (evaluation {k} of {len(r.evals)})"
            if e.get("threshold") != base_threshold:
                raise TrainingError(
                    f"{where} was evaluated at threshold {e.get('threshold')}, {base_run.name} at "
                    f"{base_threshold}: their metrics are not comparable; re-run `mrhp evaluate` on both"
                )
            products = set(e["per_product"])
            if products != base_products:
                raise TrainingError(
                    f"{where} covers {len(products):,} products, {base_run.name} {len(base_products):,} "
                    f"({len(products - base_products):,} only in the first, {len(base_products - products):,} "
                    f"only in the second): re-run `mrhp evaluate` on both against the same data"
                )


# ---- rendering -----------------------------------------------------------------------------------

def _fmt_cell(c: Cell | None, fmt: str) -> str:
    if c is None or c.mean is None:
        return "" if fmt in ("csv",) else "-"
    text = f"{c.mean:.2f} ± {c.std:.2f}"
    sig = SIG_MARK if c.significant else ""
    if fmt == "latex":
        text = f"{c.mean:.2f} $\\pm$ {c.std:.2f}" + ("$^{*}$" if sig else "")
        return f"\\textbf{{{text}}}" if c.best else text
    if fmt == "md":
        text += "\\*" if sig else ""
        return f"**{text}**" if c.best else text
    return text + sig + (f" {BEST_MARK}" if c.best else "")


def _fmt_p(c: Cell | None) -> str:
    if c is None or c.p is None:
        return "-"
    return f"{c.p:.3g} (n={c.n})"


def _latex_escape(s: str) -> str:
    out = []
    for ch in s:
        out.append({"\\": "\\textbackslash{}", "&": "\\&", "%": "\\%", "_": "\\_", "#": "\\#",
                    "$": "\\$", "{": "\\{", "}": "\\}", "±": "$\\pm$", "▲": ""}.get(ch, ch))
    return "".join(out)


def _render_grid(header: list[str], body: list[list[str]], fmt: str, *,
                 group_header: list[tuple[str, int]] | None = None) -> str:
    """header/body as text, md or latex; `group_header` (label, span) pairs cover every column."""
    if group_header is not None:
        assert sum(span for _, span in group_header) == len(header)
    if fmt == "md":
        lines = []
        if group_header:
            lines.append("| " + " | ".join(g for g, span in group_header for _ in range(span)) + " |")
            lines.append("|" + "---|" * len(header))
            lines.append("| " + " | ".join(f"*{h}*" if h else "" for h in header) + " |")
        else:
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "---|" * len(header))
        lines.extend("| " + " | ".join(row) + " |" for row in body)
        return "\n".join(lines)
    if fmt == "latex":
        cols = "l" + "c" * (len(header) - 1)
        lines = [f"\\begin{{tabular}}{{{cols}}}", "\\toprule"]
        if group_header:
            lines.append(" & ".join(f"\\multicolumn{{{span}}}{{c}}{{{_latex_escape(g)}}}" if span > 1
                                    else _latex_escape(g) for g, span in group_header) + " \\\\")
        lines.append(" & ".join(_latex_escape(h) for h in header) + " \\\\")
        lines.append("\\midrule")
        for row in body:
            lines.append(" & ".join([_latex_escape(row[0]), *row[1:]]) + " \\\\")
        lines.extend(["\\bottomrule", "\\end{tabular}"])
        return "\n".join(lines)
    widths = [max([len(h), *(len(r[i]) for r in body)]) for i, h in enumerate(header)]
    lines = []
    if group_header:
        parts, i = [], 0
        for g, span in group_header:
            w = sum(widths[i:i + span]) + 2 * (span - 1)
            parts.append(g.center(w))
            i += span
        lines.append("  ".join(parts).rstrip())
    lines.append(
        "  ".join([header[0].ljust(widths[0]), *(h.rjust(w) for h, w in zip(header[1:], widths[1:], strict=True))])
    )
    for row in body:
        lines.append(
            "  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))])
        )
    return "\n".join(lines)


def render(cmp: Comparison, fmt: str = "table", *, paired: str = "products", alpha: float = 0.05) -> str:
    """The comparison in `fmt`: the means table, then the p-values with their n."""
    if fmt == "csv":
        return _render_csv(cmp)
    header = ["run" if len(cmp.datasets) == 1 else "model", "seeds"]
    groups: list[tuple[str, int]] = [("", 2)]
    for ds in cmp.datasets:
        header.extend(cmp.metrics)
        groups.append((cmp.dataset_header[ds], len(cmp.metrics)))
    # one dataset: its name goes in the title line instead of a group header row
    group_header = groups if len(cmp.datasets) > 1 else None
    body = []
    for row in cmp.rows:
        seeds = sorted({c.seeds for (r, _, _), c in cmp.cells.items() if r == row})
        line = [row, "/".join(map(str, seeds))]
        for ds in cmp.datasets:
            line.extend(_fmt_cell(cmp.cells.get((row, ds, m)), fmt) for m in cmp.metrics)
        body.append(line)
    out = []
    if len(cmp.datasets) == 1:
        title = f"dataset {cmp.dataset_header[cmp.datasets[0]]}"
        out.append(f"% {title}" if fmt == "latex" else title)
    out.append(_render_grid(header, body, fmt, group_header=group_header))
    # p-values with their n
    prow = []
    for row in cmp.rows:
        if all(cmp.cells.get((row, ds, cmp.metrics[0])) is None or cmp.cells[(row, ds, cmp.metrics[0])].p is None
               for ds in cmp.datasets):
            continue
        line = [row, ""]
        for ds in cmp.datasets:
            line.extend(_fmt_p(cmp.cells.get((row, ds, m))) for m in cmp.metrics)
        prow.append(line)
    if prow:
        if len(cmp.datasets) == 1:
            against = next(iter(cmp.references.values()))
        else:
            against = "the first run of each dataset (" + "; ".join(
                f"{ds}: {ref}" for ds, ref in cmp.references.items()) + ")"
        out.append("")
        out.append(("% " if fmt == "latex" else "")
                   + f"paired t-test p-values against {against} (over {paired}; n = {paired} paired "
                   f"behind each p-value):")
        out.append(_render_grid(header, prow, fmt, group_header=group_header))
    notes = [f"{SIG_MARK}: p < {alpha:g} against the reference of its dataset; "
             + ("bold" if fmt in ("md", "latex") else BEST_MARK) + ": best mean in its column"]
    if any(r.random_init for r in cmp.runs):
        notes.append(f"{RANDOM_INIT_MARK}: trained on features from random-init weights (demo/test only)")
    notes.extend(f"warning: {w}" for w in cmp.warnings)
    comment = "% " if fmt == "latex" else ""
    out.append("")
    out.extend(comment + n for n in notes)
    return "\n".join(out)


def _render_csv(cmp: Comparison) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["row", "run", "model", "dataset", "categories", "metric", "mean_x100", "std_x100", "seeds",
                "reference", "p_value", "n", "significant", "best", "random_init"])
    for r in cmp.runs:
        for m in cmp.metrics:
            c = cmp.cells[(r.label, r.dataset, m)]
            w.writerow([r.row, r.name, r.model, r.dataset, "+".join(r.categories), m, f"{c.mean:.4f}",
                        f"{c.std:.4f}", c.seeds, cmp.references[r.dataset],
                        "" if c.p is None else f"{c.p:.6g}", "" if c.n is None else c.n,
                        int(c.significant), int(c.best), int(r.random_init)])
    return buf.getvalue().rstrip("\n")


def reported_table(cmp: Comparison, reported, fmt: str = "table") -> str:
    """Reported (the papers' main rows) vs reproduced (the run's mean), per run, dataset and
    category; a run whose model, source or category the papers do not cover is said so."""
    from models.reported import reported_for

    header = ["run", "paper row", "data", *cmp.metrics]
    body, missing = [], []
    for r in cmp.runs:
        cats = r.categories
        if len(cats) != 1 or not r.source:
            missing.append(f"{r.label}: dataset {r.dataset!r} has categories {'+'.join(cats) or '(unknown)'}"
                           f" and source {r.source or '(unknown)'}; the papers report one category at a time")
            continue
        rows = reported_for(reported, model=r.model, dataset=r.source, category=cats[0])
        if not rows:
            missing.append(f"{r.label}: no reported numbers for model {r.model!r} on {r.source}/{cats[0]}")
            continue
        ours = [r.label, "this run (reproduced)", f"{r.source}/{cats[0]}"]
        pm = "$\\pm$" if fmt == "latex" else "±"
        for m in cmp.metrics:
            c = cmp.cells[(r.label, r.dataset, m)]
            ours.append(f"{c.mean:.2f} {pm} {c.std:.2f}")
        body.append(ours)
        for rep in rows:
            line = ["", f"{rep.table} {rep.method} (reported)", f"{rep.dataset}/{rep.category}"]
            for m in cmp.metrics:
                v = rep.metrics.get(m)
                if v is None:
                    line.append("-")
                else:
                    d = cmp.cells[(r.label, r.dataset, m)].mean - v
                    line.append(f"{v:.2f} ({d:+.2f})")
            body.append(line)
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        w.writerows(body)
        text = buf.getvalue().rstrip("\n")
    else:
        text = _render_grid(header, body, fmt) if body else "(no run has reported numbers to set beside it)"
    comment = "% " if fmt == "latex" else ("# " if fmt == "csv" else "")
    notes = [f"{comment}reported rows: value as printed (reproduced - reported)"]
    notes.extend(f"{comment}{m}" for m in missing)
    return "\n".join([text, *notes])


def run(args: argparse.Namespace) -> int:
    from models.runs import resolve_run
    from pipeline.errors import ConfigError
    from pipeline.manifest import load_manifest

    if not 0 < args.alpha < 1:
        raise ConfigError(f"--alpha: expected a number in (0, 1), got {args.alpha}")
    manifest = load_manifest(args.manifest)
    runs = [load_run_evals(r, resolve_run(manifest.roots.runs, r), args.split) for r in args.runs]
    cmp = build_comparison(runs, paired=args.paired, alpha=args.alpha)
    if args.format == "table":
        print(f"split {args.split}; metrics x100, mean ± std over seeds")
    print(render(cmp, args.format, paired=args.paired, alpha=args.alpha))
    if args.format == "csv":  # the other formats carry the warnings in their notes
        for w in cmp.warnings:
            print(f"mrhp compare: warning: {w}", file=sys.stderr)
    if args.reported:
        from models.reported import load_reported

        print()
        print(reported_table(cmp, load_reported(), args.format))
    return 0
