"""Device names from configs ("auto", "cpu", "cuda", "cuda:N") to torch devices."""
from __future__ import annotations

import contextlib

import torch

from pipeline.errors import MRHPError, StageError


def resolve_device(name: str, *, error: type[MRHPError] = StageError,
                   key: str = "stages.rois.device") -> torch.device:
    """"auto" -> cuda when available, else cpu; otherwise the named device. A bad name or an
    absent GPU raises `error` naming the config `key`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise error(f"{key}: {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise error(f"{key}: {name!r} asked for CUDA, which is not available here")
    return dev


def autocast(device: torch.device, enabled: bool, dtype: str = "auto"):
    """The one mixed-precision context of the project (ROI extraction and the trainer).

    Disabled: a no-op context. `dtype` "auto" is fp16 on CUDA and bf16 on CPU (the rois stage's
    setting `stages.rois.autocast_dtype: auto`); "bfloat16" / "float16" name it. The trainer
    autocasts on CUDA only, in bf16: it passes `enabled=cfg.autocast and device.type == "cuda"`.
    """
    if not enabled:
        return contextlib.nullcontext()
    if dtype == "auto":
        dt = torch.float16 if device.type == "cuda" else torch.bfloat16
    else:
        dt = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return torch.autocast(device_type=device.type, dtype=dt)
