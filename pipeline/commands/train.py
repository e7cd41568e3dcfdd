"""`mrhp train`: train a registered model on a dataset of the manifest, one run per seed.

    mrhp train --model text-gru --dataset demo [--seeds 3] [--name RUN] [--config FILE]
               [--resume] [key=value ...]

Runs go to `<roots.runs>/<name>/seed<k>/` (k = 0..N-1, seed = config seed + k); labels and
grouping come from the dataset reader, arrays from the feature store views.
"""
from __future__ import annotations

import argparse

from models.config import load_train_config
from models.trainer import train_seeds
from pipeline.errors import ConfigError
from pipeline.manifest import load_manifest


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a model (one run per seed) and evaluate it on the test split",
        description="Train a registered model on a dataset from the feature store. Settings come "
        "from the TrainConfig defaults, then --config FILE (YAML), then key=value overrides "
        "(e.g. lr=3e-4 model_cfg.hidden=64 data.max_rois=64).",
    )
    p.add_argument("--model", required=True, help="registered model name (e.g. text-gru, length, sancl)")
    p.add_argument("--dataset", required=True, help="dataset name declared in the manifest")
    p.add_argument("--seeds", type=int, default=1, help="number of runs with seeds seed, seed+1, ... (default 1)")
    p.add_argument("--name", default=None, help="run name under the runs root (default <model>-<dataset>)")
    p.add_argument("--config", default=None, help="YAML file of training settings")
    p.add_argument("--resume", action="store_true", help="continue the runs from their last checkpoints")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing runs of this name (default: refuse, so no run is lost)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="setting overrides")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.seeds < 1:
        raise ConfigError(f"--seeds: expected a positive integer, got {args.seeds}")
    manifest = load_manifest(args.manifest)
    manifest.dataset(args.dataset)  # ManifestError naming the declared datasets
    cfg = load_train_config(args.config, args.overrides, base={"model": args.model, "dataset": args.dataset})
    if cfg.model != args.model or cfg.dataset != args.dataset:
        raise ConfigError(
            f"--model/--dataset ({args.model}, {args.dataset}) disagree with the config "
            f"({cfg.model}, {cfg.dataset}); set them in one place"
        )
    if args.overwrite and args.resume:
        raise ConfigError("--overwrite and --resume exclude each other")
    results = train_seeds(manifest, cfg, seeds=args.seeds, name=args.name, resume=args.resume,
                          overwrite=args.overwrite, progress=print)
    for k, res in enumerate(results):
        if res.test:
            print(f"seed{k}: best epoch {res.best_epoch}; test "
                  + ", ".join(f"{m} {v:.4f}" for m, v in res.test.items()))
    print(f"runs written under {results[0].run_dir.parent}")
    return 0
