"""What trains: the whole network (``--tune full``), a linear probe on a frozen encoder (``probe``), or
the encoder's LayerNorms and the head (``layernorm``, as GenD, WACV'26, tunes CLIP).

**probe.** The encoder (any architecture, from its usual start: CLIP's weights, Lite0's ImageNet
weights, TitanNet's SSL file, ``--init-weights``) is frozen. Every labelled face is embedded once per
run for each view of ``PROBE_VIEWS`` and the embeddings are cached in the run's checkpoint folder
(``embeddings_<key>.pt``), keyed by a digest of the face files, the architecture, its input, the input
size, the views and the encoder's weights: a rerun, and every fold, reuses them; another image, size or
start makes a new cache. Each fold then fits only a logistic regression (standardised features,
L2 with ``--probe-c``, classes balanced unless ``--imbalance none``) on its training rows × views, folded
back into the usual ``LinearHead`` on raw features, so the fold is the usual backbone + head pair that
every consumer scores with ``FoldModel``. Its out-of-fold logit is the mean over ``PROBE_VIEWS`` of the
head's logits, as TTA over those views scores it; the fold records those views as its ``oof_tta``.

**Shared backbone.** With a frozen (probe) or mostly frozen (layernorm) encoder every fold's backbone is
the start weights plus at most its LayerNorms. The start is written once per run as
``{prefix}_backbone_base.pth`` and each fold's backbone file holds only the tensors that differ from it
(none for a probe), naming the base file and its sha256 (``backbone_base``, ``backbone_base_sha256``);
the fold set (``titan.infer.folds``) loads the base, checks the digest and overlays the fold's tensors.
Five CLIP folds take ~345 MB instead of ~1.7 GB.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, SequentialSampler
from tqdm import tqdm

from ..checkpoints import CheckpointError, file_sha256, load_file, save_atomic, save_checkpoint, weights_digest
from ..config import TrainConfig
from ..data.fingerprint import digest_lines, images_digest
from ..data.images import ImageIndex
from ..infer.calibration import nll, probability
from ..metrics import binary_metrics
from ..models.archs import arch_input, resolve_arch
from ..models.clip_vit import CLIP_ARCHS, embed, freeze_except_layernorms
from ..models.heads import build_head
from ..runlog import RunLog
from . import distributed

if TYPE_CHECKING:
    from .session import TrainSession

TUNES = ("full", "probe", "layernorm")
PROBE_VIEWS = ("identity", "hflip")  # every face embedded as it is and mirrored: two samples per face


def check_tune(cfg: TrainConfig) -> None:
    """Refuse, before any work, a ``--tune`` that makes no sense with the rest of the config."""
    if cfg.tune not in TUNES:
        raise ValueError(f"--tune {cfg.tune!r}: choose one of {', '.join(TUNES)}")
    arch = resolve_arch(cfg.arch, cfg.variant)
    if cfg.tune == "layernorm" and not (arch.variant or arch.name in CLIP_ARCHS):
        raise ValueError(f"--tune layernorm: {arch.name} normalises with BatchNorm and has no LayerNorm to tune; "
                         f"use it with clip-vit-b16 or titan-<variant>, or --tune probe / full")
    if cfg.tune == "probe":
        if cfg.head != "linear":
            raise ValueError(f"--tune probe fits a linear head (logistic regression); --head {cfg.head} is not one: "
                             "use --head linear")
        if cfg.sbi_p > 0:
            raise ValueError(f"--tune probe embeds each face once, so it cannot make self-blended fakes on the fly "
                             f"(--sbi-p {cfg.sbi_p}): use --sbi-p 0, or --tune full / layernorm")
        if not cfg.probe_c > 0:
            raise ValueError(f"--probe-c {cfg.probe_c}: the inverse L2 strength must be > 0")


def describe_tune(cfg: TrainConfig) -> str:
    if cfg.tune == "probe":
        return (f"tune probe: frozen {resolve_arch(cfg.arch, cfg.variant).name}, a logistic-regression head (C={cfg.probe_c:g}) "
                f"on cached {'+'.join(PROBE_VIEWS)} embeddings (the fine-tuning schedule and augmentations are not used)")
    return f"tune {cfg.tune}"


# --- the shared backbone -----------------------------------------------------------------------------

def write_base(r: "TrainSession", backbone: torch.nn.Module) -> dict[str, str]:
    """Write the run's start weights once as ``{prefix}_backbone_base.pth`` (kept when it holds these very
    weights) → the reference each fold records: ``backbone_base`` (its file name), ``backbone_base_sha256``."""
    path = r.files.backbone_base
    sd = {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
    digest = weights_digest(sd)
    if r.env.is_main:
        same = False
        if path.is_file():
            try:
                obj = load_file(path)
                same = isinstance(obj, dict) and isinstance(obj.get("meta"), dict) and obj["meta"].get("weights") == digest
            except CheckpointError:
                same = False
        if not same:
            arch = resolve_arch(r.cfg.arch, r.cfg.variant)
            save_checkpoint(sd, path, arch=arch.name, img_size=r.cfg.img_size, weights=digest,
                            note="the frozen start every fold's backbone file is a difference from")
            r.log.info(f"shared backbone: {path.name} ({sum(v.numel() for v in sd.values()) / 1e6:.1f} M values), "
                       "written once; each fold's backbone file holds only what differs from it")
    distributed.barrier(r.env)
    return {"backbone_base": path.name, "backbone_base_sha256": file_sha256(path)}


def difference_from_base(sd: dict[str, torch.Tensor], base_path: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``sd`` that are not bit-equal to the base file's (all of a tensor the base lacks)."""
    base = load_file(base_path)["model"]
    return {k: v for k, v in sd.items() if k not in base or base[k].shape != v.shape or not torch.equal(base[k], v.cpu())}


def base_still_there(r: "TrainSession", meta: dict) -> bool:
    """A finished fold that points at a base file: that file is there with the digest it recorded."""
    name = meta.get("backbone_base")
    if not name:
        return True
    path = r.out / str(name)
    return path.is_file() and file_sha256(path) == meta.get("backbone_base_sha256")


# --- layernorm ---------------------------------------------------------------------------------------

def apply_layernorm_tune(r: "TrainSession", backbone: torch.nn.Module, log: RunLog) -> dict[str, str]:
    """Freeze all but the backbone's LayerNorms (the head stays trainable) → the base reference."""
    ref = write_base(r, backbone)  # the start, before any LayerNorm moves
    n = freeze_except_layernorms(backbone)
    total = sum(p.numel() for p in backbone.parameters())
    if n == 0:
        raise ValueError(f"--tune layernorm: {type(backbone).__name__} has no LayerNorm parameters to tune")
    log.info(f"tune layernorm: {n:,} of {total:,} backbone parameters train (its LayerNorms), plus the head")
    return ref


# --- probe: the embeddings cache -----------------------------------------------------------------------

@dataclasses.dataclass
class Embeddings:
    """(views, rows, features) float32 in the label rows' order; ``ok`` False where the face was unreadable."""

    feats: np.ndarray
    ok: np.ndarray
    key: str


def _row_images(r: "TrainSession", df: pd.DataFrame) -> list[tuple[bool, ImageIndex, list[str], np.ndarray]]:
    from .session import face_dirs

    train_dir, test_dir = face_dirs(r.cfg)
    out = []
    for pseudo, folder in ((False, train_dir), (True, test_dir)):
        pos = np.flatnonzero(df.is_pseudo.to_numpy() == pseudo)
        if len(pos):
            out.append((pseudo, ImageIndex(folder), df.Id.iloc[pos].tolist(), pos))
    return out


def embeddings_key(r: "TrainSession", df: pd.DataFrame, weights: str) -> str:
    arch = resolve_arch(r.cfg.arch, r.cfg.variant)
    parts = [f"{'pseudo' if p else 'train'}:{images_digest(index, ids)}" for p, index, ids, _ in _row_images(r, df)]
    return digest_lines(parts + [f"arch={arch.name}", f"input={arch_input(arch, r.cfg.input)}",
                                 f"img_size={r.cfg.img_size}", f"views={','.join(PROBE_VIEWS)}", f"weights={weights}"])


def cached_embeddings(r: "TrainSession", df: pd.DataFrame, backbone: torch.nn.Module) -> Embeddings:
    """Every label row's embeddings for ``PROBE_VIEWS``: from the run's cache when its key matches, else
    computed once (rank 0; tqdm and the log show the progress) and cached; stale caches are removed."""
    key = embeddings_key(r, df, weights_digest(backbone.state_dict()))
    path = r.ckpt / f"embeddings_{key}.pt"
    if r.env.is_main and not path.is_file():
        r.ckpt.mkdir(parents=True, exist_ok=True)
        feats, ok = _compute(r, df, backbone)
        save_atomic({"key": key, "ids": df.Id.tolist(), "views": list(PROBE_VIEWS), "feats": torch.from_numpy(feats),
                     "ok": torch.from_numpy(ok)}, path)
        for old in r.ckpt.glob("embeddings_*.pt"):
            if old != path:
                old.unlink(missing_ok=True)
        r.log.info(f"embeddings cached: {path} ({feats.shape[1]} faces × {len(PROBE_VIEWS)} views × {feats.shape[2]})")
    else:
        r.log.info(f"embeddings reused from {path} (same faces, architecture, size and weights)")
    distributed.barrier(r.env)
    obj = load_file(path)
    if obj.get("key") != key or list(obj.get("ids", [])) != df.Id.tolist():
        raise CheckpointError(f"{path}: not the embeddings of these rows; delete it and rerun")
    return Embeddings(obj["feats"].numpy(), obj["ok"].numpy().astype(bool), key)


@torch.no_grad()
def _compute(r: "TrainSession", df: pd.DataFrame, backbone: torch.nn.Module) -> tuple[np.ndarray, np.ndarray]:
    cfg, dev = r.cfg, r.env.device
    backbone = backbone.to(dev).eval()
    feats: np.ndarray | None = None
    ok = np.zeros(len(df), bool)
    r.log.info(f"embedding {len(df)} faces × {'+'.join(PROBE_VIEWS)} at {cfg.img_size} px on {dev} (once per run)")
    with tqdm(total=len(df), desc="embed", unit="face") as bar:
        for _, index, ids, pos in _row_images(r, df):
            ds = r.faces(ids, index.folder, on_error="replace")
            loader = DataLoader(ds, batch_size=cfg.infer_batch_size, sampler=SequentialSampler(ds), num_workers=cfg.num_workers)
            done = 0
            for x, _, served in loader:
                e = embed(backbone, r.images(x), PROBE_VIEWS, batch_size=len(x)).numpy()  # (V, b, D)
                if feats is None:
                    feats = np.full((len(PROBE_VIEWS), len(df), e.shape[-1]), np.nan, np.float32)
                rows = pos[done:done + len(x)]
                # an unreadable face is served as another one: its row keeps no embedding (left out, named)
                good = served.numpy() == np.arange(done, done + len(x))
                feats[:, rows[good]] = e[:, good]
                ok[rows[good]] = True
                done += len(x)
                bar.update(len(x))
    bad = df.Id[~ok].tolist()
    if bad:
        r.log.info(f"WARNING: {len(bad)} unreadable face(s) have no embedding and are left out: {bad[:10]}")
    return feats, ok


# --- probe: one fold ---------------------------------------------------------------------------------

def fit_linear_head(x: np.ndarray, y: np.ndarray, c: float, balanced: bool, seed: int) -> tuple[np.ndarray, float]:
    """Logistic regression on standardised features → (w, b) on the RAW features (the scaling folded
    in), so ``x @ w + b`` is the logit a plain Linear computes."""
    from sklearn.linear_model import LogisticRegression

    mu, sd = x.mean(0), x.std(0)
    sd = np.where(sd > 1e-8, sd, 1.0)
    clf = LogisticRegression(C=c, max_iter=5000, class_weight="balanced" if balanced else None, random_state=seed)
    clf.fit((x - mu) / sd, y)
    w = clf.coef_[0] / sd
    return w, float(clf.intercept_[0] - (w * mu).sum())


def train_probe_fold(r: "TrainSession", df: pd.DataFrame, folds: np.ndarray, k: int, emb: Embeddings,
                     backbone: torch.nn.Module) -> dict:
    """Fit fold ``k``'s head on the cached embeddings of every other fold's rows (and the pseudo rows)
    → the ``best`` record ``finetune.finish_fold`` saves (epoch 1: there are no epochs)."""
    cfg = r.cfg
    y = df.target_feature.to_numpy().astype(int)
    tr, va = np.flatnonzero((folds != k) & emb.ok), np.flatnonzero((folds == k) & emb.ok)
    v = emb.feats.shape[0]
    x_tr = emb.feats[:, tr].reshape(v * len(tr), -1).astype(np.float64)
    w, b = fit_linear_head(x_tr, np.tile(y[tr], v), cfg.probe_c, cfg.imbalance != "none", cfg.seed + k)
    logits = (emb.feats[:, va].astype(np.float64) @ w + b).mean(0)  # TTA over PROBE_VIEWS: the mean logit
    probs = probability(logits)
    m = binary_metrics(y[va], probs)
    val_loss = nll(logits, y[va])
    head = build_head("linear", backbone.num_features, dropout=cfg.dropout)
    with torch.no_grad():
        head.head[1].weight.copy_(torch.from_numpy(w).float()[None])
        head.head[1].bias.fill_(b)
    sd = {f"backbone.{kk}": t.detach().cpu() for kk, t in backbone.state_dict().items()}
    sd.update({f"head.{kk}": t.detach().cpu() for kk, t in head.state_dict().items()})
    r.log.info(f"Fold {k} probe | {len(tr)} training faces × {v} views, {len(va)} validation | Val F1: {m['f1']:.4f} "
               f"(th={m['threshold']:.2f}) | AUC: {m['roc_auc']:.4f} | AP: {m['ap']:.4f}")
    r.log.record("ft_epoch", fold=k, epoch=1, train_loss=float("nan"), val_loss=val_loss, f1=m["f1"], th=m["threshold"],
                 auc=m["roc_auc"], ap=m["ap"], precision=m["precision"], recall=m["recall"], lr=0.0, img_s=float("nan"))
    return {"epoch": 1, "score": [float(m["f1"]), float(np.nan_to_num(m["roc_auc"])), -val_loss],
            "metrics": {kk: float(vv) for kk, vv in m.items()}, "val_loss": val_loss,
            "ids": [str(i) for i in df.Id.iloc[va]], "probs": torch.from_numpy(probs), "model": sd}
