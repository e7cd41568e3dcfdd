"""`mrhp distances RUN [--split test] [--labels 1 4]`: the distance analysis of MCL's Tables 7-8.

For every review of the split with one of the given labels, the cosine distance (CS = 1 - cos)
and the L2 distance between the token sets of the interaction module's outputs H_p, H_r, V_p,
V_r, grouped as the paper groups them: intra-modal (product text - review text, product image -
review image), inter-modal (product text - review image, product image - review text) and
intra-review (product text - product image, review text - review image). A sample's value is
the mean over every pair of real tokens, averaged over the group's two relations; the table
prints mean +- std over the samples of each label (models.mcl.relation_distances). Reviews or
products without images take no part (they have no image tokens). Only MCL runs are accepted.
Writes `distances_<split>.json` into each run folder.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError

if TYPE_CHECKING:  # torch is imported by `run`, never by `mrhp --help`
    from models.data import DataBundle


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "distances", help="MCL Tables 7-8: intra-modal / inter-modal / intra-review distances",
        description="Cosine and L2 distances between the token sets of a trained MCL run's "
        "interaction-module outputs, per helpfulness label (the paper's Tables 7-8).",
    )
    p.add_argument("run", metavar="RUN", help="run name under the runs root, or a run folder")
    p.add_argument("--split", default="test", help="split to analyse (default test)")
    p.add_argument("--labels", type=float, nargs="+", default=[1.0, 4.0],
                   help="helpfulness labels to report (default 1 4, as the paper)")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best",
                   help="which checkpoint of each seed to analyse (default best)")
    p.set_defaults(func=run)


def distances_for_run(run_dir: Path, data: DataBundle, *, split: str = "test",
                      labels: list[float] = (1.0, 4.0), checkpoint: str = "best") -> dict[str, Any]:
    """The Table 7-8 record of one run folder (also written as distances_<split>.json)."""
    from models.data import eval_plan, make_loader
    from models.mcl import MCL, relation_distances
    from models.runs import write_json_atomic
    from models.trainer import load_run, run_config

    cfg = run_config(run_dir)
    if cfg.model != "mcl":
        raise ConfigError(f"{run_dir}: model is {cfg.model!r}; `mrhp distances` analyses MCL runs "
                          f"(it reads MCL's interaction-module outputs)")
    model, cfg = load_run(run_dir, embeddings=data.embeddings, checkpoint=checkpoint)
    assert isinstance(model, MCL)
    source = data.split(split)
    plan = eval_plan(source, batch_products=cfg.eval_batch_products, max_reviews=cfg.eval_max_reviews)
    loader = make_loader(source, plan, cfg.data, num_workers=cfg.num_workers)
    table = relation_distances(model, loader, labels=labels)
    rec = {"split": split, "checkpoint": checkpoint,
           "distances": {f"{y:g}": groups for y, groups in table.items()}}
    write_json_atomic(run_dir / f"distances_{split}.json", rec)
    return rec


def format_table(name: str, rec: dict[str, Any]) -> str:
    from models.mcl import RELATIONS

    cell = lambda m, s: "      n/a      " if math.isnan(m) else f"{m:7.3f} ± {s:5.3f}"  # noqa: E731
    head = f"{'label':<7}" + "".join(f"{g + ' CS':>18}{g + ' L2':>18}" for g in RELATIONS) + f"{'n':>7}"
    lines = [f"{name} on {rec['split']} ({rec['checkpoint']} checkpoint)", head]
    for y, groups in rec["distances"].items():
        row = f"{y:<7}"
        for g in RELATIONS:
            v = groups[g]
            row += f"{cell(v['CS'], v['CS_std']):>18}{cell(v['L2'], v['L2_std']):>18}"
        lines.append(row + f"{groups[next(iter(RELATIONS))]['n']:>7}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from models.data import build_datasets, required_views
    from models.runs import resolve_run, seed_dirs
    from models.trainer import run_config
    from pipeline.manifest import load_manifest

    manifest = load_manifest(args.manifest)
    bundles: dict[str, DataBundle] = {}
    for d in seed_dirs(resolve_run(manifest.roots.runs, args.run)):
        cfg = run_config(d)
        if cfg.dataset not in bundles:
            # the views the run's model needs, checked as `mrhp train` and `mrhp evaluate` check
            # them (before: whatever views the store had, so a missing rois view meant MCL analysed
            # without image features, unsaid)
            bundles[cfg.dataset] = build_datasets(manifest, cfg.dataset, cfg.data,
                                                  required=required_views(cfg.model, cfg.model_cfg),
                                                  allow_missing=cfg.allow_missing)
        rec = distances_for_run(d, bundles[cfg.dataset], split=args.split, labels=args.labels,
                                checkpoint=args.checkpoint)
        print(format_table(str(d), rec))
    return 0
