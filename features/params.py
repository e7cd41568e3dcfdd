"""Stage parameters, as declared under `stages:` in data_manifest.yaml.

Light on purpose (no torch/spaCy import) so that loading a manifest validates every stage's keys.
Defaults are the reference settings (../shared/docs/REFERENCE.md); every field enters the
stage's fingerprint, so changing one recomputes that stage and only that stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class RoisParams:
    """Bottom-up-attention ROI extraction (REFERENCE.md section 2)."""

    detector: str = "bua-r101-c4"  # name under resources.detectors
    random_init: bool = False  # random weights: demos/tests only; flagged in fingerprint and status
    seed: int = 0  # seed for random_init weights
    min_size: int = 600  # shorter side resized to this ...
    max_size: int = 1000  # ... unless the longer side would exceed this
    conf_thresh: float = 0.2  # keep boxes whose max class confidence is at least this
    nms_thresh: float = 0.3  # per-class NMS IoU used to compute each box's max confidence
    min_boxes: int = 10  # fewer above threshold: take the top min_boxes
    max_boxes: int = 100
    fixed_k: int | None = None  # fixed-K mode (e.g. 36): exactly K boxes, overrides min/max
    rpn_pre_nms_top_n: int = 6000
    rpn_post_nms_top_n: int = 300  # proposals per image at test time
    feature_dtype: Literal["float16", "float32"] = "float16"
    batch_size: int = 4  # images per forward pass
    num_workers: int = 2  # DataLoader workers decoding and resizing images
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:N"
    autocast: bool = False  # bf16/fp16 autocast on GPU (see docs/benchmarks.md for its error)
    autocast_dtype: Literal["auto", "bfloat16", "float16"] = "auto"  # auto: fp16 on CUDA, bf16 on CPU
    max_pixels: int = 89_478_485  # decompression-bomb guard: larger images become failures
    # Operational (not fingerprinted: they change results by floating-point rounding at most,
    # like the device or thread count do; see docs/gpu_box.md):
    fold_bn: bool = True  # fold frozen batch norm into the conv weights at load time
    channels_last: bool = False  # NHWC activations (tensor cores on CUDA prefer it)
    cudnn_benchmark: bool = True  # autotune conv algorithms per shape (CUDA only) ...
    pad_bucket: int = 128  # ... with padded batch sides rounded up to this on CUDA (0: off)
    queue_depth: int = 64  # finished records buffered between the compute thread and the writer


@dataclass(frozen=True)
class TokensParams:
    """Tokenization and vocabularies (REFERENCE.md section 3)."""

    mode: Literal["mcr", "standard"] = "mcr"
    min_freq: int = 5  # train-split frequency cut
    max_len: int = 128  # tokens kept per text
    max_vocab: int | None = None  # standard mode: keep the most frequent N terms
    batch_size: int = 512
    n_process: int = 1  # tokenizing processes (not fingerprinted: same tokens); cores - 1 on a big box


@dataclass(frozen=True)
class EmbeddingsParams:
    """Embedding matrix per vocabulary from GloVe/fastText via gensim."""

    oov_init: float = 0.25  # OOV rows ~ uniform(-oov_init, oov_init); PAD row zeros
    seed: int = 0


@dataclass(frozen=True)
class ProbesParams:
    """SANCL probe masks (REFERENCE.md section 7)."""

    mode: Literal["script", "paper"] = "script"
    coref: Literal["rules", "neuralcoref", "none"] = "rules"
    near_root: int = 1  # paper mode: dependency distance from the root that still counts as a keyword
    batch_size: int = 256
    n_process: int = 1


@dataclass(frozen=True)
class FlowParams:
    """How flows fan out and where deployments go."""

    chunk_size: int = 500  # items per task (hundreds to thousands, never one per item)
    task_runner: Literal["thread", "dask"] = "thread"
    dask_address: str | None = None  # existing cluster; None starts a local one
    dask_workers: int = 2
    work_pool: str = "mrhp-gpu"
    cron: str | None = None
    gpu_concurrency: int = 1  # concurrent GPU tasks per box
    retries: int = 2
    retry_delay_seconds: float = 5.0


STAGE_PARAMS: dict[str, type] = {
    "rois": RoisParams,
    "tokens": TokensParams,
    "embeddings": EmbeddingsParams,
    "probes": ProbesParams,
}
