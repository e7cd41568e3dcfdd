"""The bottom-up-attention Faster R-CNN (ResNet C4 + attribute head) on torchvision ops."""
from features.detector.checkpoint import (
    LoadReport,
    load_into,
    load_state,
    read_checkpoint,
    safe_unpickle,
    verify_weights,
)
from features.detector.model import (
    BUADetector,
    Detections,
    DetectorConfig,
    bua_caffe_r101,
    build_detector,
    d2_r101_c4,
    tiny_config,
)
from features.detector.preprocess import (
    PreparedImage,
    RawImage,
    pad_batch,
    prepare_batch,
    prepare_image,
    raw_image,
    resize_scale,
)
from features.detector.selection import (
    box_iou,
    max_class_confidence,
    max_class_confidence_batch,
    select_boxes,
    select_boxes_batch,
)

__all__ = [
    "BUADetector",
    "DetectorConfig",
    "Detections",
    "LoadReport",
    "PreparedImage",
    "box_iou",
    "build_detector",
    "bua_caffe_r101",
    "d2_r101_c4",
    "load_into",
    "load_state",
    "max_class_confidence",
    "max_class_confidence_batch",
    "RawImage",
    "pad_batch",
    "prepare_batch",
    "prepare_image",
    "raw_image",
    "read_checkpoint",
    "resize_scale",
    "safe_unpickle",
    "select_boxes",
    "select_boxes_batch",
    "tiny_config",
    "verify_weights",
]
