"""The NPR input (Tan et al., CVPR 2024) beside the RGB and 9-channel inputs: values, shapes,
every backbone that takes it, the fold record that lets inference rebuild it, a tiny run."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from _single_thread import single_thread  # noqa: F401  (autouse fixture)
from titan.checkpoints import load_file, save_atomic, save_checkpoint
from titan.config import TrainConfig
from titan.infer.folds import FoldSet
from titan.models.archs import arch_input, build_arch_backbone, default_start, parse_arch
from titan.models.convnextv2 import build_backbone
from titan.models.frequency import INPUTS, NPR_SCALE, FrequencyInput, NPRInput, RGBInput, build_input, npr
from titan.models.heads import build_head
from titan.models.simmim import SimMIM

CHANNELS = {"rgb": 3, "rgb+fft+srm": 9, "npr": 3, "rgb+npr": 6}


def paper_npr(x: torch.Tensor) -> torch.Tensor:
    """NPR as the paper's code writes it (even sizes): x − up×2(down×½(x)), nearest both ways."""
    down = F.interpolate(x, scale_factor=0.5, mode="nearest", recompute_scale_factor=True)
    return x - F.interpolate(down, scale_factor=2.0, mode="nearest", recompute_scale_factor=True)


@pytest.mark.parametrize("h,w", [(8, 8), (16, 10), (7, 7), (9, 12), (1, 5)])
def test_npr_keeps_the_image_shape_for_odd_and_even_sizes(h, w):
    x = torch.rand(2, 3, h, w)
    r = npr(x)
    assert r.shape == (2, 3, h, w)
    # odd sizes: as if padded by replication to even size, then cropped back
    padded = F.pad(x, (0, w % 2, 0, h % 2), mode="replicate") if (h % 2 or w % 2) and min(h, w) > 1 else x
    if padded.shape[-2] % 2 == 0 and padded.shape[-1] % 2 == 0:
        assert torch.allclose(r, paper_npr(padded)[..., :h, :w])
    assert NPRInput()(x).shape == (2, 3, h, w) and NPRInput(with_rgb=True)(x).shape == (2, 6, h, w)


def test_npr_is_the_papers_residual_on_even_sizes():
    x = torch.rand(3, 3, 32, 24)
    assert torch.equal(npr(x), paper_npr(x))


@pytest.mark.parametrize("h,w", [(16, 16), (15, 13)])
def test_npr_is_zero_on_an_image_constant_on_2x2_blocks(h, w):
    blocks = torch.rand(2, 3, (h + 1) // 2, (w + 1) // 2)
    x = blocks.repeat_interleave(2, -2).repeat_interleave(2, -1)[..., :h, :w]
    assert npr(x).abs().max() == 0
    # and not on one that varies inside a block: a pixel checkerboard differs from its anchor
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    board = ((yy + xx) % 2).float().expand(1, 3, h, w)
    assert npr(board)[..., 0, 1].eq(1).all() and npr(board)[..., 1, 1].eq(0).all()


def test_npr_input_is_scaled_and_rgb_npr_puts_the_normalised_rgb_first():
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(NPRInput()(x), npr(x) * NPR_SCALE)
    six = NPRInput(with_rgb=True)(x)
    assert torch.allclose(six[:, :3], (x - 0.5) / 0.5) and torch.allclose(six[:, 3:], npr(x) * NPR_SCALE)
    assert torch.allclose(RGBInput()(x), (x - 0.5) / 0.5)
    assert torch.allclose(FrequencyInput()(x)[:, :3], RGBInput()(x))  # one RGB for every input


def test_every_input_name_builds_with_its_channel_count_and_unknown_ones_are_refused():
    assert {n: build_input(n).out_chans for n in INPUTS} == CHANNELS
    with pytest.raises(ValueError, match="unknown input 'dct'"):
        build_input("dct")


def test_the_config_offers_default_and_exactly_the_models_inputs():
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == "input")
    assert field.default == "default" and field.metadata["choices"] == ("default", *INPUTS)


@pytest.mark.parametrize("arch,size", [("titan-atto", 64), ("efficientnet-lite0", 64)])
@pytest.mark.parametrize("choice", ["default", "rgb", "rgb+fft+srm", "npr", "rgb+npr"])
def test_each_input_choice_builds_the_backbone_and_runs_a_forward_pass(arch, size, choice):
    body = build_arch_backbone(arch, img_size=size, input_choice=choice).eval()
    name = arch_input(parse_arch(arch), choice)
    assert body.input_name == name and body.preproc.out_chans == CHANNELS[name]
    stem = body.downsamples[0][0] if arch.startswith("titan") else body.net._conv_stem
    assert stem.in_channels == CHANNELS[name]
    with torch.no_grad():
        out = body(torch.rand(2, 3, size, size))
    assert out.shape == (2, body.num_features) and torch.isfinite(out).all()


def test_the_default_input_is_each_archs_own():
    assert arch_input(parse_arch("titan-v42")) == "rgb+fft+srm"
    assert arch_input(parse_arch("efficientnet-lite0")) == "rgb"
    assert arch_input(parse_arch("efficientnet-lite0-9ch")) == "rgb+fft+srm"
    assert arch_input(parse_arch("mobilenetv2")) == "imagenet-rgb"


@pytest.mark.parametrize("arch", ["mobilenetv2", "effnet-b3-fpn-cbam", "efficientnet-lite0-9ch"])
def test_an_input_is_refused_where_the_arch_takes_its_own_only(arch):
    with pytest.raises(ValueError, match=rf"--input npr: {arch} takes its own input .* TitanNet .* efficientnet-lite0"):
        arch_input(parse_arch(arch), "npr")


def test_lite0_with_rgb_npr_starts_as_the_imagenet_rgb_model():
    x = torch.rand(2, 3, 64, 64)
    rgb, six = (build_arch_backbone("efficientnet-lite0", img_size=64, input_choice=c).eval() for c in ("rgb", "rgb+npr"))
    for body in (rgb, six):
        default_start(body, parse_arch("efficientnet-lite0"))
    assert six.net._conv_stem.weight[:, 3:].abs().max() == 0  # the NPR channels start silent
    with torch.no_grad():
        assert torch.allclose(rgb(x), six(x), atol=1e-5)


def test_simmim_reconstructs_whichever_input_the_backbone_takes():
    model = SimMIM(build_backbone("atto", input_name="npr"), patch_size=32)
    loss, rec, mask = model(torch.rand(2, 3, 64, 64))
    assert rec.shape == (2, 3, 64, 64) and torch.isfinite(loss)


def _write_fold(folder: Path, input_name: str, meta_input: str | None) -> None:
    """One TitanNet fold as fine-tuning writes it; ``meta_input`` None: a fold from before ``--input``."""
    bb, head = build_backbone("atto", input_name=input_name), build_head("linear", 320)
    extra = {} if meta_input is None else {"input": meta_input}
    save_checkpoint(bb.state_dict(), folder / "v42_backbone_fold0.pth", arch="titan-atto", variant="atto",
                    head="linear", img_size=64, **extra)
    save_checkpoint(head.state_dict(), folder / "v42_head_fold0.pth", arch="titan-atto", variant="atto", head="linear")
    save_atomic({"th": 0.5, "arch": "titan-atto", "variant": "atto", "head": "linear", "img_size": 64, **extra},
                folder / "v42_meta_fold0.pth")


def test_a_fold_loads_with_the_input_it_records_and_one_that_records_none_with_the_old_input(tmp_path):
    (tmp_path / "npr").mkdir()
    _write_fold(tmp_path / "npr", "npr", "npr")
    fold = FoldSet.from_folder(tmp_path / "npr").folds[0]
    assert isinstance(fold.model.backbone.preproc, NPRInput) and fold.meta["input"] == "npr"
    (tmp_path / "old").mkdir()
    _write_fold(tmp_path / "old", "rgb+fft+srm", None)  # written before --input existed
    fold = FoldSet.from_folder(tmp_path / "old").folds[0]
    assert isinstance(fold.model.backbone.preproc, FrequencyInput) and fold.meta["input"] == "rgb+fft+srm"


def test_an_npr_fold_without_its_record_is_refused_not_run_on_the_wrong_input(tmp_path):
    _write_fold(tmp_path, "npr", None)
    with pytest.raises(Exception, match="v42_backbone_fold0.pth") as e:
        FoldSet.from_folder(tmp_path)
    assert "downsamples.0.0.weight" in str(e.value)


# --- a tiny training run: --preset tiny --input npr, on labels with groups ---------------------------

def test_a_tiny_npr_run_on_grouped_labels_records_its_input_and_its_folds_score_with_it(tmp_path):
    from test_train_pipeline import cli_args, make_faces

    import train_v42_diamond
    from titan.infer.resilient import ImagesToScore, score_images
    from titan.data.images import ImageIndex

    data = make_faces(tmp_path)
    labels = pd.read_csv(data / "train_diamond.csv", dtype={"Id": str})
    labels["group"] = [f"person{int(i) // 4}" if not p else "" for i, p in zip(labels.Id, labels.is_pseudo)]
    labels.to_csv(data / "train_diamond.csv", index=False)
    assert train_v42_diamond.main(cli_args(data, "run", "--n-folds", "2", "--input", "npr")) == 0
    run = data / "run"

    log = (run / "training_v42_log.txt").read_text()
    assert "fold 0 6 real / 6 fake / 3 groups, fold 1 6 real / 6 fake / 3 groups" in log
    oof = pd.read_csv(run / "oof_v42.csv", dtype={"Id": str}).merge(labels[["Id", "group"]], on="Id")
    assert not set(oof.group[oof.fold == 0]) & set(oof.group[oof.fold == 1])  # OOF rows: unseen groups only
    for k in range(2):
        assert load_file(run / f"v42_meta_fold{k}.pth")["input"] == "npr"
        assert load_file(run / f"v42_backbone_fold{k}.pth")["meta"]["input"] == "npr"
    assert load_file(run / "titan_v42_ssl.pth")["meta"]["input"] == "npr"
    assert json.loads((run / "config_v42.json").read_text())["input"] == "npr"

    fs = FoldSet.from_folder(run, "v42")
    assert all(isinstance(f.model.backbone.preproc, NPRInput) for f in fs.folds)
    pred = pd.read_csv(run / "predictions_v42.csv", dtype={"Id": str})
    assert np.isfinite(pred.prob).all()
    crops = ImageIndex(data / "faces" / "test")
    again = score_images(fs.folds, ImagesToScore(pred.Id.tolist(), crops, 64), 16, "cpu", ["identity", "hflip"],
                         False, 0, False)
    assert np.allclose(1 / (1 + np.exp(-again.logits[0].astype(np.float64))), pred.fold0, atol=1e-4)
