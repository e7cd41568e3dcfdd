"""Raw dataset readers (released MRHP format) and builders (Amazon review dumps -> MRHP format)."""
from pipeline.datasets.mrhp import ValidationReport, load_dataset, resolve_image, validate_dataset

__all__ = ["ValidationReport", "load_dataset", "resolve_image", "validate_dataset"]
