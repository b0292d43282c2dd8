"""The architecture study's models: build, forward, backward; CBAM keeps shapes, maps in [0,1]."""
import pytest
import torch

from titan.models.archs import EffNetB3FPNCBAM, build_arch_backbone, load_imagenet_weights, parse_arch
from titan.models.cbam import CBAM
from titan.models.heads import build_head


@pytest.mark.parametrize("arch", ["titan-atto", "titan-v38", "mobilenetv2", "effnet-b3-fpn-cbam"])
def test_arch_forward_and_backward_at_128(arch):
    spec = parse_arch(arch)
    body = build_arch_backbone(arch)
    head = build_head(spec.head, body.num_features)
    x = torch.rand(2, 3, 128, 128)
    logit = head(body(x))
    assert logit.shape == (2,) and torch.isfinite(logit).all()
    logit.sum().backward()
    grads = [p.grad for p in body.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads[:5] + grads[-5:])


def test_cbam_keeps_shape_and_attention_maps_lie_in_unit_interval():
    cbam = CBAM(32, reduction=8)
    x = torch.randn(3, 32, 10, 12) * 5
    y = cbam(x)
    assert y.shape == x.shape
    mc = cbam.channel(x)
    ms = cbam.spatial(x * mc)
    assert mc.shape == (3, 32, 1, 1) and ms.shape == (3, 1, 10, 12)
    for m in (mc, ms):
        assert (m >= 0).all() and (m <= 1).all()
    assert (y.abs() <= x.abs() + 1e-6).all()  # attention only rescales by factors in [0,1]


def test_ssl_applies_to_titan_only():
    assert parse_arch("titan-v42").ssl and not parse_arch("mobilenetv2").ssl
    assert parse_arch("titan-v38").head == "arcface"
    with pytest.raises(ValueError, match="unknown arch"):
        parse_arch("resnet50")


def test_local_imagenet_weights_load_into_features(tmp_path):
    from torchvision import models

    ref = models.efficientnet_b3(weights=None)
    torch.save(ref.state_dict(), tmp_path / "b3.pth")
    body = EffNetB3FPNCBAM()
    left = load_imagenet_weights(body, tmp_path / "b3.pth")
    assert torch.equal(body.features[0][0].weight, ref.features[0][0].weight)
    assert any(k.startswith("fpn.") for k in left) and not any(k.startswith("features.") for k in left)
