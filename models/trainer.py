"""The training loop: Adam, ranking loss over MCR instances, dev-driven lr halving and early
stopping, best/last checkpoints, bit-identical resume on CPU, NaN guard, gradient clipping.

All randomness the loop uses (product order, review subsampling, instance sampling) comes from
one numpy Generator seeded by `cfg.seed`; dropout uses torch's global RNG seeded the same way.
Both are saved in every checkpoint, so `resume=True` continues exactly where the run stopped.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from features.device import autocast, resolve_device
from models.config import TrainConfig, config_to_yaml, train_config
from models.data import DataBundle, ProductSource, eval_plan, make_loader, train_plan
from models.losses import ranking_loss
from models.metrics import metric_names, per_product_metrics
from models.registry import build_model
from models.runs import (
    RunPaths,
    append_jsonl,
    changed_views,
    git_state,
    load_checkpoint,
    package_versions,
    read_json,
    save_checkpoint,
    truncate_metrics,
    utc_now,
    view_fingerprints,
    views_read,
    write_json_atomic,
    write_plots,
    write_seed_plots,
)
from models.samplers import PairwiseSampler, label_frequency_weights, no_instance_message
from pipeline.errors import ConfigError, TrainingError

log = logging.getLogger(__name__)

# Settings a resumed run may change; anything else must match the checkpointed config.
RESUMABLE_CHANGES = ("epochs", "patience", "num_workers", "eval_every")


@dataclass
class EvalResult:
    metrics: dict[str, float]
    per_product: dict[str, dict[str, float]]
    predictions: list[dict[str, Any]]  # {"product_id", "review_id", "label", "score"} in input order
    # products scored; of them, those without a relevant review (0 on every metric, REFERENCE.md
    # section 5) and those with a single review (ranked trivially): written next to the metrics
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    best_dev: dict[str, float]
    test: dict[str, float] | None
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)




def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _parameter_groups(model: nn.Module, params: list[nn.Parameter], lr: float) -> list[dict]:
    """The model's `parameter_groups(base_lr)` (per-module learning rates) when it has one, else
    one group; the groups must hold every trainable parameter exactly once."""
    hook = getattr(model, "parameter_groups", None)
    if not callable(hook):
        return [{"params": params}]
    groups = [g for g in hook(lr) if g["params"]]
    got = [id(p) for g in groups for p in g["params"]]
    if len(got) != len(set(got)) or set(got) != {id(p) for p in params}:
        raise TrainingError(f"{type(model).__name__}.parameter_groups must list every trainable "
                            f"parameter exactly once")
    return groups


@torch.no_grad()
def score_source(model: nn.Module, source: ProductSource, *, cfg: TrainConfig,
                 device: torch.device | None = None) -> list[dict[str, Any]]:
    """Score every review of every product of `source`: a list of {"product_id", "review_id",
    "label", "score"}, products in source order, reviews in product order."""
    device = device or resolve_device(cfg.device, error=TrainingError, key="device")
    model.eval()
    plan = eval_plan(source, batch_products=cfg.eval_batch_products, max_reviews=cfg.eval_max_reviews)
    cuda = device.type == "cuda"
    loader = make_loader(source, plan, cfg.data, num_workers=cfg.num_workers, pin_memory=cuda, half_rois=cuda)
    preds: list[dict[str, Any]] = []
    for batch in loader:
        b = batch.to(device, non_blocking=cuda)
        with autocast(device, cfg.autocast and device.type == "cuda", "bfloat16"):
            scores = model(b).scores.float().cpu().numpy()
        if scores.shape != (batch.num_reviews,):
            raise TrainingError(f"model returned scores of shape {scores.shape}, expected ({batch.num_reviews},)")
        for i in range(batch.num_reviews):
            preds.append({
                "product_id": batch.product_ids[int(batch.rev_product[i])],
                "review_id": batch.review_ids[i],
                "label": float(batch.labels[i]),
                "score": float(scores[i]),
            })
    bad = [p["review_id"] for p in preds if not math.isfinite(p["score"])]
    if bad:
        raise TrainingError(f"model produced non-finite scores for {len(bad)} review(s), e.g. {bad[0]!r}")
    return preds


def evaluate(model: nn.Module, source: ProductSource, *, threshold: float, cfg: TrainConfig,
             device: torch.device | None = None) -> EvalResult:
    """Score every review of every product of `source` and compute the ranking metrics.

    Products without a relevant review count as 0 (REFERENCE.md section 5) and are counted in
    `EvalResult.counts`; a split where *no* review is relevant is a TrainingError, since every
    metric would be 0 whatever the model (a threshold the labels never exceed)."""
    preds = score_source(model, source, cfg=cfg, device=device)
    if not preds:
        raise TrainingError("evaluation split has no reviews")
    per = per_product_metrics([p["product_id"] for p in preds], [p["label"] for p in preds],
                              [p["score"] for p in preds], threshold=threshold, ks=cfg.ks)
    counts = evaluation_counts(preds, threshold)
    if counts["products_without_relevant"] == counts["products"]:
        where = getattr(source, "split", "") or "evaluation"
        top = max(p["label"] for p in preds)
        raise TrainingError(
            f"{where} split: no review of its {counts['products']} product(s) has a label above the "
            f"threshold {threshold:g} (highest label {top:g}), so every metric would be 0 whatever the "
            f"model; check the threshold (manifest datasets.<name>.threshold or threshold=)"
        )
    names = metric_names(cfg.ks)
    metrics = {n: float(np.mean([m[n] for m in per.values()])) for n in names}
    return EvalResult(metrics=metrics, per_product=per, predictions=preds, counts=counts)


def evaluation_counts(preds: list[dict[str, Any]], threshold: float) -> dict[str, int]:
    """{"products", "products_without_relevant", "single_review_products"} of scored reviews."""
    sizes: dict[str, int] = {}
    relevant: dict[str, bool] = {}
    for p in preds:
        pid = p["product_id"]
        sizes[pid] = sizes.get(pid, 0) + 1
        relevant[pid] = relevant.get(pid, False) or p["label"] > threshold
    return {"products": len(sizes),
            "products_without_relevant": sum(1 for v in relevant.values() if not v),
            "single_review_products": sum(1 for n in sizes.values() if n == 1)}


def check_measurable(source: ProductSource, threshold: float, split: str) -> None:
    """TrainingError when no review of `source` has a label above `threshold` (every metric would
    be 0 whatever the model); reads the labels only."""
    top = max((float(source.labels(i).max()) for i in range(len(source.product_ids))
               if len(source.labels(i))), default=None)
    if top is None or top <= threshold:
        n = len(source.product_ids)
        raise TrainingError(
            f"{split} split: no review of its {n} product(s) has a label above the threshold {threshold:g} "
            f"(highest label {'none' if top is None else f'{top:g}'}), so every metric would be 0 whatever "
            f"the model; check the threshold (manifest datasets.<name>.threshold or threshold=)"
        )


def counts_line(split: str, counts: dict[str, int]) -> str:
    """One line saying over what the metrics of `split` were averaged."""
    return (f"{split}: metrics over {counts['products']:,} product(s), "
            f"{counts['products_without_relevant']:,} without a relevant review (scored 0), "
            f"{counts['single_review_products']:,} with a single review")


def _rng_state(rng: np.random.Generator) -> str:
    return json.dumps(rng.bit_generator.state)


def _set_rng_state(rng: np.random.Generator, state: str) -> None:
    rng.bit_generator.state = json.loads(state)


def _config_diff(a: TrainConfig, b: TrainConfig) -> list[str]:
    from pipeline.config import to_mapping

    ma, mb = to_mapping(a), to_mapping(b)
    return [k for k in ma if ma[k] != mb.get(k) and k not in RESUMABLE_CHANGES]


class Trainer:
    """One training run in one run folder."""

    def __init__(self, cfg: TrainConfig, data: DataBundle, run_dir: str | Path, *,
                 progress: Callable[[str], None] | None = None, progress_bar: bool | None = None,
                 record: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.data = data
        self.paths = RunPaths(Path(run_dir))
        self.progress = progress or log.info
        # a tqdm bar per epoch (steps, ETA) on stderr; default: when stderr is a terminal
        self.progress_bar = sys.stderr.isatty() if progress_bar is None else progress_bar
        self.record = dict(record or {})  # extra run.json fields (run name, category, ...)
        self._provenance: dict[str, Any] | None = None
        self.device = resolve_device(cfg.device, error=TrainingError, key="device")
        self.threshold = cfg.threshold if cfg.threshold is not None else data.threshold
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, cfg.model_cfg, data.embeddings).to(self.device)
        set_threshold = getattr(self.model, "set_dataset_threshold", None)
        if callable(set_threshold):  # models whose training uses relevance (MCL's helpful pairs)
            set_threshold(self.threshold)
        check_labels = getattr(self.model, "check_training_labels", None)
        if callable(check_labels):  # MCL: refuses a helpfulness rule no training review meets
            check_labels(data.train_labels)
        self.params = trainable_parameters(self.model)
        self.rng = np.random.default_rng(cfg.seed)
        self.sampler = PairwiseSampler(
            mode=cfg.sampler, num_negatives=cfg.num_negatives, min_gap=cfg.min_gap,
            label_weights=label_frequency_weights(data.train_labels), weight_mode=cfg.negative_weights,
        )
        self.optimizer = self.scheduler = None
        if self.params:
            self.optimizer = torch.optim.Adam(_parameter_groups(self.model, self.params, cfg.lr),
                                              lr=cfg.lr, weight_decay=cfg.weight_decay)
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, mode="max", factor=cfg.lr_factor, patience=cfg.lr_patience, min_lr=cfg.min_lr,
            )
        self.epoch = 0
        self.best_metric = -math.inf
        self.best_epoch = 0
        self.best_dev: dict[str, float] = {}
        self.bad_epochs = 0

    # ---- checkpoints -------------------------------------------------------------------------
    def _state(self, *, with_optimizer: bool = True) -> dict[str, Any]:
        """Checkpoint contents; best.pt leaves out optimizer and scheduler state (Adam's moments
        are twice the model's size), last.pt keeps them for --resume."""
        keep = with_optimizer
        return {
            "format": 1,
            "model_name": self.cfg.model,
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer and keep else {},
            "scheduler": self.scheduler.state_dict() if self.scheduler and keep else {},
            "numpy_rng": _rng_state(self.rng),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "best_dev": dict(self.best_dev),
            "bad_epochs": self.bad_epochs,
        }

    def _restore(self, state: dict[str, Any]) -> None:
        if state.get("model_name") != self.cfg.model:
            raise TrainingError(
                f"checkpoint is for model {state.get('model_name')!r}, config says {self.cfg.model!r}"
            )
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise TrainingError(f"checkpoint does not fit model {self.cfg.model!r}: {e}") from None
        if self.optimizer and state.get("optimizer"):
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(self.rng, state["numpy_rng"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.epoch = int(state["epoch"])
        self.best_metric = float(state["best_metric"])
        self.best_epoch = int(state["best_epoch"])
        self.best_dev = dict(state["best_dev"])
        self.bad_epochs = int(state["bad_epochs"])

    # ---- one epoch -----------------------------------------------------------------------------
    def _train_epoch(self) -> dict[str, Any]:
        cfg = self.cfg
        self.model.train()
        hook = getattr(self.model, "on_epoch_start", None)
        if callable(hook):  # models with per-epoch state (MM-SS pseudo-label EWMA)
            hook(self.epoch)  # 0-based index of the epoch about to run
        source = self.data.split("train")
        plan = train_plan(source, batch_products=cfg.batch_products,
                          max_reviews=cfg.max_reviews_per_product, rng=self.rng)
        cuda = self.device.type == "cuda"
        loader = make_loader(source, plan, cfg.data, num_workers=cfg.num_workers, pin_memory=cuda,
                             half_rois=cuda)
        totals = {"loss": 0.0, "rank": 0.0}
        aux_totals: dict[str, float] = {}
        steps = reviews = instances = skipped = 0
        t0 = time.perf_counter()
        bar = self._bar(len(plan))
        for step, batch in enumerate(loader):
            if bar is not None:
                bar.update(1)
                if steps:
                    bar.set_postfix(loss=f"{totals['loss'] / steps:.4f}", refresh=False)
            inst = self.sampler.sample(batch.labels.numpy(), batch.rev_product.numpy(), self.rng)
            if inst.count == 0:
                skipped += 1  # no ranking pair in these products: counted in the epoch record
                continue
            batch.instances = torch.from_numpy(inst.index)
            batch.instance_weights = torch.from_numpy(inst.weights)
            b = batch.to(self.device, non_blocking=cuda)
            with autocast(self.device, cfg.autocast and self.device.type == "cuda", "bfloat16"):
                out = self.model(b)
            rank = ranking_loss(out.scores.float(), b.labels, b.instances, b.instance_weights,
                                margin=cfg.margin, fixed_margin=cfg.fixed_margin,
                                reduction=cfg.ranking_reduction)
            aux = {k: v.float() for k, v in out.aux_losses.items()}
            loss = rank + sum(aux.values()) if aux else rank
            # one host sync for every logged value of the step (was one per value plus the check)
            vals = torch.stack([loss.detach(), rank.detach(), *(v.detach() for v in aux.values())]).tolist()
            if not math.isfinite(vals[0]):
                parts = ", ".join(f"{k}={v:.4g}" for k, v in zip(aux, vals[2:], strict=True))
                raise TrainingError(
                    f"non-finite loss at epoch {self.epoch + 1} step {step + 1} (ranking="
                    f"{vals[1]:.4g}{', ' + parts if parts else ''}); lower lr, enable grad_clip "
                    f"or check the inputs of products {batch.product_ids[:3]}"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
                if not torch.isfinite(norm):
                    raise TrainingError(
                        f"non-finite gradient norm at epoch {self.epoch + 1} step {step + 1}; "
                        f"lower lr or check the inputs"
                    )
            self.optimizer.step()
            totals["loss"] += vals[0]
            totals["rank"] += vals[1]
            for k, v in zip(aux, vals[2:], strict=True):
                aux_totals[k] = aux_totals.get(k, 0.0) + v
            steps += 1
            reviews += batch.num_reviews
            instances += inst.count
        if bar is not None:
            bar.close()
        dt = time.perf_counter() - t0
        if steps == 0:
            raise TrainingError(no_instance_message(
                (source.labels(i) for i in range(len(source.product_ids))),
                min_gap=cfg.min_gap, mode=cfg.sampler,
            ))
        return {
            "train_loss": totals["loss"] / steps,
            "rank_loss": totals["rank"] / steps,
            "aux": {k: v / steps for k, v in aux_totals.items()},
            "steps": steps,
            "skipped_batches": skipped,
            "instances": instances,
            "reviews_per_s": reviews / dt if dt > 0 else None,
            "epoch_time_s": dt,
        }

    def _bar(self, total: int):
        """tqdm bar for one epoch: "epoch 3/30", step count, ETA (None when bars are off)."""
        if not self.progress_bar:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}", unit="step",
                    leave=False, file=sys.stderr, dynamic_ncols=True)

    # ---- the run -------------------------------------------------------------------------------
    def _writer(self):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.paths.tensorboard))

    def _views(self) -> dict[str, Any]:
        """Fingerprints of the store views the run reads ({} for in-memory data)."""
        for src in self.data.splits.values():
            root = getattr(src, "store_root", None)
            if root is not None:
                return view_fingerprints(root, getattr(src, "dataset", self.data.name))
        return {}

    def _check_resumed_views(self) -> None:
        """Refuse to resume when a store view the run reads changed since its run.json recorded
        it (a re-extraction between sessions): the epochs so far trained on the old features, the
        rest would train on the new ones, and run.json / data.json would record only the new.
        A run.json without the record (or in-memory data) is not checked."""
        if not self.paths.meta.is_file():
            return
        try:
            prev = read_json(self.paths.meta).get("views")
        except TrainingError:
            return
        if not isinstance(prev, Mapping):
            return
        now = {stage: v["fingerprint"] for stage, v in self._views().items()}
        recorded = {stage: prev[stage].get("fingerprint") if isinstance(prev.get(stage), Mapping) else None
                    for stage in _stages_read(self.data)}
        changed = [f"{stage} {was or 'absent'} -> {got or 'absent'}"
                   for stage, was, got in changed_views(recorded, now)]
        if changed:
            raise TrainingError(
                f"{self.paths.root}: cannot resume: store views the run reads changed since it was trained "
                f"({'; '.join(changed)}); the epochs so far read the old features: retrain (--overwrite) "
                f"or restore the views the run was trained on"
            )

    def _write_meta(self, status: str) -> None:
        from pipeline.config import to_mapping

        if self._provenance is None:  # once per session: git, packages, views, start time
            prev: dict[str, Any] = {}
            if self.paths.meta.is_file():
                try:
                    prev = read_json(self.paths.meta)
                except TrainingError:
                    prev = {}
            views = self._views()
            self._provenance = {
                "started_at": utc_now() if not self.epoch else prev.get("started_at", utc_now()),
                "git": git_state(), "packages": package_versions(), "views": views,
                "random_init": any(v["random_init"] for v in views.values()),
                "sessions": [*prev.get("sessions", []), utc_now()] if self.epoch else [utc_now()],
            }
        meta = {
            **self.record,
            "model": self.cfg.model, "dataset": self.cfg.dataset or self.data.name,
            "preset": self.cfg.preset, "model_cfg": to_mapping(self.cfg.model_cfg),
            # the word-vector matrices the model was built on (embed_dim follows their width)
            "word_vectors": {k: list(np.shape(v)) for k, v in (self.data.embeddings or {}).items()},
            "threshold": self.threshold, "seed": self.cfg.seed, "status": status,
            "best_epoch": self.best_epoch, "best_dev": self.best_dev, "epochs_done": self.epoch,
            "trainable_parameters": sum(p.numel() for p in self.params),
            # views the model needs that were absent and allowed (TrainConfig.allow_missing)
            "allow_missing": list(self.cfg.allow_missing),
            "missing_views": list(getattr(self.data, "missing_views", ())),
            # reviews the dataset reader left out by its rules (no rel row, 0 votes), by reason
            "dropped_reviews": dict(getattr(self.data.records, "dropped", None) or {}),
            # per split: reviews whose probe mask fell back to ones (models.data.probe_fallback)
            "probe_fallback": dict(getattr(self.data, "probe_fallback", None) or {}),
            **self._provenance,
            "finished_at": utc_now() if status in ("done", "failed") else None,
        }
        write_json_atomic(self.paths.meta, meta)

    def run(self, *, resume: bool = False) -> TrainResult:
        cfg = self.cfg
        paths = self.paths
        if resume:
            if not paths.last.is_file():
                raise TrainingError(f"{paths.root}: nothing to resume (no {paths.last.name})")
            old = train_config(_load_yaml(paths.config))
            diff = _config_diff(old, cfg)
            if diff:
                raise TrainingError(
                    f"{paths.root}: cannot resume with a different config; changed: {', '.join(diff)} "
                    f"(only {', '.join(RESUMABLE_CHANGES)} may change)"
                )
            self._check_resumed_views()
            self._restore(load_checkpoint(paths.last))
            truncate_metrics(paths.metrics, self.epoch)
            self.progress(f"resuming {paths.root} after epoch {self.epoch}")
        else:
            if paths.last.is_file():
                raise TrainingError(f"{paths.root}: already holds a run; use --resume or another --name")
            paths.make()
            if paths.metrics.exists():
                paths.metrics.unlink()
        paths.make()
        paths.config.write_text(config_to_yaml(cfg), encoding="utf-8")
        if "dev" not in self.data.splits:
            raise TrainingError(f"dataset {self.data.name!r} has no dev split to select the best epoch")
        for split in ("dev", "test"):  # before any epoch: `evaluate` would refuse them after one
            if split in self.data.splits:
                check_measurable(self.data.split(split), self.threshold, split)
        writer = self._writer()
        self._write_meta("running")
        stopped_early = False
        said_dev = False
        history: list[dict[str, Any]] = []
        try:
            if not self.params:
                stopped_early = self._run_parameter_free(writer, history)
            else:
                while self.epoch < cfg.epochs:
                    rec = self._train_epoch()
                    self.epoch += 1
                    rec = {"event": "epoch", "epoch": self.epoch, "lr": self.optimizer.param_groups[0]["lr"], **rec}
                    if self.epoch % cfg.eval_every == 0 or self.epoch == cfg.epochs:
                        res = evaluate(self.model, self.data.split("dev"), threshold=self.threshold,
                                       cfg=cfg, device=self.device)
                        if not said_dev:  # what dev metrics average over, once per session
                            self.progress(counts_line("dev", res.counts))
                            said_dev = True
                        dev = res.metrics
                        rec["dev"] = dev
                        value = dev[cfg.metric]
                        self.scheduler.step(value)
                        if value > self.best_metric:
                            self.best_metric, self.best_epoch, self.best_dev = value, self.epoch, dev
                            self.bad_epochs = 0
                            rec["best"] = True
                            save_checkpoint(paths.best, self._state(with_optimizer=False))
                        else:
                            self.bad_epochs += 1
                    # The epoch's record first, then last.pt: a crash between the two leaves a
                    # record for an epoch that --resume reruns (truncate_metrics drops records past
                    # the checkpoint's epoch), never a checkpoint whose record is lost for good.
                    append_jsonl(paths.metrics, rec)
                    save_checkpoint(paths.last, self._state())
                    history.append(rec)
                    self._log_epoch(writer, rec)
                    if cfg.patience and self.bad_epochs >= cfg.patience:
                        stopped_early = True
                        self.progress(f"early stop after epoch {self.epoch}: no dev {cfg.metric} "
                                      f"gain for {self.bad_epochs} evaluations")
                        break
            test = None
            if "test" in self.data.splits:
                state = load_checkpoint(paths.best)
                self.model.load_state_dict(state["model"])
                res = evaluate(self.model, self.data.split("test"), threshold=self.threshold, cfg=cfg,
                               device=self.device)
                test = res.metrics
                append_jsonl(paths.metrics, {"event": "test", "epoch": self.best_epoch, "test": test})
                write_json_atomic(paths.eval_file("test"), {
                    "split": "test", "checkpoint": "best", "threshold": self.threshold,
                    "metrics": res.metrics, "counts": res.counts, "per_product": res.per_product,
                })
                self.progress(counts_line("test", res.counts))
                for k, v in test.items():
                    writer.add_scalar(f"test/{k}", v, self.best_epoch)
            self._write_meta("done")
        except BaseException:
            self._write_meta("failed")
            raise
        finally:
            writer.close()
        if self.params:  # drawn once, at the end; none for a parameter-free baseline
            write_plots(paths, title=self._title(), best_epoch=self.best_epoch)
        return TrainResult(run_dir=paths.root, best_epoch=self.best_epoch, best_dev=self.best_dev,
                           test=test, epochs_run=self.epoch, stopped_early=stopped_early, history=history)

    def _run_parameter_free(self, writer, history: list[dict[str, Any]]) -> bool:
        """A model with nothing to train: evaluate once on dev, checkpoint, done."""
        self.progress(f"model {self.cfg.model!r} has no trainable parameters: skipping optimisation")
        dev = evaluate(self.model, self.data.split("dev"), threshold=self.threshold, cfg=self.cfg,
                       device=self.device).metrics
        self.best_metric, self.best_epoch, self.best_dev = dev[self.cfg.metric], 0, dev
        save_checkpoint(self.paths.best, self._state(with_optimizer=False))
        save_checkpoint(self.paths.last, self._state())
        rec = {"event": "epoch", "epoch": 0, "train_loss": 0.0, "dev": dev, "steps": 0}
        append_jsonl(self.paths.metrics, rec)
        history.append(rec)
        self._log_epoch(writer, rec)
        return False

    def _log_epoch(self, writer, rec: dict[str, Any]) -> None:
        e = rec["epoch"]
        writer.add_scalar("train/loss", rec["train_loss"], e)
        if "rank_loss" in rec:
            writer.add_scalar("train/rank_loss", rec["rank_loss"], e)
        for k, v in rec.get("aux", {}).items():
            writer.add_scalar(f"train/aux_{k}", v, e)
        if rec.get("lr") is not None:
            writer.add_scalar("train/lr", rec["lr"], e)
        for k, v in rec.get("dev", {}).items():
            writer.add_scalar(f"dev/{k}", v, e)
        writer.flush()
        dev = rec.get("dev")
        self.progress(
            f"epoch {e}/{self.cfg.epochs}: loss {rec['train_loss']:.4f}"
            + (f", dev {self.cfg.metric} {dev[self.cfg.metric]:.4f}" if dev else "")
            + (f", lr {rec['lr']:.2e}" if rec.get("lr") is not None else "")
            + (f", {rec['skipped_batches']} batch(es) without a ranking pair skipped"
               if rec.get("skipped_batches") else "")
            + (" (best)" if rec.get("best") else "")
        )

    def _title(self) -> str:
        run = self.record.get("run") or self.paths.root.parent.name
        return f"{run} {self.paths.root.name} (seed {self.cfg.seed})"


def _load_yaml(path: Path) -> dict[str, Any]:
    from pipeline.config import load_yaml

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TrainingError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TrainingError(f"{path}: unreadable ({e})") from None
    try:
        return load_yaml(text, str(path)) or {}
    except ConfigError as e:
        raise TrainingError(str(e)) from None


def train(cfg: TrainConfig, data: DataBundle, run_dir: str | Path, *, resume: bool = False,
          progress: Callable[[str], None] | None = None, progress_bar: bool | None = None,
          record: dict[str, Any] | None = None) -> TrainResult:
    """Train `cfg.model` on `data`, writing everything into `run_dir` (see models.runs)."""
    return Trainer(cfg, data, run_dir, progress=progress, progress_bar=progress_bar,
                   record=record).run(resume=resume)


def run_config(run_dir: str | Path) -> TrainConfig:
    """The TrainConfig saved in a run folder, for scoring (`saved_run`: the checks of settings only
    training reads are skipped; a resumed run's config is checked in full)."""
    return train_config(_load_yaml(RunPaths(Path(run_dir)).config), saved_run=True)


def load_run(run_dir: str | Path, *, embeddings: dict[str, np.ndarray] | None,
             checkpoint: str = "best") -> tuple[nn.Module, TrainConfig]:
    """The model of a finished run (its best or last checkpoint) and its config."""
    paths = RunPaths(Path(run_dir))
    cfg = run_config(run_dir)
    model = build_model(cfg.model, cfg.model_cfg, embeddings)
    state = load_checkpoint(paths.best if checkpoint == "best" else paths.last)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise TrainingError(f"{paths.root}: checkpoint does not fit model {cfg.model!r}: {e}") from None
    return model, cfg


def _vocab_fingerprint(manifest, dataset: str, records) -> str | None:
    """The vocabulary the tokens stage uses for this dataset (predict re-tokenizes with it)."""
    try:
        from features.text.tokens import dataset_vocabularies
    except ImportError:  # tokens stage not installed: predict cannot re-tokenize
        return None
    return dataset_vocabularies(manifest, dataset, records=records).fingerprint


def _stages_read(data) -> frozenset[str]:
    """The store views a DataBundle's sources read: tokens always, the views each `StoreSource`
    was asked to read (every one of READ_VIEWS when not told), and the embeddings view
    `build_datasets` reads the word-vector matrices from."""
    from models.data import READ_VIEWS

    stages: set[str] = set()
    for src in data.splits.values():
        if getattr(src, "store_root", None) is None:
            continue
        asked = getattr(src, "read_views", None)
        stages |= (set(asked) | {"tokens"}) if asked is not None else set(READ_VIEWS)
        stages.add("embeddings")
    return frozenset(stages)


def _text_encoder_fallback(cfg: TrainConfig, manifest, say: Callable[[str], None]) -> TrainConfig:
    """A model set to read text-encoder features (MM-SS's `paper` preset) on a dataset that declares
    no `text_encoder` trains on word vectors instead (the `glove` reading), said in one line and
    recorded in the run's config (`text_features: glove`). The text encoder's own learning rate
    (`text_encoder_lr`, A.2's 5e-5 for BERT) is dropped with it, as in the `glove` preset: the
    GRU trains from scratch at the base lr, not at the fine-tuning rate of a pre-trained BERT."""
    mc = dict(cfg.model_cfg or {})
    if mc.get("text_features") != "bert" or manifest.dataset(cfg.dataset).text_encoder:
        return cfg
    lr_note = ""
    if mc.get("text_encoder_lr") is not None:
        lr_note = f"; text_encoder_lr {mc['text_encoder_lr']:g} (BERT's) -> none, the GRU trains at lr {cfg.lr:g}"
    say(f"notice: dataset {cfg.dataset!r} declares no text_encoder (manifest), so {cfg.model} reads word "
        f"vectors through its GRU (text_features: glove) instead of BERT features{lr_note}")
    new_mc = {**mc, "text_features": "glove"}
    if "text_encoder_lr" in mc:
        new_mc["text_encoder_lr"] = None
    return dataclasses.replace(cfg, model_cfg=new_mc)


def _text_feature_width(cfg: TrainConfig, data, say: Callable[[str], None]) -> TrainConfig:
    """`model_cfg.text_feat_dim` set to the width of the stored bert features (the stored features
    are what the model reads; 768 for BERT-base, 384 for the demo's MiniLM)."""
    mc = dict(cfg.model_cfg or {})
    if "text_feat_dim" not in mc:
        return cfg
    source = data.split("train")
    width = None
    for i in range(len(source.product_ids)):
        item = source.load(i)
        feats = [r.text_feats for r in item.reviews if r.text_feats is not None and len(r.text_feats)]
        if item.text_feats is not None and len(item.text_feats):
            feats.append(item.text_feats)
        if feats:
            width = int(feats[0].shape[1])
            break
    if width is None:
        raise TrainingError(f"dataset {cfg.dataset!r}: the bert view holds no text features in the train split")
    if mc["text_feat_dim"] != width:
        say(f"model_cfg.text_feat_dim: {mc['text_feat_dim']} -> {width} (the width of the stored bert features)")
        cfg = dataclasses.replace(cfg, model_cfg={**mc, "text_feat_dim": width})
    return cfg


def run_views(manifest, cfg: TrainConfig) -> frozenset[str]:
    """The stage views `train_seeds` requires for `cfg` on its dataset: the model's
    `required_views` after the text-encoder fallback (MM-SS's `bert` reading on a dataset without
    a `text_encoder` needs no bert view). The training flow checks these before it waits for a
    GPU slot; `train_seeds` checks the same set when it loads the data."""
    from models.data import required_views
    from models.text_encoder import resolve_text_encoder

    cfg = resolve_text_encoder(cfg, manifest)  # finetune_text_encoder without an encoder: ConfigError
    fallback = _text_encoder_fallback(cfg, manifest, lambda _msg: None)
    return required_views(fallback.model, fallback.model_cfg)


def train_seeds(manifest, cfg: TrainConfig, *, seeds: int = 1, first_seed: int = 0, name: str | None = None,
                resume: bool = False, overwrite: bool = False, progress: Callable[[str], None] | None = None,
                progress_bar: bool | None = None) -> list[TrainResult]:
    """Train `cfg.model` on `cfg.dataset` of the manifest once per seed index k in
    first_seed .. first_seed + seeds - 1 (seed cfg.seed + k), into `<roots.runs>/<name>/seed<k>/`;
    each run folder also gets `data.json` (dataset, vocabulary fingerprint, threshold, the
    fingerprints of the views read) for `mrhp predict`. `overwrite` deletes an existing seed folder first
    (only a folder that looks like a run: config.yaml or checkpoints/ inside). The CLI and the
    training flow call this."""
    from models.data import build_datasets
    from models.runs import write_json_atomic

    if seeds < 1:
        raise TrainingError(f"seeds: expected a positive integer, got {seeds}")
    manifest.dataset(cfg.dataset)  # ManifestError naming the declared datasets
    say = progress or log.info
    name = name or f"{cfg.model}-{cfg.dataset}"
    root = Path(manifest.roots.runs) / name
    from models.text_encoder import resolve_text_encoder

    cfg = resolve_text_encoder(cfg, manifest)  # finetune_text_encoder: the dataset's encoder, recorded
    views = run_views(manifest, cfg)
    cfg = _text_encoder_fallback(cfg, manifest, say)
    data = build_datasets(manifest, cfg.dataset, cfg.data, required=views, allow_missing=cfg.allow_missing,
                          say=say)
    how = getattr(data.records, "label_interpretation", "")
    if how:  # REFERENCE.md section 1: say which reading of rel.upvotes was used
        said = "0-4 labels" if how == "labels" else "vote counts (label min(floor(log2 v), 4); v = 0 dropped)"
        say(f"dataset {cfg.dataset!r}: rel.upvotes read as {said} (manifest labels: "
            f"{manifest.dataset(cfg.dataset).labels})")
    if "bert" in views and "bert" not in data.missing_views:
        cfg = _text_feature_width(cfg, data, say)
    vfp = _vocab_fingerprint(manifest, cfg.dataset, data.records)
    # the fingerprints of the views the run reads, as the store holds them when the data is loaded
    # (an extraction rewriting a view while the run trains is not detected here)
    read = views_read(manifest.store_root, cfg.dataset, _stages_read(data))
    results = []
    for k in range(first_seed, first_seed + seeds):
        seed_cfg = dataclasses.replace(cfg, seed=cfg.seed + k)
        run_dir = root / f"seed{k}"
        if overwrite and run_dir.is_dir():
            if not ((run_dir / "config.yaml").exists() or (run_dir / "checkpoints").is_dir()):
                raise TrainingError(f"{run_dir}: not a run folder; refusing to delete it")
            shutil.rmtree(run_dir)
        say(f"train {name} seed{k} (seed {seed_cfg.seed}) -> {run_dir}")
        spec = manifest.dataset(cfg.dataset)
        res = train(seed_cfg, data, run_dir, resume=resume, progress=say, progress_bar=progress_bar,
                    record={"run": name, "categories": list(spec.categories), "source": spec.source,
                            "manifest": str(manifest.path)})
        write_json_atomic(run_dir / "data.json", {
            "dataset": cfg.dataset, "manifest": str(manifest.path), "vocab_fingerprint": vfp,
            "threshold": data.threshold,
            # how rel.upvotes was read ("labels" or "votes"): predict reads new rel tables the same way
            "labels": getattr(data.records, "label_interpretation", None) or None,
            # the fingerprint of every view the run read: predict refuses other stage settings
            "read_views": read,
        })
        results.append(res)
    if len(results) > 1 and any(r.history and r.history[-1].get("steps") for r in results):
        write_seed_plots(root, [RunPaths(r.run_dir) for r in results], title=name,
                         best_epochs=[r.best_epoch for r in results])
    return results
