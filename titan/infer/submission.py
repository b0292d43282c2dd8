"""The one writer of ``submission_{prefix}.csv`` and ``predictions_{prefix}.csv``.

Training's inference stage and safe inference both write through here, so both files list
every test Id once, in the project's one Id order (``titan.data.labels.id_order``), with the
decision ``prob >= threshold``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from ..checkpoints import atomic_write
from ..data.labels import id_order


def decide(prob: np.ndarray, threshold: float) -> np.ndarray:
    """0/1 decisions: fake when P(fake) ≥ threshold."""
    return (np.asarray(prob, dtype=np.float64) >= threshold).astype(np.int64)


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


def write_submission(path: str | os.PathLike, ids: Sequence[str], labels: Sequence[int]) -> pd.DataFrame:
    sub = submission_frame(ids, labels)
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
