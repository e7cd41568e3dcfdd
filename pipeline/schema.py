"""Stored fields of the rois stage, shared by the extractor (features/rois.py) and the importers
(pipeline/ingest/importers.py); here on floor 1 so both import it downward (no torch here)."""
from __future__ import annotations

from pipeline.stage import FieldSpec


def rois_schema(feature_dtype: str = "float16", feature_dim: int = 2048) -> dict[str, FieldSpec]:
    """Stored fields per image (docs/design.md "Stage outputs")."""
    return {
        "features": FieldSpec(feature_dtype, (feature_dim,), ragged=True),
        "boxes": FieldSpec("float32", (4,), ragged=True),
        "obj_ids": FieldSpec("int32", (), ragged=True),
        "obj_conf": FieldSpec("float32", (), ragged=True),
        "attr_ids": FieldSpec("int32", (), ragged=True),
        "attr_conf": FieldSpec("float32", (), ragged=True),
        "image_hw": FieldSpec("int32", (2,)),
    }
