"""Logits → probabilities, decisions and verdicts: the one owner of σ, the threshold rule and the band.

No other module computes a sigmoid or compares a probability with a threshold (tests/test_layout.py
holds that): raw P(fake) = σ(logit) (``probability``; a fold ensemble's is σ of its mean logit,
``ensemble_probability``), the decision is fake when P ≥ threshold (``decide``), the calibrated
P is σ(logit / T) and the verdict adds ``uncertain`` inside the band (``Calibration``).

**Temperature.** Training fits one temperature T on the out-of-fold logits by minimum negative
log-likelihood (temperature scaling, Guo et al. 2017, "On Calibration of Modern Neural
Networks"); the calibrated P(fake) is σ(logit / T). Dividing by a T > 0 keeps the order of
every score and the decision at the threshold as they are: only how sure the number claims to be
changes. T is searched in ``T_BOUNDS`` (the NLL is convex in 1/T, so a golden-section search
finds the minimum); with fewer than ``MIN_ROWS`` usable rows or one class only there is nothing
to fit and T = 1.

**Uncertain band.** A half-width around the threshold on the calibrated scale: a face is
``uncertain`` when |calibrated P − calibrated threshold| ≤ band. Training picks the band as the
``BAND_SHARE`` (10 %) quantile of the out-of-fold faces' distances to the threshold, so the band
holds the least-sure ~10 % of those faces; without OOF data it is ``DEFAULT_BAND``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

T_BOUNDS = (0.05, 20.0)
BAND_SHARE = 0.10
DEFAULT_BAND = 0.10
MIN_ROWS = 10
_EPS = 1e-6


def logit_of(prob) -> np.ndarray:
    """log(p / (1 − p)), with p clipped to [1e-6, 1 − 1e-6] so a stored 0 or 1 stays finite."""
    p = np.clip(np.asarray(prob, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.log(p) - np.log1p(-p)


def sigmoid(x) -> np.ndarray:
    """σ(x) in float64. The form the training outputs were always written with (1 / (1 + e^−x)), so
    OOF rows, predictions and submissions keep their bits; e^−x overflowing to inf gives exactly 0."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def probability(logits) -> np.ndarray:
    """Raw P(fake) = σ(logit), per logit (a fold's, or an ensemble's mean)."""
    return sigmoid(logits)


def ensemble_probability(fold_logits) -> np.ndarray:
    """A fold ensemble's P(fake) per image: σ of the mean logit over the folds (axis 0)."""
    return sigmoid(np.asarray(fold_logits, dtype=np.float64).mean(axis=0))


def decide(prob, threshold: float) -> np.ndarray:
    """0/1 decisions: fake (1) when P(fake) ≥ threshold. The one threshold rule."""
    return (np.asarray(prob, dtype=np.float64) >= threshold).astype(np.int64)


def apply_temperature(logits, temperature: float) -> np.ndarray:
    """The logits divided by T."""
    return np.asarray(logits, dtype=np.float64) / float(temperature)


def calibrated_probability(logits, temperature: float) -> np.ndarray:
    """σ(logit / T): the calibrated P(fake)."""
    return sigmoid(apply_temperature(logits, temperature))


def nll(logits, labels, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under σ(logit / T)."""
    z, y = _usable(logits, labels)
    if not len(z):
        return float("nan")
    return float(np.mean(np.logaddexp(0.0, -(2 * y - 1) * z / temperature)))


def _usable(logits, labels) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if z.shape != y.shape:
        raise ValueError(f"{z.size} logits but {y.size} labels")
    keep = np.isfinite(z) & np.isin(y, (0.0, 1.0))
    return z[keep], y[keep]


def fit_temperature(logits, labels, bounds: tuple[float, float] = T_BOUNDS) -> float:
    """The T in ``bounds`` minimising the NLL of σ(logit / T) (non-finite rows are left out);
    1.0 when there is nothing to fit (fewer than ``MIN_ROWS`` rows, or one class only)."""
    z, y = _usable(logits, labels)
    if len(z) < MIN_ROWS or y.min() == y.max():
        return 1.0
    s = (2 * y - 1) * z

    def loss(beta: float) -> float:  # beta = 1/T: the NLL is convex in it
        return float(np.mean(np.logaddexp(0.0, -s * beta)))

    lo, hi = 1.0 / bounds[1], 1.0 / bounds[0]
    g = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo + (1 - g) * (hi - lo), lo + g * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(80):  # the bracket shrinks by 0.618 per step: far below float noise at the end
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = lo + (1 - g) * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = loss(b)
    beta = (lo + hi) / 2.0
    t = 1.0 / beta
    return float(min(max(t, bounds[0]), bounds[1])) if math.isfinite(t) else 1.0


def choose_band(logits, temperature: float, threshold: float, share: float = BAND_SHARE) -> float:
    """The half-width around the calibrated threshold that holds the ``share`` least-sure faces:
    the ``share`` quantile of |σ(logit / T) − σ(logit(threshold) / T)| (``DEFAULT_BAND`` with
    fewer than ``MIN_ROWS`` finite logits)."""
    z = np.asarray(logits, dtype=np.float64).ravel()
    z = z[np.isfinite(z)]
    if len(z) < MIN_ROWS:
        return DEFAULT_BAND
    d = np.abs(calibrated_probability(z, temperature) - calibrate_prob(threshold, temperature))
    return float(min(max(np.quantile(d, share), 1e-4), 0.5))


def calibrate_prob(prob: float, temperature: float) -> float:
    """A raw probability (e.g. the run's threshold) on the calibrated scale: σ(logit(p) / T)."""
    return float(calibrated_probability(logit_of(prob), temperature))


def calibrate_oof(labels, probs, threshold: float) -> dict:
    """What training stores beside the OOF metrics: the temperature, the band, and the NLL before
    and after (plain floats)."""
    z = logit_of(probs)
    t = fit_temperature(z, labels)
    return {"temperature": t, "uncertain_band": choose_band(z, t, threshold), "band_share": BAND_SHARE,
            "nll_raw": nll(z, labels, 1.0), "nll_calibrated": nll(z, labels, t), "n": int(len(_usable(z, labels)[0]))}


@dataclass(frozen=True)
class Calibration:
    """A run's temperature, uncertain band and threshold, and where each came from."""

    temperature: float = 1.0
    band: float = DEFAULT_BAND
    threshold: float = 0.5
    note: str = ""

    @property
    def calibrated_cut(self) -> float:
        """The threshold on the calibrated scale."""
        return calibrate_prob(self.threshold, self.temperature)

    def probabilities(self, logits) -> tuple[np.ndarray, np.ndarray]:
        """(raw P, calibrated P) of ensemble logits."""
        return probability(logits), calibrated_probability(logits, self.temperature)

    def decisions(self, prob) -> np.ndarray:
        """0/1 decisions of raw probabilities at this threshold."""
        return decide(prob, self.threshold)

    def verdicts(self, logits) -> tuple[np.ndarray, np.ndarray]:
        """(decision at the threshold: "fake"/"real", verdict: "fake"/"real"/"uncertain") per logit."""
        prob, cal = self.probabilities(logits)
        decision = np.where(decide(prob, self.threshold) == 1, "fake", "real")
        uncertain = np.abs(cal - self.calibrated_cut) <= self.band
        return decision, np.where(uncertain, "uncertain", decision)
