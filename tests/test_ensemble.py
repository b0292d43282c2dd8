"""An ensemble of runs of different architectures (a tiny CLIP probe run and a Lite0 probe run at another
input size): its threshold and calibration come from the members' combined OOF logits, a face scores the
mean of its members' logits, detect and safe inference score it, a changed member is refused."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from _single_thread import single_thread  # noqa: F401  (autouse fixture)
from test_train_pipeline import cfg_for, make_faces
from test_tune_modes import tiny_clip  # noqa: F401  (fixture)
from titan.infer.calibration import logit_of, probability
from titan.infer.detect import Detector
import ensemble as ensemble_script
from titan.infer.ensemble import fit_ensemble
from titan.infer.folds import EnsembleSet, FoldSet, FoldSetError
from titan.runfiles import ENSEMBLE_JSON
from titan.infer.safe import SafeConfig, safe_inference
from titan.metrics import best_f1_threshold
from titan.train import pipeline


@pytest.fixture(scope="module")
def runs(tiny_clip, tmp_path_factory) -> Path:  # noqa: F811
    root = make_faces(tmp_path_factory.mktemp("ens"), n_train=20, n_test=4, n_pseudo=0)
    pipeline.run_stages(cfg_for(root, "clip", arch="clip-vit-b16", tune="probe", n_folds=2, tta="identity,hflip"),
                        stages=("finetune",))
    pipeline.run_stages(cfg_for(root, "lite", arch="efficientnet-lite0", tune="probe", n_folds=2, img_size=96,
                                tta="identity"), stages=("finetune",))
    return root


def _hand_made_oof(folder: Path, y: np.ndarray, logits: np.ndarray) -> None:
    pd.DataFrame({"Id": [f"{i}" for i in range(len(y))], "target_feature": y, "prob": probability(logits),
                  "fold": np.arange(len(y)) % 2}).to_csv(folder / "oof_v42.csv", index=False)


def test_the_threshold_is_the_combined_oofs_best_f1_not_a_members(runs, tmp_path):
    rng = np.random.default_rng(3)
    y = np.r_[np.ones(30, int), np.zeros(30, int)]
    a, b = rng.normal(1.2 * y - 0.6, 1.3), rng.normal(0.8 * y - 0.2, 0.9)
    members = []
    for name, z in (("a", a), ("b", b)):
        m = tmp_path / name
        m.mkdir()
        for p in (runs / ("clip" if name == "a" else "lite")).iterdir():
            if p.is_file():
                os.link(p, m / p.name)
        (m / "oof_v42.csv").unlink()
        _hand_made_oof(m, y, z)
        members.append(m)
    spec = fit_ensemble(members, tmp_path / "ens")
    want, _ = best_f1_threshold(y, probability((logit_of(probability(a)) + logit_of(probability(b))) / 2))
    th = spec["oof"]["threshold"]
    assert th == pytest.approx(want)
    for z in (a, b):
        assert abs(best_f1_threshold(y, probability(z))[0] - th) > 1e-3
    es = EnsembleSet.from_folder(tmp_path / "ens")
    assert es.threshold()[0] == pytest.approx(th) and es.calibration().temperature == spec["calibration"]["temperature"]
    # a member whose OOF Ids differ is refused, naming both files
    _hand_made_oof(members[1], y[:50], b[:50])
    with pytest.raises(FoldSetError, match="not for the same images"):
        fit_ensemble(members, tmp_path / "ens2")


def test_a_face_scores_the_mean_of_its_members_logits_and_detect_and_safe_inference_use_it(runs, tmp_path):
    ens = tmp_path / "ens"
    assert ensemble_script.main([str(runs / "clip"), str(runs / "lite"), "--out", str(ens)]) == 0
    assert (ens / ENSEMBLE_JSON).is_file()
    img = np.asarray(pd.DataFrame(np.random.default_rng(0).integers(0, 255, (80, 80)))).astype(np.uint8)
    img = np.stack([img] * 3, -1)
    det = Detector.from_run(ens, device="cpu", batch_size=4)
    assert [p.img_size for p in det.preps] == [64, 96]  # each member at its own input size
    got = det.score_images([("x", img)])[0]
    one = [Detector.from_run(runs / r, device="cpu", batch_size=4).score_images([("x", img)])[0].logit for r in ("clip", "lite")]
    assert got.logit == pytest.approx(np.mean(one), abs=1e-5)
    assert det.calibration.threshold == pytest.approx(EnsembleSet.from_folder(ens).threshold()[0])
    out = tmp_path / "sub.csv"
    summary = safe_inference(SafeConfig(weights_dir=str(ens), test_dir=str(runs / "faces" / "test"),
                                        raw_test_dir=str(runs / "none"), out=str(out), device="cpu", num_workers=0,
                                        progress=False))
    assert summary.n_rows == 4 and len(summary.folds_used) == 4 and summary.threshold == det.calibration.threshold
    with pytest.raises(FoldSetError, match="holds an ensemble of runs"):
        FoldSet.from_folder(ens)


def test_a_member_whose_weights_changed_is_refused(runs, tmp_path):
    ens = tmp_path / "ens"
    fit_ensemble([runs / "clip", runs / "lite"], ens)
    head = runs / "lite" / "v42_head_fold1.pth"
    st = head.stat()
    os.utime(head, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        with pytest.raises(FoldSetError, match="changed since .* was fitted"):
            EnsembleSet.from_folder(ens)
    finally:
        os.utime(head, ns=(st.st_atime_ns, st.st_mtime_ns))
