"""Binary metrics for the fake class (label 1), in numpy so they are exact and dependency-light."""
from __future__ import annotations

import numpy as np

from .infer.calibration import decide


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
    pred = decide(p, threshold)
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


# --- operating points, intervals, calibration (evaluate.py) -----------------------------------

def tpr_at_fpr(y_true, y_prob, max_fpr: float) -> float:
    """The highest share of fakes caught by any rule ``prob >= t`` that flags at most ``max_fpr``
    of the reals (the ROC curve read as a step, never interpolated above what a threshold does)."""
    y, p = _arrays(y_true, y_prob)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, tp, fp = ranked_counts(y, p)
    ok = fp / n_neg <= max_fpr + 1e-12
    return float(tp[ok].max() / n_pos) if ok.any() else 0.0


def headline(y_true, y_prob, threshold: float) -> dict[str, float]:
    """The numbers evaluate.py reports at one threshold (each a float, for intervals)."""
    m = binary_metrics(y_true, y_prob, threshold)
    return {"f1": m["f1"], "precision": m["precision"], "recall": m["recall"], "roc_auc": m["roc_auc"],
            "ap": m["ap"], "tpr_at_1fpr": tpr_at_fpr(y_true, y_prob, 0.01),
            "tpr_at_5fpr": tpr_at_fpr(y_true, y_prob, 0.05), "missed_fakes": float(m["missed_fakes"])}


def bootstrap_intervals(y_true, y_prob, threshold: float, n_boot: int = 1000, seed: int = 0,
                        level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of ``headline`` at a fixed threshold: images resampled with
    replacement, fakes and reals separately (every resample keeps both classes, so AUC exists)."""
    y, p = _arrays(y_true, y_prob)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    draws: dict[str, list[float]] = {}
    for _ in range(n_boot):
        idx = np.r_[rng.choice(pos, pos.size), rng.choice(neg, neg.size)] if pos.size and neg.size \
            else rng.integers(0, y.size, y.size)
        for k, v in headline(y[idx], p[idx], threshold).items():
            draws.setdefault(k, []).append(v)
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    return {k: (float(np.nanpercentile(v, lo)), float(np.nanpercentile(v, hi))) if np.isfinite(v).any()
            else (float("nan"), float("nan")) for k, v in draws.items()}


def reliability_bins(y_true, y_prob, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Equal-width probability bins, closed on the right as scikit-learn's ``calibration_curve``:
    count, mean predicted probability and share of fakes in each (empty bins give nan) — the
    points of a reliability diagram."""
    y, p = _arrays(y_true, y_prob)
    edges = np.linspace(0, 1, n_bins + 1)
    b = np.searchsorted(edges[1:-1], p)
    count = np.bincount(b, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(b, weights=p, minlength=n_bins) / count
        frac = np.bincount(b, weights=y, minlength=n_bins) / count
    return {"edges": edges, "count": count, "confidence": conf, "fraction_fake": frac}


def expected_calibration_error(y_true, y_prob, n_bins: int = 10) -> float:
    """Σ_bins (n_b / N) · |share of fakes − mean probability| over equal-width bins of the fake
    probability (0 for a perfectly honest detector)."""
    r = reliability_bins(y_true, y_prob, n_bins)
    used = r["count"] > 0
    if not used.any():
        return float("nan")
    w = r["count"][used] / r["count"].sum()
    return float(np.sum(w * np.abs(r["fraction_fake"][used] - r["confidence"][used])))
