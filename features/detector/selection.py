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
    """
    return max_class_confidence_batch([boxes], [class_probs], nms_thresh, legacy=legacy)[0]


def max_class_confidence_batch(boxes: list[torch.Tensor], class_probs: list[torch.Tensor],
                               nms_thresh: float, *, legacy: bool = False) -> list[torch.Tensor]:
    """`max_class_confidence` for several images at once (fewer kernel launches on a GPU).

    Greedy NMS runs for every image and class together: step k visits each (image, class)'s
    k-th ranked box, keeps it unless already suppressed, and suppresses the boxes it overlaps by
    more than the threshold. R_max steps of (B, C, R_max) tensor work, on the tensors' device.
    Padding boxes get probability -1 so they rank last and can suppress nothing real.
    """
    n = len(boxes)
    counts = [int(b.shape[0]) for b in boxes]
    r = max(counts, default=0)
    if n == 0 or r == 0:
        return [p.new_zeros(c) for p, c in zip(class_probs, counts, strict=True)]
    c = int(class_probs[0].shape[1])
    dev = class_probs[0].device
    probs = torch.full((n, c, r), -1.0, dtype=torch.float32, device=dev)
    overlap = torch.zeros((n, r, r), dtype=torch.bool, device=dev)
    for i, (b, p) in enumerate(zip(boxes, class_probs, strict=True)):
        k = counts[i]
        if k:
            probs[i, :, :k] = p.t().float()
            overlap[i, :k, :k] = box_iou(b.float(), legacy=legacy) > nms_thresh
    order = torch.sort(probs, dim=2, descending=True, stable=True).indices  # (B, C, R)
    suppressed = torch.zeros((n, c, r), dtype=torch.bool, device=dev)
    kept = torch.zeros((n, c, r), dtype=torch.bool, device=dev)
    img = torch.arange(n, device=dev)[:, None].expand(n, c)
    cls = torch.arange(c, device=dev)[None, :].expand(n, c)
    for k in range(r):
        idx = order[:, :, k]  # (B, C) the k-th best box of each image and class
        keep_k = ~suppressed[img, cls, idx]
        kept[img, cls, idx] = keep_k
        suppressed |= keep_k[..., None] & overlap[img, idx]  # (B, C, R)
    conf = torch.where(kept, probs, torch.zeros_like(probs)).amax(dim=1).clamp(min=0)  # (B, R)
    return [conf[i, : counts[i]].to(class_probs[i].dtype) for i in range(n)]


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


def select_boxes_batch(max_conf: list[torch.Tensor], *, conf_thresh: float, min_boxes: int, max_boxes: int,
                       fixed_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`select_boxes` for several images at once, on the tensors' device, with no host sync.

    Returns (idx, n): idx (B, K) int64 where row b's first n[b] entries are the indices
    `select_boxes(max_conf[b], ...)` returns, in the same order (K = min(max_boxes, R_max), the
    most any image can keep); n (B,) int64. The rule, per image: if min <= #above <= max, the
    boxes above the threshold in proposal order; otherwise the top n by confidence (descending,
    ties by proposal index: a stable sort), n = min if fewer are above, else max.
    """
    if fixed_k is not None:
        min_boxes = max_boxes = fixed_k
    if min_boxes > max_boxes:
        raise ValueError(f"min_boxes {min_boxes} is larger than max_boxes {max_boxes}")
    b = len(max_conf)
    counts = [int(c.shape[0]) for c in max_conf]
    r = max(counts, default=0)
    dev = max_conf[0].device if b else torch.device("cpu")
    k = min(max_boxes, r)
    if b == 0 or k == 0:
        return torch.zeros((b, 0), dtype=torch.int64, device=dev), torch.zeros(b, dtype=torch.int64, device=dev)
    dtype = max_conf[0].dtype
    conf = torch.full((b, r), -1.0, dtype=dtype, device=dev)  # confidences are >= 0; -1 = padding
    valid = torch.zeros((b, r), dtype=torch.bool, device=dev)
    for i, c in enumerate(max_conf):
        conf[i, : counts[i]] = c
        valid[i, : counts[i]].fill_(True)
    above = valid & (conf >= conf_thresh)
    n_above = above.sum(dim=1)
    by_conf = torch.sort(conf, dim=1, descending=True, stable=True).indices  # padding ranks last
    pos = torch.arange(r, device=dev).expand(b, r)
    rank = torch.empty_like(by_conf).scatter_(1, by_conf, pos)
    in_range = (n_above >= min_boxes) & (n_above <= max_boxes)
    n_top = torch.where(n_above < min_boxes, min_boxes, max_boxes)
    keep = torch.where(in_range[:, None], above, valid & (rank < n_top[:, None]))
    order_key = torch.where(in_range[:, None], pos, rank)  # proposal order, or confidence order
    order_key = torch.where(keep, order_key, order_key + r)  # dropped boxes after every kept one
    idx = torch.sort(order_key, dim=1, stable=True).indices[:, :k]
    return idx, keep.sum(dim=1)
