"""Training configuration: one frozen record, from YAML plus `key=value` overrides.

Resolution order (each later layer wins key by key): TrainConfig defaults < the model's preset
(`TrainConfig.preset`, default "paper"; `Model.preset(name, category=...)`) < the YAML file <
`key=value` overrides. `model_cfg` is validated into the model's own config record as the config
loads (before any data is read) and stored with every field resolved.

Defaults follow the shared training protocol (REFERENCE.md section 4): Adam at 1e-4, about 30
epochs, learning rate halved when the dev MAP plateaus, best checkpoint by dev MAP, MCR
pairwise sampling with 7 negatives and the label-difference hinge margin.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import yaml

from pipeline.config import deep_merge, from_mapping, load_yaml, parse_overrides, to_mapping
from pipeline.errors import ConfigError
from pipeline.manifest import threshold_problem
from pipeline.records import MAX_LABEL


@dataclass(frozen=True)
class DataConfig:
    """How product examples are read and padded."""

    max_boxes_per_image: int = 32  # MCR: at most 32 ROIs per image ...
    max_rois: int = 128  # ... images of an item concatenated, capped at this many ROIs
    min_rois: int = 1  # pad the ROI axis of a batch to at least this (MCR pads to >= 16)
    empty_rois: Literal["mask", "zeros"] = "mask"  # item without image features: all-False mask,
    # or MCR's `zeros_rois` all-zero rows marked real
    zeros_rois: int = 16  # rows used by empty_rois="zeros"
    max_tokens: int | None = None  # cap on token ids per text (the tokens stage already cuts at 128)
    roi_dim: int = 2048  # ROI feature size; checked against the stored features
    # A review whose probes record is a failure (the stage's coref/parse step failed on it): "ones"
    # trains it with a mask of ones (plain attention), counted per split in run.json
    # (`probe_fallback`) and said in one warning line at load; "refuse" stops the load with a
    # DataError naming the first such review and its failure reason.
    probe_failures: Literal["ones", "refuse"] = "ones"
    # (`require_probes` is gone: the model's `required_views` says whether probes are needed and
    # TrainConfig.allow_missing opts out; old run configs carrying it still load, see train_config)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (saved as runs/<name>/config.yaml)."""

    model: str = "text-gru"  # registered model name (models.registry)
    model_cfg: Mapping[str, Any] = field(default_factory=dict)  # passed to Model.from_config;
    # resolved on load to every field of the model's own config record (models.registry.model_config)
    preset: str = "paper"  # the model's preset (Model.preset): defaults < preset < YAML < CLI
    dataset: str = ""  # dataset name in the manifest ("" when data is given in memory)
    epochs: int = 30
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_products: int = 8  # products per training batch (every review of each, up to the cap)
    eval_batch_products: int = 16  # products per evaluation batch
    max_reviews_per_product: int | None = 64  # training: subsample larger products (memory)
    eval_max_reviews: int = 256  # evaluation: score larger products in chunks of this many
    sampler: Literal["pairwise", "listwise"] = "pairwise"
    num_negatives: int = 7  # K negatives per positive (pairwise)
    min_gap: float = 2.0  # a negative's label is at least this much below the positive's
    # 1 - label frequency: sampling probability (MCR) or hinge weight
    negative_weights: Literal["loss", "sampling", "none"] = "sampling"
    margin: Literal["label", "fixed"] = "label"  # hinge margin: label difference or fixed_margin
    fixed_margin: float = 1.0
    ranking_reduction: Literal["mean", "sum"] = "mean"  # hinge over instances: mean, or sum (MCL Eq. 34 as printed)
    grad_clip: float | None = 5.0  # max global grad norm; None disables clipping
    metric: str = "MAP"  # dev metric that picks the best checkpoint and drives the scheduler
    lr_factor: float = 0.5  # ReduceLROnPlateau factor on the dev metric
    lr_patience: int = 2  # epochs without dev improvement before the lr is cut
    min_lr: float = 1e-6
    patience: int = 6  # early stopping: epochs without dev improvement; 0 disables
    eval_every: int = 1  # evaluate on dev every N epochs
    seed: int = 0
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:N"
    autocast: bool = True  # bf16 autocast on GPU (ignored on CPU)
    num_workers: int = 0  # DataLoader worker processes (HDF5 opened lazily in each)
    threshold: float | None = None  # relevance threshold; None = the dataset's (manifest)
    ks: tuple[int, ...] = (3, 5)  # NDCG cut-offs
    # Feature-store views the model needs but may train without (e.g. ["rois"]): by default a
    # missing required view (models.data.required_views) stops the run; names among VIEW_NAMES.
    allow_missing: tuple[str, ...] = ()
    data: DataConfig = DataConfig()


VIEW_NAMES = ("tokens", "rois", "probes", "bert")  # the stage views a model can require


def _check(cfg: TrainConfig, *, training: bool = True) -> TrainConfig:
    positive = {"epochs": cfg.epochs, "batch_products": cfg.batch_products,
                "eval_batch_products": cfg.eval_batch_products, "num_negatives": cfg.num_negatives,
                "eval_max_reviews": cfg.eval_max_reviews, "eval_every": cfg.eval_every}
    for k, v in positive.items():
        if v < 1:
            raise ConfigError(f"{k}: expected a positive integer, got {v}")
    if not cfg.lr > 0:  # `not >` refuses NaN too
        raise ConfigError(f"lr: expected a positive number, got {cfg.lr}")
    # Settings only training reads (a run about to train is refused); a finished run's saved config
    # (`training=False`: evaluate, predict) loads whatever it trained under before a check existed.
    if training:
        # clip_grad_norm_ scales every gradient by grad_clip / norm: 0 zeroes them (nothing trains)
        # and a negative value flips their sign (gradient ascent), both without a word
        if cfg.grad_clip is not None and not cfg.grad_clip > 0:
            raise ConfigError(f"grad_clip: expected a positive max gradient norm or null (no clipping), "
                              f"got {cfg.grad_clip}")
        # a negative is at least min_gap below its positive: at 0 a positive can be drawn as its own
        # negative (and equal labels pair up), below 0 negatives may outrank their positive
        if not cfg.min_gap > 0:
            raise ConfigError(f"min_gap: expected a positive label gap (1 or 2 in the papers' setups), "
                              f"got {cfg.min_gap}")
        # hinge max(0, m - (s+ - s-)): a negative margin rewards a negative scored above its positive
        if not cfg.fixed_margin >= 0:
            raise ConfigError(f"fixed_margin: expected a number >= 0, got {cfg.fixed_margin}")
        # listwise pairs a positive with every lower review, drawing nothing: "sampling" weights
        # (the default, for the pairwise sampler) would silently become "none" there
        if cfg.sampler == "listwise" and cfg.negative_weights == "sampling":
            raise ConfigError("negative_weights: 'sampling' draws negatives by weight, which sampler: listwise does "
                              "not do (it takes every lower review); set negative_weights: loss or none")
        if not cfg.weight_decay >= 0:
            raise ConfigError(f"weight_decay: expected a number >= 0, got {cfg.weight_decay}")
        # ReduceLROnPlateau cuts lr to max(lr * lr_factor, min_lr) and only when that is lower: with
        # min_lr above lr it never cuts, so lr_factor and lr_patience would be ignored in silence
        if not 0 <= cfg.min_lr <= cfg.lr:
            raise ConfigError(f"min_lr: expected a number in [0, lr={cfg.lr:g}], got {cfg.min_lr}")
    if not 0 < cfg.lr_factor < 1:
        raise ConfigError(f"lr_factor: expected a number in (0, 1), got {cfg.lr_factor}")
    if cfg.max_reviews_per_product is not None and cfg.max_reviews_per_product < 2:
        raise ConfigError(f"max_reviews_per_product: expected >= 2 or null, got {cfg.max_reviews_per_product}")
    if cfg.num_workers < 0 or cfg.patience < 0 or cfg.lr_patience < 0:
        raise ConfigError("num_workers, patience and lr_patience must be >= 0")
    if cfg.ranking_reduction not in ("mean", "sum"):
        raise ConfigError(f"ranking_reduction: expected 'mean' or 'sum', got {cfg.ranking_reduction!r}")
    # NDCG@k over the first k ranked reviews: k = 0 is 0 for every product, a negative k slices
    # from the end (NDCG over all but the last |k|), a repeated k is one column twice
    if cfg.threshold is not None and not 0 <= cfg.threshold < MAX_LABEL:
        raise ConfigError(f"threshold: {threshold_problem(cfg.threshold)}")
    bad_ks = [k for k in cfg.ks if k < 1]
    if bad_ks or len(set(cfg.ks)) != len(cfg.ks):
        raise ConfigError(f"ks: expected distinct NDCG cut-offs >= 1, got {list(cfg.ks)}")
    valid_metrics = ["MAP", "MRR", *[f"NDCG@{k}" for k in cfg.ks]]
    if cfg.metric not in valid_metrics:
        raise ConfigError(f"metric: expected one of {', '.join(valid_metrics)}, got {cfg.metric!r}")
    unknown = [v for v in cfg.allow_missing if v not in VIEW_NAMES]
    if unknown:
        raise ConfigError(
            f"allow_missing: unknown view(s) {', '.join(map(repr, unknown))}; valid: {', '.join(VIEW_NAMES)}"
        )
    if "tokens" in cfg.allow_missing:
        raise ConfigError("allow_missing: 'tokens' cannot be missing (every model reads the token ids)")
    if cfg.data.max_boxes_per_image < 1 or cfg.data.max_rois < 1 or cfg.data.min_rois < 1:
        raise ConfigError("data.max_boxes_per_image, data.max_rois and data.min_rois must be >= 1")
    # ids[:max_tokens]: 0 empties every text, a negative value drops the last tokens instead
    if cfg.data.max_tokens is not None and cfg.data.max_tokens < 1:
        raise ConfigError(f"data.max_tokens: expected a positive token cap or null, got {cfg.data.max_tokens}")
    if cfg.data.roi_dim < 1:
        raise ConfigError(f"data.roi_dim: expected a positive feature size, got {cfg.data.roi_dim}")
    if cfg.data.empty_rois == "zeros" and cfg.data.zeros_rois < 1:  # no rows: "zeros" would be "mask"
        raise ConfigError(f"data.zeros_rois: expected >= 1 rows for empty_rois: zeros, got {cfg.data.zeros_rois}")
    if cfg.data.probe_failures not in ("ones", "refuse"):
        raise ConfigError(f"data.probe_failures: expected 'ones' or 'refuse', got {cfg.data.probe_failures!r}")
    return cfg


def _resolve_model_cfg(cfg: TrainConfig, *, training: bool = True) -> TrainConfig:
    """model_cfg validated into the model's own config record and stored as every field of it
    (so a run folder records the resolved model config); unchanged for a model without one. A
    model class may define `check_train_config(record, cfg)` to refuse model settings that
    contradict the training settings (SANCL: its CPC reduction against ranking_reduction); it is
    not called for a finished run's saved config (`training=False`)."""
    from models.registry import model_class, model_config, preset_names

    valid = preset_names(cfg.model)
    if cfg.preset not in valid:
        raise ConfigError(f"preset: model {cfg.model!r} has no preset {cfg.preset!r}; valid: {', '.join(valid)}")
    record = model_config(cfg.model, cfg.model_cfg)
    if record is None:
        return cfg
    check = getattr(model_class(cfg.model), "check_train_config", None)  # model x trainer settings
    if callable(check) and training:
        check(record, cfg)
    resolved = to_mapping(record)
    # Fields the data decides (the word vectors' width, a test vocabulary's size) stay unset unless
    # the user set them: the model takes them from the matrices it is given when it is built.
    for name in DATA_DERIVED_FIELDS:
        if name not in cfg.model_cfg:
            resolved.pop(name, None)
    return dataclasses.replace(cfg, model_cfg=MappingProxyType(resolved))


DATA_DERIVED_FIELDS = ("embed_dim", "vocab_size")


def train_config(mapping: Mapping[str, Any] | None = None, *, saved_run: bool = False) -> TrainConfig:
    """Validated TrainConfig from a plain mapping (unknown keys name the valid ones), model_cfg
    checked against the model's config record. No preset is applied here: a saved run config
    already holds every resolved field.

    Backward compatibility: `data.require_probes` (run configs written before `allow_missing`)
    is accepted and dropped; `true` is what required_views now does by default, and `false` had
    only an effect when the probes view was missing, which now stops the run unless
    `allow_missing` lists probes. `saved_run=True` (a finished run's config.yaml read for
    `mrhp evaluate` / `predict`): the refusals of settings only training reads (grad_clip,
    min_gap, fixed_margin, sampler x negative_weights, weight_decay, min_lr, a model's
    `check_train_config`) are skipped, so a run trained before one of them existed still loads."""
    mapping = dict(mapping or {})
    data = mapping.get("data")
    if isinstance(data, Mapping) and "require_probes" in data:
        data = dict(data)
        data.pop("require_probes")
        mapping["data"] = data
    training = not saved_run
    return _resolve_model_cfg(_check(from_mapping(TrainConfig, mapping, ""), training=training), training=training)


def apply_preset(explicit: Mapping[str, Any], *, category: str | None = None) -> dict[str, Any]:
    """The mapping `explicit` (YAML and CLI settings) over the model's preset: TrainConfig
    defaults < preset ("train" fields and "model_cfg") < explicit, so a key the user sets always
    wins. The model and preset names come from `explicit` (defaults: TrainConfig's)."""
    from models.registry import model_preset

    defaults = TrainConfig()
    model = explicit.get("model", defaults.model)
    preset = explicit.get("preset", defaults.preset)
    if not isinstance(model, str) or not isinstance(preset, str):
        return dict(explicit)  # train_config reports the wrong type
    p = model_preset(model, preset, category=category)
    layer = deep_merge(p["train"], {"model_cfg": p["model_cfg"]})
    return deep_merge(layer, explicit)


def load_train_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                      base: Mapping[str, Any] | None = None, *,
                      category: str | None = None) -> TrainConfig:
    """base mapping <- YAML file <- `key=value` overrides over the model's preset (for the
    dataset category `category`, the first of the dataset's manifest entry), validated."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: cannot read the config ({e})") from None
        loaded = load_yaml(text, str(p)) or {}  # alias bombs and deep nesting refused in one line
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{p}: expected a mapping of training settings, got {type(loaded).__name__}")
        data = deep_merge(data, loaded)
    data = deep_merge(data, parse_overrides(list(overrides)))
    return train_config(apply_preset(data, category=category))


def _flat(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (for naming the settings two configs disagree on)."""
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_mapping(cfg), sort_keys=False)


def resolve_train_config(manifest, *, model: str, dataset: str, config: str | Path | None = None,
                         overrides: Sequence[str] = (), preset: str | None = None) -> TrainConfig:
    """The TrainConfig of a training run of `model` on `dataset` of `manifest`: TrainConfig
    defaults < the model's preset (`preset`, else a `preset=NAME` override, else "paper"; for
    the dataset's first manifest category) < the YAML file `config` < `key=value` overrides,
    validated. `mrhp train` and the training flow both resolve their config here.

    Raises ManifestError for an undeclared dataset, ConfigError for a preset given twice or a
    config whose model/dataset disagree with `model`/`dataset`."""
    spec = manifest.dataset(dataset)  # ManifestError naming the declared datasets
    overrides = list(overrides)
    if preset is not None:
        if any(o.split("=", 1)[0] == "preset" for o in overrides):
            raise ConfigError("give the preset once: --preset or preset=NAME, not both")
        overrides.append(f"preset={preset}")
    base = {"model": model, "dataset": dataset}
    cfg = load_train_config(config, overrides, base=base, category=spec.categories[0] if spec.categories else None)
    # A preset with per-category values (SANCL's Table 5) on a dataset of several categories: the
    # first category's values would apply to all, unsaid. Refused unless the settings agree.
    for other in spec.categories[1:]:
        alt = load_train_config(config, overrides, base=base, category=other)
        if alt != cfg:
            a, b = _flat(to_mapping(cfg)), _flat(to_mapping(alt))
            keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            first = ", ".join(f"{k}={a.get(k)}" for k in keys)
            second = ", ".join(f"{k}={b.get(k)}" for k in keys)
            raise ConfigError(
                f"preset {cfg.preset!r} of {model} sets {', '.join(keys)} per category, and dataset {dataset!r} "
                f"has categories {', '.join(spec.categories)} ({spec.categories[0]}: {first}; {other}: {second}); "
                f"set them explicitly or train one category per dataset"
            )
    if cfg.model != model or cfg.dataset != dataset:
        raise ConfigError(
            f"--model/--dataset ({model}, {dataset}) disagree with the config "
            f"({cfg.model}, {cfg.dataset}); set them in one place"
        )
    from models.text_encoder import resolve_text_encoder  # finetune_text_encoder: the dataset's encoder

    return resolve_text_encoder(cfg, manifest)
