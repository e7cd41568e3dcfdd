"""Box selection: the bottom-up-attention rule on hand-built scores, and agreement with per-class NMS."""
from __future__ import annotations

import pytest
import torch
from torchvision.ops import nms

from features.detector.selection import box_iou, max_class_confidence, max_class_confidence_batch, select_boxes


def _reference_max_conf(boxes, probs, thresh):
    """The original extraction loop: one NMS per class, keep the best surviving class score."""
    max_conf = torch.zeros(boxes.shape[0])
    for c in range(probs.shape[1]):
        keep = nms(boxes, probs[:, c], thresh)
        max_conf[keep] = torch.maximum(max_conf[keep], probs[keep, c])
    return max_conf


def test_vectorised_nms_matches_one_nms_per_class_on_random_boxes():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(40, 2, generator=g) * 80
    wh = torch.rand(40, 2, generator=g) * 40 + 2
    boxes = torch.cat([xy, xy + wh], dim=1)
    probs = torch.softmax(torch.randn(40, 9, generator=g) * 3, dim=1)
    for thresh in (0.3, 0.5, 0.7):
        ours = max_class_confidence(boxes, probs, thresh)
        assert torch.equal(ours, _reference_max_conf(boxes, probs, thresh))


def test_batched_confidences_equal_per_image_ones_for_different_box_counts():
    g = torch.Generator().manual_seed(1)
    boxes, probs = [], []
    for r in (12, 0, 30, 5):
        xy = torch.rand(r, 2, generator=g) * 50
        boxes.append(torch.cat([xy, xy + torch.rand(r, 2, generator=g) * 30 + 1], dim=1))
        probs.append(torch.softmax(torch.randn(r, 6, generator=g) * 2, dim=1))
    together = max_class_confidence_batch(boxes, probs, 0.3, legacy=True)
    for b, p, conf in zip(boxes, probs, together, strict=True):
        assert torch.equal(conf, max_class_confidence(b, p, 0.3, legacy=True))
        assert conf.shape == (b.shape[0],)


def test_a_box_suppressed_in_its_best_class_takes_its_best_surviving_class():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 9.0], [50.0, 50.0, 60.0, 60.0]])
    probs = torch.tensor([[0.9, 0.05], [0.8, 0.15], [0.1, 0.3]])
    conf = max_class_confidence(boxes, probs, 0.3)
    # class 0: box 0 (0.9) suppresses box 1 (IoU 0.9); class 1: box 1 (0.15) outranks box 0 and
    # survives, so box 1's confidence is 0.15, not its suppressed 0.8
    assert torch.allclose(conf, torch.tensor([0.9, 0.15, 0.3]))


def test_no_boxes_give_an_empty_confidence_vector():
    assert max_class_confidence(torch.zeros(0, 4), torch.zeros(0, 5), 0.3).shape == (0,)


def test_boxes_above_threshold_are_kept_in_proposal_order():
    conf = torch.tensor([0.1, 0.5, 0.3, 0.05, 0.9])
    keep = select_boxes(conf, conf_thresh=0.2, min_boxes=2, max_boxes=5)
    assert keep.tolist() == [1, 2, 4]


def test_fewer_than_min_boxes_above_threshold_take_the_most_confident():
    conf = torch.tensor([0.1, 0.5, 0.15, 0.05, 0.12])
    keep = select_boxes(conf, conf_thresh=0.2, min_boxes=3, max_boxes=5)
    assert keep.tolist() == [1, 2, 4]  # by confidence: 0.5, 0.15, 0.12


def test_more_than_max_boxes_keep_the_max_most_confident():
    conf = torch.tensor([0.3, 0.5, 0.4, 0.9, 0.6])
    keep = select_boxes(conf, conf_thresh=0.2, min_boxes=1, max_boxes=2)
    assert keep.tolist() == [3, 4]


def test_fixed_k_keeps_exactly_k_most_confident_boxes():
    conf = torch.tensor([0.3, 0.01, 0.4, 0.9, 0.02, 0.6])
    assert select_boxes(conf, conf_thresh=0.2, min_boxes=10, max_boxes=100, fixed_k=3).tolist() == [3, 5, 2]
    assert select_boxes(conf, conf_thresh=0.2, min_boxes=10, max_boxes=100, fixed_k=5).tolist() == [3, 5, 2, 0, 4]


def test_fewer_proposals_than_min_boxes_keep_them_all():
    conf = torch.tensor([0.01, 0.02])
    assert sorted(select_boxes(conf, conf_thresh=0.2, min_boxes=10, max_boxes=100).tolist()) == [0, 1]


def test_min_boxes_zero_allows_an_empty_selection():
    conf = torch.tensor([0.01, 0.02])
    assert select_boxes(conf, conf_thresh=0.2, min_boxes=0, max_boxes=100).numel() == 0


def test_min_boxes_above_max_boxes_is_an_error_naming_both():
    with pytest.raises(ValueError, match="min_boxes 5 is larger than max_boxes 2"):
        select_boxes(torch.ones(3), conf_thresh=0.2, min_boxes=5, max_boxes=2)


def test_legacy_iou_counts_pixels_inclusively():
    boxes = torch.tensor([[0.0, 0.0, 9.0, 9.0], [5.0, 0.0, 14.0, 9.0]])
    assert box_iou(boxes)[0, 1] == pytest.approx(36 / 126)
    assert box_iou(boxes, legacy=True)[0, 1] == pytest.approx(50 / 150)
