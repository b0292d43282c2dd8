"""The V42 training pipeline: SimMIM pretraining → k-fold fine-tuning → TTA inference.

Each stage is one function readable top to bottom (nanoGPT style): ``run_ssl`` (train/ssl.py),
``run_finetune`` (train/finetune.py) and ``run_infer`` (here); ``run_stages`` runs them in order
in one session. Every stage resumes; under torchrun every rank runs the same code and rank 0
writes files and logs.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..config import ScriptOptions, TrainConfig, option, save_config
from ..checkpoints import atomic_write
from ..data.images import ImageIndex
from ..data.align import read_align_settings
from ..data.labels import group_codes, has_groups
from ..safe_text import csv_frame
from ..infer.folds import FoldSet
from ..infer.record import CROP, Preprocessing
from ..infer.resilient import Scores
from ..infer.scorer import score_fold_set
from ..infer.submission import raw_test_index, submission_frame, test_set, write_predictions, write_submission
from . import distributed
from .finetune import assign_folds, load_labels, run_finetune
from .estimate import estimate, with_auto_batch
from .session import TrainSession, face_dirs, session
from .ssl import run_ssl
from .tune import check_tune

STAGES = ("ssl", "finetune", "infer")


def run_stages(cfg: TrainConfig, stages: Sequence[str] = STAGES, estimate_steps: int = 0) -> None:
    """Run the named stages in pipeline order; ``estimate_steps`` > 0: only time that many
    micro-batches of each and log the projected cost (``titan.train.estimate``), writing nothing else."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    with session(cfg, estimate=estimate_steps > 0) as run:
        cfg = run.cfg  # its input size resolved (session.resolve_input_size)
        labels = preflight(run, stages, probe_writable=estimate_steps == 0)
        if cfg.auto_batch:
            run = with_auto_batch(run, stages)
            cfg = run.cfg
            if run.env.is_main and not estimate_steps:
                save_config(cfg, run.files.config_json)  # the resolved batch and accumulation
        if estimate_steps:
            estimate(run, stages, labels, estimate_steps)
            return
        if "ssl" in stages:
            run_ssl(cfg, run)
        if "finetune" in stages:
            run_finetune(cfg, run, labels)
        if "infer" in stages:
            run_infer(cfg, run)


def preflight(r: TrainSession, stages: Sequence[str], probe_writable: bool = True) -> tuple[pd.DataFrame, np.ndarray] | None:
    """Everything that can be checked before hours of work: the output folder is writable, the
    faces are there, and the labels make stratified folds (each named, with the fix, on failure).
    Returns the checked (label rows, folds) for fine-tuning, so they are read once."""
    if r.env.is_main and probe_writable:
        probe = r.out / ".write_test"
        try:
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(r.out)) from e
    if "ssl" in stages or "finetune" in stages:
        face_dirs(r.cfg)
    if "finetune" in stages:
        check_tune(r.cfg)
        df = load_labels(r.cfg, r.log)
        folds = assign_folds(df, r.cfg.n_folds, r.cfg.fold_seed)
        per_fold = [np.bincount(df.target_feature.to_numpy()[folds == k], minlength=2) for k in range(r.cfg.n_folds)]
        n_groups = [len(np.unique(group_codes(df)[folds == k])) for k in range(r.cfg.n_folds)] if has_groups(df) else None
        r.log.info("checked before training: " + ", ".join(f"fold {k} {c[0]} real / {c[1]} fake"
                   + (f" / {n_groups[k]} groups" if n_groups else "") for k, c in enumerate(per_fold)))
        return df, folds
    return None


def inference_folds(r: TrainSession) -> tuple[FoldSet, Preprocessing]:
    """The run's fold set, with what it leaves out said in the log, and its resolved preprocessing:
    the run's --img-size and --tta, and the crop of the test faces (their align_settings.json) checked
    against what the folds were trained on (a mismatch is refused unless --force-preprocessing)."""
    fs = FoldSet.from_folder(r.out, r.files.prefix, n_folds=r.cfg.n_folds)
    for name, why in fs.skipped:
        r.log.info(f"NOTICE: ignoring {name}: {why}")
    for note in fs.notes:
        r.log.info(f"NOTICE: {note}")
    if len(fs.folds) < r.cfg.n_folds:
        r.log.info(f"NOTICE: using {len(fs.folds)} of {r.cfg.n_folds} folds ({', '.join(fs.names)}); "
                   f"the others have no files in {r.out}")
    crop = read_align_settings(Path(r.cfg.faces_dir) / "test") or {}
    prep = fs.resolve(img_size=r.cfg.img_size, tta=r.cfg.tta, force=r.cfg.force_preprocessing, say=r.log.info,
                      **{k: crop[k] for k in CROP if crop.get(k) is not None})
    return fs, prep


def gather_scores(env: distributed.DistEnv, mine: np.ndarray, scores: Scores) -> Scores:
    """Every rank's share of the scores, in test-set order (one process: as it is)."""
    pos = distributed.all_gather_cat(env, torch.from_numpy(mine)).numpy()
    order = np.argsort(pos)
    status = distributed.all_gather_cat(env, torch.from_numpy(scores.status)).numpy()[order]
    logits = np.stack([distributed.all_gather_cat(env, torch.from_numpy(lg)).numpy() for lg in scores.logits])[:, order]
    all_reasons, all_ids = distributed.all_gather_objects(env, scores.reasons), distributed.all_gather_objects(env, scores.ids)
    reasons, ids = [all_reasons[k] for k in order], [all_ids[k] for k in order]
    return Scores(ids, logits, status, reasons, scores.fold_names, scores.device, scores.batch_size, scores.notes)


def run_infer(cfg: TrainConfig, run: TrainSession | None = None) -> pd.DataFrame:
    """Every fold × TTA view over the test set → ``predictions_v42.csv`` and ``submission_v42.csv``.

    The test set is the raw test folder's images (else the face crops); an image that cannot be
    scored still gets its row, the prior decision, listed in ``submission_v42_issues.csv``. The
    folds, their input size and the threshold come from the fold set (``titan.infer.folds``)."""
    with session(cfg, run) as r:
        cfg = r.cfg  # its input size resolved (session.resolve_input_size)
        env, log = r.env, r.log
        fs, prep = inference_folds(r)
        test_dir = Path(cfg.faces_dir) / "test"
        crops = ImageIndex(test_dir) if test_dir.is_dir() else None
        ids = test_set(raw_test_index(cfg.raw_test_dir), crops, log.info)
        if not ids:
            raise FileNotFoundError(f"no test images: neither {cfg.raw_test_dir} nor {test_dir} holds any; "
                                    "run align_faces.py, or set --raw-test-dir / --faces-dir")
        log.info(f"inference: {len(ids)} test images × {fs.describe()} × TTA {list(prep.tta)} at {prep.img_size} px")

        mine = np.arange(env.rank, len(ids), env.world_size)  # each rank scores a strided share
        scored = score_fold_set(fs, prep, ids, crops, batch_size=cfg.infer_batch_size, device=str(env.device),
                                amp=cfg.amp, num_workers=cfg.num_workers, progress=env.is_main,
                                share=(mine, partial(gather_scores, env)), say=log.info)
        th = scored.calibration.threshold
        log.info(f"threshold {th:.4f} ({scored.threshold_note})")
        prob, filled = scored.prob, scored.filled()
        if env.is_main:
            write_predictions(r.files.predictions_csv, ids, prob, scored.fold_probabilities())
            write_submission(r.files.submission_csv, ids, filled.labels, ids)
            atomic_write(r.files.submission_issues_csv, lambda tmp: csv_frame(filled.issues).to_csv(tmp, index=False))
        for _, row in filled.issues.head(10).iterrows():
            log.info(f"guessed {row.Id}: {row.problem}")
        log.info(f"submission: {len(ids)} rows, {int(filled.labels.sum())} predicted fake (th={th:.4f}); {filled.summary()} "
                 f"→ {r.files.submission_csv}")
        distributed.barrier(env)
        return submission_frame(ids, filled.labels)


@dataclass
class StageOptions(ScriptOptions):
    """train_v42_diamond.py's own flag; every other flag is a TrainConfig field."""

    stages: str = option(",".join(STAGES), "comma-separated stages to run, in pipeline order")
    estimate: bool = option(False, "time a short warm stretch of each stage and print the projected cost; "
                                   "writes nothing but estimate_v42_log.txt/.jsonl")
    estimate_steps: int = option(8, "with --estimate: timed micro-batches per stage, after one warm-up window")

    def __post_init__(self) -> None:  # a typo is a usage error before anything runs
        bad = [s for s in self.stage_list() if s not in STAGES]
        if bad:
            raise ValueError(f"unknown stage(s) {bad}; choose from {','.join(STAGES)}")

    def stage_list(self) -> list[str]:
        return [s.strip() for s in self.stages.split(",") if s.strip()]
