"""Load the detector checkpoints users actually have, safely.

Formats:
- `bua-pth`: bottom-up-attention.pytorch's converted weights (`bua-caffe-frcn-r101_with_attributes.pth`),
  a torch file holding {"model": state_dict} (or a bare state dict). Read with
  `torch.load(weights_only=True)`: tensors and plain containers only.
- `d2-pkl`: detectron2 model-zoo `.pkl` files, a pickled {"model": {name: ndarray}, "__author__": ...}.
  Read with a restricted unpickler that can only rebuild numpy arrays, dtypes and plain
  containers; any other global (os.system, builtins.eval, ...) is refused by name.
  Caffe2-style names (`res2_0_branch2a_w`, `res2_0_branch2a_bn_s`, `conv_rpn_w`, ...) are
  translated to detectron2 names.

Key names are detectron2's, which the model mirrors. Frozen-BN statistics missing from a
checkpoint (caffe2 affine BN stores only scale and bias) default to mean 0, var 1 - eps so that
the stored scale/bias apply unchanged. Unmatched, missing and mis-shaped keys are reported by name.
"""
from __future__ import annotations

import io
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import ResourceError, StageError
from pipeline.hashing import sha256_file

_IGNORED = re.compile(r"(^|\.)num_batches_tracked$|^pixel_(mean|std)$")
_NORM_STATS = ("running_mean", "running_var")
_MAX_LISTED = 25

# Globals a numpy-array pickle needs; nothing else may be reconstructed.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol 5 pickles of arrays
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # numpy arrays pickled by py3 with protocol 2 carry their bytes this way
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to unpickle global {module}.{name}: only numpy arrays and plain containers are allowed"
        )


def safe_unpickle(data: bytes, *, source: str = "<bytes>") -> Any:
    """Unpickle `data` allowing only numpy arrays/dtypes and builtin containers."""
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise ResourceError(f"{source}: unsafe or invalid pickle: {e}") from None
    except Exception as e:  # truncated file, bad opcode ...
        raise ResourceError(f"{source}: cannot read pickle ({type(e).__name__}: {e})") from None


def verify_weights(path: Path | None, sha256: str | None, *, name: str = "detector") -> str:
    """Check the weights file exists (and matches `sha256` when given); return its sha256."""
    if path is None:
        raise ResourceError(
            f"resources.detectors.{name}: no weights path declared; set `path` (and `sha256`) in the "
            f"manifest, or use random_init for demos"
        )
    p = Path(path)
    if not p.is_file():
        raise ResourceError(f"resources.detectors.{name}: weights file {p} not found")
    actual = sha256_file(p)
    if sha256 is not None and actual.lower() != sha256.lower():
        raise ResourceError(
            f"resources.detectors.{name}: {p} has sha256 {actual}, the manifest expects {sha256}"
        )
    return actual


# --------------------------------------------------------------------------- reading


def detect_format(path: Path) -> str:
    return "d2-pkl" if Path(path).suffix.lower() == ".pkl" else "bua-pth"


def read_checkpoint(path: Path, fmt: str = "auto") -> dict[str, torch.Tensor]:
    """Raw {name: tensor} from a checkpoint file, names translated to detectron2's."""
    path = Path(path)
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "d2-pkl":
        obj = safe_unpickle(path.read_bytes(), source=str(path))
    elif fmt == "bua-pth":
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ResourceError(
                f"{path}: cannot load as a weights-only torch checkpoint ({type(e).__name__}: {e})"
            ) from None
    else:
        raise StageError(f"{path}: unknown checkpoint format {fmt!r}; valid: auto, bua-pth, d2-pkl")
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("blobs"), dict):
        obj = obj["blobs"]
    if not isinstance(obj, dict):
        raise ResourceError(f"{path}: expected a state dict (or {{'model': state_dict}}), got {type(obj).__name__}")
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise ResourceError(f"{path}: non-string key {k!r} in the state dict")
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(np.ascontiguousarray(v))
        elif not isinstance(v, torch.Tensor):
            if k.endswith("_momentum") or k == "__author__":
                continue
            raise ResourceError(f"{path}: key {k!r} holds a {type(v).__name__}, expected an array")
        name = k[len("module."):] if k.startswith("module.") else k
        out[caffe2_to_d2(name)] = v
    return out


_C2_SUFFIX = {"_w": "weight", "_b": "bias", "_bn_s": "norm.weight", "_bn_b": "norm.bias",
              "_bn_rm": "norm.running_mean", "_bn_riv": "norm.running_var"}
_C2_SPECIAL = {
    "conv1_w": "backbone.stem.conv1.weight",
    "res_conv1_bn_s": "backbone.stem.conv1.norm.weight",
    "res_conv1_bn_b": "backbone.stem.conv1.norm.bias",
    "conv_rpn_w": "proposal_generator.rpn_head.conv.weight",
    "conv_rpn_b": "proposal_generator.rpn_head.conv.bias",
    "rpn_cls_logits_w": "proposal_generator.rpn_head.objectness_logits.weight",
    "rpn_cls_logits_b": "proposal_generator.rpn_head.objectness_logits.bias",
    "rpn_bbox_pred_w": "proposal_generator.rpn_head.anchor_deltas.weight",
    "rpn_bbox_pred_b": "proposal_generator.rpn_head.anchor_deltas.bias",
    "cls_score_w": "roi_heads.box_predictor.cls_score.weight",
    "cls_score_b": "roi_heads.box_predictor.cls_score.bias",
    "bbox_pred_w": "roi_heads.box_predictor.bbox_pred.weight",
    "bbox_pred_b": "roi_heads.box_predictor.bbox_pred.bias",
}
_C2_BLOCK = re.compile(r"^res([2-5])_(\d+)_branch(1|2a|2b|2c)(_bn_s|_bn_b|_bn_rm|_bn_riv|_w|_b)$")
_C2_CONV = {"1": "shortcut", "2a": "conv1", "2b": "conv2", "2c": "conv3"}


def caffe2_to_d2(name: str) -> str:
    """Translate a caffe2/Detectron1 blob name to detectron2's; other names pass through."""
    if name in _C2_SPECIAL:
        return _C2_SPECIAL[name]
    m = _C2_BLOCK.match(name)
    if not m:
        return name
    stage, block, branch, suffix = m.groups()
    prefix = "roi_heads" if stage == "5" else "backbone"
    return f"{prefix}.res{stage}.{block}.{_C2_CONV[branch]}.{_C2_SUFFIX[suffix]}"


# --------------------------------------------------------------------------- mapping


@dataclass
class LoadReport:
    """What loading matched; `ok` when nothing is unmatched, missing or mis-shaped."""

    loaded: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint
    mis_shaped: list[str] = field(default_factory=list)  # "name: checkpoint (a, b) vs model (c, d)"
    defaulted: list[str] = field(default_factory=list)  # BN statistics filled with defaults
    ignored: list[str] = field(default_factory=list)  # num_batches_tracked, pixel_mean ...

    @property
    def ok(self) -> bool:
        return not (self.unexpected or self.missing or self.mis_shaped)

    def describe(self) -> str:
        parts = []
        for label, names in (("unmatched checkpoint keys", self.unexpected),
                             ("model keys missing from the checkpoint", self.missing),
                             ("mis-shaped keys", self.mis_shaped)):
            if names:
                shown = ", ".join(names[:_MAX_LISTED])
                more = f" ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
                parts.append(f"{len(names)} {label}: {shown}{more}")
        return "; ".join(parts) or "all keys matched"


def map_state_dict(raw: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Match checkpoint tensors to the model's state dict by name and shape."""
    target = model.state_dict()
    report = LoadReport()
    mapped: dict[str, torch.Tensor] = {}
    for name, value in raw.items():
        if _IGNORED.search(name):
            report.ignored.append(name)
            continue
        if name not in target:
            report.unexpected.append(name)
            continue
        want = tuple(target[name].shape)
        if tuple(value.shape) != want:
            report.mis_shaped.append(f"{name}: checkpoint {tuple(value.shape)} vs model {want}")
            continue
        mapped[name] = value.to(target[name].dtype)
        report.loaded.append(name)
    bad_shape = {m.split(":")[0] for m in report.mis_shaped}
    for name in target:
        if name in mapped or name in bad_shape:
            continue
        if name.endswith(_NORM_STATS) and name.rsplit(".", 1)[0] + ".weight" in mapped:
            norm = model.get_submodule(name.rsplit(".", 1)[0])
            eps = float(getattr(norm, "eps", 0.0))
            fill = 0.0 if name.endswith("running_mean") else 1.0 - eps
            mapped[name] = torch.full_like(target[name], fill)
            report.defaulted.append(name)
            continue
        report.missing.append(name)
    return mapped, report


def load_state(model: nn.Module, raw: dict[str, torch.Tensor], *, source: str) -> LoadReport:
    """Load already-read checkpoint tensors; StageError listing keys by name unless all match."""
    mapped, report = map_state_dict(raw, model)
    if not report.ok:
        raise StageError(f"{source}: checkpoint does not fit the detector: {report.describe()}")
    model.load_state_dict(mapped, strict=False)
    return report


def load_into(model: nn.Module, path: Path, fmt: str = "auto") -> LoadReport:
    """Read a checkpoint file and load it into `model` (see `load_state`)."""
    return load_state(model, read_checkpoint(Path(path), fmt), source=str(path))
