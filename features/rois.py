"""The `rois` stage: bottom-up-attention ROI features for every image of a dataset.

Items are image files keyed by the sha256 of their bytes (the same photo used by a product and
three reviews is extracted once); the view maps each image ref path to its key. Images are
decoded and resized in DataLoader workers, grouped by aspect ratio into padded batches and run
through the detector on the configured device; the original box-selection rule picks the stored
boxes (`features.detector.selection`). Undecodable images become failure records; an image
whose proposals all vanish is a record with 0 boxes only when min_boxes is 0; with fewer boxes
than min_boxes (or fixed_k) it is a failure record (a tiny image), never a short record.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from features.detector.checkpoint import load_state, read_checkpoint, verify_weights
from features.detector.model import (
    BUADetector,
    Detections,
    DetectorConfig,
    bua_caffe_r101,
    build_detector,
    d2_r101_c4,
    fold_frozen_norms,
)
from features.detector.preprocess import (
    MIN_SIDE,
    PreparedImage,
    RawImage,
    bucket_size,
    pad_batch,
    prepare_batch,
    prepare_image,
    raw_image,
)
from features.detector.selection import max_class_confidence_batch, select_boxes_batch
from features.device import autocast, resolve_device
from features.images import ImageHashCache, decode_image
from pipeline.errors import DataError, StageError
from pipeline.hashing import fingerprint as hash_fingerprint
from pipeline.params import RoisParams
from pipeline.schema import rois_schema
from pipeline.stage import RANDOM_INIT_PREFIX, Plan, Record, WorkItem

CODE_VERSION = "rois-1"  # bump when extraction code changes its outputs
# Not fingerprinted: they do not change the numbers beyond floating-point rounding (as the
# device and thread count do not). autocast_dtype is fingerprinted unless "auto" (see fingerprint()).
_OPERATIONAL = ("num_workers", "device", "fold_bn", "channels_last", "cudnn_benchmark", "pad_bucket",
                "queue_depth")
_BUCKET = 4  # aspect-ratio bucketing window, in batches
_HASH_THREADS = 8  # concurrent file hashes in plan()


# --------------------------------------------------------------------------- extraction


def pack_batch(dets: Sequence[Detections], params: RoisParams, cfg: DetectorConfig) -> list[dict[str, np.ndarray]]:
    """Apply box selection to several images' detections; the stored arrays per image.

    Selection runs on the detections' device for the whole batch, and everything stored (the
    selected features, boxes, ids, confidences and each image's box count) comes back to the
    host in ONE device-to-host copy per batch (it was six `.cpu()` calls per image)."""
    if not dets:
        return []
    probs = [d.cls_probs[:, 1:] if cfg.background == "first" else d.cls_probs[:, :-1] for d in dets]
    confs = max_class_confidence_batch([d.boxes for d in dets], probs, params.nms_thresh,
                                       legacy=cfg.legacy_boxes)
    idx, n_keep = select_boxes_batch(confs, conf_thresh=params.conf_thresh, min_boxes=params.min_boxes,
                                     max_boxes=params.max_boxes, fixed_k=params.fixed_k)
    b, k = idx.shape
    dim = int(dets[0].features.shape[1])
    dev = dets[0].features.device
    # flat row index of every (image, slot) pair into the concatenated detections
    counts = [int(d.boxes.shape[0]) for d in dets]
    offsets, total = [], 0
    for c in counts:
        offsets.append(total)
        total += c
    if total == 0 or k == 0:
        return [_empty_arrays(d, params, dim) for d in dets]
    off = torch.tensor(offsets, dtype=torch.int64).to(dev, non_blocking=True)
    rows = (idx + off[:, None]).clamp(max=total - 1).flatten()  # slots past n_keep: any valid row
    obj_conf, obj_ids = torch.cat(probs).float().max(dim=1)
    if dets[0].attr_probs is not None:
        attr_conf, attr_ids = torch.cat([d.attr_probs for d in dets])[:, 1:].float().max(dim=1)  # 0 = "no attribute"
    else:  # no attribute head (detectron2 COCO weights): -1 ids, 0 confidence
        attr_conf = torch.zeros(total, device=dev)
        attr_ids = torch.full((total,), -1, dtype=torch.int64, device=dev)
    table = torch.cat([
        torch.cat([d.features for d in dets]).float(),
        torch.cat([d.boxes for d in dets]).float(),
        torch.stack([obj_ids.float(), obj_conf, attr_ids.float(), attr_conf], dim=1),  # ids < 2**24: exact
    ], dim=1)[rows]
    table = torch.cat([table, n_keep.float().repeat_interleave(k)[:, None]], dim=1)
    host = table.cpu().numpy().reshape(b, k, dim + 9)  # the one device-to-host copy
    out = []
    for i, det in enumerate(dets):
        n = int(host[i, 0, -1])
        t = host[i, :n]
        h, w = det.image_hw
        out.append({
            "features": t[:, :dim].astype(params.feature_dtype),
            "boxes": np.ascontiguousarray(t[:, dim:dim + 4], dtype=np.float32).reshape(-1, 4),
            "obj_ids": t[:, dim + 4].astype(np.int32),
            "obj_conf": np.ascontiguousarray(t[:, dim + 5], dtype=np.float32),
            "attr_ids": t[:, dim + 6].astype(np.int32),
            "attr_conf": np.ascontiguousarray(t[:, dim + 7], dtype=np.float32),
            "image_hw": np.array([h, w], dtype=np.int32),
        })
    return out


def _empty_arrays(det: Detections, params: RoisParams, dim: int) -> dict[str, np.ndarray]:
    h, w = det.image_hw
    return {
        "features": np.zeros((0, dim), dtype=params.feature_dtype),
        "boxes": np.zeros((0, 4), dtype=np.float32),
        "obj_ids": np.zeros(0, dtype=np.int32),
        "obj_conf": np.zeros(0, dtype=np.float32),
        "attr_ids": np.zeros(0, dtype=np.int32),
        "attr_conf": np.zeros(0, dtype=np.float32),
        "image_hw": np.array([h, w], dtype=np.int32),
    }


def pack_detections(det: Detections, params: RoisParams, cfg: DetectorConfig) -> dict[str, np.ndarray]:
    """Apply box selection to one image's detections and return the stored arrays."""
    return pack_batch([det], params, cfg)[0]


def detect_batch(model: BUADetector, images: Sequence[PreparedImage | RawImage], params: RoisParams,
                 device: torch.device) -> list[Detections]:
    """One padded forward pass over several images (NMS and selection inputs stay on device).

    `RawImage`s (uint8, as the stage ships them to a GPU) are resized and normalised on the
    device; `PreparedImage`s (float, resized by a CPU worker) are padded there. On CUDA with
    `cudnn_benchmark`, padded sides are rounded up to `pad_bucket` (masked: same result)."""
    cuda = device.type == "cuda"
    bucket = params.pad_bucket if cuda and params.cudnn_benchmark else 0
    div = model.cfg.size_divisibility
    if all(isinstance(p, RawImage) for p in images):
        batch = prepare_batch(list(images), device, pixel_mean=model.cfg.pixel_mean, divisibility=div,
                              bucket=bucket, channels_last=params.channels_last)
    else:
        batch = pad_batch([p.tensor.to(device, non_blocking=True) for p in images], div)
        if bucket:
            h, w = bucket_size(batch.shape[2], div, bucket), bucket_size(batch.shape[3], div, bucket)
            batch = F.pad(batch, (0, w - batch.shape[3], 0, h - batch.shape[2]))
        if params.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
    with autocast(device, params.autocast, params.autocast_dtype):
        return model(batch, [p.size for p in images], [p.scale for p in images],
                     [p.orig_hw for p in images], proposals=params.proposals)


def optimise_for_inference(model: BUADetector, params: RoisParams, device: torch.device) -> BUADetector:
    """Load-time changes that keep the numbers (up to rounding): frozen BN folded into the convs,
    channels_last weights, cudnn autotuning. Call after the weights are loaded."""
    if params.fold_bn:
        fold_frozen_norms(model)
    if params.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda" and params.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    return model


def extract_features(model: BUADetector, images: Sequence[np.ndarray | PreparedImage | RawImage],
                     params: RoisParams, *, device: torch.device | str | None = None) -> list[dict[str, np.ndarray]]:
    """ROI fields for RGB uint8 images (or prepared ones), batch_size images per forward pass.

    Usable without the store: returns one dict per image, in input order, with the `rois`
    schema's arrays.
    """
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    prepared = [img if isinstance(img, (PreparedImage, RawImage)) else
                prepare_image(img, min_size=params.min_size, max_size=params.max_size,
                              pixel_mean=model.cfg.pixel_mean) for img in images]
    for i, p in enumerate(prepared):
        if min(p.size) < MIN_SIDE:
            raise DataError(f"image {i} ({p.orig_hw[1]}x{p.orig_hw[0]}) resizes to {p.size[1]}x{p.size[0]}, "
                            f"below {MIN_SIDE} px on a side")
    out: list[dict[str, np.ndarray]] = []
    for start in range(0, len(prepared), max(1, params.batch_size)):
        chunk = prepared[start:start + params.batch_size]
        out.extend(pack_batch(detect_batch(model, chunk, params, dev), params, model.cfg))
    return out


# --------------------------------------------------------------------------- loading


class _DecodeDataset(Dataset):
    """Decode (+ resize on the CPU path) in DataLoader workers; a bad image becomes (key, None, reason).

    Indexed by the WorkItem itself (the sampler yields items), so that one persistent set of
    workers serves every chunk of a run. `ship_uint8`: return a RawImage (uint8, resized on the
    device: the GPU path) instead of a resized float PreparedImage (the CPU path)."""

    def __init__(self, params: RoisParams, pixel_mean: tuple[float, float, float], *, ship_uint8: bool = False):
        self.params = params
        self.pixel_mean = pixel_mean
        self.ship_uint8 = ship_uint8

    def __getitem__(self, item: WorkItem) -> tuple[str, PreparedImage | RawImage | None, str | None]:
        if item.key.startswith("invalid:"):
            return item.key, None, f"image path escapes the dataset image root: {item.key[8:]}"
        res = decode_image(item.source, max_pixels=self.params.max_pixels)
        if not res.ok:
            return item.key, None, res.failure
        try:
            if self.ship_uint8:
                prep = raw_image(res.rgb, min_size=self.params.min_size, max_size=self.params.max_size)
            else:
                prep = prepare_image(res.rgb, min_size=self.params.min_size, max_size=self.params.max_size,
                                     pixel_mean=self.pixel_mean)
        except Exception as e:  # resizing a degenerate image must not end the run
            return item.key, None, f"cannot resize image ({type(e).__name__}: {e}): {item.source}"
        if min(prep.size) < MIN_SIDE:
            h, w = prep.orig_hw
            return item.key, None, (f"image {w}x{h} is too thin: resized to {prep.size[1]}x{prep.size[0]}, "
                                    f"below {MIN_SIDE} px on a side: {item.source}")
        return item.key, prep, None


class _ItemSampler:
    """Yields the current chunk's WorkItems; set `items` before each pass over the loader."""

    def __init__(self) -> None:
        self.items: list[WorkItem] = []

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def _as_list(batch: list) -> list:
    return batch


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # one decoding thread per worker: workers x threads <= cores


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


_DONE = object()


def _in_background(gen: Iterator[Record], *, maxsize: int) -> Iterator[Record]:
    """Run `gen` in a thread, handing its items over a bounded queue; re-raise its errors here.
    Closing the returned generator stops the thread after its current item."""
    q: queue.Queue = queue.Queue(maxsize=maxsize)
    stop = threading.Event()

    def put(x: object) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in gen:
                if not put(item):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            put(_Raised(e))
            return
        finally:
            if stop.is_set():
                gen.close()
        put(_DONE)

    thread = threading.Thread(target=produce, name="rois-compute", daemon=True)
    thread.start()
    try:
        while True:
            x = q.get()
            if x is _DONE:
                return
            if isinstance(x, _Raised):
                raise x.exc
            yield x
    finally:
        stop.set()
        thread.join()


def config_for_checkpoint(raw: Mapping[str, torch.Tensor], fmt: str) -> DetectorConfig:
    """Detector layout implied by a checkpoint: bua caffe for .pth, detectron2 C4 for .pkl."""
    if fmt == "d2-pkl":
        n_cls = raw.get("roi_heads.box_predictor.cls_score.weight")
        cfg = d2_r101_c4(num_classes=int(n_cls.shape[0]) if n_cls is not None else 81)
        attr = raw.get("roi_heads.box_predictor.attr_linear2.weight")
        if attr is not None:
            cfg = dataclasses.replace(cfg, num_attributes=int(attr.shape[0]))
        return cfg
    return bua_caffe_r101()


# --------------------------------------------------------------------------- stage


class RoisStage:
    """The `rois` stage of one dataset (see pipeline/stage.py for the contract)."""

    name = "rois"
    depends_on: tuple[str, ...] = ()

    def __init__(self, *, manifest: Any, dataset_name: str, params: RoisParams | None = None,
                 detector_config: DetectorConfig | None = None):
        self.manifest = manifest
        self.dataset_name = dataset_name
        self.dataset = manifest.dataset(dataset_name)
        self.params: RoisParams = params or manifest.stage_params("rois")
        self.detector_spec = manifest.detector(self.params.detector)
        self._config_override = detector_config
        p = self.params
        if p.pad_bucket < 0 or p.queue_depth < 1 or p.num_workers < 0 or p.batch_size < 1:
            raise StageError(
                f"stages.rois: pad_bucket must be >= 0, queue_depth and batch_size >= 1, num_workers >= 0; "
                f"got pad_bucket={p.pad_bucket}, queue_depth={p.queue_depth}, batch_size={p.batch_size}, "
                f"num_workers={p.num_workers}")
        feature_dim = self.detector_config().res5_channels
        self.schema = rois_schema(self.params.feature_dtype, feature_dim)
        self._weights_id: str | None = None
        self._fingerprint: str | None = None
        self._model: BUADetector | None = None
        self._device: torch.device | None = None
        self._fits: int | None = None  # largest batch known to fit after an out-of-memory retry
        self._loader_state: tuple[DataLoader, _ItemSampler] | None = None
        self._loader_lock = threading.Lock()

    # ---- identity
    def is_random_init(self) -> bool:
        return bool(self.params.random_init)

    def weights_id(self) -> str:
        """"random-init:seed=N" or "sha256:<hex>" of the verified weights file."""
        if self._weights_id is None:
            if self.params.random_init:
                self._weights_id = f"random-init:seed={self.params.seed}"
            else:
                sha = verify_weights(self.detector_spec.path, self.detector_spec.sha256,
                                     name=self.detector_spec.name or self.params.detector)
                self._weights_id = f"sha256:{sha}"
        return self._weights_id

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            params = {k: v for k, v in dataclasses.asdict(self.params).items() if k not in _OPERATIONAL}
            if params.get("autocast_dtype") == "auto" or not params.get("autocast"):
                # unused, or the earlier behaviour: fingerprints of existing stores hold
                params.pop("autocast_dtype", None)
            payload = {
                "params": params,
                "weights": self.weights_id(),
                "architecture": self.detector_spec.architecture,
                "format": self.detector_spec.format,
                "config": dataclasses.asdict(self._config_override) if self._config_override else None,
            }
            fp = hash_fingerprint("rois", payload, code_version=CODE_VERSION)
            self._fingerprint = RANDOM_INIT_PREFIX + fp if self.params.random_init else fp
        return self._fingerprint

    # ---- model
    def detector_config(self, raw: Mapping[str, torch.Tensor] | None = None, fmt: str = "bua-pth") -> DetectorConfig:
        """The one place the stage picks its detector layout: the configuration it was given
        (tests, benches), else the layout the checkpoint `raw` implies, else bottom-up-attention's
        (random_init, and the stored feature width before any checkpoint is read)."""
        if self._config_override is not None:
            return self._config_override
        if raw is not None:
            return config_for_checkpoint(raw, fmt)
        return bua_caffe_r101()

    def model(self) -> BUADetector:
        """The detector, built and loaded once per stage object."""
        if self._model is None:
            self.weights_id()  # verifies the weights before the expensive build
            self._device = resolve_device(self.params.device)
            if self.params.random_init:
                model = build_detector(self.detector_config(), seed=self.params.seed)
            else:
                path = Path(self.detector_spec.path)
                fmt = self.detector_spec.format
                if fmt == "auto":
                    fmt = "d2-pkl" if path.suffix.lower() == ".pkl" else "bua-pth"
                raw = read_checkpoint(path, fmt)
                model = build_detector(self.detector_config(raw, fmt))
                load_state(model, raw, source=str(path))
                del raw
            self._model = optimise_for_inference(model.to(self._device).eval(), self.params, self._device)
        return self._model

    # ---- plan
    def hash_cache(self) -> ImageHashCache:
        """The image hash cache, kept beside the store (store/cache/, outside the index and segments)."""
        return ImageHashCache(Path(self.manifest.store_root) / "cache" / "image-hashes.sqlite",
                              threads=_HASH_THREADS)

    def plan(self) -> Plan:
        from features.records_cache import load_dataset_once
        from pipeline.datasets.mrhp import resolve_image

        records = load_dataset_once(self.dataset)  # read once per command, shared with the text stages
        refs = [ref for p in records.products.values() for ref in p.images]
        refs += [ref for r in records.reviews for ref in r.images]
        paths: dict[str, Path | None] = {}
        for ref in refs:
            if ref.path not in paths:
                try:
                    paths[ref.path] = resolve_image(self.dataset, ref)
                except DataError:
                    paths[ref.path] = None
        # content keys, re-hashing only files whose (size, mtime, inode, ctime) changed
        digests = self.hash_cache().keys([full for full in paths.values() if full is not None])
        keys = []
        for rel, full in paths.items():
            if full is None:
                keys.append(f"invalid:{rel}")
            else:
                keys.append(digests[full] or f"missing:{rel}")
        items: dict[str, WorkItem] = {}
        view: dict[str, str] = {}
        for (rel, full), key in zip(paths.items(), keys, strict=True):
            items.setdefault(key, WorkItem(key=key, source=str(full) if full is not None else ""))
            view[rel] = key
        return Plan(items=items, view=view)

    # ---- run
    def run(self, items: Sequence[WorkItem]) -> Iterator[Record]:
        """Records for `items`. Decoding runs in DataLoader workers and the forward passes in a
        background thread, so the consumer's writes overlap with the next batches' compute."""
        if not items:
            return
        self.model()  # weights errors surface here, in the caller's thread
        yield from _in_background(
            self._records(items), maxsize=max(2, self.params.queue_depth, 2 * self.params.batch_size)
        )

    def _new_loader(self, *, persistent: bool) -> tuple[DataLoader, _ItemSampler]:
        p = self.params
        cuda = self._device.type == "cuda"
        sampler = _ItemSampler()
        loader = DataLoader(
            _DecodeDataset(p, self._model.cfg.pixel_mean, ship_uint8=cuda),
            sampler=sampler,
            batch_size=max(1, p.batch_size),
            num_workers=p.num_workers,
            collate_fn=_as_list,
            worker_init_fn=_worker_init,
            pin_memory=cuda,
            persistent_workers=persistent and p.num_workers > 0,
            prefetch_factor=4 if p.num_workers > 0 else None,
        )
        return loader, sampler

    def _loader(self) -> tuple[DataLoader, _ItemSampler]:
        """The stage's DataLoader, built once: with workers, they persist across chunks (no
        respawn, no refill gap at every chunk boundary); on CUDA, batches come in pinned memory."""
        if self._loader_state is None:
            self._loader_state = self._new_loader(persistent=True)
        return self._loader_state

    def close(self) -> None:
        """Stop the persistent decoding workers (they also stop when the stage is collected)."""
        self._loader_state = None

    def _records(self, items: Sequence[WorkItem]) -> Iterator[Record]:
        p = self.params
        shared = self._loader_lock.acquire(blocking=False)  # busy (concurrent chunk): a one-off loader
        loader, sampler = self._loader() if shared else self._new_loader(persistent=False)
        sampler.items = list(items)
        finished = False
        try:
            pool: list[tuple[str, PreparedImage | RawImage]] = []
            for batch in loader:
                for key, prep, failure in batch:
                    if prep is None:
                        yield Record(key=key, failure=failure)
                    else:
                        pool.append((key, prep))
                if len(pool) >= _BUCKET * p.batch_size:
                    yield from self._flush(pool)
                    pool = []
            if pool:
                yield from self._flush(pool)
            finished = True
        finally:
            if shared:
                if not finished:  # stopped mid-pass: do not reuse workers holding a stale pass
                    self._loader_state = None
                self._loader_lock.release()

    def _flush(self, pool: list[tuple[str, PreparedImage]]) -> Iterator[Record]:
        """Batch pooled images by aspect ratio (less padding) and yield their records."""
        pool = sorted(pool, key=lambda kp: kp[1].size[0] / kp[1].size[1])
        start = 0
        while start < len(pool):
            chunk = pool[start:start + self._batch_limit()]
            dets = self._detect_fitting([prep for _, prep in chunk])
            start += len(chunk)
            need = self.params.fixed_k if self.params.fixed_k is not None else self.params.min_boxes
            for (key, prep), arrays in zip(chunk, pack_batch(dets, self.params, self._model.cfg), strict=True):
                n_boxes = int(arrays["boxes"].shape[0])
                if n_boxes < need:  # e.g. a 1-pixel image: every proposal collapsed; never store short
                    h, w = prep.orig_hw
                    yield Record(key=key, failure=(
                        f"only {n_boxes} box(es) survived proposal filtering on this {w}x{h} "
                        f"image; {'fixed_k' if self.params.fixed_k is not None else 'min_boxes'} asks for {need}"))
                    continue
                bad = int(np.size(arrays["features"]) - np.count_nonzero(np.isfinite(arrays["features"])))
                if bad:  # e.g. fp16 autocast or the float16 cast overflowing: never store NaN/inf
                    yield Record(key=key, failure=(
                        f"{bad} non-finite (NaN/inf) box feature value(s) in {self.params.feature_dtype}; "
                        f"turn autocast off or set feature_dtype: float32"))
                    continue
                yield Record(key=key, arrays=arrays,
                             meta={"n_boxes": int(arrays["boxes"].shape[0]),
                                   "image_hw": [int(x) for x in arrays["image_hw"]]})


    def _batch_limit(self) -> int:
        return max(1, min(self.params.batch_size, self._fits or self.params.batch_size))

    def _detect_fitting(self, preps: list[PreparedImage | RawImage]) -> list[Detections]:
        """Detect a batch; on device out-of-memory, halve it (and remember the size that fits)."""
        try:
            return detect_batch(self._model, preps, self.params, self._device)
        except torch.OutOfMemoryError:
            if len(preps) == 1:
                h, w = preps[0].size
                raise StageError(
                    f"stages.rois: one {w}x{h} image with {self.params.rpn_post_nms_top_n} proposals does "
                    f"not fit in {self._device} memory; lower max_size or rpn_post_nms_top_n"
                ) from None
            if self._device.type == "cuda":
                torch.cuda.empty_cache()
            half = len(preps) // 2
            self._fits = half
            return self._detect_fitting(preps[:half]) + self._detect_fitting(preps[half:])


def build_stage(manifest: Any, dataset_name: str) -> RoisStage:
    """The `rois` stage for `dataset_name` with the manifest's `stages.rois` parameters."""
    return RoisStage(manifest=manifest, dataset_name=dataset_name)
