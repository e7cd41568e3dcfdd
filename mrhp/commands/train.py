"""`mrhp train`: train a registered model on a dataset of the manifest, one run per seed.

    mrhp train --model text-gru --dataset demo [--seeds 3] [--name RUN] [--config FILE]
               [--preset NAME] [--show-config] [--resume] [key=value ...]

Settings resolve as TrainConfig defaults < the model's preset (`--preset`, default "paper",
for the dataset's first manifest category) < --config YAML < key=value overrides. Runs go to
`<roots.runs>/<name>/seed<k>/` (k = 0..N-1, seed = config seed + k); labels and grouping come
from the dataset reader, arrays from the feature store views. Heavy imports (torch) happen in
`run`, so `mrhp --help` stays fast.

The Prefect flow `mrhp-train` (flows/training.py, deployed by `mrhp deploy`) makes the same two
calls: `models.config.resolve_train_config`, then `models.trainer.train_seeds` with that config.
"""
from __future__ import annotations

import argparse

from models.registry import MODEL_NAMES


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a model (one run per seed) and evaluate it on the test split",
        description="Train a registered model on a dataset from the feature store. Settings come "
        "from the TrainConfig defaults, then the model's preset (--preset), then --config FILE "
        "(YAML), then key=value overrides (e.g. lr=3e-4 model_cfg.hidden=64 data.max_rois=64); "
        "a key set explicitly always wins over the preset.",
    )
    p.add_argument("--model", required=True, metavar="MODEL",
                   help=f"registered model name: {', '.join(MODEL_NAMES)}")
    p.add_argument("--dataset", required=True, help="dataset name declared in the manifest")
    p.add_argument("--seeds", type=int, default=1, help="number of runs with seeds seed, seed+1, ... (default 1)")
    p.add_argument("--name", default=None, help="run name under the runs root (default <model>-<dataset>)")
    p.add_argument("--config", default=None, help="YAML file of training settings")
    p.add_argument("--preset", default=None,
                   help="the model's preset of settings (default 'paper'; e.g. 'code' for a public "
                   "code release's settings where the model offers one); same as preset=NAME")
    p.add_argument("--show-config", action="store_true",
                   help="print the resolved training config as YAML and exit without training")
    p.add_argument("--resume", action="store_true", help="continue the runs from their last checkpoints")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing runs of this name (default: refuse, so no run is lost)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="setting overrides (YAML values)")
    p.set_defaults(func=run)


def resolve(args: argparse.Namespace, manifest) -> object:
    """The TrainConfig the command line asks for (preset, YAML, overrides), validated; resolved
    by `models.config.resolve_train_config`, as the training flow resolves its parameters."""
    from models.config import resolve_train_config

    return resolve_train_config(manifest, model=args.model, dataset=args.dataset, config=args.config,
                                overrides=args.overrides, preset=args.preset)


def run(args: argparse.Namespace) -> int:
    from pipeline.errors import ConfigError
    from pipeline.manifest import load_manifest

    if args.seeds < 1:
        raise ConfigError(f"--seeds: expected a positive integer, got {args.seeds}")
    manifest = load_manifest(args.manifest)
    cfg = resolve(args, manifest)
    if args.show_config:
        from models.config import config_to_yaml

        print(config_to_yaml(cfg), end="")
        return 0
    if args.overwrite and args.resume:
        raise ConfigError("--overwrite and --resume exclude each other")
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from models.trainer import train_seeds

    with logging_redirect_tqdm():
        results = train_seeds(manifest, cfg, seeds=args.seeds, name=args.name, resume=args.resume,
                              overwrite=args.overwrite, progress=tqdm.write)
    for k, res in enumerate(results):
        if res.test:
            print(f"seed{k}: best epoch {res.best_epoch}; test "
                  + ", ".join(f"{m} {v * 100:.2f}" for m, v in res.test.items()) + " (x100)")
    print(f"runs written under {results[0].run_dir.parent}")
    return 0
