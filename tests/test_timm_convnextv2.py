"""timm ConvNeXt V2 checkpoints as --init-weights: mapped block by block onto TitanNet's backbone."""
from __future__ import annotations

import pytest
import torch

from _single_thread import single_thread  # noqa: F401  (autouse fixture)
from titan.checkpoints import CheckpointError
from titan.models.archs import load_init_weights, parse_arch
from titan.models.convnextv2 import build_backbone
from titan.models.timm_convnextv2 import TIMM_MEAN, TIMM_STD

timm = pytest.importorskip("timm")  # test-only dependency (requirements-dev.txt)


def _timm_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False).eval()
    with torch.no_grad():  # GRN and norms start at 0/1: randomise them so every mapped key matters
        for k, p in m.named_parameters():
            if "grn" in k or "norm" in k or k.startswith(("stem.1", "stages.1.downsample.0")):
                p.add_(torch.randn_like(p) * 0.2)
    return m


def _timm_pooled(m: torch.nn.Module, x01: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(TIMM_MEAN).view(1, 3, 1, 1), torch.tensor(TIMM_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return m.forward_head(m.forward_features((x01 - mean) / std), pre_logits=True)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_convnextv2_weights_give_our_backbone_timms_pooled_features_on_the_same_image(tmp_path, suffix):
    m = _timm_model("convnextv2_atto")
    path = tmp_path / f"convnextv2_atto{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": m.state_dict()}, path)
    else:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    ours = build_backbone("atto").eval()
    line = load_init_weights(ours, parse_arch("titan-atto"), path)
    assert "timm ConvNeXt V2" in line and "FFT/SRM input weights start at zero" in line
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        got = ours(x)
    want = _timm_pooled(m, x)
    assert got.shape == want.shape == (2, 320)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    stem = ours.downsamples[0][0].weight
    assert stem[:, 3:].abs().max() == 0 and stem[:, :3].abs().max() > 0  # FFT/SRM start at zero


def test_an_fcmae_checkpoint_without_head_norm_loads_with_a_note(tmp_path):
    sd = {k: v for k, v in _timm_model("convnextv2_atto").state_dict().items() if not k.startswith("head.")}
    torch.save(sd, tmp_path / "fcmae.pth")
    line = load_init_weights(build_backbone("atto"), parse_arch("titan-atto"), tmp_path / "fcmae.pth")
    assert "no head.norm in the file" in line


def test_a_timm_checkpoint_of_another_size_is_refused_naming_the_keys(tmp_path):
    torch.save(_timm_model("convnextv2_femto").state_dict(), tmp_path / "femto.pth")
    with pytest.raises(CheckpointError) as e:
        load_init_weights(build_backbone("atto"), parse_arch("titan-atto"), tmp_path / "femto.pth")
    msg = str(e.value)
    assert "femto.pth" in msg and "another size" in msg
    assert "stem.0.weight (48, 3, 4, 4) → downsamples.0.0.weight (40, 9, 4, 4)" in msg
