"""Image -> detector input, as bottom-up-attention prepares it: BGR, minus the pixel means,
bilinear resize so the shorter side is `min_size` unless the longer would pass `max_size`."""
from __future__ import annotations

from dataclasses import dataclass

MIN_SIDE = 16  # resized images need at least one stride-16 feature cell per side

import numpy as np
import torch
import torch.nn.functional as F


def resize_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """Scale factor of the caffe test-time resize (shorter side min_size, longer <= max_size)."""
    short, long = min(height, width), max(height, width)
    scale = float(min_size) / short
    if round(scale * long) > max_size:
        scale = float(max_size) / long
    return scale


@dataclass
class PreparedImage:
    """One resized, normalised image and what is needed to map boxes back."""

    tensor: torch.Tensor  # (3, h, w) float32, BGR minus pixel means
    scale: float  # resized / original
    orig_hw: tuple[int, int]  # original (height, width)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.tensor.shape[1]), int(self.tensor.shape[2])


def prepare_image(rgb: np.ndarray, *, min_size: int, max_size: int,
                  pixel_mean: tuple[float, float, float]) -> PreparedImage:
    """(H, W, 3) uint8 RGB -> normalised BGR tensor resized like cv2.INTER_LINEAR (no antialias)."""
    h, w = int(rgb.shape[0]), int(rgb.shape[1])
    scale = resize_scale(h, w, min_size, max_size)
    x = torch.from_numpy(np.ascontiguousarray(rgb[:, :, ::-1])).permute(2, 0, 1).float()
    x = x - torch.tensor(pixel_mean, dtype=torch.float32)[:, None, None]
    nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    if (nh, nw) != (h, w):
        x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
    return PreparedImage(tensor=x.contiguous(), scale=scale, orig_hw=(h, w))


def pad_batch(tensors: list[torch.Tensor], divisibility: int) -> torch.Tensor:
    """Zero-pad (3, h_i, w_i) tensors to one (N, 3, H, W) batch, H and W multiples of divisibility."""
    hmax = max(t.shape[1] for t in tensors)
    wmax = max(t.shape[2] for t in tensors)
    if divisibility > 1:
        hmax = (hmax + divisibility - 1) // divisibility * divisibility
        wmax = (wmax + divisibility - 1) // divisibility * divisibility
    out = tensors[0].new_zeros((len(tensors), 3, hmax, wmax))
    for i, t in enumerate(tensors):
        out[i, :, : t.shape[1], : t.shape[2]] = t
    return out
