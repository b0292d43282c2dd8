"""Evaluating on labels of one class: refused unless meant, and then only what one class defines.

With reals only, F1, precision, recall, ROC-AUC and AP have no meaning (there is no fake to find,
so they come out 0 or NaN and read as a model that got everything wrong); what is defined is the
share of reals called fake (the false-positive rate) and its complement, the specificity. With
fakes only, the share found (recall, the detection rate) and the missed fakes. The rest is
reported as null with the reason.
"""
from __future__ import annotations

import numpy as np

from ..infer.calibration import decide

UNDEFINED = "n/a (one class)"
CLASS_NAMES = {0: "real (0)", 1: "fake (1)"}


class OneClassError(ValueError):
    """The labels hold one class and --one-class was not given."""


def check_classes(labels: np.ndarray, source: str, one_class: bool) -> int | None:
    """The one class present (None when both are); refuses one class unless ``one_class``."""
    present = sorted(set(int(v) for v in labels))
    if len(present) > 1:
        return None
    only = present[0]
    if not one_class:
        raise OneClassError(
            f"{source}: every one of the {len(labels)} labelled images is {CLASS_NAMES[only]}; F1, precision, recall, "
            "ROC-AUC and AP need both classes. Add images of the other class, or pass --one-class to report only what "
            "one class defines (false-positive rate for reals, detection rate for fakes)")
    return only


def _rate(hits: np.ndarray, n_boot: int, seed: int) -> dict:
    """A proportion with its bootstrap 95 % interval."""
    value = float(hits.mean())
    rng = np.random.default_rng(seed)
    boots = rng.binomial(len(hits), value, size=max(1, n_boot)) / len(hits)
    return {"value": value, "ci95": [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))]}


def one_class_block(cls: int, prob: np.ndarray, threshold: float, n_boot: int = 1000, seed: int = 0,
                    keys: tuple[str, ...] = ()) -> dict:
    """One threshold's metrics on one class: the defined rates with intervals, every other
    headline key (``keys``) null."""
    called_fake = decide(prob, threshold).astype(float)
    out: dict = {"threshold": float(threshold), **{k: None for k in keys}}
    if cls == 0:
        out["false_positive_rate"] = _rate(called_fake, n_boot, seed)
        out["specificity"] = _rate(1.0 - called_fake, n_boot, seed)
    else:
        out["recall"] = _rate(called_fake, n_boot, seed)
        miss = _rate(1.0 - called_fake, n_boot, seed)
        out["missed_fakes"] = {"value": miss["value"] * len(prob), "ci95": [v * len(prob) for v in miss["ci95"]]}
    return out


def why_undefined(cls: int) -> str:
    other = "fake" if cls == 0 else "real"
    return (f"only {CLASS_NAMES[cls]} images are labelled: metrics that need a {other} image (F1, precision"
            f"{', recall' if cls == 0 else ''}, ROC-AUC, AP, TPR at a false-positive rate) are not defined")
