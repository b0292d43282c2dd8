"""make_diamonds: the threshold rule, the CSV contract, both weight formats, and clean refusals."""
import numpy as np
import pandas as pd
import pytest
import torch

import make_diamonds
from fold_fixtures import SIZE, copy_files, grey_logit, grey_prob, v38_dir, write_images, write_v42_folds  # noqa: F401 (fixture)
from titan import build_backbone, build_head
from titan.models.classifier import FoldModel
from titan.infer.calibration import ensemble_probability
from titan.infer.tta import tta_logits
from titan.infer.diamonds import DiamondConfig, DiamondError, make_diamonds as run, select_diamonds
from titan.runlog import RunLog

# grey level → P(fake) = sigmoid(20·(v/255 − 0.5)) under grey_logit: 255, 200 → > 0.995; 59, 0 → < 0.005;
# 190 (0.9926), 128, 65 (0.0074) sit just inside the thresholds.
GREYS = {"t_a": 255, "t_b": 200, "t_c": 190, "t_d": 128, "t_e": 65, "t_f": 59, "t_g": 0}


def layout(tmp_path, greys=GREYS):
    write_images(tmp_path / "data/faces_512/test", greys)
    (tmp_path / "data/dataset").mkdir(parents=True)
    (tmp_path / "data/dataset/train_solution.csv").write_text("Id,target_feature\nr_2,1\nr_1,0\nr_3,0\n")
    return tmp_path


def cfg(tmp_path, **kw):
    base = dict(weights_dir=str(tmp_path), test_dir=str(tmp_path / "data/faces_512/test"),
                train_csv=str(tmp_path / "data/dataset/train_solution.csv"), out=str(tmp_path / "train_diamond.csv"),
                num_workers=0, progress=False)
    return DiamondConfig(**{**base, **kw})


def test_threshold_rule_is_strict_and_skips_nan():
    ids = ["a", "b", "c", "d", "e", "f", "g"]
    probs = [0.995, 0.99501, 1.0, 0.005, 0.00499, 0.0, np.nan]
    d = select_diamonds(ids, probs, hi=0.995, lo=0.005)
    assert dict(zip(d.Id, d.target_feature)) == {"b": 1, "c": 1, "e": 0, "f": 0}


def test_cap_keeps_most_confident_and_balance_evens_classes():
    ids = [f"i{k}" for k in range(7)]
    probs = [0.999, 0.9999, 0.996, 0.001, 0.0001, 0.5, 0.9991]
    capped = select_diamonds(ids, probs, max_per_class=2)
    assert set(capped.Id) == {"i1", "i6", "i4", "i3"}
    balanced = select_diamonds(ids, probs, balance=True)
    assert (balanced.target_feature == 1).sum() == (balanced.target_feature == 0).sum() == 2
    assert set(balanced.Id[balanced.target_feature == 1]) == {"i1", "i6"}


def test_no_args_v38_arcface_folds_select_by_rule_and_keep_originals_first(v38_dir, tmp_path, monkeypatch):
    layout(tmp_path)
    copy_files(v38_dir, tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(FoldModel, "forward", lambda self, x: grey_logit(x))  # known scores per image
    assert make_diamonds.main(["--no-progress", "--num-workers", "0"]) == 0

    out = pd.read_csv(tmp_path / "train_diamond.csv", dtype={"Id": str})
    assert list(out.columns) == ["Id", "target_feature", "is_pseudo"]
    assert out.Id.tolist()[:3] == ["r_2", "r_1", "r_3"] and not out.is_pseudo[:3].any()  # originals, in order
    expected = {i: int(grey_prob(v) > 0.995) for i, v in GREYS.items() if grey_prob(v) > 0.995 or grey_prob(v) < 0.005}
    assert expected == {"t_a": 1, "t_b": 1, "t_f": 0, "t_g": 0}
    dia = out[out.is_pseudo]
    assert dict(zip(dia.Id, dia.target_feature)) == expected and len(out) == 3 + 4
    scores = pd.read_csv(tmp_path / "train_diamond_scores.csv", dtype={"Id": str}).set_index("Id").prob
    assert np.allclose([scores[i] for i in GREYS], [grey_prob(v) for v in GREYS.values()], atol=1e-5)
    assert (tmp_path / "train_diamond_hist.png").stat().st_size > 1000
    log = (tmp_path / "train_diamond_log.txt").read_text()
    assert "loaded 2 fold(s)" in log and "[fold0, fold1] of titan-atto/arcface" in log
    assert "2 fake (p > 0.995) + 2 real (p < 0.005) = 4 of 7 test faces (57.1%)" in log
    assert "0.95-1.00" in log and "record no preprocessing" in log and "img_size 512" in log  # V38: no metadata


def test_unreadable_test_face_is_logged_and_never_a_diamond(v38_dir, tmp_path, monkeypatch):
    layout(tmp_path)
    (tmp_path / "data/faces_512/test/t_a.png").write_bytes(b"\x89PNG truncated")
    copy_files(v38_dir, tmp_path)
    monkeypatch.setattr(FoldModel, "forward", lambda self, x: grey_logit(x))
    s = run(cfg(tmp_path, img_size=SIZE), RunLog(tmp_path / "log.txt", echo=False))
    assert s.unreadable == ["t_a"] and s.n_scored == len(GREYS) - 1 and (s.n_fake, s.n_real) == (1, 2)
    out = pd.read_csv(tmp_path / "train_diamond.csv", dtype={"Id": str})
    assert "t_a" not in set(out.Id)
    assert "not a diamond: " in (tmp_path / "log.txt").read_text() and "t_a.png" in (tmp_path / "log.txt").read_text()


def test_v42_folds_by_glob_use_meta_size_and_real_models(tmp_path):
    layout(tmp_path)
    models = [FoldModel(bb, head).eval() for bb, head in write_v42_folds(tmp_path, n=2)]
    c = cfg(tmp_path, backbones=str(tmp_path / "v42_backbone_fold*.pth"), heads=str(tmp_path / "v42_head_fold*.pth"),
            hi=0.5, lo=0.4)
    s = run(c)
    assert s.n_folds == 2 and s.img_size == SIZE and s.n_scored == len(GREYS)
    # The scores are the real ensemble's: recompute one image by hand.
    x = torch.full((1, 3, SIZE, SIZE), 200 / 255.0)
    p = ensemble_probability(np.stack([tta_logits(m, x, ["identity", "hflip"]).numpy() for m in models]))[0]
    scores = pd.read_csv(tmp_path / "train_diamond_scores.csv", dtype={"Id": str}).set_index("Id").prob
    assert scores["t_b"] == pytest.approx(p, abs=1e-5)


def test_no_weights_is_an_error_and_writes_nothing(tmp_path):
    layout(tmp_path)
    with pytest.raises(DiamondError, match="no fold weights found"):
        run(cfg(tmp_path))
    assert not (tmp_path / "train_diamond.csv").exists()


def test_wrong_architecture_is_an_error_and_writes_nothing(v38_dir, tmp_path):
    layout(tmp_path)
    torch.save(build_backbone("atto").state_dict(), tmp_path / "titan_backbone_fold0.pth")
    torch.save(build_head("arcface", 768).state_dict(), tmp_path / "titan_head_fold0.pth")  # a V38-wide head
    with pytest.raises(DiamondError, match=r"(?s)wrong architecture.*titan_head_fold0.pth.*wrong shape"):
        run(cfg(tmp_path))
    copy_files(v38_dir, tmp_path)
    with pytest.raises(DiamondError, match="does not fit"):
        run(cfg(tmp_path, variant="v38"))  # atto weights forced into a v38 backbone
    assert not (tmp_path / "train_diamond.csv").exists()


def test_empty_test_folder_is_an_error_and_writes_nothing(v38_dir, tmp_path):
    layout(tmp_path, greys={})
    copy_files(v38_dir, tmp_path)
    with pytest.raises(DiamondError, match="no test images"):
        run(cfg(tmp_path))
    assert not (tmp_path / "train_diamond.csv").exists()


def test_test_ids_colliding_with_train_ids_is_an_error(v38_dir, tmp_path):
    layout(tmp_path, greys={"r_1": 10, "t_x": 20})
    copy_files(v38_dir, tmp_path)
    with pytest.raises(DiamondError, match=r"1 test Id\(s\).*\['r_1'\]"):
        run(cfg(tmp_path))
    assert not (tmp_path / "train_diamond.csv").exists()
    # the script turns it into a message and exit code 2, not a traceback
    assert make_diamonds.main(["--weights-dir", str(tmp_path), "--test-dir", str(tmp_path / "data/faces_512/test"),
                               "--train-csv", str(tmp_path / "data/dataset/train_solution.csv"),
                               "--out", str(tmp_path / "train_diamond.csv")]) == 2


def test_help_lists_every_flag_with_default(capsys):
    with pytest.raises(SystemExit):
        make_diamonds.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for flag in ("--weights-dir", "--prefix", "--backbones", "--heads", "--variant", "--head", "--test-dir",
                 "--train-csv", "--out", "--img-size", "--hi", "--lo", "--batch-size", "--device", "--tta",
                 "--max-per-class", "--balance"):
        assert flag in text
    assert "default: 0.995" in text and "default: titan" in text
