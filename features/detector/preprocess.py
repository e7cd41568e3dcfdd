"""Image -> detector input, as bottom-up-attention prepares it: BGR, minus the pixel means,
bilinear resize so the shorter side is `min_size` unless the longer would pass `max_size`."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

MIN_SIDE = 16  # resized images need at least one stride-16 feature cell per side


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


@dataclass
class RawImage:
    """A decoded image as it ships to the device: (H, W, 3) uint8 RGB (0.9 MB for 640x480, a
    sixth of the resized float32 tensor), plus the resize geometry computed on the host.
    `pin_memory()` lets a DataLoader's pin-memory thread put it in page-locked memory, so the
    host-to-device copy is asynchronous."""

    rgb: torch.Tensor  # (H, W, 3) uint8, RGB
    scale: float  # resized / original
    size: tuple[int, int]  # resized (h, w)

    @property
    def orig_hw(self) -> tuple[int, int]:
        return int(self.rgb.shape[0]), int(self.rgb.shape[1])

    def pin_memory(self) -> RawImage:
        return RawImage(rgb=self.rgb.pin_memory(), scale=self.scale, size=self.size)


def raw_image(rgb: np.ndarray, *, min_size: int, max_size: int) -> RawImage:
    """(H, W, 3) uint8 RGB -> RawImage (no pixel work: resizing happens on the device)."""
    h, w = int(rgb.shape[0]), int(rgb.shape[1])
    scale = resize_scale(h, w, min_size, max_size)
    nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    rgb = np.ascontiguousarray(rgb)
    if not rgb.flags.writeable:  # Pillow's arrays are read-only; torch wants to own writable memory
        rgb = rgb.copy()
    return RawImage(rgb=torch.from_numpy(rgb), scale=scale, size=(nh, nw))


def bucket_size(n: int, divisibility: int, bucket: int) -> int:
    """n rounded up to `divisibility`, then to `bucket` (0: no bucketing). Bucketing keeps the
    number of distinct padded shapes small so cudnn.benchmark's per-shape autotuning pays;
    the extra padding is masked, so it does not change the result."""
    if divisibility > 1:
        n = (n + divisibility - 1) // divisibility * divisibility
    if bucket > 1:
        n = (n + bucket - 1) // bucket * bucket
    return n


_MEANS: dict = {}


def prepare_batch(raws: list[RawImage], device: torch.device, *, pixel_mean: tuple[float, float, float],
                  divisibility: int, bucket: int = 0, channels_last: bool = False) -> torch.Tensor:
    """Ship uint8 images to `device` and do BGR, minus means, bilinear resize and zero padding
    there: the same operations in the same order as `prepare_image` + `pad_batch` (bitwise the
    same result on CPU). Returns the (N, 3, H, W) float32 batch."""
    key = (tuple(pixel_mean), str(device))
    mean = _MEANS.get(key)
    if mean is None:
        mean = _MEANS[key] = torch.tensor(pixel_mean, dtype=torch.float32).to(device)[:, None, None]
    hmax = bucket_size(max(r.size[0] for r in raws), divisibility, bucket)
    wmax = bucket_size(max(r.size[1] for r in raws), divisibility, bucket)
    out = torch.zeros((len(raws), 3, hmax, wmax), dtype=torch.float32, device=device)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    for i, r in enumerate(raws):
        x = r.rgb.to(device, non_blocking=True).permute(2, 0, 1).flip(0).float()  # BGR, float
        x = x - mean
        if r.size != r.orig_hw:
            x = F.interpolate(x[None], size=r.size, mode="bilinear", align_corners=False)[0]
        out[i, :, : r.size[0], : r.size[1]] = x
    return out
