"""Stage parameters, as declared under `stages:` in data_manifest.yaml.

Light on purpose (no torch/spaCy import) so that loading a manifest validates every stage's keys.
Defaults are the reference settings (../shared/docs/REFERENCE.md); every field that can change
a result enters the stage's fingerprint, so changing one recomputes that stage and only that
stage; operational fields (device, batch sizes, workers, n_process, the rois GPU settings) do not.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ProposalParams:
    """The RPN's test-time proposal counts per image, as the detector reads them
    (features.detector.model.BUADetector.forward takes this record; nothing there has a default).

    No defaults here either: the one place they are set is `RoisParams` (`rpn_pre_nms_top_n`,
    `rpn_post_nms_top_n`, the manifest's keys), whose `proposals` builds this record. The other
    RPN settings (NMS IoU, minimum proposal side, anchors) belong to the checkpoint's architecture
    and live in features.detector.model.DetectorConfig only."""

    pre_nms_top_n: int  # highest-scoring anchors kept before the proposal NMS
    post_nms_top_n: int  # proposals kept after it (the boxes the heads see)


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

    @property
    def proposals(self) -> ProposalParams:
        """The proposal counts as the detector takes them."""
        return ProposalParams(pre_nms_top_n=self.rpn_pre_nms_top_n, post_nms_top_n=self.rpn_post_nms_top_n)

    def problems(self) -> list[str]:
        """Settings that contradict each other (checked when the manifest loads, before any compute:
        the detector could only store fewer boxes than asked, or fail on every image)."""
        out = []
        proposals = self.rpn_post_nms_top_n
        if self.fixed_k is not None:
            if self.fixed_k < 1:
                out.append(f"fixed_k: expected a positive number of boxes, got {self.fixed_k}")
            elif self.fixed_k > proposals:
                out.append(f"fixed_k: {self.fixed_k} boxes cannot come from rpn_post_nms_top_n {proposals} "
                           f"proposals; lower fixed_k or raise rpn_post_nms_top_n")
        else:
            if self.min_boxes < 0:
                out.append(f"min_boxes: expected 0 or more, got {self.min_boxes}")
            if self.min_boxes > self.max_boxes:
                out.append(f"min_boxes: {self.min_boxes} is larger than max_boxes {self.max_boxes}")
            if self.min_boxes > proposals:
                out.append(f"min_boxes: {self.min_boxes} boxes cannot come from rpn_post_nms_top_n {proposals} "
                           f"proposals; lower min_boxes or raise rpn_post_nms_top_n")
        if self.rpn_pre_nms_top_n < proposals:
            out.append(f"rpn_pre_nms_top_n: {self.rpn_pre_nms_top_n} is below rpn_post_nms_top_n {proposals}")
        if self.min_size < 1 or self.max_size < self.min_size:
            out.append(f"min_size/max_size: expected 1 <= min_size <= max_size, got {self.min_size}/{self.max_size}")
        if not 0.0 <= self.conf_thresh <= 1.0:
            out.append(f"conf_thresh: expected a value in [0, 1], got {self.conf_thresh}")
        if not 0.0 < self.nms_thresh <= 1.0:
            out.append(f"nms_thresh: expected a value in (0, 1], got {self.nms_thresh}")
        if self.batch_size < 1:
            out.append(f"batch_size: expected a positive integer, got {self.batch_size}")
        if self.num_workers < 0:
            out.append(f"num_workers: expected 0 or more, got {self.num_workers}")
        return out


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
    """SANCL probe masks (REFERENCE.md section 7; features/text/probes.py)."""

    mode: Literal["paper", "script"] = "paper"  # paper: Algorithm 1; script: gen_amazon.py's rules
    coref: Literal["auto", "rules", "neuralcoref", "none"] = "auto"  # auto: neuralcoref when built, else rules
    near_root: int = 1  # paper mode: dependency distance from the root that still counts as a keyword
    keyword_test: Literal["substring", "word"] = "substring"  # script mode: the script's test, or the word-level fix
    batch_size: int = 256
    n_process: int = 1


@dataclass(frozen=True)
class BertParams:
    """Last-layer token features of a BERT-family encoder (MM-SS Eq. 2; SANCL's BERT rows).

    The encoder is the dataset's `text_encoder` (a name under resources.text_encoders)."""

    max_length: int = 128  # word pieces per text fed to the encoder, [CLS] and [SEP] included
    keep_sep: bool = False  # store the [SEP] row too (Eq. 2 has |D| + 1 rows: [CLS] + tokens)
    feature_dtype: Literal["float16", "float32"] = "float16"
    random_init: bool = False  # seeded random weights: demos/tests only; flagged like rois
    seed: int = 0  # seed for random_init weights
    batch_size: int = 32  # texts per forward pass (texts are sorted by length first)
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:N"
    autocast: bool = False  # bf16 autocast on GPU (changes the numbers: fingerprinted)


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
    "bert": BertParams,
}
