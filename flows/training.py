"""Prefect flow `mrhp-train`: train and evaluate a model from the feature store's cached shards.

Thin wiring: the flow checks that the dataset's views exist (tokens and embeddings at least; the
extraction flow produces them), then runs one task per seed (sequentially: one device), each
calling `models.trainer.train_seeds`, which writes `<roots.runs>/<name>/seed<k>/` and evaluates
the best checkpoint on the test split.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefect import flow, get_run_logger, task

from models.config import load_train_config
from models.trainer import train_seeds
from pipeline.errors import StoreError
from pipeline.manifest import load_manifest

REQUIRED_VIEWS = ("tokens", "embeddings")


@task(name="check-views")
def check_views(manifest_path: str | None, dataset: str) -> list[str]:
    """The stages with a view for `dataset`; StoreError when a required one is missing."""
    from pipeline.store import FeatureStore

    manifest = load_manifest(manifest_path)
    have = {v.stage for v in FeatureStore(manifest.store_root).views() if v.dataset == dataset}
    missing = [s for s in REQUIRED_VIEWS if s not in have]
    if missing:
        raise StoreError(
            f"dataset {dataset!r} has no {', '.join(missing)} view(s) in {manifest.store_root}; "
            f"run `mrhp extract --dataset {dataset}` first"
        )
    return sorted(have)


@task(name="train-seed")
def train_seed(manifest_path: str | None, cfg_mapping: dict[str, Any], seed_index: int, name: str,
               resume: bool) -> dict[str, Any]:
    """Train seed `seed_index` of the run; returns its run folder, best epoch and test metrics."""
    manifest = load_manifest(manifest_path)
    cfg = load_train_config(None, (), base=cfg_mapping)
    res = train_seeds(manifest, cfg, seeds=1, first_seed=seed_index, name=name, resume=resume,
                      progress=get_run_logger().info)[0]
    return {"run_dir": str(res.run_dir), "best_epoch": res.best_epoch, "test": res.test,
            "stopped_early": res.stopped_early}


@flow(name="mrhp-train")
def train_flow(dataset: str, model: str, *, manifest_path: str | None = None, seeds: int = 1,
               name: str | None = None, config: str | None = None, overrides: Sequence[str] = (),
               resume: bool = False) -> list[dict[str, Any]]:
    """Train `model` on `dataset` for `seeds` seeds from cached store views; test metrics per seed."""
    from pipeline.config import to_mapping

    views = check_views(manifest_path, dataset)
    get_run_logger().info("views present for %s: %s", dataset, ", ".join(views))
    spec = load_manifest(manifest_path).dataset(dataset)
    cfg = load_train_config(config, overrides, base={"model": model, "dataset": dataset},
                            category=spec.categories[0] if spec.categories else None)
    run_name = name or f"{model}-{dataset}"
    return [train_seed(manifest_path, to_mapping(cfg), k, run_name, resume) for k in range(seeds)]
