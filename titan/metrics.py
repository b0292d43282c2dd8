"""Binary metrics for the fake class (label 1), in numpy so they are exact and dependency-light."""
from __future__ import annotations

import numpy as np


def _arrays(y_true, y_prob) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(int).ravel()
    p = np.asarray(y_prob, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"{y.size} labels but {p.size} probabilities")
    return y, p


def confusion(y_true, y_pred) -> dict[str, int]:
    y, yp = np.asarray(y_true).astype(int), np.asarray(y_pred).astype(int)
    return {
        "tn": int(((y == 0) & (yp == 0)).sum()), "fp": int(((y == 0) & (yp == 1)).sum()),
        "fn": int(((y == 1) & (yp == 0)).sum()), "tp": int(((y == 1) & (yp == 1)).sum()),
    }


def f1_precision_recall(y_true, y_pred) -> tuple[float, float, float]:
    c = confusion(y_true, y_pred)
    precision = c["tp"] / (c["tp"] + c["fp"]) if c["tp"] + c["fp"] else 0.0
    recall = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else 0.0
    f1 = 2 * c["tp"] / (2 * c["tp"] + c["fp"] + c["fn"]) if c["tp"] else 0.0
    return f1, precision, recall


def ranked_counts(y_true, y_prob) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct scores descending, TP, FP) of the rule ``prob >= score`` at each distinct score.

    The one sweep behind the threshold search, AP and the ROC / F1 curves.
    """
    y, p = _arrays(y_true, y_prob)
    order = np.argsort(-p, kind="mergesort")
    ps, ys = p[order], y[order]
    last_of_run = np.r_[ps[1:] != ps[:-1], True]  # cut after a run of equal scores
    return ps[last_of_run], np.cumsum(ys)[last_of_run], np.cumsum(1 - ys)[last_of_run]


def best_f1_threshold(y_true, y_prob) -> tuple[float, float]:
    """(threshold, F1) maximising F1 for the rule ``prob >= threshold``.

    Every distinct probability is a candidate; the threshold returned is the midpoint between
    the chosen cut and the next lower probability, so it generalises rather than sitting on a point.
    """
    y, p = _arrays(y_true, y_prob)
    if y.sum() == 0:
        return 0.5, 0.0
    cuts, tp, fp = ranked_counts(y, p)
    f1 = 2 * tp / (2 * tp + fp + (y.sum() - tp))
    i = int(np.argmax(f1))
    cut = cuts[i]
    below = cuts[i + 1] if i + 1 < len(cuts) else 0.0
    return float((cut + below) / 2), float(f1[i])


def roc_auc(y_true, y_prob) -> float:
    """Mann–Whitney AUC with ties counted as half; nan when only one class is present."""
    y, p = _arrays(y_true, y_prob)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p))
    sp = p[order]
    i = 0
    while i < len(sp):  # average ranks over ties
        j = i
        while j + 1 < len(sp) and sp[j + 1] == sp[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(y_true, y_prob) -> float:
    """Σ (R_n − R_{n−1}) P_n over distinct thresholds (scikit-learn's definition)."""
    y, p = _arrays(y_true, y_prob)
    if y.sum() == 0:
        return float("nan")
    _, tp, fp = ranked_counts(y, p)
    precision = tp / (tp + fp)
    recall = tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def binary_metrics(y_true, y_prob, threshold: float | None = None) -> dict[str, float | int]:
    """All headline metrics; ``threshold=None`` searches the best-F1 threshold."""
    y, p = _arrays(y_true, y_prob)
    if threshold is None:
        threshold, _ = best_f1_threshold(y, p)
    pred = (p >= threshold).astype(int)
    f1, precision, recall = f1_precision_recall(y, pred)
    c = confusion(y, pred)
    return {
        "threshold": float(threshold), "f1": f1, "precision": precision, "recall": recall,
        "roc_auc": roc_auc(y, p), "ap": average_precision(y, p), **c,
        "missed_fakes": c["fn"], "n_fakes": int(y.sum()), "n": int(len(y)),
    }


def format_metrics(r: dict) -> str:
    return (f"F1 {r['f1']:.4f} (th={r['threshold']:.3f}) | AUC {r['roc_auc']:.4f} | AP {r['ap']:.4f} | "
            f"P {r['precision']:.4f} R {r['recall']:.4f} | missed fakes {r['missed_fakes']}/{r['n_fakes']} | "
            f"TN {r['tn']} FP {r['fp']} FN {r['fn']} TP {r['tp']}")
