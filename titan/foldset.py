"""A set of fold weights on disk: find the files (by prefix or by globs), load them strictly or
leniently, and read what the set agrees on (image size, threshold).

make_diamonds.py loads strictly (a broken fold is an error); safe_inference.py leniently (a
broken fold is skipped and named). Models and TTA themselves live in ``titan.ensemble``.
"""
from __future__ import annotations

import glob
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .checkpoints import CheckpointError, read_meta
from .ensemble import Fold, find_folds, load_fold


@dataclass(frozen=True)
class FoldFiles:
    """The files of one fold; ``head`` is None when the backbone has no partner head file."""

    backbone: Path
    head: Path | None
    meta: Path | None = None

    @property
    def name(self) -> str:
        k = fold_number(self.backbone)
        return f"fold{k}" if k is not None else self.backbone.stem


def fold_number(path: str | os.PathLike) -> int | None:
    m = re.search(r"fold(\d+)", Path(path).stem)
    return int(m.group(1)) if m else None


def discover(weights_dir: str | os.PathLike, prefix: str = "v42") -> list[FoldFiles]:
    """Every ``{prefix}_backbone_fold{k}.pth`` in ``weights_dir``, with its head and meta when present.

    Backbones without a head are returned with ``head=None`` so callers can name them.
    """
    return [FoldFiles(b, h, m) for _, b, h, m in find_folds(weights_dir, prefix, include_headless=True)]


def pair_globs(backbones: str, heads: str) -> list[FoldFiles]:
    """Pair backbone and head files matched by two globs: by fold number in the names when every
    file has one, else in sorted order. A meta file ``*meta*`` beside a backbone is picked up."""
    bs = sorted(Path(p) for p in glob.glob(backbones))
    hs = sorted(Path(p) for p in glob.glob(heads))
    if all(fold_number(p) is not None for p in bs + hs):
        by_k = {fold_number(h): h for h in hs}
        pairs = [(b, by_k.get(fold_number(b))) for b in bs]
    else:
        pairs = [(b, hs[i] if i < len(hs) else None) for i, b in enumerate(bs)]
    out = []
    for b, h in pairs:
        meta = b.with_name(b.name.replace("backbone", "meta"))
        out.append(FoldFiles(b, h, meta if meta != b and meta.is_file() else None))
    return out


def load_folds(files: list[FoldFiles], variant: str | None = None, head: str | None = None,
               strict: bool = True) -> tuple[list[Fold], list[tuple[str, str]]]:
    """Load each fold → (folds, skipped as (name, reason)).

    ``strict`` raises ``CheckpointError`` on the first fold that does not load; otherwise the fold
    is skipped and its reason kept. ``variant``/``head`` override what the files say.
    """
    folds, skipped = [], []
    for f in files:
        try:
            if f.head is None:
                raise CheckpointError(f"no matching head file (expected {f.backbone.name.replace('backbone', 'head')})")
            fold = load_fold(f.backbone, f.head, f.meta, variant=variant or None, head=head or None)
            fold.name = f.name
            folds.append(fold)
        except Exception as e:  # noqa: BLE001 — any failure to build a fold is reported the same way
            # Name the files: load_fold's shape errors only say "state dict".
            files_txt = " + ".join(str(p) for p in (f.backbone, f.head) if p is not None)
            reason = f"{f.name} ({files_txt}): " + (str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}")
            if strict:
                raise CheckpointError(reason) from e
            skipped.append((f.name, reason))
    return folds, skipped


def img_size_of(folds: list[Fold], files: list[FoldFiles], default: int = 512) -> tuple[int, str]:
    """The image size the folds were trained at → (size, where it came from).

    Meta files first, then the metadata inside our backbone checkpoints, then ``default``. When
    folds disagree the most common size wins (the note says so)."""
    by_name = {f.name: f for f in files}
    sizes = []
    for fold in folds:
        s = fold.meta.get("img_size")
        if s is None and fold.name in by_name:
            try:
                s = read_meta(by_name[fold.name].backbone).get("img_size")
            except CheckpointError:
                s = None
        if isinstance(s, (int, float)) and s > 0:
            sizes.append(int(s))
    if not sizes:
        return default, f"{default} (no img_size in the checkpoints' metadata)"
    size, n = Counter(sizes).most_common(1)[0]
    note = f"{size} (checkpoint metadata)"
    if n < len(sizes):
        note += f"; folds disagree: {sorted(set(sizes))}"
    return size, note


def mean_threshold(folds: list[Fold], default: float = 0.5) -> tuple[float, int]:
    """Mean of the folds' thresholds (``default`` for a fold without one) → (th, folds with one)."""
    ths = [f.threshold for f in folds if f.threshold is not None]
    if not folds:
        return default, 0
    return float(sum(ths) + default * (len(folds) - len(ths))) / len(folds), len(ths)
