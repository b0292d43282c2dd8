"""--tune probe and --tune layernorm through train_v42_diamond.py's pipeline, on a tiny random-weight CLIP
(no wheel needed): probe folds are the usual backbone + head files that FoldSet scores exactly as the
training's OOF, sharing one backbone file; the embeddings cache is reused and invalidated; layernorm
trains only the LayerNorms and the head; the per-arch input size; refusals."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from _single_thread import single_thread  # noqa: F401  (autouse fixture)
from test_train_pipeline import cfg_for, make_faces
from titan.checkpoints import CheckpointError, load_file
from titan.config import make_config
from titan.data.images import ImageIndex
from titan.infer import folds as folds_mod
from titan.infer.folds import FoldSet
from titan.infer.scorer import score_fold_set
from titan.models import archs
from titan.models.clip_vit import ClipViT, ClipVisionConfig
from titan.train import pipeline
from titan.train.session import resolve_input_size

TINY = ClipVisionConfig(image_size=64, patch_size=16, width=32, layers=2, heads=2, mlp_dim=64, proj_dim=16)


@pytest.fixture(scope="module")
def tiny_clip():
    """The registry's clip-vit-b16 built as a tiny ViT with seeded random weights (no wheel)."""
    def b16(img_size: int = 224, project: bool = False) -> ClipViT:
        torch.manual_seed(0)
        return ClipViT(replace(TINY, image_size=int(img_size)), project)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(archs.ClipViT, "b16", staticmethod(b16))
        mp.setattr(archs, "load_offline_clip", lambda body: "clip-vit-b16: seeded random weights (test)")
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_faces(tmp_path_factory.mktemp("tune"), n_train=20, n_test=4, n_pseudo=2)


def probe_cfg(data: Path, out: str, **over):
    return cfg_for(data, out, arch="clip-vit-b16", tune="probe", n_folds=2, tta="identity,hflip", **over)


@pytest.fixture(scope="module")
def probe_run(tiny_clip, data) -> Path:
    pipeline.run_stages(probe_cfg(data, "probe"), stages=("finetune",))
    return data / "probe"


def test_probe_folds_score_through_foldset_exactly_as_their_oof(probe_run, data):
    fs = FoldSet.from_folder(probe_run)
    assert fs.arch == "clip-vit-b16" and len(fs.folds) == 2
    assert fs.folds[0].record.oof_tta == ("identity", "hflip")
    oof = pd.read_csv(probe_run / "oof_v42.csv", dtype={"Id": str})
    assert len(oof) == 20 and oof.prob.between(0, 1).all()  # pseudo rows train only: never an OOF row
    faces = ImageIndex(data / "faces" / "train")
    prep = fs.resolve(tta="identity,hflip")
    for k, f in enumerate(fs.folds):
        rows = oof[oof.fold == k]
        one = FoldSet([f], run=None)
        got = score_fold_set(one, prep, rows.Id.tolist(), faces, progress=False).prob
        np.testing.assert_allclose(got, rows.prob.to_numpy(), atol=1e-4)


def test_probe_folds_share_one_backbone_file_and_a_changed_base_is_refused(probe_run, tmp_path):
    base = probe_run / "v42_backbone_base.pth"
    assert base.is_file()
    for k in range(2):
        fold_file = probe_run / f"v42_backbone_fold{k}.pth"
        obj = load_file(fold_file)
        assert obj["model"] == {} and obj["meta"]["backbone_base"] == base.name
        assert fold_file.stat().st_size < base.stat().st_size / 10
    copy = tmp_path / "run"
    copy.mkdir()
    for p in probe_run.glob("v42_*_fold*.pth"):
        os.link(p, copy / p.name)
    with pytest.raises(CheckpointError, match="v42_backbone_base.pth, which is not beside it"):
        FoldSet.from_folder(copy)
    sd = load_file(base)
    sd["model"]["norm.bias"] = sd["model"]["norm.bias"] + 1
    torch.save(sd, copy / base.name)
    with pytest.raises(CheckpointError, match="sha256 differs"):
        FoldSet.from_folder(copy)


def test_the_embeddings_cache_is_reused_on_rerun_and_rebuilt_when_an_image_changes(probe_run, data, tiny_clip):
    ckpt = probe_run / "checkpoints_v42"
    (first,) = ckpt.glob("embeddings_*.pt")
    for p in probe_run.glob("v42_meta_fold*.pth"):
        p.unlink()  # the folds retrain, the embeddings must not be recomputed
    pipeline.run_stages(probe_cfg(data, "probe"), stages=("finetune",))
    log = (probe_run / "training_v42_log.txt").read_text()
    assert log.count("embeddings reused from") == 1 and log.count("embeddings cached:") == 1
    assert list(ckpt.glob("embeddings_*.pt")) == [first]
    img = Image.open(data / "faces" / "train" / "3.jpg")
    Image.fromarray(255 - np.asarray(img)).save(data / "faces" / "train" / "3.jpg", quality=92)
    pipeline.run_stages(probe_cfg(data, "probe"), stages=("finetune",))
    log = (probe_run / "training_v42_log.txt").read_text()
    (second,) = ckpt.glob("embeddings_*.pt")
    assert second != first and log.count("embeddings cached:") == 2 and "retraining — its images changed" in log


def test_layernorm_tune_trains_only_layernorms_and_the_head(tiny_clip, data):
    cfg = cfg_for(data, "ln", arch="clip-vit-b16", tune="layernorm", n_folds=2, ft_epochs=1, tta="identity")
    pipeline.run_stages(cfg, stages=("finetune",))
    out = data / "ln"
    base = load_file(out / "v42_backbone_base.pth")["model"]
    for k in range(2):
        delta = load_file(out / f"v42_backbone_fold{k}.pth")["model"]
        assert delta and all("norm" in key for key in delta), sorted(delta)  # only LayerNorm tensors moved
        assert any(not torch.equal(delta[key], base[key]) for key in delta)
    fs = FoldSet.from_folder(out)
    sd = fs.folds[0].model.backbone.state_dict()
    assert torch.equal(sd["blocks.0.attn.q_proj.weight"], base["blocks.0.attn.q_proj.weight"])
    assert "plus the head" in (out / "training_v42_log.txt").read_text()


def test_clip_trains_at_224_unless_an_input_size_is_given():
    cfg, note = resolve_input_size(make_config(overrides={"arch": "clip-vit-b16"}))
    assert cfg.img_size == 224 and "clip-vit-b16's own" in note
    cfg, note = resolve_input_size(make_config(overrides={"arch": "clip-vit-b16", "img_size": 96}))
    assert cfg.img_size == 96 and note == ""
    assert resolve_input_size(make_config())[0].img_size == 512


@pytest.mark.parametrize("over, match", [
    (dict(arch="efficientnet-lite0", tune="layernorm"), "has no LayerNorm to tune"),
    (dict(arch="clip-vit-b16", tune="probe", head="arcface"), "use --head linear"),
    (dict(arch="clip-vit-b16", tune="probe", sbi_p=0.3), "--sbi-p 0"),
])
def test_a_tune_that_makes_no_sense_is_refused_before_training(data, over, match):
    with pytest.raises(ValueError, match=match):
        pipeline.run_stages(cfg_for(data, "refused", **over), stages=("finetune",))
