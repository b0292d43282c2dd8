"""One owner of a fold set: every stage reads the same folds, input size, threshold and Id order."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from _single_thread import single_thread  # noqa: F401  (autouse fixture)
from fold_fixtures import SIZE, write_images, write_v42_folds
from titan.config import make_config
from titan.data.ids import id_order
from titan.infer.folds import FoldSet, FoldSetError, decision_threshold, find_fold_files
from titan.infer.safe import SafeConfig, safe_inference
from titan.metrics import best_f1_threshold
from titan.report.logparse import load_run
from titan.train.pipeline import run_infer

import make_diamonds
import safe_inference as safe_script
import train_v42_diamond

OOF_TH = 0.37  # recorded in metrics_v42.json; the folds' own are 0.40 and 0.42


def make_run(root: Path, ids: list[str], size: int = SIZE) -> Path:
    """A finished run folder: two atto folds, metrics_v42.json with an OOF threshold, and test faces."""
    torch.manual_seed(0)
    write_v42_folds(root, n=2, size=size)
    (root / "metrics_v42.json").write_text(json.dumps({"oof": {"threshold": OOF_TH, "f1": 0.8}, "folds": []}))
    rng = np.random.default_rng(0)
    write_images(root / "faces" / "test", {i: int(v) for i, v in zip(ids, rng.integers(0, 255, len(ids)))}, size=40)
    (root / "faces" / "train").mkdir(parents=True, exist_ok=True)
    return root


def infer_cfg(root: Path, **over):
    return make_config(preset="tiny", overrides={"out_dir": str(root), "faces_dir": str(root / "faces"), "img_size": SIZE,
                                                 "n_folds": 2, "device": "cpu", **over})


@pytest.mark.parametrize("ids", [[str(i) for i in range(1, 13)], ["b7", "a10", "a9", "c", "A1"]],
                         ids=["numeric 1..12", "non-numeric"])
def test_safe_and_training_inference_use_the_same_threshold_and_id_order(tmp_path, ids):
    root = make_run(tmp_path / "run", ids)
    run_infer(infer_cfg(root))
    main = pd.read_csv(root / "submission_v42.csv", dtype={"Id": str})
    preds = pd.read_csv(root / "predictions_v42.csv", dtype={"Id": str})
    summary = safe_inference(SafeConfig(weights_dir=str(root), test_dir=str(root / "faces" / "test"),
                                        raw_test_dir=str(tmp_path / "none"), out=str(tmp_path / "safe.csv"),
                                        device="cpu", num_workers=0, progress=False, tta="minimal"))
    safe = pd.read_csv(tmp_path / "safe.csv", dtype={"Id": str})

    assert main.Id.tolist() == safe.Id.tolist() == preds.Id.tolist() == id_order(ids)
    assert summary.threshold == pytest.approx(OOF_TH)
    assert f"threshold {OOF_TH:.4f}" in (root / "training_v42_log.txt").read_text()
    assert load_run(root).threshold() == pytest.approx(OOF_TH)  # the plots and the report
    # Same folds, views and threshold: the same decisions.
    assert main.target_feature.tolist() == safe.target_feature.tolist()
    assert (main.target_feature == (preds.prob >= OOF_TH)).all()


def test_id_order_sorts_numbers_as_numbers_and_everything_else_as_text():
    assert id_order(["10", "9", "1", "100"]) == ["1", "9", "10", "100"]
    assert id_order(["10", "9", "x"]) == ["10", "9", "x"]


def test_threshold_rule_prefers_recorded_oof_then_fold_mean_then_oof_predictions_then_half():
    y, p = np.array([0, 0, 1, 1]), np.array([0.1, 0.3, 0.6, 0.9])
    assert decision_threshold(0.37, [0.4, 0.5], lambda: (y, p))[0] == pytest.approx(0.37)
    assert decision_threshold(None, [0.4, None, 0.5], lambda: (y, p))[0] == pytest.approx(0.45)
    assert decision_threshold(None, [None], lambda: (y, p))[0] == pytest.approx(best_f1_threshold(y, p)[0])
    assert decision_threshold(None, [])[0] == 0.5


def test_infer_stage_refuses_an_image_size_the_folds_were_not_trained_at(tmp_path, capsys):
    root = make_run(tmp_path / "run", ["1", "2"], size=512)
    rc = train_v42_diamond.main(["--stages", "infer", "--preset", "tiny", "--img-size", "384", "--n-folds", "2",
                                 "--out-dir", str(root), "--faces-dir", str(root / "faces"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "384" in err and "512" in err and "--force-preprocessing" in err
    assert not (root / "submission_v42.csv").exists()


def test_forcing_an_image_size_scores_at_that_size_and_logs_it(tmp_path):
    root = make_run(tmp_path / "run", [str(i) for i in range(1, 7)])
    run_infer(infer_cfg(root))
    native = pd.read_csv(root / "predictions_v42.csv", dtype={"Id": str})
    # the CLI spelling of old (--force-img-size) is an alias of --force-preprocessing
    assert train_v42_diamond.main(["--stages", "infer", "--preset", "tiny", "--img-size", str(2 * SIZE), "--force-img-size",
                                   "--n-folds", "2", "--out-dir", str(root), "--faces-dir", str(root / "faces"),
                                   "--device", "cpu"]) == 0
    forced = pd.read_csv(root / "predictions_v42.csv", dtype={"Id": str})
    log = (root / "training_v42_log.txt").read_text()
    assert f"--force-preprocessing: img_size {2 * SIZE} instead of the {SIZE}" in log
    assert f"× TTA ['identity', 'hflip'] at {2 * SIZE} px" in log
    assert native.Id.tolist() == forced.Id.tolist()
    assert not np.allclose(native.prob, forced.prob), "the forced size must change what the folds see"


def mixed_sizes(tmp_path: Path) -> Path:
    root = make_run(tmp_path / "run", ["1", "2"])
    other = tmp_path / "other"
    other.mkdir()
    write_v42_folds(other, n=2, size=64)
    for part in ("backbone", "head", "meta"):
        shutil.copy(other / f"v42_{part}_fold1.pth", root / f"v42_{part}_fold1.pth")
    return root


def test_folds_of_mixed_sizes_are_refused_by_make_diamonds_naming_the_files(tmp_path, capsys):
    root = mixed_sizes(tmp_path)
    (root / "train.csv").write_text("Id,target_feature\ntr1,0\ntr2,1\n")
    rc = make_diamonds.main(["--prefix", "v42", "--weights-dir", str(root), "--test-dir", str(root / "faces" / "test"),
                             "--train-csv", str(root / "train.csv"), "--out", str(tmp_path / "d.csv"), "--device", "cpu",
                             "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "input size" in err and "v42_backbone_fold0.pth" in err and "v42_backbone_fold1.pth" in err
    assert "32 px" in err and "64 px" in err
    assert not (tmp_path / "d.csv").exists()


def test_folds_of_mixed_sizes_are_refused_by_safe_inference_naming_the_files(tmp_path, capsys):
    root = mixed_sizes(tmp_path)
    rc = safe_script.main(["--weights-dir", str(root), "--test-dir", str(root / "faces" / "test"),
                           "--out", str(tmp_path / "s.csv"), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "input size" in err and "v42_backbone_fold1.pth" in err
    assert not (tmp_path / "s.csv").exists()


def test_folds_of_different_architectures_are_an_error_naming_the_files(tmp_path):
    write_v42_folds(tmp_path, n=1, variant="atto")
    other = tmp_path / "femto"
    other.mkdir()
    write_v42_folds(other, n=2, variant="femto")
    for part in ("backbone", "head", "meta"):
        shutil.copy(other / f"v42_{part}_fold1.pth", tmp_path / f"v42_{part}_fold1.pth")
    with pytest.raises(FoldSetError, match=r"(?s)architecture.*titan-atto.*fold0.*titan-femto.*fold1"):
        FoldSet.from_folder(tmp_path)


def test_fold_set_reads_each_fold_once_with_its_metadata(tmp_path, monkeypatch):
    import titan.infer.folds as folds

    write_v42_folds(tmp_path, n=2)
    calls = []
    real = folds.load_file
    monkeypatch.setattr(folds, "load_file", lambda p, **kw: calls.append(Path(p).name) or real(p, **kw))
    fs = FoldSet.from_folder(tmp_path)
    assert sorted(calls) == sorted(f"v42_{part}_fold{k}.pth" for part in ("backbone", "head", "meta") for k in (0, 1))
    assert fs.img_size[0] == SIZE and fs.arch == "titan-atto" and fs.head == "linear"
    assert [f.name for f in find_fold_files(tmp_path)] == fs.names == ["fold0", "fold1"]
