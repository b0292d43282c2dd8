"""An ensemble of training runs (e.g. a Lite0 run and a CLIP probe run): one scoring set made of
several fold sets, fitted once on their combined out-of-fold predictions.

    python ensemble.py runs/lite0 runs/clip --out runs/ens     # writes runs/ens/ensemble.json
    python detect.py photos/ --weights-dir runs/ens                            # any scorer, as with one run

**Rule.** Each member is a run folder (its ``FoldSet``); a member's logit for a face is its folds' mean
logit over its TTA views, computed on the member's own crop and input size (its preprocessing record);
the ensemble's logit is the mean of its members' logits. The threshold (best F1), temperature and
uncertain band are fitted on the members' OOF predictions joined on Id (``oof_{prefix}.csv``: each
prob → its logit; the mean over members), exactly as training fits one run's (``calibrate_oof``), so
the ensemble has its own threshold and calibration, not any member's. The members must hold OOF rows
for the same Ids with the same labels (refused otherwise, naming them).

**ensemble.json** (written atomically): the members (folder, relative to the ensemble folder when it can
be, prefix, and the digest of their fold files and metrics: ``FoldSet.digest``), the combined OOF
metrics and calibration. Loading (``EnsembleSet.from_folder``) refuses a member whose files changed since
the fit (its digest), naming it and the refit command. ``EnsembleSet`` and ``load_scoring_set`` live in
``titan.infer.folds`` beside ``FoldSet`` (the one owner of what a set of folds decides); detect.py,
evaluate.py, serve.py (through ``Detector.from_run``) and safe_inference.py load through them: an
ensemble folder gives an ``EnsembleSet``, any other run folder its ``FoldSet``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from ..checkpoints import atomic_json, atomic_write
from ..config import ScriptOptions, option
from ..metrics import binary_metrics
from ..runfiles import DEFAULT_PREFIX, ENSEMBLE_JSON, RunFiles
from .calibration import calibrate_oof, logit_of, probability
from .folds import FoldSet, FoldSetError

log = logging.getLogger("titan")

ENSEMBLE_OOF = "oof_ensemble.csv"


def _member_oof(run: RunFiles) -> pd.DataFrame:
    path = run.oof_csv
    if not path.is_file():
        raise FoldSetError(f"{path}: a member needs its out-of-fold predictions (written when its folds finish training)")
    try:
        df = pd.read_csv(path, dtype={"Id": str})[["Id", "target_feature", "prob"]].dropna()
    except (OSError, ValueError, KeyError) as e:
        raise FoldSetError(f"{path}: unreadable OOF file ({e})") from None
    if df.Id.duplicated().any():
        raise FoldSetError(f"{path}: Id(s) listed twice: {df.Id[df.Id.duplicated()].tolist()[:5]}")
    return df


def combined_oof(runs: Sequence[RunFiles]) -> pd.DataFrame:
    """The members' OOF rows joined on Id → ``Id, target_feature, logit`` (the mean of member logits)
    and one ``logit_<i>`` column per member. Different Id sets or labels are refused, naming examples."""
    frames = [_member_oof(r) for r in runs]
    ids0 = set(frames[0].Id)
    for run, df in zip(runs[1:], frames[1:]):
        only_a, only_b = sorted(ids0 - set(df.Id)), sorted(set(df.Id) - ids0)
        if only_a or only_b:
            raise FoldSetError(
                f"the members' OOF predictions are not for the same images: {len(only_a)} Id(s) only in "
                f"{runs[0].oof_csv} (e.g. {only_a[:5]}), {len(only_b)} only in {run.oof_csv} (e.g. {only_b[:5]}); "
                "an ensemble's threshold needs every member's OOF for the same Ids: train the members on the same label CSV")
    out = frames[0][["Id", "target_feature"]].sort_values("Id").reset_index(drop=True)
    for i, (run, df) in enumerate(zip(runs, frames)):
        m = out.merge(df, on="Id", how="left", suffixes=("", "_m"))
        clash = m.Id[m.target_feature != m.target_feature_m].tolist()
        if clash:
            raise FoldSetError(f"{run.oof_csv} labels {len(clash)} Id(s) differently from {runs[0].oof_csv} "
                               f"(e.g. {clash[:5]}): the members were trained on different labels")
        out[f"logit_{i}"] = logit_of(m.prob.to_numpy())
    out["logit"] = out[[f"logit_{i}" for i in range(len(runs))]].to_numpy().mean(axis=1)
    return out


def fit_ensemble(members: Sequence[str | os.PathLike], out: str | os.PathLike, prefix: str = DEFAULT_PREFIX,
                 say: Callable[[str], None] = log.info) -> dict:
    """Load each member (every fold must load), join their OOF predictions, fit the threshold, temperature
    and band on the mean logits → ``out/ensemble.json`` (and ``out/oof_ensemble.csv``); returns the spec."""
    if not str(out):
        raise FoldSetError("name the ensemble's folder with --out")
    if len(members) < 2:
        raise FoldSetError(f"an ensemble needs at least two run folders, got {len(members)}")
    out = Path(out)
    if any(Path(m).resolve() == out.resolve() for m in members):
        raise FoldSetError(f"--out {out} is one of the members; write the ensemble to a folder of its own")
    sets = [FoldSet.from_folder(m, prefix) for m in members]
    runs = [fs.run for fs in sets]
    oof = combined_oof(runs)
    y, prob = oof.target_feature.to_numpy(int), probability(oof.logit.to_numpy())
    rep = binary_metrics(y, prob)
    cal = calibrate_oof(y, prob, rep["threshold"])
    out.mkdir(parents=True, exist_ok=True)
    spec = {"members": [{"folder": _relative(Path(m), out), "prefix": prefix, "digest": fs.digest(), "arch": fs.arch,
                         "img_size": fs.img_size[0], "folds": fs.names,
                         "oof": binary_metrics(y, probability(oof[f"logit_{i}"].to_numpy()))}
                        for i, (m, fs) in enumerate(zip(members, sets))],
            "rule": "mean of member logits (each: its folds' mean over its TTA views, at its own preprocessing)",
            "oof": rep, "calibration": cal, "n_oof": int(len(oof))}
    atomic_write(out / ENSEMBLE_OOF, lambda tmp: oof.assign(prob=prob).to_csv(tmp, index=False))
    atomic_json(spec, out / ENSEMBLE_JSON)
    say(f"ensemble of {len(sets)} runs ({', '.join(f'{m} ({fs.arch})' for m, fs in zip(members, sets))}) on {len(oof)} "
        f"OOF Ids: ROC-AUC {rep['roc_auc']:.4f}, F1 {rep['f1']:.4f} at threshold {rep['threshold']:.4f}; temperature "
        f"{cal['temperature']:.3f}; members' ROC-AUC " + ", ".join(f"{s['oof']['roc_auc']:.4f}" for s in spec["members"])
        + f" → {out / ENSEMBLE_JSON}")
    return spec


def _relative(member: Path, out: Path) -> str:
    try:
        return os.path.relpath(member.resolve(), out.resolve())
    except ValueError:  # another drive
        return str(member.resolve())


def mean_member_logits(member_logits: Sequence[np.ndarray]) -> np.ndarray:
    """The ensemble's logit per face: the mean over members (NaN where a member has none)."""
    return np.mean(np.stack([np.asarray(m, np.float64) for m in member_logits]), axis=0)


@dataclass
class EnsembleFitOptions(ScriptOptions):
    """ensemble.py's flags."""

    members: list[str] = option(help="member run folders (each with its folds, oof and metrics files)", positional=True,
                                default_factory=list)
    out: str = option("", "the ensemble's folder: ensemble.json and oof_ensemble.csv are written there")
    prefix: str = option(DEFAULT_PREFIX, "the members' fold file prefix")
