"""Safe inference: a complete submission whatever happens, short of no usable weights at all.

Degrades instead of failing, and says how: any subset of folds (a fold that does not load is
skipped and named), the fold set's threshold rule (``titan.infer.folds``), OOM → smaller batches,
no CUDA → CPU, an unreadable face crop → a fresh crop of the original image, and if that fails
too → the ensemble's prior decision, listed in the issues CSV.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from ..checkpoints import atomic_write
from ..config import option
from ..data.faces import crop_face
from ..data.images import ImageIndex, decode_image
from ..runfiles import TEST_IMAGES, RunFiles
from ..runlock import holds_folder
from ..safe_text import csv_frame
from ..runlog import RunLog
from .folds import EnsembleSet, FoldSet, FoldSetError, find_fold_files, is_ensemble, members_of
from .record import Preprocessing
from .resilient import RECROPPED, CropFlags, ScoringOptions
from .scorer import score_ensemble, score_fold_set
from .submission import in_id_order, raw_test_index, test_set, write_submission



class SafeInferenceError(RuntimeError):
    """No submission is possible (no usable weights, no test images)."""


@dataclass
class SafeConfig(ScoringOptions, CropFlags):
    """safe_inference.py's flags (the scoring flags, then its own; the crop flags serve its re-crops)."""

    raw_test_dir: str = option(TEST_IMAGES, "original test images, re-cropped when a face crop fails")
    out: str = option(RunFiles(Path(".")).submission_csv.name, "submission CSV")
    issues: str = option("", "issues CSV; empty = safe_inference_issues.csv beside --out")


@dataclass
class SafeSummary:
    out: Path
    issues: Path
    n_rows: int
    folds_used: list[str]
    folds_skipped: list[tuple[str, str]]
    threshold: float
    recropped: list[str]
    prior_rows: list[str]
    device: str
    batch_size: int
    degraded: list[str] = field(default_factory=list)


def recrop(original_path: str | os.PathLike, prep: Preprocessing) -> np.ndarray:
    """The face crop of an original test image, made as the folds' faces were (``prep``: size, margin,
    min_prob, max_side; centre square when no face is found), uint8 RGB."""
    return np.asarray(crop_face(decode_image(original_path), prep.img_size, prep.margin,
                                min_prob=prep.min_prob, max_side=prep.max_side))


def _recrop_by_id(raw: ImageIndex | None, prep: Preprocessing, raw_dir: str, image_id: str) -> np.ndarray:
    # Module-level (not a closure) so loader workers can pickle it under any start method.
    if raw is None:
        raise FileNotFoundError(f"no originals folder {raw_dir}")
    return recrop(raw.path(image_id), prep)


def _index_or_none(folder: str, degraded: list[str], what: str) -> ImageIndex | None:
    try:
        return ImageIndex(folder)
    except FileNotFoundError:
        degraded.append(f"{what} folder {folder} not found")
        return None


@holds_folder(lambda cfg, runlog=None: Path(cfg.out).parent)
def safe_inference(cfg: SafeConfig, runlog: RunLog | None = None) -> SafeSummary:
    """Write a complete ``Id,target_feature`` submission (every test Id once, in Id order)."""
    say = runlog.info if runlog else (lambda msg: None)
    degraded: list[str] = []

    try:
        fs_files = RunFiles(Path(cfg.weights_dir), cfg.prefix)
        if is_ensemble(cfg.weights_dir):  # an ensemble of runs (titan.infer.ensemble): each member at its own record
            fs = EnsembleSet.from_folder(cfg.weights_dir, strict=False)
        else:
            fs = FoldSet.load(find_fold_files(cfg.weights_dir, cfg.prefix), strict=False, run=fs_files)
    except FoldSetError as e:  # folds that disagree: no single ensemble to fall back on
        raise SafeInferenceError(str(e)) from None
    folds, skipped = fs.folds, fs.skipped
    for name, why in skipped:
        say(f"skipped {name}: {why}")
        degraded.append(f"fold skipped: {name}")
    if not folds:
        raise SafeInferenceError(
            f"no usable fold weights in {cfg.weights_dir} ({fs_files.fold_glob()} + {fs_files.fold_glob('head')})"
            + (f"; skipped: {'; '.join(f'{n}: {w}' for n, w in skipped)}" if skipped else "")
            + ". Pass --weights-dir / --prefix.")
    try:
        preps = [cfg.resolve(m, say) for m in members_of(fs)]
    except FoldSetError as e:
        raise SafeInferenceError(str(e)) from None
    prep = preps[0]

    faces = _index_or_none(cfg.test_dir, degraded, "face-crop")
    raw = raw_test_index(cfg.raw_test_dir)
    ids = test_set(raw, faces, say)
    if not ids:
        raise SafeInferenceError(f"no test images in {cfg.test_dir} or {cfg.raw_test_dir}; pass --test-dir / --raw-test-dir")

    say(f"{fs.describe()}; " + "; ".join(f"input {p.img_size} px, TTA {','.join(p.tta)}" for p in preps) + f"; {len(ids)} test Ids")
    run_kw = dict(batch_size=cfg.batch_size, device=cfg.device, amp=cfg.amp, num_workers=cfg.num_workers,
                  progress=cfg.progress, say=say)
    try:
        if isinstance(fs, EnsembleSet):
            scored = score_ensemble(fs, preps, ids, faces, **run_kw,
                                    recrops=[partial(_recrop_by_id, raw, p, cfg.raw_test_dir) for p in preps])
        else:
            scored = score_fold_set(fs, prep, ids, faces, recrop=partial(_recrop_by_id, raw, prep, cfg.raw_test_dir), **run_kw)
    except Exception as e:  # noqa: BLE001 — reached only when no fold can score at all
        raise SafeInferenceError(f"no fold could score the test images: {type(e).__name__}: {e}") from e
    scores = scored.scores
    degraded += scores.notes
    th, th_note = scored.calibration.threshold, scored.threshold_note
    if th_note.startswith("0.5"):
        degraded.append(f"threshold: {th_note}")
    say(f"threshold {th:.4f} ({th_note})")

    filled = scored.filled()
    labels = filled.labels
    rec = np.flatnonzero(scores.status == RECROPPED)
    recropped = [ids[i] for i in rec]
    issues_df = pd.concat([pd.DataFrame([(ids[i], "recropped", scores.reasons[i], "scored on a fresh crop of the original")
                                         for i in rec], columns=filled.issues.columns), filled.issues])
    issues_df = in_id_order(issues_df.reset_index(drop=True)) if len(issues_df) else issues_df

    out = Path(cfg.out)
    issues_path = Path(cfg.issues) if cfg.issues else out.with_name("safe_inference_issues.csv")
    sub = write_submission(out, ids, labels, ids)
    atomic_write(issues_path, lambda tmp: csv_frame(issues_df).to_csv(tmp, index=False))

    prior_rows = filled.issues.Id.tolist()
    if recropped:
        degraded.append(f"{len(recropped)} row(s) scored on a re-crop of the original image")
    if prior_rows:
        degraded.append(f"{len(prior_rows)} row(s) given the prior decision {filled.prior} ({filled.prior_why})")
    say(f"wrote {out}: {len(sub)} rows ({int(labels.sum())} fake) on {scores.device}, batch {scores.batch_size}; "
        f"issues in {issues_path} ({len(issues_df)} rows)")
    say("degraded: " + ("nothing" if not degraded else "\n  - " + "\n  - ".join(degraded)))
    return SafeSummary(out, issues_path, len(sub), scores.fold_names, skipped, th, recropped, prior_rows,
                       scores.device, scores.batch_size, degraded)
