"""The test set and the one writer of ``submission_{prefix}.csv`` and ``predictions_{prefix}.csv``.

Training's inference stage and safe inference both ask here which Ids the test set holds
(``test_set``), fill the rows no model could score with the prior decision (``fill_unscored``),
and write through here, so both submissions list every test Id exactly once — never more, never
fewer — in the project's one Id order (``titan.data.ids.id_order``), with the decision
``prob >= threshold``.
"""
from __future__ import annotations

import os
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from ..checkpoints import atomic_write
from ..data.images import ImageIndex
from ..data.ids import id_order
from .calibration import decide


def raw_test_index(raw_dir: str | os.PathLike | None) -> ImageIndex | None:
    """The raw test folder's images (any file PIL can open, whatever its extension), None without one."""
    return ImageIndex(raw_dir, probe_unknown=True) if raw_dir and Path(raw_dir).is_dir() else None


def test_set(raw: ImageIndex | None, crops: ImageIndex | None, say: Callable[[str], None] = lambda s: None) -> list[str]:
    """The test Ids: every image of the raw test folder (``raw_test_index``) when there is one,
    else every face crop. Crops of Ids the raw folder no longer has are left out, and said so."""
    if raw is not None:
        if raw.ignored:
            say(f"test set: {len(raw.ignored)} file(s) in {raw.folder} are not images, ignored: "
                f"{[p.name for p in raw.ignored[:10]]}")
        stale = sorted(set(crops.ids()) - set(raw.ids())) if crops is not None else []
        if stale:
            say(f"test set: {len(stale)} face crop(s) in {crops.folder} have no original in {raw.folder} and are left out: "
                f"{stale[:10]}{' …' if len(stale) > 10 else ''}")
        return id_order(raw.ids())
    if crops is None:
        return []
    say(f"test set: the face crops in {crops.folder} (no raw test folder)")
    return id_order(crops.ids())


def prior_decision(pred: np.ndarray, probs: np.ndarray, threshold: float) -> tuple[int, str]:
    """The label for a row the ensemble could not see: the majority of its decisions on the other
    rows; on a tie, the threshold applied to their mean probability; with no other rows, 0."""
    if len(pred) == 0:
        return 0, "no image could be scored: real (0) by default"
    n1 = int(pred.sum())
    n0 = len(pred) - n1
    if n1 != n0:
        return int(n1 > n0), f"majority of {len(pred)} predictions ({n1} fake / {n0} real)"
    label = int(decide(float(np.mean(probs)), threshold))
    return label, f"tie in predictions: mean probability {np.mean(probs):.3f} vs threshold {threshold:.3f}"


@dataclass
class Filled:
    labels: np.ndarray      # 0/1 for every Id
    issues: pd.DataFrame    # Id, resolution, problem, action — one row per guessed Id
    prior: int
    prior_why: str

    @property
    def n_guessed(self) -> int:
        return len(self.issues)

    def summary(self) -> str:
        return (f"{self.n_guessed} of {len(self.labels)} row(s) guessed (prior decision {self.prior}: {self.prior_why})"
                if self.n_guessed else f"all {len(self.labels)} rows scored")


def fill_unscored(ids: Sequence[str], prob: np.ndarray, threshold: float, reasons: Sequence[str]) -> Filled:
    """Decisions for every Id: ``prob >= threshold`` where ``prob`` is finite, the prior decision
    (``prior_decision``) where no model could score the image, each of those listed with its reason."""
    prob = np.asarray(prob, dtype=np.float64)
    ok = np.isfinite(prob)
    labels = np.zeros(len(ids), dtype=np.int64)
    labels[ok] = decide(prob[ok], threshold)
    prior, why = prior_decision(labels[ok], prob[ok], threshold)
    labels[~ok] = prior
    rows = [(ids[i], "prior", reasons[i] or "no fold produced a finite score", f"label {prior}: {why}")
            for i in np.flatnonzero(~ok)]
    issues = pd.DataFrame(rows, columns=["Id", "resolution", "problem", "action"])
    return Filled(labels, in_id_order(issues) if len(issues) else issues, prior, why)


def submission_frame(ids: Sequence[str], labels: Sequence[int]) -> pd.DataFrame:
    """``Id,target_feature`` in Id order; every Id once."""
    df = pd.DataFrame({"Id": [str(i) for i in ids], "target_feature": np.asarray(labels, dtype=np.int64)})
    if not df.Id.is_unique:
        raise ValueError(f"duplicate Ids in a submission: {df.Id[df.Id.duplicated()].tolist()[:10]}")
    return in_id_order(df)


def in_id_order(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of a frame with a unique ``Id`` column, in Id order."""
    order = {i: n for n, i in enumerate(id_order(df.Id))}
    return df.iloc[np.argsort([order[i] for i in df.Id], kind="stable")].reset_index(drop=True)


def write_submission(path: str | os.PathLike, ids: Sequence[str], labels: Sequence[int],
                     test_ids: Sequence[str]) -> pd.DataFrame:
    """Write the submission — only when its Ids are exactly ``test_ids`` (never a short or long file)."""
    sub = submission_frame(ids, labels)
    missing, extra = set(test_ids) - set(sub.Id), set(sub.Id) - set(test_ids)
    if missing or extra or len(sub) != len(test_ids):
        raise ValueError(f"refusing to write {path}: {len(sub)} rows for a test set of {len(test_ids)} "
                         f"(missing {sorted(missing)[:10]}, extra {sorted(extra)[:10]})")
    atomic_write(Path(path), lambda tmp: sub.to_csv(tmp, index=False))
    return sub


def write_predictions(path: str | os.PathLike, ids: Sequence[str], prob: np.ndarray,
                      per_fold: Mapping[str, np.ndarray] | None = None) -> pd.DataFrame:
    """``Id,prob[,fold k…]`` in Id order (per-fold columns are probabilities too)."""
    df = pd.DataFrame({"Id": [str(i) for i in ids], "prob": np.asarray(prob, dtype=np.float64)})
    for name, p in (per_fold or {}).items():
        df[name] = np.asarray(p, dtype=np.float64)
    df = in_id_order(df)
    atomic_write(Path(path), lambda tmp: df.to_csv(tmp, index=False))
    return df
