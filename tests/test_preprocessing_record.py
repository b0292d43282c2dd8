"""The preprocessing record travels with the folds, one resolver answers every script, one scorer scores.

A tiny real run trains on faces whose align_settings.json says margin 0.3; every consumer then
crops, sizes and scores as the folds were trained, says where each value came from, and refuses a
flag that contradicts the record unless --force-preprocessing.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from _single_thread import single_thread  # noqa: F401  (autouse fixture)
from test_train_pipeline import cli_args, make_faces
from titan.data.align import SETTINGS_JSON
from titan.data.images import ImageIndex
from titan.infer import detect as detect_mod
from titan.infer import diamonds as diamonds_mod
from titan.infer import safe as safe_mod
from titan.infer.folds import FoldSet
from titan.infer.record import Preprocessing, PreprocessingError, resolve_preprocessing
from titan.infer.tta import resolve_tta

import detect
import make_diamonds
import safe_inference
import train_v42_diamond

CROP = {"size": 64, "margin": 0.3, "format": "jpg", "quality": 95, "min_prob": 0.8, "max_side": 640}
FULL = ",".join(resolve_tta("full"))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny real run (2 folds, 1 epoch) on faces made 'with' align_faces.py --margin 0.3 --min-prob 0.8 --max-side 640."""
    root = make_faces(tmp_path_factory.mktemp("record"), n_train=16, n_test=6, n_pseudo=0)
    for split in ("train", "test"):
        (root / "faces" / split / SETTINGS_JSON).write_text(json.dumps(CROP))
    assert train_v42_diamond.main(cli_args(root, "run", "--n-folds", "2", "--ft-epochs", "1")) == 0
    (root / "train.csv").write_text("Id,target_feature\ntr1,0\ntr2,1\n")
    return root


def test_every_fold_records_what_it_was_trained_on(run):
    prep = FoldSet.from_folder(run / "run").preprocessing
    assert (prep.arch, prep.img_size, prep.margin, prep.min_prob, prep.max_side) == ("titan-atto", 64, 0.3, 0.8, 640)
    assert prep.tta == ("identity", "hflip") and prep.oof_tta == ("identity",) and prep.mean == (0.5, 0.5, 0.5)
    assert prep.temperature is not None and prep.band is not None  # the run's calibration, from its OOF rows
    again = Preprocessing.from_meta({"preprocessing": prep.to_dict()})
    assert (again.margin, again.tta, again.img_size) == (0.3, ("identity", "hflip"), 64) and not again.legacy


def _spy_margins(monkeypatch) -> list[float]:
    seen: list[float] = []
    real = detect_mod.face_crop

    def spy(img, det, size, margin):
        seen.append(margin)
        return real(img, det, size, margin)
    monkeypatch.setattr(detect_mod, "face_crop", spy)
    return seen


def _detect(run: Path, *flags: str) -> int:
    return detect.main([str(run / "faces" / "test"), "--weights-dir", str(run / "run"), "--no-progress", "--device", "cpu",
                        "--workers", "0", *flags])


def test_detect_crops_as_the_folds_were_trained_and_says_so(run, capsys, monkeypatch):
    seen = _spy_margins(monkeypatch)
    assert _detect(run) == 0
    err = capsys.readouterr().err
    assert "margin 0.3 (the folds' record)" in err and "min_prob 0.8 (the folds' record)" in err
    assert "max_side 640 (the folds' record)" in err and "input 64 px (the folds' record)" in err
    assert seen and set(seen) == {0.3}


def test_detect_refuses_a_margin_that_contradicts_the_record_unless_forced(run, capsys, monkeypatch):
    seen = _spy_margins(monkeypatch)
    assert _detect(run, "--margin", "0.2") == 2
    err = capsys.readouterr().err
    assert "--margin 0.2" in err and "margin 0.3" in err and "--force-preprocessing" in err and not seen
    assert _detect(run, "--margin", "0.2", "--force-preprocessing") == 0
    assert "WARNING: --force-preprocessing: margin 0.2 instead of the 0.3" in capsys.readouterr().err
    assert seen and set(seen) == {0.2}


def test_training_inference_refuses_test_crops_made_with_another_margin(run, tmp_path, capsys):
    faces = tmp_path / "faces"
    for split in ("train", "test"):
        (faces / split).mkdir(parents=True)
    for p in (run / "faces" / "test").glob("*.jpg"):
        (faces / "test" / p.name).write_bytes(p.read_bytes())
    (faces / "test" / SETTINGS_JSON).write_text(json.dumps({**CROP, "margin": 0.2}))
    args = ["--stages", "infer", "--preset", "tiny", "--n-folds", "2", "--out-dir", str(run / "run"), "--faces-dir",
            str(faces), "--raw-test-dir", str(tmp_path / "none"), "--device", "cpu"]
    assert train_v42_diamond.main(args) == 2
    err = capsys.readouterr().err
    assert "--margin 0.2" in err and "margin 0.3" in err


def test_tta_full_is_accepted_by_all_four_scoring_scripts(run, tmp_path, capsys):
    out = run / "run"
    common = ["--weights-dir", str(out), "--no-progress", "--device", "cpu"]
    assert train_v42_diamond.main(cli_args(run, "run", "--stages", "infer", "--n-folds", "2", "--tta", "full")) == 0
    assert make_diamonds.main(["--prefix", "v42", "--test-dir", str(run / "faces" / "test"), "--train-csv",
                               str(run / "train.csv"), "--out", str(tmp_path / "d.csv"), "--num-workers", "0", "--tta",
                               "full", *common]) == 0
    assert safe_inference.main(["--test-dir", str(run / "faces" / "test"), "--raw-test-dir", str(tmp_path / "none"),
                                "--out", str(tmp_path / "s.csv"), "--num-workers", "0", "--tta", "full", *common]) == 0
    assert detect.main([str(run / "faces" / "test"), "--workers", "0", "--tta", "full", *common]) == 0
    assert capsys.readouterr().err.count(f"TTA {FULL} (flag)") == 4  # each logs where its views came from
    assert f"TTA {FULL} (flag)" in (out / "training_v42_log.txt").read_text()


def test_training_safe_and_diamonds_give_bit_identical_probabilities(run, tmp_path, monkeypatch):
    out = run / "run"
    assert train_v42_diamond.main(cli_args(run, "run", "--stages", "infer", "--n-folds", "2")) == 0
    training = pd.read_csv(out / "predictions_v42.csv", dtype={"Id": str}).set_index("Id").prob
    got = {}
    real = safe_mod.score_fold_set

    def keep(*a, **k):
        got["safe"] = scored = real(*a, **k)
        return scored
    monkeypatch.setattr(safe_mod, "score_fold_set", keep)
    safe_mod.safe_inference(safe_mod.SafeConfig(weights_dir=str(out), test_dir=str(run / "faces" / "test"),
                                                raw_test_dir=str(tmp_path / "none"), out=str(tmp_path / "s.csv"),
                                                device="cpu", num_workers=0, progress=False))
    summary = diamonds_mod.make_diamonds(diamonds_mod.DiamondConfig(
        weights_dir=str(out), prefix="v42", test_dir=str(run / "faces" / "test"), train_csv=str(run / "train.csv"),
        out=str(tmp_path / "d.csv"), device="cpu", num_workers=0, progress=False))
    safe = pd.Series(got["safe"].prob, index=got["safe"].ids)
    diamonds = pd.Series(summary.probs, index=ImageIndex(run / "faces" / "test").ids())
    assert len(training) == 6
    ids = training.index
    assert np.array_equal(training.to_numpy(), safe[ids].to_numpy())  # exactly: one scorer, one σ
    assert np.array_equal(training.to_numpy(), diamonds[ids].to_numpy())


def test_folds_without_a_record_get_the_defaults_with_one_notice():
    lines: list[str] = []
    prep = resolve_preprocessing(Preprocessing.from_meta({"img_size": 32}), margin=0.25, say=lines.append)
    assert (prep.img_size, prep.margin, prep.max_side, ",".join(prep.tta)) == (32, 0.25, 1024, FULL)
    assert sum("NOTICE" in s for s in lines) == 1 and "record no preprocessing" in lines[0]
    assert prep.sources == {"img_size": "the folds' record", "margin": "flag", "min_prob": "default",
                            "max_side": "default", "tta": "default"}
    with pytest.raises(PreprocessingError, match=r"--img-size 48 .* img_size 32\..*--force-preprocessing"):
        resolve_preprocessing(Preprocessing.from_meta({"img_size": 32}), img_size=48, say=lines.append)


def test_every_boolean_flag_is_a_switch_with_its_no_form():
    from titan.config import TrainConfig, config_from_args, make_config
    import argparse
    from titan.config import add_config_args

    parser = argparse.ArgumentParser()
    add_config_args(parser, TrainConfig)
    cfg = config_from_args(parser.parse_args(["--no-amp", "--compile", "--force-img-size"]), TrainConfig)
    assert (cfg.amp, cfg.compile, cfg.force_preprocessing) == (False, True, True)
    assert make_config(overrides={"amp": "false"}).amp is False  # --set amp=false keeps working
    with pytest.raises(SystemExit):
        parser.parse_args(["--amp", "false"])
