"""Our metrics agree with scikit-learn; the threshold search finds the best F1."""
import numpy as np
import pytest
from sklearn import metrics as skm

from titan.metrics import average_precision, best_f1_threshold, binary_metrics, roc_auc


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_agree_with_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    p = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1).round(2)  # rounding makes ties
    assert roc_auc(y, p) == pytest.approx(skm.roc_auc_score(y, p))
    assert average_precision(y, p) == pytest.approx(skm.average_precision_score(y, p))
    r = binary_metrics(y, p, 0.5)
    pred = (p >= 0.5).astype(int)
    assert r["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert r["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert r["recall"] == pytest.approx(skm.recall_score(y, pred))
    tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
    assert (r["tn"], r["fp"], r["fn"], r["tp"]) == (tn, fp, fn, tp)
    assert r["missed_fakes"] == fn and r["n_fakes"] == y.sum()


def test_best_threshold_beats_every_candidate():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 300)
    p = np.clip(0.35 * y + rng.random(300) * 0.65, 0, 1)
    th, f1 = best_f1_threshold(y, p)
    assert skm.f1_score(y, p >= th) == pytest.approx(f1)
    brute = max(skm.f1_score(y, p >= t) for t in np.unique(p))
    assert f1 == pytest.approx(brute)


def test_perfect_separation_threshold_between_classes():
    th, f1 = best_f1_threshold([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
    assert f1 == 1.0 and 0.2 < th < 0.8


def test_single_class_auc_is_nan_not_crash():
    assert np.isnan(roc_auc([1, 1, 1], [0.2, 0.5, 0.9]))
    assert best_f1_threshold([0, 0], [0.3, 0.4])[1] == 0.0
