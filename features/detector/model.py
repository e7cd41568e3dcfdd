"""Bottom-up-attention Faster R-CNN (ResNet C4) on torchvision ops.

The layout follows the Caffe model of Anderson et al. as converted by bottom-up-attention.pytorch
(`bua-caffe` configs) and, with a different `DetectorConfig`, detectron2's R101-C4 model zoo
models. Module names mirror detectron2's (`backbone.res2.0.conv1.norm.weight`,
`proposal_generator.rpn_head.conv.weight`, `roi_heads.res5.0...`, `roi_heads.box_predictor...`)
so that both checkpoint families load without renaming (see `checkpoint.py`).

Inference only: frozen batch norm, no losses, no training-time sampling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms, roi_align, roi_pool

from pipeline.params import ProposalParams

_SCALE_CLAMP = math.log(1000.0 / 16)  # largest dw/dh applied to a box (detectron2's bound)


@dataclass(frozen=True)
class DetectorConfig:
    """Architecture and the test-time settings a checkpoint family implies; `bua_caffe_r101()`
    and `d2_r101_c4()` are the presets. The proposal counts per image are a run's settings, not
    the architecture's: `forward` takes them as a `pipeline.params.ProposalParams` (from the
    manifest's `stages.rois`), with no default here."""

    stage_blocks: tuple[int, ...] = (3, 4, 23)  # bottleneck blocks in res2, res3, res4
    res5_blocks: int = 3  # bottleneck blocks of the res5 box head
    stem_channels: int = 64  # output channels of the 7x7 stem conv
    res2_channels: int = 256  # res2 output channels; bottleneck width is a quarter; doubles per stage
    stride_in_1x1: bool = True  # caffe/MSRA ResNet: downsampling stride on the first 1x1 conv
    res5_dilation: int = 2  # 2: res5 keeps the 14x14 crop (bua caffe); 1: stride 2 (detectron2)
    norm_eps: float = 1e-5  # frozen batch norm epsilon
    num_classes: int = 1601  # classifier outputs, background included
    background: Literal["first", "last"] = "first"  # caffe puts background at 0, detectron2 last
    num_attributes: int = 401  # attribute outputs, index 0 = "no attribute"; 0 disables the head
    attr_embed_dim: int = 256  # class embedding concatenated with the box feature
    attr_hidden: int = 512  # hidden width of the attribute MLP
    rpn_channels: int = 512  # RPN 3x3 conv width (512 bua caffe, 1024 detectron2)
    rpn_objectness: Literal["softmax", "sigmoid"] = "softmax"  # caffe: 2A logits; d2: A logits
    anchor_style: Literal["caffe", "d2"] = "caffe"  # caffe generate_anchors or d2 cell anchors
    anchor_sizes: tuple[float, ...] = (64.0, 128.0, 256.0, 512.0)  # caffe scales 4..32 x stride 16
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # height / width
    legacy_boxes: bool = True  # caffe "+1" box widths in decoding, clipping and size filtering
    rpn_nms_thresh: float = 0.7  # IoU of the proposal NMS
    min_proposal_size: float = 16.0  # proposals with a side below this (original pixels) are dropped
    pooler: Literal["roipool", "roialign", "roialignv2"] = "roipool"  # see features/detector/README.md
    pooler_resolution: int = 14  # crop size fed to res5
    pooler_sampling_ratio: int = 0  # ROIAlign samples per bin (0 = adaptive)
    pixel_mean: tuple[float, float, float] = (102.9801, 115.9465, 122.7717)  # BGR means subtracted
    size_divisibility: int = 32  # padded batch height/width are multiples of this
    box_head_chunk: int = 1024  # ROIs per res5 pass: bounds peak memory of the box head

    @property
    def num_anchors(self) -> int:
        return len(self.anchor_sizes) * len(self.anchor_ratios)

    @property
    def bbox_reg_classes(self) -> int:
        return self.num_classes if self.background == "first" else self.num_classes - 1

    @property
    def res5_channels(self) -> int:
        return self.res2_channels * 8

    @property
    def feature_stride(self) -> int:
        return 16


def bua_caffe_r101() -> DetectorConfig:
    """The Visual Genome model of bottom-up-attention (1600 objects, 400 attributes)."""
    return DetectorConfig()


def d2_r101_c4(num_classes: int = 81) -> DetectorConfig:
    """detectron2 model zoo R101-C4 Faster R-CNN (COCO: 80 classes + background, no attributes)."""
    return DetectorConfig(
        res5_dilation=1,
        num_classes=num_classes,
        background="last",
        num_attributes=0,
        rpn_channels=1024,
        rpn_objectness="sigmoid",
        anchor_style="d2",
        anchor_sizes=(32.0, 64.0, 128.0, 256.0, 512.0),
        legacy_boxes=False,
        min_proposal_size=0.0,
        pooler="roialignv2",
        pixel_mean=(103.530, 116.280, 123.675),
    )


def tiny_config() -> DetectorConfig:
    """A narrow, shallow layout with the same code paths, for fast CPU tests and demos of wiring."""
    return DetectorConfig(
        stage_blocks=(1, 1, 1), res5_blocks=1, stem_channels=8, res2_channels=32,
        num_classes=11, num_attributes=7, attr_embed_dim=8, attr_hidden=16, rpn_channels=16,
    )


# --------------------------------------------------------------------------- backbone


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics: y = (x - mean) / sqrt(var + eps) * weight + bias."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels) - eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype)[None, :, None, None] + shift.to(x.dtype)[None, :, None, None]


class PadSizes(tuple):
    """Each image's valid (h, w) in a padded batch, with a mask cache shared by every layer of one
    forward pass: a mask is built once per (valid sizes, map size) on the map's device, by slice
    fills with Python ints (no host-to-device copy, no host sync), and reused by every later
    layer of the same geometry (res2's three blocks, res4's 23 ...)."""

    cache: dict

    def __new__(cls, sizes, cache: dict | None = None):
        obj = super().__new__(cls, (tuple(int(v) for v in sz) for sz in sizes))
        obj.cache = {} if cache is None else cache
        return obj

    def derive(self, sizes) -> PadSizes:
        return PadSizes(sizes, self.cache)


Sizes = PadSizes | list[tuple[int, int]] | None  # valid (h, w) of each image in a padded batch; None: no padding


def _conv_out(n: int, conv: nn.Conv2d) -> int:
    k, s, p, d = conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0]
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _derive(sizes: Sizes, new: list[tuple[int, int]]) -> Sizes:
    return sizes.derive(new) if isinstance(sizes, PadSizes) else PadSizes(new)


def _conv_sizes(sizes: Sizes, conv: nn.Conv2d) -> Sizes:
    return None if sizes is None else _derive(sizes, [(_conv_out(h, conv), _conv_out(w, conv)) for h, w in sizes])


def _keep_mask(sizes: Sizes, n: int, hh: int, ww: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """(N, 1, H, W) 1/0 mask of the valid area, cached per forward; None when nothing is padded."""
    if all(h >= hh and w >= ww for h, w in sizes):
        return None
    cache = sizes.cache if isinstance(sizes, PadSizes) else {}
    key = (tuple(sizes), hh, ww, device, dtype)
    keep = cache.get(key)
    if keep is None:
        keep = torch.zeros((n, 1, hh, ww), dtype=dtype, device=device)
        for i, (h, w) in enumerate(sizes):
            keep[i, :, :h, :w].fill_(1)
        cache[key] = keep
    return keep


def _mask(x: torch.Tensor, sizes: Sizes) -> torch.Tensor:
    """Zero activations outside each image's valid area, so that a padded batch computes exactly
    what each image alone would (convolutions then see zeros past the border, as zero padding).
    In place: `x` is always a fresh activation here (inference only)."""
    if sizes is None:
        return x
    keep = _keep_mask(sizes, x.shape[0], int(x.shape[-2]), int(x.shape[-1]), x.device, x.dtype)
    return x if keep is None else x.mul_(keep)


class ConvNorm(nn.Conv2d):
    """Conv without bias followed by frozen BN, stored as `<name>.weight` and `<name>.norm.*`."""

    def __init__(self, cin: int, cout: int, k: int, *, stride: int = 1, padding: int = 0,
                 dilation: int = 1, eps: float = 1e-5):
        super().__init__(cin, cout, k, stride=stride, padding=padding, dilation=dilation, bias=False)
        self.norm = FrozenBatchNorm2d(cout, eps)
        self.folded = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y if self.folded else self.norm(y)

    @torch.no_grad()
    def fold_norm(self) -> None:
        """Fold the frozen BN into the conv: W' = W * s, b' = t with s = weight / sqrt(var + eps),
        t = bias - mean * s, so conv'(x) = s * conv(x) + t = norm(conv(x)) (exact algebra; the
        floating-point result differs by rounding only). Saves two full passes over every
        activation map. The norm buffers are reset to the identity so a later state_dict cannot
        be mistaken for the unfolded weights' norm statistics."""
        if self.folded:
            return
        n = self.norm
        scale = n.weight * (n.running_var + n.eps).rsqrt()
        shift = n.bias - n.running_mean * scale
        self.weight.mul_(scale.to(self.weight.dtype)[:, None, None, None])
        self.bias = nn.Parameter(shift.to(self.weight.dtype), requires_grad=False)
        n.weight.fill_(1.0)
        n.bias.zero_()
        n.running_mean.zero_()
        n.running_var.fill_(1.0 - n.eps)
        self.folded = True


def fold_frozen_norms(model: nn.Module) -> int:
    """Fold every ConvNorm's frozen BN into its conv (load time, after the weights): the count."""
    n = 0
    for m in model.modules():
        if isinstance(m, ConvNorm) and not m.folded:
            m.fold_norm()
            n += 1
    return n


class Bottleneck(nn.Module):
    """ResNet bottleneck; `stride_in_1x1` puts the downsampling on conv1 (caffe/MSRA ResNet)."""

    def __init__(self, cin: int, cout: int, width: int, *, stride: int, dilation: int,
                 stride_in_1x1: bool, eps: float):
        super().__init__()
        self.shortcut = ConvNorm(cin, cout, 1, stride=stride, eps=eps) if cin != cout else None
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = ConvNorm(cin, width, 1, stride=s1, eps=eps)
        self.conv2 = ConvNorm(width, width, 3, stride=s3, padding=dilation, dilation=dilation, eps=eps)
        self.conv3 = ConvNorm(width, cout, 1, eps=eps)

    def forward(self, x: torch.Tensor, sizes: Sizes = None) -> tuple[torch.Tensor, Sizes]:
        s1 = _conv_sizes(sizes, self.conv1)
        out = _mask(F.relu(self.conv1(x)), s1)
        s2 = _conv_sizes(s1, self.conv2)
        out = _mask(F.relu(self.conv2(out)), s2)
        out = self.conv3(out)
        short = self.shortcut(x) if self.shortcut is not None else x
        return _mask(F.relu(out + short), s2), s2


class Stage(nn.Sequential):
    """Bottlenecks in sequence, threading each image's valid size through them."""

    def forward(self, x: torch.Tensor, sizes: Sizes = None) -> tuple[torch.Tensor, Sizes]:
        for block in self:
            x, sizes = block(x, sizes)
        return x, sizes


def make_stage(n: int, cin: int, cout: int, width: int, *, first_stride: int, dilation: int,
               stride_in_1x1: bool, eps: float) -> Stage:
    blocks = []
    for i in range(n):
        blocks.append(Bottleneck(cin if i == 0 else cout, cout, width,
                                 stride=first_stride if i == 0 else 1, dilation=dilation,
                                 stride_in_1x1=stride_in_1x1, eps=eps))
    return Stage(*blocks)


class Stem(nn.Module):
    """conv 7x7/2 + frozen BN + ReLU + max pool 3x3/2 (caffe rounding: ceil_mode)."""

    def __init__(self, cout: int, eps: float):
        super().__init__()
        self.conv1 = ConvNorm(3, cout, 7, stride=2, padding=3, eps=eps)

    def forward(self, x: torch.Tensor, sizes: Sizes = None) -> tuple[torch.Tensor, Sizes]:
        s1 = _conv_sizes(sizes, self.conv1)
        x = _mask(F.relu(self.conv1(x)), s1)  # post-ReLU >= 0, so masked zeros never win a max
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)
        s2 = None if s1 is None else _derive(s1, [(-(-(h - 3) // 2) + 1, -(-(w - 3) // 2) + 1) for h, w in s1])
        return _mask(x, s2), s2


class Backbone(nn.Module):
    """Stem + res2..res4: the C4 trunk at stride 16."""

    def __init__(self, cfg: DetectorConfig):
        super().__init__()
        self.stem = Stem(cfg.stem_channels, cfg.norm_eps)
        cin, cout, width = cfg.stem_channels, cfg.res2_channels, cfg.res2_channels // 4
        self.stage_names = []
        for i, n in enumerate(cfg.stage_blocks):
            name = f"res{i + 2}"
            self.add_module(name, make_stage(n, cin, cout, width, first_stride=1 if i == 0 else 2,
                                             dilation=1, stride_in_1x1=cfg.stride_in_1x1,
                                             eps=cfg.norm_eps))
            self.stage_names.append(name)
            cin, cout, width = cout, cout * 2, width * 2
        self.out_channels = cin

    def forward(self, x: torch.Tensor, sizes: Sizes = None) -> tuple[torch.Tensor, Sizes]:
        """res4 features and each image's valid res4 size (None when `sizes` is None)."""
        x, sizes = self.stem(x, sizes)
        for name in self.stage_names:
            x, sizes = getattr(self, name)(x, sizes)
        return x, sizes


# --------------------------------------------------------------------------- boxes


def cell_anchors(cfg: DetectorConfig) -> torch.Tensor:
    """(A, 4) anchors of one feature-map cell at the origin, in the checkpoint family's order."""
    stride = cfg.feature_stride
    out = []
    if cfg.anchor_style == "caffe":
        # py-faster-rcnn generate_anchors: ratio-major, rounded widths, centre (stride-1)/2.
        base = float(stride)
        ctr = (base - 1) / 2
        for r in cfg.anchor_ratios:
            ws = round(math.sqrt(base * base / r))
            hs = round(ws * r)
            for size in cfg.anchor_sizes:
                s = size / base
                w, h = ws * s, hs * s
                out.append([ctr - (w - 1) / 2, ctr - (h - 1) / 2, ctr + (w - 1) / 2, ctr + (h - 1) / 2])
    else:
        # detectron2 DefaultAnchorGenerator: size-major, centred on the cell origin.
        for size in cfg.anchor_sizes:
            area = size * size
            for r in cfg.anchor_ratios:
                w = math.sqrt(area / r)
                h = w * r
                out.append([-w / 2, -h / 2, w / 2, h / 2])
    return torch.tensor(out, dtype=torch.float32)


def grid_anchors(cell: torch.Tensor, height: int, width: int, stride: int) -> torch.Tensor:
    """(H*W*A, 4) anchors over a feature map, ordered (y, x, anchor) like the RPN outputs."""
    sy = torch.arange(height, dtype=torch.float32, device=cell.device) * stride
    sx = torch.arange(width, dtype=torch.float32, device=cell.device) * stride
    yy, xx = torch.meshgrid(sy, sx, indexing="ij")
    shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)  # (H*W, 1, 4)
    return (shifts + cell[None]).reshape(-1, 4)


def decode_boxes(deltas: torch.Tensor, boxes: torch.Tensor, *, legacy: bool,
                 weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)) -> torch.Tensor:
    """Apply (dx, dy, dw, dh) deltas (..., 4) to boxes (..., 4); `legacy` uses +1 widths."""
    one = 1.0 if legacy else 0.0
    w = boxes[..., 2] - boxes[..., 0] + one
    h = boxes[..., 3] - boxes[..., 1] + one
    cx = boxes[..., 0] + 0.5 * w
    cy = boxes[..., 1] + 0.5 * h
    dx, dy = deltas[..., 0] / weights[0], deltas[..., 1] / weights[1]
    dw = (deltas[..., 2] / weights[2]).clamp(max=_SCALE_CLAMP)
    dh = (deltas[..., 3] / weights[3]).clamp(max=_SCALE_CLAMP)
    pcx, pcy = dx * w + cx, dy * h + cy
    pw, ph = dw.exp() * w, dh.exp() * h
    return torch.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], dim=-1)


def clip_boxes(boxes: torch.Tensor, height: float, width: float, *, legacy: bool) -> torch.Tensor:
    one = 1.0 if legacy else 0.0
    x = boxes[:, 0::2].clamp(0, width - one)
    y = boxes[:, 1::2].clamp(0, height - one)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)


# --------------------------------------------------------------------------- RPN


class RPNHead(nn.Module):
    def __init__(self, cin: int, channels: int, num_anchors: int, objectness: str):
        super().__init__()
        self.conv = nn.Conv2d(cin, channels, 3, padding=1)
        n_obj = 2 * num_anchors if objectness == "softmax" else num_anchors
        self.objectness_logits = nn.Conv2d(channels, n_obj, 1)
        self.anchor_deltas = nn.Conv2d(channels, 4 * num_anchors, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = F.relu(self.conv(x))
        return self.objectness_logits(t), self.anchor_deltas(t)


class ProposalGenerator(nn.Module):
    """RPN head + anchors + per-image top-k, clipping, size filter and NMS (batched on device)."""

    def __init__(self, cfg: DetectorConfig, cin: int):
        super().__init__()
        self.cfg = cfg
        self.rpn_head = RPNHead(cin, cfg.rpn_channels, cfg.num_anchors, cfg.rpn_objectness)
        self.register_buffer("cell_anchors", cell_anchors(cfg), persistent=False)

    def forward(self, feats: torch.Tensor, image_sizes: list[tuple[int, int]], scales: list[float],
                proposals: ProposalParams, feat_sizes: Sizes = None) -> list[torch.Tensor]:
        """Proposals per image in resized-image pixels. `feat_sizes`: each image's valid feature
        map size in a padded batch; anchors outside it are not candidates."""
        cfg = self.cfg
        n, _, fh, fw = feats.shape
        a = cfg.num_anchors
        logits, deltas = self.rpn_head(feats)
        logits, deltas = logits.float(), deltas.float()
        if cfg.rpn_objectness == "softmax":
            # caffe layout: channels [bg_0..bg_{A-1}, fg_0..fg_{A-1}]
            scores = F.softmax(logits.view(n, 2, a, fh, fw), dim=1)[:, 1]
        else:
            scores = logits.view(n, a, fh, fw)  # logits rank like probabilities
        scores = scores.permute(0, 2, 3, 1).reshape(n, -1)  # (N, H*W*A)
        deltas = deltas.view(n, a, 4, fh, fw).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
        anchors = grid_anchors(self.cell_anchors, fh, fw, cfg.feature_stride)
        boxes = decode_boxes(deltas, anchors[None], legacy=cfg.legacy_boxes)  # (N, H*W*A, 4)

        return self._select(boxes, scores, image_sizes, scales, proposals, feat_sizes, fh, fw)

    def _select(self, boxes: torch.Tensor, scores: torch.Tensor, image_sizes: list[tuple[int, int]],
                scales: list[float], proposals: ProposalParams, feat_sizes: Sizes,
                fh: int, fw: int) -> list[torch.Tensor]:
        """Top-k, clipping, size filter and NMS for the whole batch at once: (N, K) tensors with a
        validity mask instead of a per-image loop with boolean indexing. Host syncs: one for the
        valid candidates, those inside NMS, one for the per-image counts.

        Same result as filtering each image on its own: invalid entries (anchors of the padded
        area, boxes failing the size filter) get score -inf and rank after every valid one in a
        stable sort, so the valid entries keep their relative order (row-major y, x, anchor, the
        order of the image's own map); top-k ties are broken by that order."""
        cfg = self.cfg
        pre_nms_top_n, post_nms_top_n = proposals.pre_nms_top_n, proposals.post_nms_top_n
        n, k_all = scores.shape
        dev = scores.device
        a = cfg.num_anchors
        one = 1.0 if cfg.legacy_boxes else 0.0
        valid = torch.ones((n, fh, fw, a), dtype=torch.bool, device=dev)
        if feat_sizes is not None:
            for i, (vh, vw) in enumerate(feat_sizes):
                if (vh, vw) != (fh, fw):
                    valid[i].fill_(False)
                    valid[i, :vh, :vw].fill_(True)
        valid = valid.view(n, k_all)
        # one small host-to-device copy: each image's clip limits and minimum proposal side
        lim = torch.tensor(
            [[h - one, w - one, cfg.min_proposal_size * sc] for (h, w), sc in zip(image_sizes, scales, strict=True)],
            dtype=torch.float32,
        ).to(dev, non_blocking=True)
        neg_inf = torch.tensor(float("-inf"), device=dev)

        def clip_and_filter(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.minimum(b[..., 0::2].clamp(min=0), lim[:, None, 1:2])
            y = torch.minimum(b[..., 1::2].clamp(min=0), lim[:, None, 0:1])
            b = torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)
            bw, bh = b[..., 2] - b[..., 0] + one, b[..., 3] - b[..., 1] + one
            ok = (bw > lim[:, None, 2]) & (bh > lim[:, None, 2])
            if cfg.legacy_boxes:
                ok &= (b[..., 2] > b[..., 0]) & (b[..., 3] > b[..., 1])
            return b, ok

        def top(b: torch.Tensor, sc: torch.Tensor, ok: torch.Tensor):
            k = min(pre_nms_top_n, sc.shape[1])
            order = torch.sort(torch.where(ok, sc, neg_inf), dim=1, descending=True, stable=True).indices[:, :k]
            return (b.gather(1, order[..., None].expand(-1, -1, 4)), sc.gather(1, order), ok.gather(1, order))

        if cfg.legacy_boxes:  # bua caffe: clip and filter first, then top-k
            b, ok = clip_and_filter(boxes)
            b, sc, ok = top(b, scores, valid & ok)
        else:  # detectron2: top-k first, then clip and drop empty boxes
            b, sc, ok = top(boxes, scores, valid)
            b, ok2 = clip_and_filter(b)
            ok = ok & ok2
        img = torch.arange(n, device=dev)[:, None].expand_as(sc)
        flat = torch.nonzero(ok.flatten()).flatten()  # one sync for the valid candidates
        all_boxes, all_scores, all_img = b.reshape(-1, 4)[flat], sc.flatten()[flat], img.flatten()[flat]
        keep = batched_nms(all_boxes, all_scores, all_img, cfg.rpn_nms_thresh)  # score-descending
        kept_img = all_img[keep]
        # first post_nms_top_n kept boxes of each image, in score order, without a per-image loop
        grouped = torch.sort(kept_img, stable=True).indices
        keep, kept_img = keep[grouped], kept_img[grouped]
        counts = torch.bincount(kept_img, minlength=n)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(keep.numel(), device=dev) - starts[kept_img]
        keep = keep[torch.nonzero(rank < post_nms_top_n).flatten()]
        sizes = counts.clamp(max=post_nms_top_n).tolist()
        return list(torch.split(all_boxes[keep], sizes))


# --------------------------------------------------------------------------- box head


class BoxPredictor(nn.Module):
    """Classifier, class-specific box deltas and the attribute head of bottom-up-attention.

    Attributes (bua `BUACaffeFastRCNNOutputLayers`): embed the argmax class (background
    included) into 256-d, concatenate with the 2048-d box feature, fc 512, ReLU, fc 401.
    """

    def __init__(self, cfg: DetectorConfig, cin: int):
        super().__init__()
        self.cls_score = nn.Linear(cin, cfg.num_classes)
        self.bbox_pred = nn.Linear(cin, 4 * cfg.bbox_reg_classes)
        self.has_attributes = cfg.num_attributes > 0
        if self.has_attributes:
            self.cls_embed = nn.Embedding(cfg.num_classes, cfg.attr_embed_dim)
            self.attr_linear1 = nn.Linear(cin + cfg.attr_embed_dim, cfg.attr_hidden)
            self.attr_linear2 = nn.Linear(cfg.attr_hidden, cfg.num_attributes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        logits = self.cls_score(x)
        deltas = self.bbox_pred(x)
        attr = None
        if self.has_attributes:
            emb = self.cls_embed(logits.argmax(dim=1))
            attr = self.attr_linear2(F.relu(self.attr_linear1(torch.cat([x, emb.to(x.dtype)], dim=1))))
        return logits, deltas, attr


class ROIHeads(nn.Module):
    """Crop res4 per proposal, run res5, mean-pool to the box feature, predict classes/attributes."""

    def __init__(self, cfg: DetectorConfig, cin: int):
        super().__init__()
        self.cfg = cfg
        cout = cfg.res5_channels
        stride = 1 if cfg.res5_dilation > 1 else 2
        self.res5 = make_stage(cfg.res5_blocks, cin, cout, cout // 4, first_stride=stride,
                               dilation=cfg.res5_dilation, stride_in_1x1=cfg.stride_in_1x1,
                               eps=cfg.norm_eps)
        self.box_predictor = BoxPredictor(cfg, cout)

    def pool(self, feats: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        scale = 1.0 / cfg.feature_stride
        size = (cfg.pooler_resolution, cfg.pooler_resolution)
        feats, rois = feats.float(), rois.float()  # pooling kernels lack bf16 on CPU; crops are small
        if cfg.pooler == "roipool":
            return roi_pool(feats, rois, size, scale)
        return roi_align(feats, rois, size, scale, cfg.pooler_sampling_ratio,
                         aligned=cfg.pooler == "roialignv2")

    def forward(self, feats: torch.Tensor, rois: torch.Tensor):
        pooled = []
        for start in range(0, rois.shape[0], max(1, self.cfg.box_head_chunk)):
            crop = self.pool(feats, rois[start:start + self.cfg.box_head_chunk])
            pooled.append(self.res5(crop)[0].mean(dim=(2, 3)))
        x = torch.cat(pooled) if pooled else feats.new_zeros((0, self.cfg.res5_channels))
        logits, deltas, attr = self.box_predictor(x)
        return x, logits, deltas, attr


# --------------------------------------------------------------------------- detector


@dataclass
class Detections:
    """Per-image raw outputs before box selection (R proposals)."""

    boxes: torch.Tensor  # (R, 4) proposal boxes x1,y1,x2,y2 in original image pixels
    features: torch.Tensor  # (R, D) mean-pooled res5 features
    cls_probs: torch.Tensor  # (R, num_classes) softmax, background included
    attr_probs: torch.Tensor | None  # (R, num_attributes) softmax, or None without the head
    image_hw: tuple[int, int]  # original image height, width
    meta: dict = field(default_factory=dict)


class BUADetector(nn.Module):
    """Faster R-CNN C4 with the attribute head; `forward` takes a padded, normalised batch."""

    def __init__(self, cfg: DetectorConfig | None = None):
        super().__init__()
        self.cfg = cfg or DetectorConfig()
        self.backbone = Backbone(self.cfg)
        self.proposal_generator = ProposalGenerator(self.cfg, self.backbone.out_channels)
        self.roi_heads = ROIHeads(self.cfg, self.backbone.out_channels)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, image_sizes: list[tuple[int, int]], scales: list[float],
                orig_sizes: list[tuple[int, int]], *, proposals: ProposalParams) -> list[Detections]:
        """images (N, 3, H, W) BGR minus pixel means, zero-padded; image_sizes are the resized
        (h, w) of each image, scales resized/original, orig_sizes the original (h, w);
        `proposals` the RPN's proposal counts (`RoisParams.proposals`)."""
        feats, feat_sizes = self.backbone(images, _padded_sizes(images, image_sizes))
        boxes = self.proposal_generator(feats, image_sizes, scales, proposals, feat_sizes)
        return self._heads(feats, boxes, scales, orig_sizes)

    @torch.no_grad()
    def forward_boxes(self, images: torch.Tensor, scales: list[float], orig_sizes: list[tuple[int, int]],
                      boxes: list[torch.Tensor]) -> list[Detections]:
        """Features and predictions for given boxes (x1,y1,x2,y2 in original pixels) instead of
        RPN proposals: extraction for known regions, and precision checks on fixed boxes."""
        sizes = [(int(round(h * s)), int(round(w * s))) for (h, w), s in zip(orig_sizes, scales, strict=True)]
        feats, _ = self.backbone(images, _padded_sizes(images, sizes))
        props = [b.to(device=images.device, dtype=torch.float32) * s for b, s in zip(boxes, scales, strict=True)]
        return self._heads(feats, props, scales, orig_sizes)

    def _heads(self, feats: torch.Tensor, proposals: list[torch.Tensor], scales: list[float],
               orig_sizes: list[tuple[int, int]]) -> list[Detections]:
        counts = [p.shape[0] for p in proposals]
        batch_idx = torch.cat([torch.full((c, 1), i, dtype=torch.float32, device=feats.device)
                               for i, c in enumerate(counts)])
        rois = torch.cat([batch_idx, torch.cat(proposals).float()], dim=1)
        x, logits, _deltas, attr = self.roi_heads(feats, rois)
        probs = F.softmax(logits.float(), dim=1)
        attr_probs = F.softmax(attr.float(), dim=1) if attr is not None else None
        out = []
        start = 0
        for i, c in enumerate(counts):
            sl = slice(start, start + c)
            out.append(Detections(
                boxes=proposals[i] / scales[i],
                features=x[sl],
                cls_probs=probs[sl],
                attr_probs=attr_probs[sl] if attr_probs is not None else None,
                image_hw=orig_sizes[i],
            ))
            start += c
        return out


def _padded_sizes(images: torch.Tensor, sizes: list[tuple[int, int]]) -> Sizes:
    """The valid sizes when some image is padded, else None (no masking work)."""
    full = (int(images.shape[2]), int(images.shape[3]))
    return None if all(tuple(sz) == full for sz in sizes) else PadSizes(sizes)


def build_detector(cfg: DetectorConfig | None = None, *, seed: int | None = None) -> BUADetector:
    """A detector in eval mode; with `seed`, weights are drawn deterministically (random-init mode)."""
    if seed is not None:
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
    model = BUADetector(cfg)
    if seed is not None:
        _randomize_norms(model, seed)
        torch.random.set_rng_state(gen_state)
    return model.eval()


def _randomize_norms(model: nn.Module, seed: int) -> None:
    """Random-init mode: give frozen BN realistic non-trivial statistics so activations stay finite
    and varied through 100 blocks (a unit scale would blow up the residual sums)."""
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            c = m.weight.numel()
            m.weight.copy_(0.5 + 0.5 * torch.rand(c, generator=g))
            m.bias.copy_(0.1 * torch.randn(c, generator=g))
    for m in model.modules():
        if isinstance(m, Bottleneck):
            m.conv3.norm.weight.mul_(0.2)  # damp residual branches as trained ResNets do
