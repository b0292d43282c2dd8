"""The V42 training pipeline: SimMIM pretraining → k-fold fine-tuning → TTA inference.

Three loops, each readable top to bottom (nanoGPT style): ``run_ssl``, ``run_finetune`` and
``run_infer``; ``run_stages`` runs them in order. Every stage resumes: SSL and each fold from
their newest complete epoch checkpoint, finished folds are skipped. Under torchrun every rank
runs the same code; rank 0 writes files and logs.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader, SequentialSampler
from tqdm import tqdm

from . import engine
from .archs import build_arch_backbone, load_init_weights, resolve_arch
from .augment import augment_batch, build_augment
from .checkpoints import atomic_write, load_file, load_into, read_meta, save_atomic, save_checkpoint
from .config import TrainConfig, save_config
from .convnextv2 import build_backbone, keep_stem_highpass
from .data import EncodedFaceDataset, FaceDataset, ImageIndex, LabelCSVError, collate_encoded, decode_on_device, read_labels
from .ensemble import FoldModel, ensemble_probability, find_folds, load_fold, parse_tta, predict_batches, to_float_image
from .heads import ArcFaceHead, build_head
from .metrics import format_report, report
from .runlog import RunLog
from .simmim import SimMIM

# Output names (the file contract in DESIGN.md).
SSL_WEIGHTS = "titan_v42_ssl.pth"
PREFIX = "v42"
LOG_TXT, LOG_JSONL = "training_v42_log.txt", "training_v42_log.jsonl"
CONFIG_JSON = "config_v42.json"
OOF_CSV, METRICS_JSON = "oof_v42.csv", "metrics_v42.json"
PREDICTIONS_CSV, SUBMISSION_CSV = "predictions_v42.csv", "submission_v42.csv"
STAGES = ("ssl", "finetune", "infer")
# A finished fold whose files were written with other values of these is not reused.
FOLD_IDENTITY = ("arch", "variant", "head", "img_size", "n_folds", "fold_seed")


# --- the run: device, processes, logs ------------------------------------------------------------

@dataclass
class Run:
    cfg: TrainConfig
    env: engine.DistEnv
    log: RunLog
    out: Path
    ckpt: Path

    def path(self, name: str) -> Path:
        return self.out / name

    @property
    def channels_last(self) -> bool:
        # ConvNeXt gains from NHWC only with cuDNN; on CPU it just adds layout copies.
        return self.cfg.channels_last and self.env.device.type == "cuda"

    def faces(self, ids: Sequence[str], folder: Path, labels=None, on_error: str = "replace") -> FaceDataset:
        """The dataset for these Ids; with ``gpu_decode`` JPEG bytes travel and decode on the device."""
        cls = EncodedFaceDataset if self.cfg.gpu_decode else FaceDataset
        return cls(list(ids), folder, self.cfg.img_size, labels, on_error=on_error)

    def loader(self, dataset, batch_size: int, sampler) -> DataLoader:
        return engine.make_loader(dataset, batch_size, sampler, self.cfg.num_workers, self.env.device,
                                  collate_fn=collate_encoded if self.cfg.gpu_decode else None)

    def images(self, x) -> torch.Tensor:
        """A loader batch → float [0,1] (B,3,S,S) on the device (decoded there with ``gpu_decode``)."""
        if isinstance(x, list):
            x = decode_on_device(x, self.cfg.img_size, self.env.device)
        return to_float_image(x, self.env.device, self.channels_last)


class _WarningsToRunLog(logging.Handler):
    """Route titan's warnings (e.g. an unreadable image replaced) into the run log."""

    def __init__(self, log: RunLog) -> None:
        super().__init__(logging.WARNING)
        self.runlog = log

    def emit(self, record: logging.LogRecord) -> None:
        self.runlog.info(f"WARNING: {record.getMessage()}")


@contextmanager
def session(cfg: TrainConfig, run: Run | None = None) -> Iterator[Run]:
    """Open (or reuse) a run: join the process group, open the logs, write the config."""
    if run is not None:
        yield run
        return
    env = engine.setup_distributed(cfg.device)
    if cfg.threads > 0:
        # Small models on a shared CPU: extra OpenMP threads spin and slow every op down.
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    log = RunLog(out / LOG_TXT, out / LOG_JSONL, enabled=env.is_main)
    handler = _WarningsToRunLog(log)
    logger = logging.getLogger("titan")
    logger.addHandler(handler)
    try:
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / CONFIG_JSON)
        log.record("config", **dataclasses.asdict(cfg))
        log.info(f"run on {env.device} × {env.world_size} process(es); outputs in {out.resolve()}")
        yield Run(cfg, env, log, out, out / cfg.ckpt_dir)
    finally:
        logger.removeHandler(handler)
        engine.teardown_distributed()


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


def identity(c: dict) -> dict:
    """A config (or fold meta) dict with its architecture resolved: arch "" + variant "v42" is
    "titan-v42"; files from before ``arch`` existed read as titan-<variant>; baselines have variant ""."""
    out = dict(c)
    if "variant" in c or "arch" in c:
        a = resolve_arch(c.get("arch") or "", c.get("variant") or "v42")
        out.update(arch=a.name, variant=a.variant or "")
    return out


def check_resumable(state: dict, cfg: TrainConfig, names: Sequence[str], where: str) -> None:
    """Refuse to continue a checkpoint made with settings that change what is being trained."""
    saved, now = identity(state.get("config") or {}), identity(dataclasses.asdict(cfg))
    diff = {n: (saved.get(n), now[n]) for n in names if n in saved and saved[n] != now[n]}
    if diff:
        raise ValueError(f"{where} was made with other settings {diff} (checkpoint vs now); "
                         "use a fresh --out-dir, or delete the checkpoint to start over")


def restore_rng(r: Run, rng: dict, epoch: int) -> None:
    """Resume rank 0's saved RNG streams; other ranks reseed from (seed, rank, epoch) so they stay distinct."""
    engine.set_rng_state(rng)
    if r.env.rank:
        engine.seed_everything(r.cfg.seed + 7919 * r.env.rank + 104729 * epoch)


# --- data ------------------------------------------------------------------------------------------

def face_dirs(cfg: TrainConfig) -> tuple[Path, Path]:
    """{faces_dir}/train and {faces_dir}/test; the train folder must exist."""
    train, test = Path(cfg.faces_dir) / "train", Path(cfg.faces_dir) / "test"
    if not train.is_dir():
        raise FileNotFoundError(f"{train}: face folder not found — run align_faces.py first, or set --faces-dir")
    return train, test


def load_labels(cfg: TrainConfig, log: RunLog) -> pd.DataFrame:
    """The training rows with an ``image`` column (train faces for real rows, test faces for pseudo).

    ``train_csv`` falls back to ``fallback_csv`` (with a notice) before any diamonds exist.
    Ids without a face image are an error listing them, or dropped with ``skip_missing``.
    """
    csv = Path(cfg.train_csv)
    if not csv.is_file():
        if not Path(cfg.fallback_csv).is_file():
            raise FileNotFoundError(f"no training labels: neither {cfg.train_csv} nor {cfg.fallback_csv} exists. "
                                    "Run make_diamonds.py, or point --train-csv at a label CSV.")
        log.info(f"NOTICE: {csv} not found (no diamonds yet) — training on {cfg.fallback_csv} instead")
        csv = Path(cfg.fallback_csv)
    df = read_labels(csv)
    train_dir, test_dir = face_dirs(cfg)
    index = {False: ImageIndex(train_dir), True: ImageIndex(test_dir) if test_dir.is_dir() else None}
    has = np.array([index[p] is not None and i in index[p] for i, p in zip(df.Id, df.is_pseudo)])
    if not has.all():
        rows = [f"{i!r} (line {n + 2}, {'pseudo → ' + str(test_dir) if p else train_dir})"
                for n, (i, p) in enumerate(zip(df.Id, df.is_pseudo)) if not has[n]]
        msg = f"{csv}: {len(rows)} Id(s) have no face image: {', '.join(rows[:20])}" + (" …" if len(rows) > 20 else "")
        if not cfg.skip_missing:
            raise LabelCSVError(msg + ". Run align_faces.py for them, or drop them with --skip-missing.")
        log.info(f"WARNING: --skip-missing: dropping them. {msg}")
        df = df[has].reset_index(drop=True)
    n_real = int((~df.is_pseudo).sum())
    log.info(f"labels: {csv} — {n_real} real rows ({int(df.target_feature[~df.is_pseudo].sum())} fake), "
             f"{len(df) - n_real} pseudo rows")
    return df


def assign_folds(df: pd.DataFrame, n_folds: int, seed: int) -> np.ndarray:
    """Fold of each row: stratified over the real rows only; pseudo rows get -1 (train-only)."""
    from sklearn.model_selection import StratifiedKFold

    fold = np.full(len(df), -1, dtype=int)
    real = np.flatnonzero(~df.is_pseudo.to_numpy())
    y = df.target_feature.to_numpy()[real]
    least = int(np.bincount(y, minlength=2).min())
    if n_folds < 2 or least < n_folds:
        raise ValueError(f"cannot make {n_folds} stratified folds: the rarer class has {least} real row(s); "
                         "need n_folds ≥ 2 and at least n_folds rows of each class (lower --n-folds)")
    for k, (_, va) in enumerate(StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(real, y)):
        fold[real[va]] = k
    return fold


def labelled_dataset(r: Run, df: pd.DataFrame) -> ConcatDataset:
    """Real rows from the train faces, then pseudo rows from the test faces (dataset order = df order
    when ``df`` lists real rows first, as the callers arrange)."""
    train_dir, test_dir = face_dirs(r.cfg)
    parts = []
    for pseudo, folder in ((False, train_dir), (True, test_dir)):
        sub = df[df.is_pseudo == pseudo]
        if len(sub):
            parts.append(r.faces(sub.Id.tolist(), folder, sub.target_feature.tolist()))
    return ConcatDataset(parts)


def id_order(ids: Sequence[str]) -> list[str]:
    """Ids in Id order: numerically when every Id is a number, else as strings."""
    ids = list(ids)
    if ids and all(i.isdigit() for i in ids):
        return sorted(ids, key=lambda s: (int(s), s))
    return sorted(ids)


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))


def _write_json(obj: dict, path: Path) -> None:
    text = json.dumps(obj, indent=2, default=float)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))


# --- stage 1: SimMIM pretraining --------------------------------------------------------------------

def run_ssl(cfg: TrainConfig, run: Run | None = None) -> Path | None:
    """SimMIM over every train and test face (labels unused) → ``titan_v42_ssl.pth``.

    The baselines (mobilenetv2, effnet-b3-fpn-cbam) skip it: SimMIM here reconstructs the
    9-channel ConvNeXt V2 input; they fine-tune from ``init_weights`` or from scratch → None."""
    with session(cfg, run) as r:
        env, log, dev = r.env, r.log, r.env.device
        arch = resolve_arch(cfg.arch, cfg.variant)
        if not arch.ssl:
            log.info(f"NOTICE: {arch.name} takes no SimMIM pretraining (TitanNet only); skipping SSL")
            return None
        out_path = r.path(SSL_WEIGHTS)
        if cfg.ssl_epochs <= 0:
            log.info("SSL: --ssl-epochs 0, SimMIM skipped")
            return None
        if out_path.is_file() and int(read_meta(out_path).get("epoch", -1)) >= cfg.ssl_epochs:
            log.info(f"SSL already complete ({out_path}); skipping")
            return out_path
        engine.seed_everything(cfg.seed + env.rank)  # DDP: each rank its own masks and augmentations
        train_dir, test_dir = face_dirs(cfg)
        parts = [r.faces(ImageIndex(d).ids(), d) for d in (train_dir, test_dir) if d.is_dir()]
        dataset = ConcatDataset(parts)
        if len(dataset) == 0:
            raise FileNotFoundError(f"no face images in {train_dir} or {test_dir}")
        sampler = engine.make_sampler(len(dataset), env, shuffle=True, seed=cfg.seed)
        loader = r.loader(dataset, cfg.batch_size, sampler)

        raw = SimMIM(build_backbone(arch.variant, cfg.drop_path, cfg.stem), cfg.mask_patch, cfg.mask_ratio)
        raw.encoder.norm.requires_grad_(False)  # the pooled-feature norm is unused by SimMIM (DDP needs every trained param used)
        model = engine.prepare_model(raw, env, r.channels_last, cfg.compile)
        optimizer = engine.make_optimizer(raw, cfg.ssl_lr, cfg.ssl_weight_decay, dev)
        if cfg.stem == "highpass":
            keep_stem_highpass(raw.encoder, optimizer)
        steps = math.ceil(len(loader) / cfg.accum_steps)
        scheduler = engine.warmup_cosine(optimizer, cfg.ssl_warmup_epochs * steps, cfg.ssl_epochs * steps, cfg.min_lr_ratio)
        stepper = engine.Stepper(model, optimizer, scheduler, engine.make_scaler(dev, cfg.amp), env, cfg.accum_steps, cfg.max_bad_steps)
        aug = build_augment("ssl").to(dev)

        start, loss = 0, float("nan")
        state = engine.load_latest_state(r.ckpt, "ssl", log.info)
        if state is not None:
            check_resumable(state, cfg, ("arch", "variant", "img_size", "mask_patch", "mask_ratio"), f"SSL checkpoint in {r.ckpt}")
            raw.load_state_dict(state["model"])
            stepper.load_state_dict(state["train"])
            start, loss = int(state["epoch"]), float(state.get("loss", float("nan")))
            restore_rng(r, state["rng"], start)
            log.info(f"SSL: resuming after epoch {start} from {r.ckpt}")
        log.info(f"SSL: {len(dataset)} images, {len(loader)} batches/epoch of {cfg.batch_size}×{env.world_size}, "
                 f"accumulation {cfg.accum_steps}, epochs {start + 1}..{cfg.ssl_epochs}")

        for epoch in range(start, cfg.ssl_epochs):
            sampler.set_epoch(epoch)
            model.train()
            t0, total, seen, bad0 = time.time(), torch.zeros((), device=dev), 0, stepper.bad_total
            bar = tqdm(loader, desc=f"SSL ep {epoch + 1}/{cfg.ssl_epochs}", disable=not env.is_main, leave=False)
            for i, (x, _, _) in enumerate(bar):
                x = augment_batch(aug, r.images(x))
                sync = stepper.sync_next(i == len(loader) - 1)
                with engine.no_sync(model, sync), engine.autocast(dev, cfg.amp):
                    batch_loss, _, _ = model(x)
                if stepper.backward(batch_loss, f"SSL epoch {epoch + 1} step {i + 1}", sync):
                    total += batch_loss.detach().float() * len(x)
                    seen += len(x)
            stepper.flush()
            loss, img_s = engine.epoch_mean(env, total, seen, len(sampler), t0)
            log.info(f"SSL Ep {epoch + 1} | Loss: {loss:.4f} | LR: {stepper.lr:.1e}")
            log.record("ssl_epoch", epoch=epoch + 1, loss=loss, lr=stepper.lr, img_s=img_s, bad_steps=stepper.bad_total - bad0)
            if env.is_main:
                engine.save_train_state(r.ckpt, "ssl", epoch + 1, keep=cfg.keep_checkpoints, model=raw.state_dict(),
                                        train=stepper.state_dict(), loss=loss, config=dataclasses.asdict(cfg))
            engine.barrier(env)

        if env.is_main:
            save_checkpoint(raw.encoder, out_path, arch=arch.name, variant=arch.variant, img_size=cfg.img_size, epoch=cfg.ssl_epochs,
                            metrics={"loss": loss}, config=dataclasses.asdict(cfg))
            log.info(f"SSL done → {out_path}")
        engine.barrier(env)
        return out_path


# --- stage 2: k-fold fine-tuning --------------------------------------------------------------------

class Classifier(FoldModel):
    """A fold model that also computes its training loss in ``forward`` (so DDP sees every
    parameter the loss uses, including ArcFace's margin weights)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, label_smoothing: float = 0.1, pos_weight: float | None = None) -> None:
        super().__init__(backbone, head)
        self.label_smoothing = label_smoothing
        self.register_buffer("pos_weight", torch.tensor([pos_weight if pos_weight else 1.0]), persistent=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        feats = self.backbone(x)
        logit = self.head(feats).float()
        if y is None:
            return logit, None
        if isinstance(self.head, ArcFaceHead):
            return logit, self.head.margin_loss(feats, y)
        target = y.float() * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
        return logit, F.binary_cross_entropy_with_logits(logit, target, pos_weight=self.pos_weight)


def fold_done(r: Run, k: int) -> dict | None:
    """The meta of a finished fold (its files and OOF rows all written), else None."""
    meta_path = r.path(f"{PREFIX}_meta_fold{k}.pth")
    files = [r.path(f"{PREFIX}_backbone_fold{k}.pth"), r.path(f"{PREFIX}_head_fold{k}.pth"), r.ckpt / f"oof_fold{k}.csv"]
    if not meta_path.is_file() or not all(p.is_file() for p in files):
        return None
    meta = load_file(meta_path)
    if not (isinstance(meta, dict) and meta.get("complete")):
        return None
    have, now = identity(meta), identity(dataclasses.asdict(r.cfg))
    stale = {f: (have.get(f), now[f]) for f in FOLD_IDENTITY if have.get(f) != now[f]}
    if stale:
        raise ValueError(f"{meta_path} was trained with other settings {stale} (file vs now); use a fresh --out-dir "
                         "or delete that fold's files to retrain it")
    return meta


def run_finetune(cfg: TrainConfig, run: Run | None = None) -> dict:
    """Fine-tune every fold from the SSL backbone, then write the OOF file and the metrics summary."""
    with session(cfg, run) as r:
        df = load_labels(cfg, r.log)
        # Real rows first, then pseudo rows: the order the datasets are built in.
        df = pd.concat([df[~df.is_pseudo], df[df.is_pseudo]], ignore_index=True)
        folds = assign_folds(df, cfg.n_folds, cfg.fold_seed)
        for k in range(cfg.n_folds):
            if fold_done(r, k) is not None:
                r.log.info(f"Fold {k} already complete; skipping")
                continue
            train_fold(r, df, folds, k)
        return summarize_folds(r, df)


def _imbalance(cfg: TrainConfig, y: np.ndarray) -> tuple[float | None, np.ndarray | None]:
    """(pos_weight, sampler weights) per ``cfg.imbalance``."""
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if cfg.imbalance == "pos_weight":
        return (n_neg / n_pos if n_pos else None), None
    if cfg.imbalance == "sampler":
        counts = np.array([max(n_neg, 1), max(n_pos, 1)], dtype=np.float64)
        return None, 1.0 / counts[y.astype(int)]
    if cfg.imbalance == "none":
        return None, None
    raise ValueError(f"imbalance must be pos_weight, sampler or none, not {cfg.imbalance!r}")


def build_classifier(cfg: TrainConfig, ssl_path: Path, log: RunLog, pos_weight: float | None) -> Classifier:
    """The configured arch's backbone — from ``init_weights`` if set, else (Titan) the SSL weights — and head."""
    arch = resolve_arch(cfg.arch, cfg.variant)
    backbone = build_arch_backbone(arch.name, cfg.drop_path, cfg.stem)
    if cfg.init_weights:
        log.info(load_init_weights(backbone, arch, cfg.init_weights))
    elif not arch.ssl:
        log.info(f"NOTICE: {arch.name}: no --init-weights — fine-tuning from random initialisation")
    elif ssl_path.is_file():
        load_into(backbone, ssl_path)
    elif cfg.ssl_epochs <= 0:
        log.info("SSL off (--ssl-epochs 0): fine-tuning from random initialisation")
    else:
        log.info(f"NOTICE: {ssl_path} not found — fine-tuning from random initialisation (run --stages ssl first)")
    if cfg.stem != "standard" and not arch.ssl:
        log.info(f"NOTICE: --stem {cfg.stem} applies to TitanNet only; {arch.name} keeps its own stem")
    kwargs = {"dropout": cfg.dropout} if cfg.head == "linear" else {}
    if cfg.head == "arcface" and pos_weight:
        log.info("NOTICE: the ArcFace margin loss takes no pos_weight; use --imbalance sampler to balance classes")
    head = build_head(cfg.head, backbone.num_features, **kwargs)
    return Classifier(backbone, head, cfg.label_smoothing, pos_weight)


@torch.no_grad()
def predict_logits(r: Run, model: nn.Module, loader: DataLoader) -> tuple[np.ndarray, np.ndarray]:
    """(dataset indices, logits) over every rank's share of ``loader``, gathered and de-duplicated."""
    dev, idx_all, out = r.env.device, [], []
    model.eval()
    for x, _, idx in loader:
        with engine.autocast(dev, r.cfg.amp):
            logit, _ = model(r.images(x))
        out.append(logit.float().cpu())
        idx_all.append(idx.cpu())
    idx = engine.all_gather_cat(r.env, torch.cat(idx_all) if idx_all else torch.zeros(0, dtype=torch.long))
    logits = engine.all_gather_cat(r.env, torch.cat(out) if out else torch.zeros(0))
    uniq, first = np.unique(idx.numpy(), return_index=True)  # DistributedSampler pads with repeats
    return uniq, logits.numpy()[first]


def train_fold(r: Run, df: pd.DataFrame, folds: np.ndarray, k: int) -> dict:
    """One fold: train on every other fold's real rows plus all pseudo rows; validate on fold k."""
    cfg, env, log, dev = r.cfg, r.env, r.log, r.env.device
    tr, va = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
    assert not df.is_pseudo.to_numpy()[va].any(), "pseudo rows must never be validated on"
    df_tr, df_va = df.iloc[tr].reset_index(drop=True), df.iloc[va].reset_index(drop=True)
    y_tr, y_va = df_tr.target_feature.to_numpy(), df_va.target_feature.to_numpy()
    # Each fold starts the same whether or not other folds ran in this process.
    engine.seed_everything(cfg.seed + 1 + k + 7919 * env.rank)

    train_set, val_set = labelled_dataset(r, df_tr), labelled_dataset(r, df_va)
    pos_weight, weights = _imbalance(cfg, y_tr)
    sampler = engine.make_sampler(len(train_set), env, shuffle=True, seed=cfg.seed + k, weights=weights)
    loader = r.loader(train_set, cfg.batch_size, sampler)
    val_loader = r.loader(val_set, cfg.infer_batch_size, engine.make_sampler(len(val_set), env, False, 0))

    raw = build_classifier(cfg, r.path(SSL_WEIGHTS), log, pos_weight)
    model = engine.prepare_model(raw, env, r.channels_last, cfg.compile)
    optimizer = engine.make_optimizer(raw, cfg.ft_lr, cfg.ft_weight_decay, dev)
    if cfg.stem == "highpass" and resolve_arch(cfg.arch, cfg.variant).ssl:  # TitanNet only
        keep_stem_highpass(raw.backbone, optimizer)
    steps = math.ceil(len(loader) / cfg.accum_steps)
    scheduler = engine.warmup_cosine(optimizer, cfg.ft_warmup_epochs * steps, cfg.ft_epochs * steps, cfg.min_lr_ratio)
    stepper = engine.Stepper(model, optimizer, scheduler, engine.make_scaler(dev, cfg.amp), env, cfg.accum_steps, cfg.max_bad_steps)
    aug = build_augment("finetune", cfg.jpeg_p, cfg.blur_p).to(dev)
    stem = f"fold{k}"

    start, best = 0, None  # best: {"epoch", "metrics", "probs", "model"}
    state = engine.load_latest_state(r.ckpt, stem, log.info)
    if state is not None:
        check_resumable(state, cfg, FOLD_IDENTITY, f"Fold {k} checkpoint in {r.ckpt}")
        raw.load_state_dict(state["model"])
        stepper.load_state_dict(state["train"])
        start, best = int(state["epoch"]), state["best"]
        restore_rng(r, state["rng"], start)
        log.info(f"Fold {k}: resuming after epoch {start}")
    log.info(f"Fold {k}: {len(df_tr)} training rows ({int(df_tr.is_pseudo.sum())} pseudo), {len(df_va)} validation rows")

    for epoch in range(start, cfg.ft_epochs):
        sampler.set_epoch(epoch)
        model.train()
        t0, total, seen = time.time(), torch.zeros((), device=dev), 0
        bar = tqdm(loader, desc=f"Fold {k} ep {epoch + 1}/{cfg.ft_epochs}", disable=not env.is_main, leave=False)
        for i, (x, y, _) in enumerate(bar):
            x = augment_batch(aug, r.images(x))
            y = y.to(dev, non_blocking=True)
            sync = stepper.sync_next(i == len(loader) - 1)
            with engine.no_sync(model, sync), engine.autocast(dev, cfg.amp):
                _, batch_loss = model(x, y)
            if stepper.backward(batch_loss, f"Fold {k} epoch {epoch + 1} step {i + 1}", sync):
                total += batch_loss.detach().float() * len(x)
                seen += len(x)
        stepper.flush()
        train_loss, img_s = engine.epoch_mean(env, total, seen, len(sampler), t0)

        idx, logits = predict_logits(r, model, val_loader)
        yv = y_va[idx]
        probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        val_loss = float(F.binary_cross_entropy_with_logits(torch.from_numpy(logits).double(), torch.from_numpy(yv).double()))
        m = report(yv, probs)
        log.info(f"Fold {k} Ep {epoch + 1} | Loss: {train_loss:.4f} | Val F1: {m['f1']:.4f} (th={m['threshold']:.2f}) | "
                 f"AUC: {m['roc_auc']:.4f} | AP: {m['ap']:.4f} | LR: {stepper.lr:.1e}")
        log.record("ft_epoch", fold=k, epoch=epoch + 1, train_loss=train_loss, val_loss=val_loss, f1=m["f1"],
                   th=m["threshold"], auc=m["roc_auc"], ap=m["ap"], precision=m["precision"], recall=m["recall"],
                   lr=stepper.lr, img_s=img_s)
        score = (float(m["f1"]), float(np.nan_to_num(m["roc_auc"])), -val_loss)  # plain floats: weights_only
        if best is None or score > tuple(best["score"]):
            best = {"epoch": epoch + 1, "score": list(score), "metrics": {kk: float(v) for kk, v in m.items()},
                    "val_loss": val_loss, "ids": [str(df_va.Id[j]) for j in idx], "probs": torch.from_numpy(probs),
                    "model": {kk: v.detach().cpu().clone() for kk, v in raw.state_dict().items()}}
        if env.is_main:
            engine.save_train_state(r.ckpt, stem, epoch + 1, keep=cfg.keep_checkpoints, model=raw.state_dict(),
                                    train=stepper.state_dict(), best=best, config=dataclasses.asdict(cfg))
        engine.barrier(env)

    if best is None:
        raise RuntimeError(f"Fold {k}: no epoch ran (ft_epochs={cfg.ft_epochs})")
    result = {"fold": k, "best_epoch": best["epoch"], "f1": best["metrics"]["f1"], "th": best["metrics"]["threshold"],
              "auc": best["metrics"]["roc_auc"], "ap": best["metrics"]["ap"]}
    if env.is_main:
        save_fold(r, k, best)
        engine.remove_train_states(r.ckpt, stem)
    log.info(f"Fold {k} done: best epoch {best['epoch']} | F1 {result['f1']:.4f} (th={result['th']:.2f}) | AUC {result['auc']:.4f}")
    log.record("fold_done", **result)
    engine.barrier(env)
    return result


def save_fold(r: Run, k: int, best: dict) -> None:
    """Write the best epoch's backbone, head, OOF rows and — last, as the completion mark — meta."""
    cfg, m = r.cfg, best["metrics"]
    sd = best["model"]
    arch = resolve_arch(cfg.arch, cfg.variant)
    meta = dict(arch=arch.name, variant=arch.variant or "", head=cfg.head, img_size=cfg.img_size, epoch=int(best["epoch"]),
                metrics={kk: float(v) for kk, v in m.items()}, config=dataclasses.asdict(cfg))
    for part in ("backbone", "head"):
        part_sd = {kk[len(part) + 1:]: v for kk, v in sd.items() if kk.startswith(part + ".")}
        save_checkpoint(part_sd, r.path(f"{PREFIX}_{part}_fold{k}.pth"), **meta)
    oof = pd.DataFrame({"Id": best["ids"], "prob": best["probs"].numpy(), "fold": k})
    _write_csv(oof, r.ckpt / f"oof_fold{k}.csv")
    save_atomic({"th": float(m["threshold"]), "f1": float(m["f1"]), "auc": float(m["roc_auc"]), "ap": float(m["ap"]),
                 "arch": arch.name, "variant": arch.variant or "", "head": cfg.head, "img_size": cfg.img_size, "epoch": int(best["epoch"]),
                 "n_folds": cfg.n_folds, "fold_seed": cfg.fold_seed, "complete": True},
                r.path(f"{PREFIX}_meta_fold{k}.pth"))


def summarize_folds(r: Run, df: pd.DataFrame) -> dict:
    """``oof_v42.csv`` and ``metrics_v42.json`` from the finished folds' OOF rows."""
    cfg, log = r.cfg, r.log
    parts, folds = [], []
    for k in range(cfg.n_folds):
        meta = fold_done(r, k)
        parts.append(pd.read_csv(r.ckpt / f"oof_fold{k}.csv", dtype={"Id": str}))
        folds.append({"fold": k, "best_epoch": int(meta["epoch"]), "f1": meta["f1"], "th": meta["th"],
                      "auc": meta["auc"], "ap": meta["ap"]})
    real = df[~df.is_pseudo][["Id", "target_feature"]]
    oof = real.merge(pd.concat(parts, ignore_index=True), on="Id", how="left", validate="one_to_one")
    if oof.prob.isna().any():
        # An unreadable validation image has no prediction: say so rather than invent one.
        log.info(f"WARNING: no OOF prediction for {int(oof.prob.isna().sum())} Id(s) "
                 f"{oof.Id[oof.prob.isna()].tolist()[:10]}; they are left out of the OOF metrics")
        oof = oof.dropna(subset=["prob"]).reset_index(drop=True)
    rep = report(oof.target_feature.to_numpy(), oof.prob.to_numpy())
    summary = {"oof": rep, "folds": folds}
    if r.env.is_main:
        _write_csv(oof[["Id", "target_feature", "prob", "fold"]], r.path(OOF_CSV))
        _write_json(summary, r.path(METRICS_JSON))
    log.info("OOF | " + format_report(rep))
    log.record("oof", **rep)
    return summary


# --- stage 3: TTA inference --------------------------------------------------------------------------

def ensemble_threshold(r: Run, folds) -> float:
    """The OOF-best threshold when metrics_v42.json exists, else the mean of the fold thresholds."""
    mpath = r.path(METRICS_JSON)
    if mpath.is_file():
        th = json.loads(mpath.read_text()).get("oof", {}).get("threshold")
        if th is not None:
            r.log.info(f"threshold {th:.4f} (OOF-best, from {mpath})")
            return float(th)
    ths = [f.threshold for f in folds if f.threshold is not None]
    th = float(np.mean(ths)) if ths else 0.5
    r.log.info(f"threshold {th:.4f} ({'mean of fold thresholds' if ths else 'no thresholds found: 0.5'}; {mpath} missing)")
    return th


def run_infer(cfg: TrainConfig, run: Run | None = None) -> pd.DataFrame:
    """Every fold × TTA view over the test faces → ``predictions_v42.csv`` and ``submission_v42.csv``."""
    with session(cfg, run) as r:
        env, log, dev = r.env, r.log, r.env.device
        found = find_folds(r.out, PREFIX)
        extra = [k for k, *_ in found if k >= cfg.n_folds]
        if extra:  # left over from a run with more folds
            log.info(f"NOTICE: ignoring fold files {extra} in {r.out} (n_folds={cfg.n_folds})")
            found = [f for f in found if f[0] < cfg.n_folds]
        if not found:
            raise FileNotFoundError(f"no {PREFIX}_backbone_fold*.pth / {PREFIX}_head_fold*.pth in {r.out}; run --stages finetune first")
        folds = [load_fold(b, h, m) for _, b, h, m in found]
        models = [engine.prepare_model(f.model, engine.DistEnv(device=dev), r.channels_last, cfg.compile).eval() for f in folds]
        views = parse_tta(cfg.tta)
        test_dir = Path(cfg.faces_dir) / "test"
        ids = id_order(ImageIndex(test_dir).ids())
        if not ids:
            raise FileNotFoundError(f"{test_dir}: no test face images")
        log.info(f"inference: {len(ids)} test faces × {len(folds)} folds × TTA {views}")

        # Each rank predicts a strided share; unreadable test images are errors (no guessed rows).
        mine = np.arange(env.rank, len(ids), env.world_size)
        dataset = r.faces([ids[i] for i in mine], test_dir, on_error="raise")
        loader = r.loader(dataset, cfg.infer_batch_size, SequentialSampler(dataset))
        batches = (r.images(x) for x, _, _ in loader)
        with tqdm(total=len(dataset), desc="inference", disable=not env.is_main, leave=False) as bar:
            logits = predict_batches(models, batches, dev, views, cfg.amp, r.channels_last, progress=bar)
        pos = engine.all_gather_cat(env, torch.from_numpy(mine))
        per_fold = np.stack([engine.all_gather_cat(env, torch.from_numpy(l)).numpy() for l in logits])
        order = np.argsort(pos.numpy())
        per_fold = per_fold[:, order]

        th = ensemble_threshold(r, folds)
        prob = ensemble_probability(per_fold)
        pred = pd.DataFrame({"Id": ids, "prob": prob})
        for (k, *_), l in zip(found, per_fold):
            pred[f"fold{k}"] = 1.0 / (1.0 + np.exp(-l.astype(np.float64)))
        sub = pd.DataFrame({"Id": ids, "target_feature": (prob >= th).astype(int)})
        if env.is_main:
            _write_csv(pred, r.path(PREDICTIONS_CSV))
            _write_csv(sub, r.path(SUBMISSION_CSV))
        log.info(f"submission: {len(sub)} rows, {int(sub.target_feature.sum())} predicted fake (th={th:.4f}) → {r.path(SUBMISSION_CSV)}")
        engine.barrier(env)
        return sub
