"""Checkpoint loading: both key-name families round-trip exactly; bad files fail by name; no arbitrary unpickling."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from features.detector import build_detector, load_into, pad_batch, prepare_image, tiny_config, verify_weights
from features.detector.checkpoint import caffe2_to_d2, read_checkpoint, safe_unpickle
from pipeline.errors import ResourceError, StageError
from pipeline.params import ProposalParams
from pipeline.stage import is_random_init


@pytest.fixture(scope="module")
def source():
    return build_detector(tiny_config(), seed=11)


@pytest.fixture(scope="module")
def probe():
    rng = np.random.RandomState(0)
    rgb = np.kron(rng.randint(0, 255, (9, 12, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    p = prepare_image(rgb, min_size=64, max_size=128, pixel_mean=tiny_config().pixel_mean)
    return pad_batch([p.tensor], 32), [p.size], [p.scale], [p.orig_hw]


class _TrainerState:
    """An arbitrary class instance: what a weights-only load must refuse."""


def _outputs(model, probe):
    batch, sizes, scales, orig = probe
    det = model(batch, sizes, scales, orig, proposals=ProposalParams(pre_nms_top_n=300, post_nms_top_n=15))[0]
    return det.boxes, det.features, det.cls_probs, det.attr_probs


def _assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_bua_pth_checkpoint_loads_with_zero_unmatched_keys_and_identical_outputs(tmp_path, source, probe):
    path = tmp_path / "bua-caffe-frcn-r101_with_attributes.pth"
    sd = source.state_dict()
    sd["backbone.res2.0.conv1.norm.num_batches_tracked"] = torch.tensor(7)  # BN bookkeeping, ignored
    torch.save({"model": sd}, path)
    fresh = build_detector(tiny_config(), seed=99)
    report = load_into(fresh, path)
    assert report.ok and not report.unexpected and not report.missing and not report.mis_shaped
    assert len(report.loaded) == len(source.state_dict())
    _assert_same(_outputs(source, probe), _outputs(fresh, probe))


def test_d2_pkl_of_numpy_arrays_loads_with_identical_outputs(tmp_path, source, probe):
    path = tmp_path / "model_final.pkl"
    blob = {"model": {k: v.numpy() for k, v in source.state_dict().items()}, "__author__": "test"}
    for protocol in (2, 4, 5):  # py2-era model zoo files use 2; numpy uses _frombuffer from 5 on
        path.write_bytes(pickle.dumps(blob, protocol=protocol))
        fresh = build_detector(tiny_config(), seed=98)
        report = load_into(fresh, path)
        assert report.ok and len(report.loaded) == len(source.state_dict())
        _assert_same(_outputs(source, probe), _outputs(fresh, probe))


def test_missing_batch_norm_statistics_default_to_identity(tmp_path, probe):
    src = build_detector(tiny_config(), seed=3)
    for name, buf in src.named_buffers():  # make the statistics the defaults a c2 checkpoint implies
        if name.endswith("running_mean"):
            buf.zero_()
        elif name.endswith("running_var"):
            buf.fill_(1.0 - 1e-5)
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith(("running_mean", "running_var"))}
    path = tmp_path / "affine_bn.pth"
    torch.save(sd, path)
    fresh = build_detector(tiny_config(), seed=4)
    report = load_into(fresh, path)
    assert report.defaulted and report.ok
    _assert_same(_outputs(src, probe), _outputs(fresh, probe))


def test_mis_shaped_extra_and_missing_keys_are_reported_by_name(tmp_path, source):
    sd = dict(source.state_dict())
    sd["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(5, 3)
    sd["roi_heads.mask_head.predictor.weight"] = torch.zeros(2)
    del sd["proposal_generator.rpn_head.conv.bias"]
    path = tmp_path / "bad.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(StageError) as e:
        load_into(build_detector(tiny_config(), seed=0), path)
    msg = str(e.value)
    assert "roi_heads.box_predictor.cls_score.weight: checkpoint (5, 3) vs model (11, 256)" in msg
    assert "roi_heads.mask_head.predictor.weight" in msg
    assert "proposal_generator.rpn_head.conv.bias" in msg
    assert str(path) in msg


def test_pickle_with_a_malicious_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"x": Evil()}}))
    with pytest.raises(ResourceError, match=r"refusing to unpickle global (posix|os|nt)\.system"):
        read_checkpoint(path)
    assert not marker.exists()
    with pytest.raises(ResourceError, match="builtins.eval"):
        safe_unpickle(b"cbuiltins\neval\n(S'1+1'\ntR.")


def test_pth_holding_arbitrary_objects_is_refused_by_weights_only_load(tmp_path):
    path = tmp_path / "objects.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "cfg": _TrainerState()}, path)
    with pytest.raises(ResourceError, match="weights-only"):
        read_checkpoint(path)


def test_caffe2_blob_names_translate_to_detectron2_names():
    assert caffe2_to_d2("res2_0_branch2a_w") == "backbone.res2.0.conv1.weight"
    assert caffe2_to_d2("res4_22_branch2c_bn_s") == "backbone.res4.22.conv3.norm.weight"
    assert caffe2_to_d2("res3_0_branch1_bn_b") == "backbone.res3.0.shortcut.norm.bias"
    assert caffe2_to_d2("res5_2_branch2b_w") == "roi_heads.res5.2.conv2.weight"
    assert caffe2_to_d2("res_conv1_bn_s") == "backbone.stem.conv1.norm.weight"
    assert caffe2_to_d2("rpn_cls_logits_w") == "proposal_generator.rpn_head.objectness_logits.weight"
    assert caffe2_to_d2("backbone.res2.0.conv1.weight") == "backbone.res2.0.conv1.weight"


def test_weights_file_missing_or_with_wrong_sha256_is_a_resource_error(tmp_path):
    with pytest.raises(ResourceError, match="not found"):
        verify_weights(tmp_path / "nope.pth", None, name="bua-r101-c4")
    with pytest.raises(ResourceError, match="no weights path declared"):
        verify_weights(None, None, name="bua-r101-c4")
    f = tmp_path / "w.pth"
    f.write_bytes(b"weights")
    good = verify_weights(f, None)
    assert verify_weights(f, good.upper()) == good
    with pytest.raises(ResourceError) as e:
        verify_weights(f, "0" * 64, name="bua-r101-c4")
    assert good in str(e.value) and "0" * 64 in str(e.value)


def test_is_random_init_reads_fingerprints_and_params():
    assert is_random_init("random-init-0123456789abcdef")
    assert not is_random_init("0123456789abcdef")
    assert is_random_init({"random_init": True}) and not is_random_init({"random_init": False})
