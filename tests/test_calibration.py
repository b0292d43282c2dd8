"""Temperature scaling and the uncertain band: fitted on OOF logits, bounded, monotone, read by the fold set."""
from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from fold_fixtures import write_v42_folds
from titan.infer.calibration import (BAND_SHARE, DEFAULT_BAND, T_BOUNDS, Calibration, calibrate_oof, choose_band,
                                     calibrated_probability, fit_temperature, logit_of, nll, sigmoid)
from titan.infer.folds import FoldSet


def overconfident(n: int = 4000, t_true: float = 2.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits z whose labels follow σ(z / t_true): a model t_true times too sure of itself."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 4, n)
    y = (rng.random(n) < sigmoid(z / t_true)).astype(int)
    return z, y


def test_fit_temperature_recovers_a_known_overconfidence_and_lowers_the_nll():
    z, y = overconfident()
    t = fit_temperature(z, y)
    assert t == pytest.approx(2.5, rel=0.12)
    assert nll(z, y, t) < nll(z, y, 1.0)
    # it is the minimum: nudging T either way costs likelihood
    assert nll(z, y, t) <= min(nll(z, y, t * 1.05), nll(z, y, t / 1.05))


def test_fit_temperature_is_bounded_and_finite_on_degenerate_data():
    z = np.r_[np.linspace(-5, -1, 20), np.linspace(1, 5, 20)]
    y = (z > 0).astype(int)
    assert fit_temperature(z, y) == pytest.approx(T_BOUNDS[0], rel=1e-3)  # separable: as sure as allowed, no further
    assert fit_temperature(-z, y) <= T_BOUNDS[1]                          # anti-correlated: bounded above
    assert fit_temperature(z, np.ones_like(y)) == 1.0                     # one class: nothing to fit
    assert fit_temperature(z[:5], y[:5]) == 1.0                           # too few rows
    zz = np.r_[z, np.nan, np.inf, -np.inf]
    yy = np.r_[y, 1, 0, 1]
    t = fit_temperature(zz, yy)
    assert np.isfinite(t) and t == pytest.approx(fit_temperature(z, y))  # non-finite rows are left out


def test_calibrated_probability_is_monotone_in_the_raw_one_and_keeps_the_decision():
    z = np.linspace(-12, 12, 2001)
    raw = sigmoid(z)
    for t in (0.3, 1.0, 2.5, 19.0):
        cal = calibrated_probability(z, t)
        assert np.all(np.diff(cal) >= 0) and np.all((cal >= 0) & (cal <= 1))
        unsaturated = (cal[:-1] > 1e-9) & (cal[1:] < 1 - 1e-9)  # float64 rounds σ(40) to 1
        assert unsaturated.sum() > 100 and np.all(np.diff(cal)[unsaturated] > 0)
        c = Calibration(t, 0.05, 0.37)
        decision, verdict = c.verdicts(z)
        assert (decision == np.where(raw >= 0.37, "fake", "real")).all()  # T never moves a decision
        inside = verdict == "uncertain"
        assert (np.abs(cal[inside] - c.calibrated_cut) <= 0.05 + 1e-12).all()
        assert (verdict[~inside] == decision[~inside]).all()


def test_band_holds_the_least_sure_tenth_of_the_oof_faces():
    z, y = overconfident(n=2000, seed=1)
    probs = sigmoid(z)
    cal = calibrate_oof(y, probs, threshold=0.4)
    c = Calibration(cal["temperature"], cal["uncertain_band"], 0.4)
    share = np.mean(c.verdicts(logit_of(probs))[1] == "uncertain")
    assert share == pytest.approx(BAND_SHARE, abs=0.01)
    assert cal["nll_calibrated"] < cal["nll_raw"] and cal["n"] == 2000
    assert choose_band([0.1, 0.2], 1.0, 0.5) == DEFAULT_BAND  # too little OOF data


def test_fold_set_reads_the_stored_calibration_and_old_runs_get_temperature_1_with_a_notice(tmp_path, caplog):
    write_v42_folds(tmp_path, n=1)
    (tmp_path / "metrics_v42.json").write_text(json.dumps({"oof": {"threshold": 0.42},
                                                          "calibration": {"temperature": 1.7, "uncertain_band": 0.06}}))
    c = FoldSet.from_folder(tmp_path).calibration()
    assert (c.temperature, c.band, c.threshold) == (1.7, 0.06, 0.42)

    (tmp_path / "metrics_v42.json").write_text(json.dumps({"oof": {"threshold": 0.42}}))  # a run from before calibration
    z, y = overconfident(n=200)
    pd.DataFrame({"Id": [f"i{k}" for k in range(200)], "target_feature": y, "prob": sigmoid(z)}).to_csv(
        tmp_path / "oof_v42.csv", index=False)
    with caplog.at_level(logging.WARNING, logger="titan"):
        c = FoldSet.from_folder(tmp_path).calibration()
    assert c.temperature == 1.0 and "temperature 1" in caplog.text
    assert c.band == pytest.approx(choose_band(z, 1.0, 0.42), abs=1e-6) and "oof_v42.csv" in c.note

    (tmp_path / "oof_v42.csv").unlink()
    (tmp_path / "metrics_v42.json").unlink()
    c = FoldSet.from_folder(tmp_path).calibration()
    assert c.temperature == 1.0 and c.band == DEFAULT_BAND
