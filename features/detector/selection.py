"""Which proposals become stored boxes: the rule of bottom-up-attention's feature extraction.

For every object class (background excluded), greedy NMS at `nms_thresh` runs over all R
proposal boxes ranked by that class's probability; a box's confidence is its highest class
probability among the classes in which it survived NMS. Boxes with confidence >= conf_thresh
are kept in proposal order; fewer than `min_boxes` of them: the `min_boxes` most confident
instead; more than `max_boxes`: the `max_boxes` most confident. Fixed-K mode is the same rule
with min = max = K (as bottom-up-attention.pytorch's `fix36` configs do).
"""
from __future__ import annotations

import torch


def box_iou(boxes: torch.Tensor, *, legacy: bool = False) -> torch.Tensor:
    """(R, R) IoU; `legacy` counts pixels inclusively (caffe's +1 areas)."""
    one = 1.0 if legacy else 0.0
    area = (boxes[:, 2] - boxes[:, 0] + one).clamp(min=0) * (boxes[:, 3] - boxes[:, 1] + one).clamp(min=0)
    lt = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    wh = (rb - lt + one).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area[:, None] + area[None, :] - inter
    return torch.where(union > 0, inter / union, torch.zeros_like(union))


def max_class_confidence(boxes: torch.Tensor, class_probs: torch.Tensor, nms_thresh: float,
                         *, legacy: bool = False) -> torch.Tensor:
    """(R,) each box's highest class probability over the classes whose NMS keeps it.

    boxes (R, 4); class_probs (R, C) over object classes only (background column removed).
    Greedy NMS runs for all C classes at once: step k visits each class's k-th ranked box,
    keeps it unless already suppressed, and suppresses what it overlaps by more than the
    threshold. R steps of (C, R) tensor work, all on the tensors' device.
    """
    r, c = class_probs.shape
    max_conf = torch.zeros(r, dtype=class_probs.dtype, device=class_probs.device)
    if r == 0 or c == 0:
        return max_conf
    overlap = box_iou(boxes.float(), legacy=legacy) > nms_thresh  # (R, R)
    probs_t = class_probs.t()  # (C, R)
    order = torch.sort(probs_t, dim=1, descending=True, stable=True).indices  # (C, R)
    suppressed = torch.zeros((c, r), dtype=torch.bool, device=boxes.device)
    kept = torch.zeros((c, r), dtype=torch.bool, device=boxes.device)
    cls = torch.arange(c, device=boxes.device)
    for k in range(r):
        idx = order[:, k]  # (C,) the k-th best box of each class
        keep_k = ~suppressed[cls, idx]
        kept[cls, idx] = keep_k
        suppressed |= keep_k[:, None] & overlap[idx]
    conf = torch.where(kept, probs_t, torch.zeros_like(probs_t))
    return torch.maximum(max_conf, conf.max(dim=0).values)


def select_boxes(max_conf: torch.Tensor, *, conf_thresh: float, min_boxes: int, max_boxes: int,
                 fixed_k: int | None = None) -> torch.Tensor:
    """Indices of the boxes to keep (the original rule; fixed_k means min = max = K)."""
    if fixed_k is not None:
        min_boxes = max_boxes = fixed_k
    if min_boxes > max_boxes:
        raise ValueError(f"min_boxes {min_boxes} is larger than max_boxes {max_boxes}")
    above = torch.nonzero(max_conf >= conf_thresh).flatten()
    if min_boxes <= above.numel() <= max_boxes:
        return above
    by_conf = torch.sort(max_conf, descending=True, stable=True).indices
    n = min_boxes if above.numel() < min_boxes else max_boxes
    return by_conf[:n]
