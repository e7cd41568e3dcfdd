"""Device names from configs ("auto", "cpu", "cuda", "cuda:N") to torch devices."""
from __future__ import annotations

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
