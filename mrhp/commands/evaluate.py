"""`mrhp evaluate RUN [--split test]`: MAP, NDCG@3, NDCG@5 and MRR of a run's best checkpoint.

RUN is a run name under the manifest's runs root (or a path): a single run folder or a folder of
seed<k>/ runs. The threshold is the dataset's (manifest) unless the run's config overrides it.
A run whose store views were re-extracted since training (data.json `read_views`), or trained in
another vocabulary than the dataset's now (`vocab_fingerprint`), is refused.
Writes `eval_<split>.json` (metrics and per-product metrics) into each run folder, which
`mrhp compare` reads. Numbers print x100 with two decimals, the scale of `mrhp compare` and of
the papers; a run trained on random-init features is marked.
"""
from __future__ import annotations

import argparse

RANDOM_INIT_MARK = "[random-init]"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate", help="ranking metrics of a trained run on a split",
        description="Score every review of every product of a split with the run's best checkpoint "
        "and print MAP, NDCG@3, NDCG@5 and MRR x100 (per seed, then mean +- std), the scale of "
        "`mrhp compare`.",
    )
    p.add_argument("run", metavar="RUN", help="run name under the runs root, or a run folder")
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best",
                   help="which checkpoint to score (default best: the best dev epoch)")
    p.set_defaults(func=run)


def check_views_unchanged(run_dir, store_root, dataset: str) -> None:
    """Refuse to evaluate a run whose store views changed since it was trained: data.json's
    `read_views` (the fingerprint of every view training read) against the store's views now. A
    run folder without the record is evaluated unchecked (trained before it existed); a recorded
    view now absent is left to the data loading (refused unless allowed missing)."""
    from pathlib import Path

    from models.runs import changed_views, read_json, recorded_views, short_fp, views_read
    from pipeline.errors import DataError

    path = Path(run_dir) / "data.json"
    if not path.is_file():
        return
    rec = recorded_views(read_json(path), str(path))
    if not rec:
        return
    now = {s: v["fingerprint"] for s, v in views_read(store_root, dataset, rec).items()}
    for stage, was, got in changed_views(rec, now):
        if got is not None and was is not None:  # a view now gone is left to the data loading
            raise DataError(
                f"{run_dir}: the run was trained on the {stage} view of dataset {dataset!r} with fingerprint "
                f"{short_fp(was, got)}, the store's view now has {short_fp(got, was)} (re-extracted since "
                f"training): evaluating would score features the model never saw; retrain the run, or "
                f"re-extract {stage} with the settings it was trained on"
            )


def check_vocabulary_unchanged(run_dir, now: str | None, dataset: str) -> None:
    """Refuse to evaluate a run trained in another vocabulary than the dataset's now (data.json
    `vocab_fingerprint`): the tokens view's fingerprint leaves the vocabulary out, so after the
    train texts changed and were re-extracted every token id means another word to the model.
    Unchecked when either side is unknown (a run or a tokens stage without the record)."""
    from pathlib import Path

    from models.runs import read_json
    from pipeline.errors import DataError

    path = Path(run_dir) / "data.json"
    if now is None or not path.is_file():
        return
    was = read_json(path).get("vocab_fingerprint")
    if isinstance(was, str) and was and was != now:
        raise DataError(
            f"{run_dir}: the run was trained in vocabulary {was[:8]}, dataset {dataset!r} now fits vocabulary "
            f"{now[:8]} (its train texts or the manifest's stages.tokens changed since training): token ids "
            f"would mean other words to the model; retrain the run on the current data and settings"
        )


def random_init_note(dirs) -> str:
    """" [random-init]" when any seed of the run read random-init features (its run.json)."""
    from models.runs import RunPaths, read_json, run_is_random_init

    for d in dirs:
        meta = RunPaths(d).meta
        if meta.is_file() and run_is_random_init(read_json(meta)):
            return f" {RANDOM_INIT_MARK}"
    return ""


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from models.data import build_datasets, required_views
    from models.metrics import metric_names
    from models.runs import RunPaths, resolve_run, seed_dirs, write_json_atomic
    from models.trainer import _vocab_fingerprint, counts_line, evaluate, load_run, run_config
    from pipeline.manifest import load_manifest

    manifest = load_manifest(args.manifest)
    dirs = seed_dirs(resolve_run(manifest.roots.runs, args.run))
    bundles: dict[tuple, object] = {}
    vocabs: dict[str, str | None] = {}
    rows = []
    for d in dirs:
        cfg = run_config(d)
        check_views_unchanged(d, manifest.store_root, cfg.dataset)
        views = required_views(cfg.model, cfg.model_cfg)
        key = (cfg.dataset, tuple(sorted(views)))
        if key not in bundles:
            bundles[key] = build_datasets(manifest, cfg.dataset, cfg.data,
                                          required=required_views(cfg.model, cfg.model_cfg),
                                          allow_missing=cfg.allow_missing)
        data = bundles[key]
        if cfg.dataset not in vocabs:  # the dataset's vocabulary now (the tokens stage's cached fit)
            vocabs[cfg.dataset] = _vocab_fingerprint(manifest, cfg.dataset, data.records)
        check_vocabulary_unchanged(d, vocabs[cfg.dataset], cfg.dataset)
        model, cfg = load_run(d, embeddings=data.embeddings, checkpoint=args.checkpoint)
        threshold = cfg.threshold if cfg.threshold is not None else data.threshold
        res = evaluate(model, data.split(args.split), threshold=threshold, cfg=cfg)
        write_json_atomic(RunPaths(d).eval_file(args.split), {
            "split": args.split, "checkpoint": args.checkpoint, "threshold": threshold,
            "metrics": res.metrics, "counts": res.counts, "per_product": res.per_product,
        })
        rows.append((d.name, res.metrics))
        counts = res.counts
    names = metric_names(cfg.ks)
    mark = random_init_note(dirs)
    print(f"{args.run}{mark} on {args.split} (threshold {threshold:g}, {len(res.per_product)} products); "
          f"metrics x100")
    print(counts_line(args.split, counts))
    print(f"{'run':<10}" + "".join(f"{n:>10}" for n in names))
    for label, m in rows:
        print(f"{label:<10}" + "".join(f"{m[n] * 100:>10.2f}" for n in names))
    if len(rows) > 1:
        print(f"{'mean':<10}" + "".join(f"{np.mean([m[n] for _, m in rows]) * 100:>10.2f}" for n in names))
        print(f"{'std':<10}" + "".join(f"{np.std([m[n] for _, m in rows], ddof=1) * 100:>10.2f}" for n in names))
    if mark:
        print(f"{RANDOM_INIT_MARK}: trained on features from random-init weights (demo/test only; "
              f"never a result)")
    return 0
