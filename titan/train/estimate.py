"""``--estimate`` and ``--batch-size auto``: know the cost of a training command before paying it.

``with_auto_batch`` probes the device with the real models of the stages that train and keeps
the largest batch that fits (halving on out of memory from the virtual batch, accumulation
raised so that batch × accumulation stays the same). ``estimate`` times a short warm stretch of
every stage the command would run — the SimMIM step, the fine-tuning step with augmentation,
validation and TTA inference — through the same code training runs (the configured loader and
workers, ``ssl_epoch`` / ``finetune_epoch`` / ``predict_logits`` / ``score_batches``), projects
each over the command's images (``titan.costs.workload``) and logs a table. It writes nothing but
its log (``estimate_v42_log.txt`` / ``.jsonl``): no weights, states, folds or submission.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..costs import StageCost, TimedLoader, cost_table, timed_cost, workload
from ..data.augment import build_augment
from ..data.images import ImageIndex
from ..device import autocast, fit_batch, peak_memory_gib, release_memory, reset_peak_memory, synchronize, to_float_image
from ..infer.resilient import ImagesToScore, ResilientPredictor, score_batches, scoring_loader
from ..infer.submission import raw_test_index, test_set
from ..infer.tta import resolve_tta
from ..models.archs import resolve_arch
from ..models.classifier import FoldModel
from ..runlog import RunLog
from . import distributed
from .epoch import predict_logits
from .finetune import fold_data, fold_inputs, fold_model, finetune_epoch
from .session import TrainSession
from .ssl import ssl_data, ssl_epoch, ssl_model

QUIET = RunLog(None, None, echo=False)  # notices of throwaway models (e.g. "no SSL weights yet") stay out of the log


def training_kinds(cfg, stages: Sequence[str]) -> list[str]:
    """The stages of this command that train a model: ``ssl`` (SimMIM archs, epochs > 0), ``finetune``."""
    arch = resolve_arch(cfg.arch, cfg.variant)
    return [s for s in ("ssl", "finetune") if s in stages and (s != "ssl" or (arch.ssl and cfg.ssl_epochs > 0))]


def probe(r: TrainSession, kind: str, batch: int) -> None:
    """Two full training steps (forward, backward, AdamW) of ``kind``'s model at ``batch`` on random
    images: raises out of memory when the batch does not fit. Uncompiled (one shape, many tries)."""
    pr = dataclasses.replace(r, cfg=dataclasses.replace(r.cfg, compile=False, accum_steps=1))
    cfg, dev = pr.cfg, pr.env.device
    built = model = stepper = None
    try:  # building may run out of memory too
        built = ssl_model(pr, resolve_arch(cfg.arch, cfg.variant).variant, 1) if kind == "ssl" else fold_model(pr, None, 1, QUIET)
        _, model, stepper = built
        y = (torch.arange(batch, device=dev) % 2).float()
        for i in range(2):
            x = to_float_image(torch.randint(0, 256, (batch, 3, cfg.img_size, cfg.img_size), dtype=torch.uint8), dev,
                               pr.channels_last)
            with autocast(dev, cfg.amp):
                loss = model(x)[0] if kind == "ssl" else model(x, y)[1]
            stepper.backward(loss, f"batch probe {i + 1}")
            stepper.update()
        synchronize(dev)
    finally:
        built = model = stepper = None  # drop the probe's tensors before the next, smaller try
        release_memory(dev)


def with_auto_batch(r: TrainSession, stages: Sequence[str]) -> TrainSession:
    """``--batch-size auto``: the session with the largest batch that fits every training stage of
    the command, from the virtual batch (batch × accumulation) down, and accumulation scaled so
    the virtual batch stays the same (batches are divisors of it)."""
    cfg, log = r.cfg, r.log
    virtual = cfg.batch_size * cfg.accum_steps
    kinds = training_kinds(cfg, stages)
    if not kinds:
        log.info("batch size auto: nothing in these stages trains; batch size unchanged")
        return r
    batch, notes = virtual, []
    for kind in kinds:
        batch, tried = fit_batch(lambda b: probe(r, kind, b), batch, r.env.device, multiple_of=virtual)
        notes += [f"{kind} {t}" for t in tried]
    batch = min(distributed.all_gather_objects(r.env, [batch]))  # every rank trains at one batch size
    accum = virtual // batch
    log.info(f"batch size auto: {batch} × accumulation {accum} = virtual batch {virtual} per process on {r.env.device}"
             + (f"; did not fit: {', '.join(notes)}" if notes else "; the whole virtual batch fits"))
    log.record("auto_batch", batch_size=batch, accum_steps=accum, virtual_batch=virtual, did_not_fit=notes)
    return dataclasses.replace(r, cfg=dataclasses.replace(cfg, batch_size=batch, accum_steps=accum))


def stretch(cfg, steps: int) -> tuple[int, int]:
    """(warm-up, timed) micro-batches: one accumulation window to warm up (worker start, compile,
    cuDNN autotune), then whole windows covering at least ``steps``."""
    a = max(1, cfg.accum_steps)
    return a, a * math.ceil(max(1, steps) / a)


def subset_loader(r: TrainSession, dataset, batch: int, n_batches: int, seed: int):
    """The stage's own loader (workers, pinning, GPU decode) over ``n_batches`` batches drawn from
    ``dataset`` (cycled when it is smaller)."""
    perm = np.random.default_rng(seed).permutation(len(dataset))
    return r.loader(dataset, batch, [int(perm[i % len(perm)]) for i in range(n_batches * batch)])


def plan(r: TrainSession, labels: tuple[pd.DataFrame, np.ndarray] | None, n_ssl: int, n_test: int) -> dict:
    """``titan.costs.workload`` of this command on this data."""
    cfg, folds = r.cfg, []
    if labels is not None:
        df, fold = labels
        folds = [(len(df) - int((fold == k).sum()), int((fold == k).sum())) for k in range(cfg.n_folds)]
    return workload(n_ssl, folds or [(0, 0)] * cfg.n_folds, n_test, ssl_epochs=cfg.ssl_epochs, ft_epochs=cfg.ft_epochs,
                    batch_size=cfg.batch_size, accum_steps=cfg.accum_steps, infer_batch_size=cfg.infer_batch_size,
                    world=r.env.world_size)


def estimate_ssl(r: TrainSession, steps: int, work) -> StageCost:
    cfg, dev = r.cfg, r.env.device
    dataset, _ = ssl_data(r)
    warm, timed = stretch(cfg, steps)
    loader = TimedLoader(subset_loader(r, dataset, cfg.batch_size, warm + timed, cfg.seed))
    reset_peak_memory(dev)
    raw, model, stepper = ssl_model(r, resolve_arch(cfg.arch, cfg.variant).variant, 1)
    ssl_epoch(r, model, loader, stepper, build_augment("ssl").to(dev), "estimate: SSL")
    synchronize(dev)
    return timed_cost("SSL step", loader, warm, work, peak_memory_gib(dev), r.env.world_size)


def estimate_finetune(r: TrainSession, labels, steps: int, works) -> tuple[list[StageCost], torch.nn.Module]:
    """Rows for the fine-tuning step (with augmentation) and validation; the model, for inference."""
    cfg, env, dev = r.cfg, r.env, r.env.device
    d = fold_data(r, *labels, 0)
    warm, timed = stretch(cfg, steps)
    loader = TimedLoader(subset_loader(r, d.loader.dataset, cfg.batch_size, warm + timed, cfg.seed))
    reset_peak_memory(dev)
    raw, model, stepper = fold_model(r, d.pos_weight, 1, QUIET)
    finetune_epoch(r, model, loader, stepper, fold_inputs(r), "estimate: fine-tune (+SBI, augmentation)")
    synchronize(dev)
    rows = [timed_cost("fine-tune step (+aug)", loader, warm, works["finetune"], peak_memory_gib(dev), env.world_size)]
    reset_peak_memory(dev)
    vloader = TimedLoader(subset_loader(r, d.val_loader.dataset, cfg.infer_batch_size, 1 + max(1, steps), cfg.seed))
    predict_logits(model, vloader, env, cfg.amp, r.images)
    rows.append(timed_cost("validation", vloader, 1, works["validation"], peak_memory_gib(dev), env.world_size))
    return rows, FoldModel(raw.backbone, raw.head)


def estimate_infer(r: TrainSession, steps: int, work, model: torch.nn.Module | None) -> StageCost:
    """One fold's TTA over test faces (every view), through the resilient scorer's loop."""
    cfg, dev = r.cfg, r.env.device
    if model is None:
        from .finetune import build_classifier

        raw = build_classifier(cfg, r.files.ssl_weights, QUIET, None)
        model = FoldModel(raw.backbone, raw.head)
    test, train = face_index(r, "test"), face_index(r, "train")
    crops = test if test is not None and len(test) else train
    if crops is None or not len(crops):
        raise FileNotFoundError(f"no face crops in {cfg.faces_dir}/test or /train to time inference on")
    dataset = ImagesToScore(crops.ids(), crops, cfg.img_size)
    perm = np.random.default_rng(cfg.seed).permutation(len(dataset))
    n = (1 + max(1, steps)) * cfg.infer_batch_size
    loader = TimedLoader(scoring_loader(dataset, cfg.infer_batch_size, cfg.num_workers, dev,
                                        [int(perm[i % len(perm)]) for i in range(n)]))
    reset_peak_memory(dev)
    predictor = ResilientPredictor([model.eval()], ["estimate"], dev, resolve_tta(cfg.tta), cfg.infer_batch_size, cfg.amp)
    score_batches(predictor, loader, len(dataset), progress=False)
    synchronize(dev)
    row = timed_cost(f"TTA inference ×{len(resolve_tta(cfg.tta))}", loader, 1, work, peak_memory_gib(dev), r.env.world_size)
    row.notes += [f"images/s of one fold (every view); the projection counts {cfg.n_folds} folds"] + predictor.notes
    return row


def face_index(r: TrainSession, split: str) -> ImageIndex | None:
    """The ``{faces_dir}/{split}`` crops, None without that folder."""
    folder = Path(r.cfg.faces_dir) / split
    return ImageIndex(folder) if folder.is_dir() else None


def estimate(r: TrainSession, stages: Sequence[str], labels, steps: int) -> list[StageCost]:
    """Time every stage of the command (``steps`` micro-batches each, after a warm-up), log the table."""
    cfg, log = r.cfg, r.log
    kinds = training_kinds(cfg, stages)
    n_ssl = len(ssl_data(r)[0]) if "ssl" in kinds else 0
    test = face_index(r, "test")
    n_test = len(test_set(raw_test_index(cfg.raw_test_dir), test, lambda _: None)) if "infer" in stages else 0
    works = plan(r, labels, n_ssl, n_test)
    log.info(f"estimate on {r.env.device}: batch {cfg.batch_size} × accumulation {cfg.accum_steps}, {cfg.num_workers} "
             f"loader workers, {cfg.img_size} px, {resolve_arch(cfg.arch, cfg.variant).name}; {steps} timed micro-batches "
             "per stage after one warm-up window")
    rows, model = [], None
    if "ssl" in kinds:
        rows.append(estimate_ssl(r, steps, works["ssl"]))
    if "finetune" in kinds:
        ft, model = estimate_finetune(r, labels, steps, works)
        rows += ft
    if "infer" in stages:
        rows.append(estimate_infer(r, steps, works["infer"], model))
    for line in cost_table(rows, "peak GiB" if r.env.device.type == "cuda" else "RSS GiB"):
        log.info(line)
    log.info("projected from scratch (stages and folds a rerun would skip are counted), warm-up excluded; "
             f"{r.env.world_size} process(es). Nothing was written but this log.")
    log.record("estimate", device=str(r.env.device), batch_size=cfg.batch_size, accum_steps=cfg.accum_steps,
               num_workers=cfg.num_workers, stages=[row.as_dict() for row in rows],
               total_seconds=sum(row.seconds for row in rows))
    return rows
