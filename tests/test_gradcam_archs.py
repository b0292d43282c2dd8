"""Grad-CAM for every registered architecture: the layer comes from the registry entry (a module
name, or a function, plus a reshape hook for token outputs), and the reports that call Grad-CAM
(plot_training_curves.py --explain, detect.py --heatmaps) show heatmaps for the demo's
EfficientNet-Lite0 folds."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn
from torchvision.models.vision_transformer import VisionTransformer

import detect
import plot_training_curves
from _single_thread import single_thread  # noqa: F401  (autouse fixture)
from fake_run import make_fake_run, real_photos
from titan.checkpoints import save_checkpoint
from titan.data.images import square_resize
from titan.models.archs import BASELINES, Arch, CamLayer, build_arch_backbone, parse_arch, registered_archs, tokens_to_grid
from titan.models.classifier import FoldModel
from titan.models.heads import build_head
from titan.report.gradcam import gradcam, signed_cam

SIZE = 64  # a 2×2 last map at stride 32: the smallest size every architecture runs at
DEMO_ARCH = "efficientnet-lite0"


def _photo(name: str = "astronaut", size: int = SIZE) -> torch.Tensor:
    img = square_resize(real_photos()[name], size)
    return torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0


def _fold(arch: str, seed: int = 0, size: int = SIZE) -> FoldModel:
    torch.manual_seed(seed)
    body = build_arch_backbone(arch, img_size=size)
    return FoldModel(body, build_head(parse_arch(arch).head, body.num_features)).eval()


def _check_cams(arch: str, folds: list[FoldModel], x: torch.Tensor) -> None:
    s, logit = signed_cam(folds[0], x, parse_arch(arch).cam)
    assert s.ndim == 3 and s.shape[0] == x.shape[0] and torch.isfinite(s).all()
    assert s.abs().amax() > 0, f"{arch}: the signed map is all zero"
    assert torch.allclose(logit, folds[0](x), atol=1e-4), f"{arch}: the hooked pass is not the model's own"
    # one of the two classes has positive evidence somewhere; each heatmap is finite, in [0,1], input-sized
    maps = [gradcam(folds, x, torch.tensor([fake] * x.shape[0]), arch=arch)[0] for fake in (True, False)]
    for cam in maps:
        assert cam.shape == (x.shape[0], *x.shape[-2:]) and torch.isfinite(cam).all()
        assert cam.min() >= 0 and cam.max() <= 1
    assert max(float(c.max()) for c in maps) == pytest.approx(1.0)


@pytest.mark.parametrize("arch", registered_archs())
def test_every_registered_architecture_has_a_non_empty_gradcam(arch):
    assert isinstance(parse_arch(arch).cam, CamLayer), f"{arch}: its registry entry names no Grad-CAM layer"
    _check_cams(arch, [_fold(arch, 0), _fold(arch, 1)], _photo())


def test_titan_layer_is_the_last_stage_map_the_old_gradcam_read():
    """The registry's ``stages.3`` hook gives exactly what ``forward_maps`` gave before the registry."""
    fold, x = _fold("titan-atto"), _photo("chelsea")
    s, _ = signed_cam(fold, x, parse_arch("titan-atto").cam)
    bb = fold.backbone
    with torch.enable_grad():
        fmap = bb.forward_maps(bb.preproc(x))
        (grad,) = torch.autograd.grad(fold.head(bb.pool(fmap)).sum(), fmap)
    assert torch.allclose(s, (grad.mean((2, 3), keepdim=True) * fmap).sum(1).detach(), atol=1e-5)


def test_lite0_layer_is_the_head_activation_not_the_stem():
    """``net._swish`` runs after the stem and after the head conv: the map read is the head's."""
    fold = _fold(DEMO_ARCH)
    s, _ = signed_cam(fold, _photo(), parse_arch(DEMO_ARCH).cam)
    with torch.no_grad():
        feats = fold.backbone.net.extract_features((_photo() - 0.5) / 0.5)
    assert s.shape == (1, *feats.shape[-2:]) and feats.shape[1] == 1280


# --- a ViT: the last block's tokens, CLS dropped, on the patch grid ----------------------------------

class TinyViT(nn.Module):
    """A 2-block ViT body (torchvision's): [0,1] RGB → the CLS token's features."""

    def __init__(self, img_size: int = 32, patch: int = 8) -> None:
        super().__init__()
        self.vit = VisionTransformer(img_size, patch, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
        self.vit.heads = nn.Identity()
        self.num_features = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit((x - 0.5) / 0.5)


@pytest.fixture
def tiny_vit(monkeypatch):
    """A registry entry the way a CLIP ViT's is written: a function returning the last block's first
    norm (the tokens entering it; CLIP: ``resblocks[-1].ln_1``), and ``tokens_to_grid`` as the reshape hook."""
    entry = Arch("tiny-vit", "linear", False, CamLayer(lambda body: body.vit.encoder.layers[-1].ln_1, tokens_to_grid))
    monkeypatch.setitem(BASELINES, "tiny-vit", entry)
    torch.manual_seed(0)
    return [FoldModel(TinyViT(), build_head("linear", 32)).eval() for _ in range(2)]


def test_vit_gradcam_reads_the_last_blocks_patch_tokens_on_the_grid(tiny_vit):
    x = _photo("astronaut", 32)
    s, _ = signed_cam(tiny_vit[0], x, parse_arch("tiny-vit").cam)
    assert s.shape == (1, 4, 4)  # 32 px / 8 px patches; the CLS token is not a cell
    _check_cams("tiny-vit", tiny_vit, x)


def test_tokens_to_grid_drops_cls_and_keeps_row_major_patch_order():
    b, g, c = 2, 3, 5
    tokens = torch.randn(b, 1 + g * g, c)
    grid = tokens_to_grid(tokens)
    assert grid.shape == (b, c, g, g)
    assert torch.equal(grid[:, :, 1, 2], tokens[:, 1 + 1 * g + 2])
    with pytest.raises(ValueError, match="square patch grid"):
        tokens_to_grid(torch.randn(1, 1 + 6, 4))
    with pytest.raises(ValueError, match="expects"):
        tokens_to_grid(torch.randn(4, 4))


def test_a_wrong_registry_entry_fails_with_a_message_naming_the_fix(tiny_vit):
    fold, x = _fold("titan-atto"), _photo()
    with pytest.raises(ValueError, match="not a module of ConvNeXtV2.*registry entry"):
        signed_cam(fold, x, CamLayer("stages.9"))
    fold.backbone.spare = nn.Identity()  # a module the forward pass never calls
    with pytest.raises(ValueError, match="never ran.*registry entry"):
        signed_cam(fold, x, CamLayer("spare"))
    vit, x32 = tiny_vit[0], _photo("astronaut", 32)
    with pytest.raises(ValueError, match=r"not a \(B,C,h,w\) map.*tokens_to_grid"):
        signed_cam(vit, x32, CamLayer("vit.encoder.layers.encoder_layer_1.ln_1"))
    # the last block's output: a CLS-token head never reads its patch tokens, so no gradient reaches them
    with pytest.raises(ValueError, match="zero gradient.*first norm"):
        signed_cam(vit, x32, CamLayer("vit.encoder.layers.encoder_layer_1", tokens_to_grid))


# --- the reports that call Grad-CAM, on the demo architecture ------------------------------------

@pytest.fixture(scope="module")
def lite0_run(tmp_path_factory) -> Path:
    """A run folder (log, OOF, predictions, test faces) whose two folds are EfficientNet-Lite0."""
    root = make_fake_run(tmp_path_factory.mktemp("lite0_run"), weights=False)
    for k in range(2):
        fold = _fold(DEMO_ARCH, 100 + k)
        meta = dict(arch=DEMO_ARCH, head="linear", img_size=SIZE, epoch=2, th=0.43)
        save_checkpoint(fold.backbone, root / f"v42_backbone_fold{k}.pth", **meta)
        save_checkpoint(fold.head, root / f"v42_head_fold{k}.pth", **meta)
    return root


def test_plot_training_curves_explains_lite0_folds_with_a_gallery(lite0_run, tmp_path):
    out = tmp_path / "plots"
    rc = plot_training_curves.main([str(lite0_run), "--out", str(out), "--explain", "3", "--weights-dir", str(lite0_run),
                                    "--test-dir", str(lite0_run / "faces" / "test")])
    assert rc == 0
    png = out / "gradcam.png"
    assert png.is_file() and png.stat().st_size > 1000 and "](gradcam.png)" in (out / "report.md").read_text()


def test_detect_writes_lite0_heatmaps_and_embeds_them_in_the_page(lite0_run, tmp_path, capsys):
    photo = cv2.resize(real_photos()["astronaut"], (160, 160), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(tmp_path / "astro.png"), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
    rc = detect.main([str(tmp_path / "astro.png"), "--weights-dir", str(lite0_run), "--heatmaps", str(tmp_path / "hm"),
                      "--html", str(tmp_path / "r.html"), "--out", str(tmp_path / "d.jsonl"), "--no-progress",
                      "--device", "cpu", "--workers", "0"])
    assert rc == 0
    assert "no heatmaps" not in capsys.readouterr().err
    pngs = sorted((tmp_path / "hm").iterdir())
    assert pngs, "no heatmap written for the lite0 folds"
    heat = cv2.imread(str(pngs[0]))
    assert heat is not None and heat.shape[:2] == (SIZE, SIZE) and heat.std() > 1
    assert 'class="cam"' in (tmp_path / "r.html").read_text()
    rows = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert rows[-1]["status"] in ("ok", "no_face") and np.isfinite(rows[-1]["prob"])
