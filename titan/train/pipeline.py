"""The V42 training pipeline: SimMIM pretraining → k-fold fine-tuning → TTA inference.

Each stage is one function readable top to bottom (nanoGPT style): ``run_ssl`` (train/ssl.py),
``run_finetune`` (train/finetune.py) and ``run_infer`` (here); ``run_stages`` runs them in order
in one session. Every stage resumes; under torchrun every rank runs the same code and rank 0
writes files and logs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import SequentialSampler
from tqdm import tqdm

from ..config import TrainConfig, option
from ..data.images import ImageIndex
from ..data.labels import id_order
from ..infer.folds import FoldSet
from ..infer.submission import decide, submission_frame, write_predictions, write_submission
from ..infer.tta import ensemble_probability, parse_tta, predict_batches
from . import distributed
from .finetune import run_finetune
from .session import TrainSession, session
from .ssl import run_ssl

STAGES = ("ssl", "finetune", "infer")


def run_stages(cfg: TrainConfig, stages: Sequence[str] = STAGES) -> None:
    """Run the named stages in pipeline order."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    with session(cfg) as run:
        if "ssl" in stages:
            run_ssl(cfg, run)
        if "finetune" in stages:
            run_finetune(cfg, run)
        if "infer" in stages:
            run_infer(cfg, run)


def run_infer(cfg: TrainConfig, run: TrainSession | None = None) -> pd.DataFrame:
    """Every fold × TTA view over the test faces → ``predictions_v42.csv`` and ``submission_v42.csv``.

    The folds, their input size and the threshold come from the fold set (``titan.infer.folds``)."""
    with session(cfg, run) as r:
        env, log, dev = r.env, r.log, r.env.device
        fs = FoldSet.from_folder(r.out, r.files.prefix, n_folds=cfg.n_folds)
        for name, why in fs.skipped:
            log.info(f"NOTICE: ignoring {name}: {why}")
        fs.input_size(cfg.img_size, cfg.force_img_size, log.info)  # refuses a size the folds were not trained at
        models = [distributed.prepare_model(m, distributed.DistEnv(device=dev), r.channels_last, cfg.compile).eval()
                  for m in fs.models]
        views = parse_tta(cfg.tta)
        test_dir = Path(cfg.faces_dir) / "test"
        ids = id_order(ImageIndex(test_dir).ids())
        if not ids:
            raise FileNotFoundError(f"{test_dir}: no test face images")
        log.info(f"inference: {len(ids)} test faces × {fs.describe()} × TTA {views}")

        # Each rank predicts a strided share; unreadable test images are errors (no guessed rows).
        mine = np.arange(env.rank, len(ids), env.world_size)
        dataset = r.faces([ids[i] for i in mine], test_dir, on_error="raise")
        loader = r.loader(dataset, cfg.infer_batch_size, SequentialSampler(dataset))
        batches = (r.images(x) for x, _, _ in loader)
        with tqdm(total=len(dataset), desc="inference", disable=not env.is_main, leave=False) as bar:
            logits = predict_batches(models, batches, dev, views, cfg.amp, r.channels_last, progress=bar)
        pos = distributed.all_gather_cat(env, torch.from_numpy(mine))
        per_fold = np.stack([distributed.all_gather_cat(env, torch.from_numpy(lg)).numpy() for lg in logits])
        per_fold = per_fold[:, np.argsort(pos.numpy())]

        th, th_note = fs.threshold()
        log.info(f"threshold {th:.4f} ({th_note})")
        prob = ensemble_probability(per_fold)
        labels = decide(prob, th)
        if env.is_main:
            write_predictions(r.files.predictions_csv, ids, prob,
                              {name: 1.0 / (1.0 + np.exp(-lg.astype(np.float64))) for name, lg in zip(fs.names, per_fold)})
            write_submission(r.files.submission_csv, ids, labels)
        log.info(f"submission: {len(ids)} rows, {int(labels.sum())} predicted fake (th={th:.4f}) → {r.files.submission_csv}")
        distributed.barrier(env)
        return submission_frame(ids, labels)


@dataclass
class StageOptions:
    """train_v42_diamond.py's own flag; every other flag is a TrainConfig field."""

    stages: str = option(",".join(STAGES), "comma-separated stages to run, in pipeline order")

    def __post_init__(self) -> None:  # a typo is a usage error before anything runs
        bad = [s for s in self.stage_list() if s not in STAGES]
        if bad:
            raise ValueError(f"unknown stage(s) {bad}; choose from {','.join(STAGES)}")

    def stage_list(self) -> list[str]:
        return [s.strip() for s in self.stages.split(",") if s.strip()]
