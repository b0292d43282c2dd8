"""evaluate.py's parts: degradations, metrics with intervals and calibration, the resumable sweep."""
from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from titan import metrics
from titan.report import degrade
from titan.infer.calibration import Calibration
from titan.report.evaluation import (LabelledSet, ScoreBook, ScoredImage, clean_metrics,
                                     robustness_table, score_sweep, write_outputs)


def photo(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) % 64 * 4], -1)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def ijg_table(base: np.ndarray, quality: int) -> np.ndarray:
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality  # integer, as libjpeg
    return np.clip((base * scale + 50) // 100, 1, 255)


# libjpeg's standard luminance table (Annex K), in natural order.
LUMA = np.array([16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
                 14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
                 49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99])


@pytest.mark.parametrize("quality", [95, 75, 50, 30])
def test_jpeg_degradation_reencodes_at_the_requested_quality(quality):
    img = photo()
    data = degrade.jpeg_bytes(img, quality)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == "JPEG"
    table = np.array(decoded.quantization[0])
    # PIL reports the table in zigzag order; compare as sets of values with multiplicity.
    assert sorted(table.tolist()) == sorted(ijg_table(LUMA, quality).tolist())
    out = degrade.degraded(img, "jpeg", quality)
    assert np.array_equal(out, np.asarray(decoded.convert("RGB")))
    assert not np.array_equal(out, img)


def test_lower_jpeg_quality_loses_more():
    img = photo()
    err = [np.abs(degrade.degraded(img, "jpeg", q).astype(int) - img).mean() for q in (95, 75, 50, 30)]
    assert err == sorted(err) and err[0] > 0


def test_downscale_changes_the_pixel_grid_but_keeps_the_size():
    img = np.zeros((64, 64, 3), np.uint8)
    img[::2] = 255  # one-pixel stripes: detail no ×0.5 grid can hold
    out = degrade.degraded(img, "downscale", 0.5)
    assert out.shape == img.shape
    assert out.std() < img.std() * 0.2  # stripes averaged away
    harsher = [np.abs(degrade.degraded(photo(), "downscale", f).astype(int) - photo()).mean() for f in (0.75, 0.5, 0.25)]
    assert harsher == sorted(harsher) and harsher[0] > 0


@pytest.mark.parametrize("name", sorted(degrade.DEGRADATIONS))
def test_severity_zero_is_the_identity(name):
    img = photo()
    d = degrade.DEGRADATIONS[name]
    assert d.apply(img, d.clean) is img
    assert degrade.degraded(img, "clean", 0) is img


def test_blur_noise_margin_and_social_do_what_they_say():
    img = photo(seed=3)
    assert degrade.degraded(img, "blur", 2.0).astype(float).std() < img.astype(float).std()
    noisy = degrade.degraded(img.copy() * 0 + 128, "noise", 10.0).astype(float)
    assert 9.0 < noisy.std() < 11.0
    assert np.array_equal(degrade.degraded(img, "noise", 5.0), degrade.degraded(img, "noise", 5.0))  # seeded
    assert degrade.degraded(img, "margin", 0.4) is img
    assert degrade.crop_margin("margin", 0.4, 0.2) == 0.4 and degrade.crop_margin("jpeg", 50, 0.2) == 0.2
    big = np.repeat(np.repeat(photo(), 12, 0), 12, 1)  # 1152 × 1536
    out = degrade.degraded(big, "social", 1080)
    assert max(out.shape[:2]) == 1080
    assert degrade.degraded(photo(), "social", 1080).shape == photo().shape  # small photos are not enlarged


def test_sweep_plan_starts_clean_and_refuses_unknown_degradations():
    plan = degrade.sweep_plan()
    assert plan[0] == ("clean", 0.0)
    assert ("jpeg", 30.0) in plan and ("downscale", 0.25) in plan and ("margin", 0.1) in plan
    assert len(degrade.sweep_plan(reduced=True)) == 1 + len(degrade.REDUCED_LEVELS)
    with pytest.raises(ValueError, match="unknown degradation"):
        degrade.sweep_plan(["jpeg", "sepia"])


# --- metrics ----------------------------------------------------------------------------------

def scored(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1).round(2)  # rounded: ties included


def test_metrics_match_scikit_learn():
    from sklearn.metrics import average_precision_score, f1_score, roc_auc_score, roc_curve

    y, p = scored()
    h = metrics.headline(y, p, 0.5)
    assert h["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    assert h["ap"] == pytest.approx(average_precision_score(y, p))
    assert h["f1"] == pytest.approx(f1_score(y, p >= 0.5))
    fpr, tpr, _ = roc_curve(y, p, drop_intermediate=False)
    for target, key in ((0.01, "tpr_at_1fpr"), (0.05, "tpr_at_5fpr")):
        assert h[key] == pytest.approx(tpr[fpr <= target].max())
    assert h["missed_fakes"] == int(((p < 0.5) & (y == 1)).sum())


def test_ece_matches_the_binned_definition():
    from sklearn.calibration import calibration_curve

    y, p = scored(500, 1)
    frac, conf = calibration_curve(y, p, n_bins=10, strategy="uniform")
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, 11)[1:-1], p), minlength=10)
    counts = counts[counts > 0]
    assert metrics.expected_calibration_error(y, p) == pytest.approx(np.sum(counts / len(p) * np.abs(frac - conf)))
    assert metrics.expected_calibration_error(np.array([0, 1] * 50), np.full(100, 0.5)) == pytest.approx(0.0)


def test_bootstrap_interval_contains_the_point_estimate():
    y, p = scored(150, 2)
    point = metrics.headline(y, p, 0.5)
    ci = metrics.bootstrap_intervals(y, p, 0.5, n_boot=300, seed=0)
    for k, v in point.items():
        lo, hi = ci[k]
        assert lo <= v <= hi, k
        assert lo < hi or k.startswith("tpr"), k
    assert metrics.bootstrap_intervals(y, p, 0.5, n_boot=50, seed=4) == metrics.bootstrap_intervals(y, p, 0.5, n_boot=50, seed=4)


# --- the sweep --------------------------------------------------------------------------------

def labelled_folder(tmp_path, n: int = 12, corrupt: str | None = None):
    d = tmp_path / "images"
    d.mkdir()
    rows = []
    for i in range(n):
        y = i % 2
        img = photo(48 + 8 * (i % 3), 64, seed=i)
        img = np.clip(img.astype(int) + (60 if y else -60), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"im{i:02d}.{'png' if i % 4 == 0 else 'jpg'}")
        rows.append((f"im{i:02d}", y))
    if corrupt:
        (d / f"{corrupt}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        rows.append((corrupt, 1))
    rows.append(("nofile", 0))
    (d / "stray.jpg").write_bytes((d / "im01.jpg").read_bytes())
    pd.DataFrame(rows, columns=["Id", "target_feature"]).to_csv(tmp_path / "labels.csv", index=False)
    return d, tmp_path / "labels.csv"


class BrightnessScorer:
    """A stand-in detector: brighter = more fake. Counts the photos it is asked to score."""

    def __init__(self, fail_after: int | None = None):
        self.calls, self.seen, self.fail_after, self.margins = 0, 0, fail_after, []

    def __call__(self, images, margin):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.seen += len(images)
        self.margins.append(margin)
        return [ScoredImage((im.mean() - 128) / 20, 1, False) for im in images]


def test_sweep_scores_every_image_at_every_point_and_lists_what_does_not_match(tmp_path):
    d, labels = labelled_folder(tmp_path, corrupt="broken")
    data = LabelledSet.load(d, labels)
    assert data.missing_images == ["nofile"] and data.unlabelled_images == ["stray"]
    plan = degrade.sweep_plan(reduced=True)
    scorer = BrightnessScorer()
    scores = score_sweep(data, plan, scorer, ScoreBook(tmp_path / "out", {"x": "1"}))
    assert len(scores) == len(data.ids) * len(plan)
    bad = scores[scores.Id == "broken"]
    assert (bad.status == "error").all() and bad.error.str.contains("broken.jpg").all()
    assert (scores[scores.Id != "broken"].status == "ok").all()
    assert 0.4 in scorer.margins and 0.2 in scorer.margins  # the margin sweep reaches the cropper
    cal = Calibration(threshold=0.5, temperature=2.0)
    table = robustness_table(scores, cal)
    assert set(zip(table.degradation, table.level)) == {(n, float(v)) for n, v in plan}
    clean = table[table.degradation == "clean"].iloc[0]
    assert clean.flipped == 0.0 and clean.roc_auc == pytest.approx(1.0)
    files, written = write_outputs(tmp_path / "out", data, scores, cal, n_boot=50, source="test run")
    assert written == json.loads((tmp_path / "out" / "metrics.json").read_text())
    text = files["report"].read_text()
    assert "nofile" in text and "stray" in text and "| jpeg | 50 |" in files["robustness_md"].read_text()
    assert all(p.is_file() for p in files.values())
    m = clean_metrics(scores, cal, n_boot=50)
    assert m["n_errors"] == 1 and m["calibration"]["temperature"] == 2.0


def test_an_interrupted_sweep_resumes_where_it_stopped(tmp_path):
    d, labels = labelled_folder(tmp_path, n=20)
    data = LabelledSet.load(d, labels)
    plan = degrade.sweep_plan(["jpeg", "blur"], reduced=True)
    out = tmp_path / "out"
    inputs = {"weights": "w1", "data": data.digest()}
    with pytest.raises(KeyboardInterrupt):
        score_sweep(data, plan, BrightnessScorer(fail_after=2), ScoreBook(out, inputs), chunk=4)
    saved = pd.read_csv(out / "scores.csv")
    assert 0 < len(saved) < len(data.ids) * len(plan)
    again = BrightnessScorer()
    scores = score_sweep(data, plan, again, ScoreBook(out, inputs), chunk=4)
    assert again.seen == len(data.ids) * len(plan) - len(saved)
    fresh = score_sweep(data, plan, BrightnessScorer(), ScoreBook(tmp_path / "x", inputs))
    key = ["Id", "degradation", "level"]
    a, b = scores.sort_values(key).reset_index(drop=True), fresh.sort_values(key).reset_index(drop=True)
    assert np.allclose(a.logit, b.logit)
    other = BrightnessScorer()
    score_sweep(data, plan, other, ScoreBook(out, {**inputs, "weights": "w2"}), chunk=4)
    assert other.seen == len(data.ids) * len(plan)  # other weights: nothing reused


# --- evaluate.py end to end, with tiny folds ----------------------------------------------------

def test_evaluate_cli_scores_a_labelled_folder_writes_every_output_and_resumes(tmp_path, capsys):
    import json

    import cv2
    from fold_fixtures import write_v42_folds
    from skimage import data as skdata

    import evaluate
    from titan.demo.dataset import FACE_PHOTOS, _rgb
    from titan.infer.detect import Detector

    run = tmp_path / "run"
    write_v42_folds(run, n=2, size=32)
    (run / "metrics_v42.json").write_text(json.dumps({"oof": {"threshold": 0.5}, "folds": [],
                                                      "calibration": {"temperature": 1.5, "uncertain_band": 0.05}}))
    d = tmp_path / "photos"
    d.mkdir()
    astro = cv2.resize(_rgb(FACE_PHOTOS["astronaut"]()), (160, 160), interpolation=cv2.INTER_AREA)
    grace = cv2.resize(_rgb(FACE_PHOTOS["grace_hopper"]()), (128, 160), interpolation=cv2.INTER_AREA)
    Image.fromarray(astro).save(d / "a.jpg", quality=95)
    Image.fromarray(grace).save(d / "g.png")
    Image.fromarray(np.ascontiguousarray(astro[:, ::-1])).save(d / "af.jpg", quality=95)
    Image.fromarray(cv2.resize(skdata.coffee(), (160, 120))).save(d / "c.jpg")
    (d / "bad.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    pd.DataFrame({"Id": ["a", "g", "af", "c", "bad", "gone"], "target_feature": [1, 0, 1, 0, 1, 0]}).to_csv(
        tmp_path / "labels.csv", index=False)
    out = tmp_path / "eval"
    argv = ["--data", str(d), "--labels", str(tmp_path / "labels.csv"), "--weights-dir", str(run), "--out", str(out),
            "--degradations", "jpeg,margin", "--reduced", "--bootstrap", "50", "--device", "cpu", "--tta", "minimal",
            "--no-progress", "--chunk", "2"]
    assert evaluate.main(argv) == 0
    for name in ("metrics.json", "robustness.csv", "robustness.md", "reliability.png", "robustness_jpeg.png",
                 "robustness_margin.png", "errors.csv", "scores.csv", "evaluation.md"):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_scored"] == 4 and m["n_errors"] == 1 and m["missing_images"] == ["gone"]
    assert m["run_threshold"]["threshold"] == 0.5 and m["calibration"]["temperature"] == 1.5
    scores = pd.read_csv(out / "scores.csv", keep_default_na=False)
    assert len(scores) == 5 * 3 and set(scores.degradation) == {"clean", "jpeg", "margin"}
    assert "bad.jpg" in pd.read_csv(out / "errors.csv").error.iloc[0]
    # The clean scores are detect.py's own verdict logits for the same photos.
    det = Detector.from_run(run, tta="minimal", device="cpu")
    clean = scores[(scores.degradation == "clean") & (scores.status == "ok")].set_index("Id")
    from titan.data.images import decode_image
    for i, r in zip(["a", "g"], det.score_images([(i, decode_image(d / f)) for i, f in (("a", "a.jpg"), ("g", "g.png"))])):
        assert float(clean.loc[i, "logit"]) == pytest.approx(r.logit, abs=1e-4)
    report = (out / "evaluation.md").read_text()
    assert "| margin | 0.4" in report and "gone" in report and "ECE" in report
    capsys.readouterr()
    assert evaluate.main(argv) == 0  # the same command again: everything is reused
    assert "resuming: 15 scored rows" in capsys.readouterr().out + (out / "evaluate_log.txt").read_text()


def test_evaluate_without_weights_or_labels_exits_2_naming_what_is_missing(tmp_path, capsys):
    import evaluate

    d = tmp_path / "photos"
    d.mkdir()
    Image.fromarray(photo()).save(d / "x.jpg")
    pd.DataFrame({"Id": ["x"], "target_feature": [1]}).to_csv(tmp_path / "l.csv", index=False)
    assert evaluate.main(["--data", str(d), "--labels", str(tmp_path / "nope.csv"), "--no-progress",
                          "--out", str(tmp_path / "o")]) == 2
    assert "nope.csv" in capsys.readouterr().err
    assert evaluate.main(["--data", str(d), "--labels", str(tmp_path / "l.csv"), "--weights-dir", str(tmp_path),
                          "--no-progress", "--out", str(tmp_path / "o")]) == 2
    assert "v42_backbone_fold" in capsys.readouterr().err
