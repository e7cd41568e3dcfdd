"""The detector: layout and key names of the real R-101 model, anchors, box coding, batched inference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from features.detector import (
    bua_caffe_r101,
    build_detector,
    d2_r101_c4,
    pad_batch,
    prepare_image,
    resize_scale,
    tiny_config,
)
from features.detector.model import DetectorConfig, cell_anchors, decode_boxes, grid_anchors
from pipeline.params import ProposalParams


@pytest.fixture(scope="module")
def tiny():
    return build_detector(tiny_config(), seed=0)


def _img(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.RandomState(seed)
    base = rng.randint(0, 255, size=(h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8)
    return np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w]  # blocky: gives RPN structure


def _run(model, imgs, *, min_size=64, max_size=128, post=20):
    preps = [prepare_image(im, min_size=min_size, max_size=max_size, pixel_mean=model.cfg.pixel_mean)
             for im in imgs]
    batch = pad_batch([p.tensor for p in preps], model.cfg.size_divisibility)
    return model(batch, [p.size for p in preps], [p.scale for p in preps], [p.orig_hw for p in preps],
                 proposals=ProposalParams(pre_nms_top_n=500, post_nms_top_n=post))


def test_real_r101_layout_uses_bottom_up_attention_key_names_and_shapes():
    sd = build_detector(bua_caffe_r101(), seed=0).state_dict()
    expected = {
        "backbone.stem.conv1.weight": (64, 3, 7, 7),
        "backbone.stem.conv1.norm.running_var": (64,),
        "backbone.res2.0.shortcut.weight": (256, 64, 1, 1),
        "backbone.res3.0.conv1.weight": (128, 256, 1, 1),
        "backbone.res4.22.conv3.norm.bias": (1024,),
        "proposal_generator.rpn_head.conv.weight": (512, 1024, 3, 3),
        "proposal_generator.rpn_head.objectness_logits.weight": (24, 512, 1, 1),
        "proposal_generator.rpn_head.anchor_deltas.weight": (48, 512, 1, 1),
        "roi_heads.res5.0.shortcut.weight": (2048, 1024, 1, 1),
        "roi_heads.res5.2.conv2.weight": (512, 512, 3, 3),
        "roi_heads.box_predictor.cls_score.weight": (1601, 2048),
        "roi_heads.box_predictor.bbox_pred.weight": (1601 * 4, 2048),
        "roi_heads.box_predictor.cls_embed.weight": (1601, 256),
        "roi_heads.box_predictor.attr_linear1.weight": (512, 2048 + 256),
        "roi_heads.box_predictor.attr_linear2.weight": (401, 512),
    }
    for name, shape in expected.items():
        assert tuple(sd[name].shape) == shape, name
    assert "backbone.res4.23.conv1.weight" not in sd  # 23 blocks in res4
    assert not any("anchors" in k for k in sd)  # derived buffers are not checkpoint keys


def test_stride_sits_on_the_first_1x1_conv_of_downsampling_blocks():
    model = build_detector(tiny_config(), seed=0)
    blk = model.backbone.res3[0]
    assert blk.conv1.stride == (2, 2) and blk.conv2.stride == (1, 1)
    res5 = model.roi_heads.res5[0]  # bua caffe: dilation 2, no stride in res5
    assert res5.conv1.stride == (1, 1) and res5.conv2.dilation == (2, 2)
    d2 = build_detector(DetectorConfig(**{**tiny_config().__dict__, "res5_dilation": 1}), seed=0)
    assert d2.roi_heads.res5[0].conv1.stride == (2, 2)


def test_caffe_anchors_reproduce_py_faster_rcnn_generate_anchors():
    cfg = DetectorConfig(anchor_sizes=(128.0, 256.0, 512.0))  # scales 8, 16, 32 at stride 16
    # what py-faster-rcnn's generate_anchors() returns in Python (its comment shows MATLAB's, +1)
    expected = [[-84, -40, 99, 55], [-176, -88, 191, 103], [-360, -184, 375, 199],
                [-56, -56, 71, 71], [-120, -120, 135, 135], [-248, -248, 263, 263],
                [-36, -80, 51, 95], [-80, -168, 95, 183], [-168, -344, 183, 359]]
    assert torch.equal(cell_anchors(cfg), torch.tensor(expected, dtype=torch.float32))
    assert bua_caffe_r101().num_anchors == 12


def test_detectron2_anchors_are_size_major_and_centred_on_the_cell():
    cfg = d2_r101_c4()
    anchors = cell_anchors(cfg)
    assert anchors.shape == (15, 4)
    assert torch.allclose(anchors[1], torch.tensor([-16.0, -16.0, 16.0, 16.0]))  # size 32, ratio 1
    grid = grid_anchors(anchors, 2, 3, 16)
    assert grid.shape == (2 * 3 * 15, 4)
    assert torch.allclose(grid[15 + 1], torch.tensor([0.0, -16.0, 32.0, 16.0]))  # (y0, x1) cell


def test_zero_deltas_keep_boxes_except_the_caffe_plus_one_on_the_far_corner():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 80.0]])
    assert torch.allclose(decode_boxes(torch.zeros(1, 4), boxes, legacy=False), boxes)
    # py-faster-rcnn / bua decode: widths +1, x2 = ctr + w/2, so x2 and y2 grow by one pixel
    legacy = decode_boxes(torch.zeros(1, 4), boxes, legacy=True)
    assert torch.allclose(legacy, torch.tensor([[10.0, 20.0, 51.0, 81.0]]))
    moved = decode_boxes(torch.tensor([[0.5, 0.0, 0.0, 0.0]]), boxes, legacy=False)
    assert torch.allclose(moved, torch.tensor([[30.0, 20.0, 70.0, 80.0]]))


def test_resize_scale_follows_shorter_side_unless_longer_side_exceeds_max():
    assert resize_scale(480, 640, 600, 1000) == pytest.approx(1.25)
    assert resize_scale(300, 1000, 600, 1000) == pytest.approx(1.0)
    assert resize_scale(1, 1, 600, 1000) == pytest.approx(600.0)


def test_prepare_image_is_bgr_minus_means_at_the_resized_size():
    rgb = np.zeros((10, 20, 3), dtype=np.uint8)
    rgb[..., 0] = 200  # red
    p = prepare_image(rgb, min_size=20, max_size=100, pixel_mean=(1.0, 2.0, 3.0))
    assert p.size == (20, 40) and p.scale == pytest.approx(2.0) and p.orig_hw == (10, 20)
    assert torch.allclose(p.tensor[:, 5, 5], torch.tensor([-1.0, -2.0, 197.0]))


def test_detections_have_one_row_per_proposal_in_original_pixels(tiny):
    imgs = [_img(96, 128, 0), _img(70, 50, 1)]
    dets = _run(tiny, imgs)
    assert len(dets) == 2
    for det, im in zip(dets, imgs, strict=True):
        r = det.boxes.shape[0]
        assert 0 < r <= 20
        assert det.features.shape == (r, tiny.cfg.res5_channels)
        assert det.cls_probs.shape == (r, 11) and det.attr_probs.shape == (r, 7)
        assert torch.allclose(det.cls_probs.sum(1), torch.ones(r), atol=1e-5)
        assert det.image_hw == im.shape[:2]
        h, w = im.shape[:2]
        assert float(det.boxes[:, 0::2].max()) <= w and float(det.boxes[:, 1::2].max()) <= h
        assert float(det.boxes.min()) >= 0


def test_proposal_counts_come_only_from_the_stage_parameters(tiny):
    """One place holds them: RoisParams (the manifest's keys) -> ProposalParams -> forward,
    which has no default of its own (a call without them is an error, not 6000/300)."""
    import dataclasses as dc

    from pipeline.params import RoisParams

    assert all(f.default is dc.MISSING for f in dc.fields(ProposalParams))
    assert RoisParams(rpn_pre_nms_top_n=700, rpn_post_nms_top_n=9).proposals == ProposalParams(700, 9)
    p = prepare_image(_img(96, 128, 0), min_size=64, max_size=128, pixel_mean=tiny.cfg.pixel_mean)
    batch = pad_batch([p.tensor], tiny.cfg.size_divisibility)
    with pytest.raises(TypeError, match="proposals"):
        tiny(batch, [p.size], [p.scale], [p.orig_hw])
    # the count reaches the proposal selection: at most post_nms_top_n boxes per image
    few = tiny(batch, [p.size], [p.scale], [p.orig_hw], proposals=RoisParams(rpn_post_nms_top_n=3).proposals)
    many = tiny(batch, [p.size], [p.scale], [p.orig_hw], proposals=RoisParams(rpn_post_nms_top_n=40).proposals)
    assert few[0].boxes.shape[0] == 3 < many[0].boxes.shape[0]
    assert torch.equal(few[0].boxes, many[0].boxes[:3])  # the same top proposals, in score order


@pytest.mark.parametrize("sizes", [[(64, 96)] * 3, [(64, 96), (90, 60), (37, 130)]])
def test_batched_inference_equals_one_image_at_a_time(tiny, sizes):
    """Padding is masked layer by layer, so a batch computes what each image alone would."""
    imgs = [_img(h, w, i) for i, (h, w) in enumerate(sizes)]
    together = _run(tiny, imgs)
    for im, det in zip(imgs, together, strict=True):
        alone = _run(tiny, [im])[0]
        assert torch.allclose(alone.boxes, det.boxes, atol=1e-4)
        assert torch.allclose(alone.features, det.features, atol=1e-4)
        assert torch.allclose(alone.attr_probs, det.attr_probs, atol=1e-5)


def test_padding_to_a_multiple_of_32_does_not_change_a_single_image_result(tiny):
    unpadded = build_detector(DetectorConfig(**{**tiny_config().__dict__, "size_divisibility": 0}), seed=0)
    im = _img(50, 75, 9)
    a = _run(tiny, [im], min_size=70, max_size=200)[0]  # 70x105 padded to 96x128
    b = _run(unpadded, [im], min_size=70, max_size=200)[0]
    assert torch.allclose(a.boxes, b.boxes, atol=1e-4) and torch.allclose(a.features, b.features, atol=1e-4)


def test_given_boxes_reproduce_the_features_of_the_same_proposals(tiny):
    imgs = [_img(64, 96, 7), _img(64, 96, 8)]
    dets = _run(tiny, imgs)
    preps = [prepare_image(im, min_size=64, max_size=128, pixel_mean=tiny.cfg.pixel_mean) for im in imgs]
    batch = pad_batch([p.tensor for p in preps], 32)
    again = tiny.forward_boxes(batch, [p.scale for p in preps], [p.orig_hw for p in preps],
                               [d.boxes for d in dets])
    for a, b in zip(dets, again, strict=True):
        assert torch.allclose(a.features, b.features, atol=1e-4)
        assert torch.allclose(a.cls_probs, b.cls_probs, atol=1e-5)


def test_random_init_weights_depend_only_on_the_seed():
    a = build_detector(tiny_config(), seed=5).state_dict()
    b = build_detector(tiny_config(), seed=5).state_dict()
    c = build_detector(tiny_config(), seed=6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_all_roi_poolers_produce_features(tiny):
    for pooler in ("roipool", "roialign", "roialignv2"):
        cfg = DetectorConfig(**{**tiny_config().__dict__, "pooler": pooler})
        model = build_detector(cfg, seed=0)
        det = _run(model, [_img(64, 64, 5)])[0]
        assert torch.isfinite(det.features).all() and det.features.shape[0] > 0


def test_matches_detectron2_r101_c4_backbone_and_box_head_when_detectron2_is_installed():
    """Parity with detectron2 itself (absent here: not installable, see ENVIRONMENT.md)."""
    d2 = pytest.importorskip("detectron2", reason="detectron2 is not installed (no installable release)")
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_101_C4_3x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    ref = build_model(cfg).eval()
    ours = build_detector(d2_r101_c4(num_classes=81), seed=0)
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if k in ours.state_dict()}, strict=True)
    x = torch.randn(1, 3, 96, 128) * 50
    with torch.no_grad():
        f_ref = ref.backbone(x)["res4"]
        f_ours, _ = ours.backbone(x)
        assert torch.allclose(f_ref, f_ours, atol=1e-4)
        boxes = torch.tensor([[4.0, 8.0, 60.0, 90.0], [30.0, 10.0, 120.0, 70.0]])
        pooled_ref = ref.roi_heads._shared_roi_transform([f_ref], [Boxes(boxes)]).mean(dim=(2, 3))
        rois = torch.cat([torch.zeros(2, 1), boxes], dim=1)
        pooled, logits, _, _ = ours.roi_heads(f_ours, rois)
        assert torch.allclose(pooled_ref, pooled, atol=1e-4)
        assert torch.allclose(ref.roi_heads.box_predictor(pooled_ref)[0], logits, atol=1e-4)
    assert d2.__version__
