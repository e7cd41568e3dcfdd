"""Prefect flow `mrhp-train`: train and evaluate a model from the feature store's cached views.

Thin wiring around the one training entry point: the flow resolves its settings with
`models.config.resolve_train_config` and trains with `models.trainer.train_seeds`, the two calls
`mrhp train` makes, handing the same frozen TrainConfig record to its tasks (no round trip
through a mapping). Same config and seed, same run folders and bitwise the same test metrics as
`mrhp train`.

Tasks (run in the flow's process, one after the other):
- `check-views`: the views the run needs (`models.trainer.run_views`: the model's own
  `required_views`, as `mrhp train` checks them) exist in the store, or a one-line DataError
  naming the stage and `mrhp extract --dataset D --stage S`; checked before the run waits for
  the GPU, so a run missing a view fails at once instead of after the GPU frees up.
- `train`: `train_seeds` for every seed (seeds seed, seed+1, ...; seed plots across seeds, as
  the CLI writes them). With `gpu_limit` (set by `mrhp deploy`) and a device other than "cpu",
  it holds one slot of that global concurrency limit for the whole run, the limit the ROI and
  bert extraction chunks hold a slot of, so training and GPU extraction never share the GPU
  at once; it also carries the `mrhp-gpu` task tag of the GPU chunks. `device: auto` counts as
  a GPU run (deciding would need torch here; on a box without a GPU the slot only serialises).

Task parameters are Python objects (the Manifest and the TrainConfig). `cache_policy=NONE`: a
training run is never served from Prefect's cache (Prefect 3.8's default policy, inputs + task
source + flow run id, would hand back a stored result for the same inputs once result
persistence is switched on, e.g. on a retry of the flow run, without training or looking at the
run folder) and nothing is hashed per call; both records do hash under the default policy
(checked with Prefect 3.8.8), so this is a choice, not a workaround. `quote()` (`as_is`) hands
the very objects to the tasks without Prefect walking every field of them in search of futures
(Prefect 3.8.8 would keep the unchanged records as they are; quoted, nothing depends on that).
Only the flow's own parameters (strings, numbers, lists of strings) go to the Prefect API.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar, cast

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.utilities.annotations import quote

# GPU_LIMIT_TAG: the task tag of GPU work, shared with the extraction's GPU chunks (a Prefect
# tag concurrency limit on it covers both).
from flows.extract import GPU_LIMIT_TAG
from models.config import TrainConfig, resolve_train_config
from pipeline.errors import ConfigError
from pipeline.manifest import Manifest, load_manifest

T = TypeVar("T")


def as_is(obj: T) -> T:
    """`obj` wrapped in Prefect's `quote()`: the task receives this very object, unwalked
    (typed as `obj` for the task's signature)."""
    return cast(T, quote(obj))


@task(name="check-views", cache_policy=NONE, persist_result=False)
def check_run_views(manifest: Manifest, cfg: TrainConfig) -> list[str]:
    """The views a run of `cfg` needs, checked as `mrhp train` checks them; DataError when one
    is missing and not listed in `cfg.allow_missing`."""
    from models.data import check_views
    from models.trainer import run_views

    views = run_views(manifest, cfg)
    check_views(manifest.store_root, cfg.dataset, views, cfg.allow_missing)
    return sorted(views)


def uses_gpu(cfg: TrainConfig) -> bool:
    """Whether a run of `cfg` may use the GPU ("auto" may: the flow does not import torch)."""
    return cfg.device != "cpu"


@contextmanager
def gpu_slot(cfg: TrainConfig, gpu_limit: str | None) -> Iterator[None]:
    """One slot of the global concurrency limit `gpu_limit` for a GPU run, none otherwise.

    Strict: a deployed run whose limit is missing (or whose server cannot grant it) stops with
    one line naming the limit, instead of training beside an extraction unguarded. A failed
    lease renewal does not kill a long run."""
    if not gpu_limit or not uses_gpu(cfg):
        yield
        return
    from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.sync import concurrency

    try:
        with concurrency(gpu_limit, occupy=1, strict=True, raise_on_lease_renewal_failure=False):
            yield
    except ConcurrencySlotAcquisitionError as e:  # raised on entry only: training never raises it
        raise ConfigError(
            f"gpu_limit: cannot take a slot of the global concurrency limit {gpu_limit!r} ({e}); "
            "`mrhp deploy` creates it"
        ) from None


@task(name="train", cache_policy=NONE, persist_result=False)
def train_run(manifest: Manifest, cfg: TrainConfig, *, seeds: int, name: str | None, resume: bool,
              overwrite: bool, gpu_limit: str | None) -> list[dict[str, Any]]:
    """`train_seeds(manifest, cfg, ...)`, the call `mrhp train` makes; per seed its run folder,
    best epoch, test metrics and whether it stopped early."""
    from models.trainer import train_seeds

    with gpu_slot(cfg, gpu_limit):
        results = train_seeds(manifest, cfg, seeds=seeds, name=name, resume=resume, overwrite=overwrite,
                              progress=get_run_logger().info)
    return [{"seed": k, "run_dir": str(res.run_dir), "best_epoch": res.best_epoch, "test": res.test,
             "stopped_early": res.stopped_early} for k, res in enumerate(results)]


@flow(name="mrhp-train", flow_run_name="{model}-{dataset}")
def train_flow(dataset: str, model: str, *, manifest_path: str | None = None, seeds: int = 1,
               name: str | None = None, config: str | None = None, overrides: Sequence[str] = (),
               preset: str | None = None, resume: bool = False, overwrite: bool = False,
               gpu_limit: str | None = None) -> list[dict[str, Any]]:
    """Train `model` on `dataset` for `seeds` seeds from the store's views, as
    `mrhp train --model MODEL --dataset DATASET [--seeds N] [--name NAME] [--config FILE]
    [--preset P] [--resume] [--overwrite] [key=value ...]` does; test metrics per seed.

    Args:
        dataset: dataset name declared in the manifest.
        model: registered model name (models.registry).
        manifest_path: the manifest (set by `mrhp deploy`; default: data_manifest.yaml).
        seeds: number of runs, with seeds seed, seed+1, ...
        name: run name under the runs root (default MODEL-DATASET).
        config: YAML file of training settings, a path on the machine running the flow.
        overrides: key=value settings, e.g. ["epochs=20", "model_cfg.hidden=64"].
        preset: the model's preset of settings (default "paper").
        resume: continue the runs from their last checkpoints.
        overwrite: replace existing runs of this name.
        gpu_limit: global concurrency limit a GPU run holds a slot of (set by `mrhp deploy`).
    """
    if seeds < 1:
        raise ConfigError(f"seeds: expected a positive integer, got {seeds}")
    if overwrite and resume:
        raise ConfigError("overwrite and resume exclude each other")
    if isinstance(overrides, str):  # `-p overrides=lr=3e-4` would otherwise split into characters
        raise ConfigError(f"overrides: expected a list of key=value strings, got the string {overrides!r}")
    manifest = load_manifest(manifest_path)
    cfg = resolve_train_config(manifest, model=model, dataset=dataset, config=config,
                               overrides=list(overrides), preset=preset)
    views = check_run_views(as_is(manifest), as_is(cfg))
    log = get_run_logger()
    log.info("%s on %s: views %s present; preset %s", cfg.model, cfg.dataset, ", ".join(views), cfg.preset)
    train = train_run.with_options(tags=[GPU_LIMIT_TAG] if uses_gpu(cfg) else [])
    return train(as_is(manifest), as_is(cfg), seeds=seeds, name=name, resume=resume, overwrite=overwrite,
                 gpu_limit=gpu_limit)
