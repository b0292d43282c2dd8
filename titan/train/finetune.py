"""Stage 2 of training: stratified k-fold fine-tuning from the SSL backbone.

Pseudo-labelled rows (diamonds) only ever train: they get no fold and are never validated on.
Each fold keeps its best epoch (F1, then ROC-AUC, then validation loss), writes its backbone,
head, OOF rows and — last, as the completion mark — its meta file; a finished fold is skipped on
a rerun, an interrupted one resumes from its newest complete epoch state.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader

from ..checkpoints import atomic_json, atomic_write, load_file, load_into, save_atomic, save_checkpoint
from ..config import TrainConfig
from ..data.augment import augment_batch, build_augment
from ..data.sbi import SelfBlend
from ..data.fingerprint import changed_inputs, images_digest, labels_digest
from ..data.images import ImageIndex
from ..data.labels import GROUP, LabelCSVError, group_codes, has_groups, read_labels
from ..data.align import read_align_settings
from ..infer.calibration import calibrate_oof, probability
from ..infer.record import Preprocessing
from ..metrics import binary_metrics, format_metrics
from ..models.archs import arch_input, build_arch_backbone, default_start, load_init_weights, resolve_arch
from ..models.classifier import Classifier
from ..models.convnextv2 import keep_stem_highpass
from ..models.heads import build_head
from ..runlog import RunLog
from . import distributed, optim, state, tune
from .epoch import EpochStats, predict_logits, train_one_epoch
from .reuse import changed_settings, describe, fold_fields
from .session import TrainSession, face_dirs, save_run_config, session



# --- labels and folds -------------------------------------------------------------------------------

def load_labels(cfg: TrainConfig, log: RunLog) -> pd.DataFrame:
    """The training rows: real rows (train faces) first, then pseudo rows (test faces).

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
    df = pd.concat([df[~df.is_pseudo], df[df.is_pseudo]], ignore_index=True)
    df.attrs["source"] = str(csv)  # named by later errors (e.g. one class only)
    return df


def assign_folds(df: pd.DataFrame, n_folds: int, seed: int) -> np.ndarray:
    """Fold of each row: stratified over the real rows only; pseudo rows get -1 (train-only).

    With groups (the label CSV's ``group`` column) the split is stratified *group* k-fold: no
    group has rows on both sides, so the OOF metrics, threshold and temperature come from groups
    training never saw. Without groups it is exactly the plain stratified split."""
    from sklearn.model_selection import StratifiedKFold

    fold = np.full(len(df), -1, dtype=int)
    real = np.flatnonzero(~df.is_pseudo.to_numpy())
    y = df.target_feature.to_numpy()[real]
    counts = np.bincount(y, minlength=2)
    source = df.attrs.get("source", "the label CSV")
    if counts.min() == 0:
        only = "real (0)" if counts[0] else "fake (1)"
        raise ValueError(f"{source}: both classes are needed: every one of the "
                         f"{len(real)} labelled rows is {only}; add images of the other class")
    if has_groups(df.iloc[real]):
        fold[real] = group_folds(df.iloc[real].reset_index(drop=True), n_folds, seed, source)
        return fold
    least = int(counts.min())
    if n_folds < 2 or least < n_folds:
        raise ValueError(f"{source}: cannot make {n_folds} stratified folds: "
                         f"the rarer class has {least} real row(s); "
                         "need n_folds ≥ 2 and at least n_folds rows of each class (lower --n-folds)")
    for k, (_, va) in enumerate(StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(real, y)):
        fold[real[va]] = k
    return fold


def _group_names(rows: pd.DataFrame, limit: int = 10) -> str:
    """The groups of ``rows`` for a message: their names, a blank one as the Id it stands for."""
    names = sorted({g if g else f"(no group: Id {i})" for g, i in zip(rows[GROUP], rows.Id)})
    return ", ".join(repr(n) for n in names[:limit]) + (f" … ({len(names)} in all)" if len(names) > limit else "")


def group_fold_limit(df: pd.DataFrame) -> int:
    """The most folds the labelled rows' groups can fill with both classes: the fewer of the groups
    holding a real row and those holding a fake row (every row counts as a group without groups)."""
    real = df[~df.is_pseudo.to_numpy()]
    groups, y = group_codes(real), real.target_feature.to_numpy()
    return int(min(len(np.unique(groups[y == c])) for c in (0, 1)))


def group_folds(real: pd.DataFrame, n_folds: int, seed: int, source: str = "the label CSV") -> np.ndarray:
    """The fold of each labelled row, by stratified group k-fold (shuffled with ``seed``); refuses,
    naming the groups and the fix, when the groups cannot give every fold both classes."""
    from sklearn.model_selection import StratifiedGroupKFold

    groups, y = group_codes(real), real.target_feature.to_numpy()
    n_groups = len(np.unique(groups))
    if n_folds < 2 or n_groups < n_folds:
        raise ValueError(f"{source}: cannot make {n_folds} group folds: the {len(real)} labelled rows hold "
                         f"{n_groups} group(s) (a row with a blank group is a group of its own); need n_folds ≥ 2 "
                         f"and at least n_folds groups: lower --n-folds to at most {n_groups}, or add images from more groups")
    for c, name in ((1, "fake (1)"), (0, "real (0)")):
        holding = real[y == c]
        n_c = len(np.unique(groups[y == c]))
        if n_c < n_folds:
            raise ValueError(f"{source}: cannot make {n_folds} group folds with both classes in each: only {n_c} "
                             f"group(s) hold {name} rows ({_group_names(holding)}), so some fold would validate "
                             f"without one; use --n-folds {max(n_c, 2)} or fewer, or add {name.split()[0]} images "
                             "from more groups")
    fold = np.full(len(real), -1, dtype=int)
    splitter = StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed)
    for k, (_, va) in enumerate(splitter.split(np.zeros(len(real)), y, groups)):
        fold[va] = k
    for k in range(n_folds):
        missing = [name for c, name in ((0, "real (0)"), (1, "fake (1)")) if not (y[fold == k] == c).any()]
        if missing:
            raise ValueError(f"{source}: group fold {k} would hold no {missing[0]} rows: its groups are "
                             f"{_group_names(real[fold == k])}; the groups are too few or too lopsided for "
                             f"{n_folds} folds: lower --n-folds, or add {missing[0].split()[0]} images from more groups")
    return fold


def training_inputs(r: TrainSession, df: pd.DataFrame, folds: np.ndarray) -> dict[str, str]:
    """Digests of what every fold is made from: the label rows with their folds, and their face images."""
    train_dir, test_dir = face_dirs(r.cfg)
    images = []
    for pseudo, folder in ((False, train_dir), (True, test_dir)):
        ids = df.Id[df.is_pseudo == pseudo].tolist()
        if ids:
            images.append(images_digest(ImageIndex(folder), ids))
    return {"labels": labels_digest(df.Id, df.target_feature, df.is_pseudo, folds), "images": "+".join(images)}


def labelled_dataset(r: TrainSession, df: pd.DataFrame) -> ConcatDataset:
    """Real rows from the train faces, then pseudo rows from the test faces (dataset order = df
    order, since ``load_labels`` lists real rows first)."""
    train_dir, test_dir = face_dirs(r.cfg)
    parts = []
    for pseudo, folder in ((False, train_dir), (True, test_dir)):
        sub = df[df.is_pseudo == pseudo]
        if len(sub):
            parts.append(r.faces(sub.Id.tolist(), folder, sub.target_feature.tolist()))
    return ConcatDataset(parts)


def class_balance(cfg: TrainConfig, y: np.ndarray) -> tuple[float | None, np.ndarray | None]:
    """(pos_weight, sampler weights) per ``cfg.imbalance``."""
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    # --sbi-p turns that share of the reals into fakes during training: balance what the loss sees
    n_pos, n_neg = n_pos + cfg.sbi_p * n_neg, (1 - cfg.sbi_p) * n_neg
    if cfg.imbalance == "pos_weight":
        return (n_neg / n_pos if n_pos and n_neg else None), None
    if cfg.imbalance == "sampler":
        counts = np.array([max(n_neg, 1), max(n_pos, 1)], dtype=np.float64)
        return None, 1.0 / counts[y.astype(int)]
    if cfg.imbalance == "none":
        return None, None
    raise ValueError(f"imbalance must be pos_weight, sampler or none, not {cfg.imbalance!r}")


def build_classifier(cfg: TrainConfig, ssl_path: Path, log: RunLog, pos_weight: float | None) -> Classifier:
    """The configured arch's backbone — from ``init_weights`` if set, else (Titan) the SSL weights — and head."""
    arch = resolve_arch(cfg.arch, cfg.variant)
    backbone = build_arch_backbone(arch.name, cfg.drop_path, cfg.stem, cfg.img_size, cfg.input)
    if cfg.init_weights:
        log.info(load_init_weights(backbone, arch, cfg.init_weights))
    elif not arch.ssl:
        log.info(default_start(backbone, arch))
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
    return Classifier(backbone, build_head(cfg.head, backbone.num_features, **kwargs), cfg.label_smoothing, pos_weight)


# --- the stage -------------------------------------------------------------------------------------

def fold_done(r: TrainSession, k: int, inputs: dict[str, str]) -> dict | None:
    """The meta of a finished fold (its files and OOF rows all written) made from ``inputs`` with
    this run's weight-shaping settings (``titan.train.reuse``), else None; a fold made from other
    labels, images or settings is retrained (logged, naming what changed)."""
    meta_path = r.files.fold("meta", k)
    files = [r.files.fold("backbone", k), r.files.fold("head", k), r.files.fold_oof(k, r.ckpt)]
    if not meta_path.is_file() or not all(p.is_file() for p in files):
        return None
    meta = load_file(meta_path)
    if not (isinstance(meta, dict) and meta.get("complete")):
        return None
    if not tune.base_still_there(r, meta):
        r.log.info(f"Fold {k}: retraining — its shared backbone {meta.get('backbone_base')} is gone or was rewritten")
        return None
    stale = changed_settings(meta.get("config") or meta, r.cfg, fold_fields(r.cfg))
    if stale:
        r.log.info(f"Fold {k}: retraining — it was trained with {describe(stale)} (then → now)")
        return None
    changed = changed_inputs(meta.get("inputs"), inputs)
    if changed:
        r.log.info(f"Fold {k}: retraining — its {' and '.join(changed)} changed since it was trained"
                   + ("" if "inputs" in meta else " (its files record none: written by an older version)"))
        return None
    return meta


def run_finetune(cfg: TrainConfig, run: TrainSession | None = None,
                 labels: tuple[pd.DataFrame, np.ndarray] | None = None) -> dict:
    """Fine-tune every fold from the SSL backbone, then write the OOF file and the metrics summary.

    ``labels`` = (rows, folds) already read and checked (``pipeline.preflight``); else read here."""
    with session(cfg, run) as r:
        cfg = r.cfg  # its input size resolved (session.resolve_input_size)
        if labels is None:
            df = load_labels(cfg, r.log)
            labels = df, assign_folds(df, cfg.n_folds, cfg.fold_seed)
        df, folds = labels
        tune.check_tune(cfg)
        if cfg.tune != "full":
            r.log.info(tune.describe_tune(cfg))
        inputs = training_inputs(r, df, folds)
        probe = None  # (frozen backbone, its cached embeddings, base reference): made once, for the first fold to train
        for k in range(cfg.n_folds):
            if fold_done(r, k, inputs) is not None:
                r.log.info(f"Fold {k} already complete; skipping")
                continue
            if cfg.tune == "probe":
                if probe is None:
                    backbone = build_classifier(cfg, r.files.ssl_weights, r.log, None).backbone.eval()
                    probe = backbone, tune.cached_embeddings(r, df, backbone), tune.write_base(r, backbone)
                best = tune.train_probe_fold(r, df, folds, k, probe[1], probe[0])
                finish_fold(r, k, best, inputs, probe[2])
                continue
            train_fold(r, df, folds, k, inputs)
        summary = summarize_folds(r, df, inputs)
        if r.env.is_main:
            save_run_config(cfg, r.files, weights_made=True)  # every fold is now this config's
        return summary


@dataclass
class FoldData:
    """One fold's rows and loaders: train on every other fold's real rows plus all pseudo rows."""

    train: pd.DataFrame
    val: pd.DataFrame
    sampler: object
    loader: DataLoader
    val_loader: DataLoader
    pos_weight: float | None


def fold_data(r: TrainSession, df: pd.DataFrame, folds: np.ndarray, k: int) -> FoldData:
    cfg, env = r.cfg, r.env
    tr, va = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
    assert not df.is_pseudo.to_numpy()[va].any(), "pseudo rows must never be validated on"
    df_tr, df_va = df.iloc[tr].reset_index(drop=True), df.iloc[va].reset_index(drop=True)
    train_set, val_set = labelled_dataset(r, df_tr), labelled_dataset(r, df_va)
    pos_weight, weights = class_balance(cfg, df_tr.target_feature.to_numpy())
    sampler = distributed.make_sampler(len(train_set), env, shuffle=True, seed=cfg.seed + k, weights=weights)
    val_loader = r.loader(val_set, cfg.infer_batch_size, distributed.make_sampler(len(val_set), env, False, 0))
    return FoldData(df_tr, df_va, sampler, r.loader(train_set, cfg.batch_size, sampler), val_loader, pos_weight)


def validate(r: TrainSession, model, d: FoldData) -> tuple[dict, float, np.ndarray, np.ndarray]:
    """(metrics, validation loss, dataset indices, probabilities) on the fold's validation rows."""
    idx, logits = predict_logits(model, d.val_loader, r.env, r.cfg.amp, r.images)
    y = d.val.target_feature.to_numpy()[idx]
    probs = probability(logits)
    val_loss = float(F.binary_cross_entropy_with_logits(torch.from_numpy(logits).double(), torch.from_numpy(y).double()))
    return binary_metrics(y, probs), val_loss, idx, probs


def fold_model(r: TrainSession, pos_weight: float | None, steps_per_epoch: int,
               log: RunLog, name: str = "Fold") -> tuple[Classifier, torch.nn.Module, optim.Stepper]:
    """(the fold's classifier from the SSL backbone, the same placed for the device, its stepper)."""
    cfg, env = r.cfg, r.env
    raw = build_classifier(cfg, r.files.ssl_weights, log, pos_weight)
    if cfg.tune == "layernorm":  # before DDP wraps it: frozen parameters take no gradient buckets
        raw.base = tune.apply_layernorm_tune(r, raw.backbone, log)
    model = distributed.prepare_model(raw, env, r.channels_last, cfg.compile)
    stepper = optim.make_stepper(raw, model, cfg.ft_lr, cfg.ft_weight_decay, cfg.ft_warmup_epochs, cfg.ft_epochs,
                                 steps_per_epoch, cfg, env, name, log.info)
    if cfg.stem == "highpass" and resolve_arch(cfg.arch, cfg.variant).ssl:  # TitanNet only
        keep_stem_highpass(raw.backbone, stepper.optimizer)
    return raw, model, stepper


def fold_inputs(r: TrainSession):
    """A loader batch → (images, labels) on the device: decoded, a share ``sbi_p`` of the real faces
    turned into self-blended fakes (``titan.data.sbi``), then the fine-tuning augmentations."""
    cfg, dev = r.cfg, r.env.device
    aug = build_augment("finetune", cfg.jpeg_p, cfg.blur_p).to(dev)
    sbi = SelfBlend(cfg.sbi_p) if cfg.sbi_p > 0 else None

    def inputs(b):
        x, y = r.images(b[0]), b[1].to(dev, non_blocking=True)
        if sbi is not None:
            x, y, _ = sbi(x, y)
        return augment_batch(aug, x), y
    return inputs


def finetune_epoch(r: TrainSession, model: torch.nn.Module, loader, stepper: optim.Stepper, inputs,
                   name: str) -> EpochStats:
    """One fine-tuning epoch over ``loader``: ``inputs`` (``fold_inputs``) makes each batch's faces
    and labels, the classifier's loss comes out."""
    return train_one_epoch(model, loader, stepper, r.env, r.cfg.amp, inputs, lambda m, x, y: m(x, y)[1], name)


def train_fold(r: TrainSession, df: pd.DataFrame, folds: np.ndarray, k: int, inputs: dict[str, str]) -> dict:
    """Fine-tune fold ``k`` (resuming its newest complete epoch state) and save its best epoch."""
    cfg, env, log = r.cfg, r.env, r.log
    state.seed_everything(cfg.seed + 1 + k + 7919 * env.rank)  # the same start whether or not other folds ran here
    d = fold_data(r, df, folds, k)
    raw, model, stepper = fold_model(r, d.pos_weight, math.ceil(len(d.loader) / cfg.accum_steps), log, f"Fold {k}")
    batch_inputs, stem = fold_inputs(r), f"fold{k}"

    start, best = 0, None  # best: {"epoch", "score", "metrics", "val_loss", "ids", "probs", "model"}
    saved = r.resume(stem, raw, stepper, fold_fields(cfg), f"Fold {k} checkpoint in {r.ckpt}", inputs)
    if saved is not None:
        start, best = int(saved["epoch"]), saved["best"]
        log.info(f"Fold {k}: resuming after epoch {start}")
    log.info(f"Fold {k}: {len(d.train)} training rows ({int(d.train.is_pseudo.sum())} pseudo), {len(d.val)} validation rows")

    for epoch in range(start, cfg.ft_epochs):
        d.sampler.set_epoch(epoch)
        st = finetune_epoch(r, model, d.loader, stepper, batch_inputs, f"Fold {k} epoch {epoch + 1}")
        m, val_loss, idx, probs = validate(r, model, d)
        log.info(f"Fold {k} Ep {epoch + 1} | Loss: {st.loss:.4f} | Val F1: {m['f1']:.4f} (th={m['threshold']:.2f}) | "
                 f"AUC: {m['roc_auc']:.4f} | AP: {m['ap']:.4f} | LR: {stepper.lr:.1e}")
        log.record("ft_epoch", fold=k, epoch=epoch + 1, train_loss=st.loss, val_loss=val_loss, f1=m["f1"],
                   th=m["threshold"], auc=m["roc_auc"], ap=m["ap"], precision=m["precision"], recall=m["recall"],
                   lr=stepper.lr, img_s=st.img_s)
        score = (float(m["f1"]), float(np.nan_to_num(m["roc_auc"])), -val_loss)  # plain floats: weights_only
        if best is None or score > tuple(best["score"]):
            best = {"epoch": epoch + 1, "score": list(score), "metrics": {kk: float(v) for kk, v in m.items()},
                    "val_loss": val_loss, "ids": [str(d.val.Id[j]) for j in idx], "probs": torch.from_numpy(probs),
                    "model": {kk: v.detach().cpu().clone() for kk, v in raw.state_dict().items()}}
        if env.is_main:
            state.save_train_state(r.ckpt, stem, epoch + 1, keep=cfg.keep_checkpoints, model=raw.state_dict(),
                                   train=stepper.state_dict(), best=best, config=dataclasses.asdict(cfg), inputs=inputs)
        distributed.barrier(env)
    return finish_fold(r, k, best, inputs, getattr(raw, "base", None))


def finish_fold(r: TrainSession, k: int, best: dict | None, inputs: dict[str, str],
                base: dict[str, str] | None = None) -> dict:
    """Save the best epoch's files, drop the fold's epoch states, and log the fold's result."""
    if best is None:
        raise RuntimeError(f"Fold {k}: no epoch ran (ft_epochs={r.cfg.ft_epochs})")
    m = best["metrics"]
    result = {"fold": k, "best_epoch": best["epoch"], "f1": m["f1"], "th": m["threshold"], "auc": m["roc_auc"], "ap": m["ap"]}
    if r.env.is_main:
        save_fold(r, k, best, inputs, base)
        state.remove_train_states(r.ckpt, f"fold{k}")
    r.log.info(f"Fold {k} done: best epoch {best['epoch']} | F1 {result['f1']:.4f} (th={result['th']:.2f}) | AUC {result['auc']:.4f}")
    r.log.record("fold_done", **result)
    distributed.barrier(r.env)
    return result


def save_fold(r: TrainSession, k: int, best: dict, inputs: dict[str, str], base: dict[str, str] | None = None) -> None:
    """Write the best epoch's backbone, head, OOF rows and — last, as the completion mark — meta.
    With ``base`` (``titan.train.tune``: the run's shared frozen start) the backbone file holds only
    the tensors that differ from that file, and names it."""
    cfg, m, sd = r.cfg, best["metrics"], best["model"]
    arch = resolve_arch(cfg.arch, cfg.variant)
    ident = dict(arch=arch.name, variant=arch.variant or "", head=cfg.head, img_size=cfg.img_size, epoch=int(best["epoch"]),
                 preprocessing=fold_record(r).to_dict(), tune=cfg.tune, **(base or {}),
                 input=arch_input(arch, cfg.input))  # inference rebuilds this input (titan.models.frequency)
    for part in ("backbone", "head"):
        part_sd = {kk[len(part) + 1:]: v for kk, v in sd.items() if kk.startswith(part + ".")}
        if part == "backbone" and base:
            part_sd = tune.difference_from_base(part_sd, r.out / base["backbone_base"])
        save_checkpoint(part_sd, r.files.fold(part, k), **ident, metrics={kk: float(v) for kk, v in m.items()},
                        config=dataclasses.asdict(cfg))
    oof = pd.DataFrame({"Id": best["ids"], "prob": best["probs"].numpy(), "fold": k})
    atomic_write(r.files.fold_oof(k, r.ckpt), lambda tmp: oof.to_csv(tmp, index=False))
    save_atomic({"th": float(m["threshold"]), "f1": float(m["f1"]), "auc": float(m["roc_auc"]), "ap": float(m["ap"]),
                 **ident, "n_folds": cfg.n_folds, "fold_seed": cfg.fold_seed, "inputs": inputs,
                 "config": dataclasses.asdict(cfg), "complete": True},
                r.files.fold("meta", k))


def fold_record(r: TrainSession) -> Preprocessing:
    """What every fold of this run records it was trained on (``titan.infer.record``): the crop is
    the training faces' align_settings.json (none recorded when they have none)."""
    cfg = r.cfg
    crop = read_align_settings(face_dirs(cfg)[0])
    arch = resolve_arch(cfg.arch, cfg.variant)
    oof_tta = tune.PROBE_VIEWS if cfg.tune == "probe" else None  # a probe's OOF logit is its views' mean
    return Preprocessing.for_training(arch.name, cfg.img_size, cfg.tta, crop, arch_input(arch, cfg.input), oof_tta)


def summarize_folds(r: TrainSession, df: pd.DataFrame, inputs: dict[str, str]) -> dict:
    """``oof_v42.csv`` and ``metrics_v42.json`` from the finished folds' OOF rows."""
    parts, folds = [], []
    for k in range(r.cfg.n_folds):
        meta = fold_done(r, k, inputs)
        parts.append(pd.read_csv(r.files.fold_oof(k, r.ckpt), dtype={"Id": str}))
        folds.append({"fold": k, "best_epoch": int(meta["epoch"]), "f1": meta["f1"], "th": meta["th"],
                      "auc": meta["auc"], "ap": meta["ap"]})
    real = df[~df.is_pseudo][["Id", "target_feature"]]
    oof = real.merge(pd.concat(parts, ignore_index=True), on="Id", how="left", validate="one_to_one")
    if oof.prob.isna().any():
        # An unreadable validation image has no prediction: say so rather than invent one.
        r.log.info(f"WARNING: no OOF prediction for {int(oof.prob.isna().sum())} Id(s) "
                   f"{oof.Id[oof.prob.isna()].tolist()[:10]}; they are left out of the OOF metrics")
        oof = oof.dropna(subset=["prob"]).reset_index(drop=True)
    rep = binary_metrics(oof.target_feature.to_numpy(), oof.prob.to_numpy())
    # detect.py's calibrated probability and uncertain band come from the same OOF rows
    cal = calibrate_oof(oof.target_feature.to_numpy(), oof.prob.to_numpy(), rep["threshold"])
    summary = {"oof": rep, "folds": folds, "calibration": cal}
    if r.env.is_main:
        atomic_write(r.files.oof_csv, lambda tmp: oof[["Id", "target_feature", "prob", "fold"]].to_csv(tmp, index=False))
        atomic_json(summary, r.files.metrics_json)
    r.log.info("OOF | " + format_metrics(rep))
    r.log.record("oof", **rep)
    r.log.info(f"OOF calibration | temperature {cal['temperature']:.3f} (NLL {cal['nll_raw']:.4f} → "
               f"{cal['nll_calibrated']:.4f}) | uncertain band ±{cal['uncertain_band']:.3f} around the threshold "
               f"(holds the least-sure {100 * cal['band_share']:.0f}% of OOF faces)")
    r.log.record("calibration", **cal)
    return summary
