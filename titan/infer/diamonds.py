"""Diamonds: pseudo-labels for the test faces a previous fold ensemble is nearly sure about.

A test image with ensemble P(fake) > hi becomes a fake row, one with P(fake) < lo a real row
(both strict, so 0.995 itself is not a diamond). The output CSV holds the original training rows
first (``is_pseudo=False``), then the diamonds (``is_pseudo=True``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..checkpoints import CheckpointError, atomic_write
from ..config import option
from ..data.images import ImageIndex
from ..data.labels import GROUP, read_labels
from ..runfiles import DIAMOND_CSV, TRAIN_CSV, RunFiles
from ..runlock import holds_folder
from ..runlog import RunLog
from .folds import FoldSet, FoldSetError, find_fold_files, pair_globs
from .resilient import FAILED, ScoringOptions
from .scorer import score_fold_set
from .submission import in_id_order

class DiamondError(RuntimeError):
    """make_diamonds cannot run; nothing was written. The message says what to fix."""


@dataclass
class DiamondConfig(ScoringOptions):
    """make_diamonds.py's flags (the scoring flags, then its own)."""

    prefix: str = option("titan", "fold file prefix: titan (V38 release) or v42 (ours)")
    backbones: str = option("", "glob of backbone files (with --heads; replaces --weights-dir/--prefix)")
    heads: str = option("", "glob of head files (with --backbones)")
    variant: str = option("", "backbone variant; empty = read from the weights")
    head: str = option("", "head type; empty = read from the weights", choices=("", "linear", "arcface"))
    train_csv: str = option(TRAIN_CSV, "original labelled rows (Id,target_feature)")
    out: str = option(DIAMOND_CSV, "output CSV")
    hi: float = option(0.995, "P(fake) above this → fake diamond")
    lo: float = option(0.005, "P(fake) below this → real diamond")
    max_per_class: int = option(0, "keep at most N most confident per class; 0 = all")
    balance: bool = option(False, "keep as many real as fake diamonds (the smaller count)")


@dataclass
class DiamondSummary:
    out: Path
    n_folds: int
    n_test: int
    n_scored: int
    n_fake: int
    n_real: int
    img_size: int
    histogram: str
    probs: np.ndarray   # ensemble P(fake) per test face (Id order of the scores CSV)
    histogram_png: Path  # where make_diamonds.py draws them (titan.report.plots.diamond_histogram)
    unreadable: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def select_diamonds(ids, probs, hi: float = 0.995, lo: float = 0.005, max_per_class: int = 0,
                    balance: bool = False) -> pd.DataFrame:
    """Rows ``Id,target_feature,prob`` with prob > hi (1) or prob < lo (0); NaN is never selected.

    ``max_per_class`` keeps the most confident N of each class; ``balance`` caps both classes at
    the smaller one's count. Output in Id order (``id_order``)."""
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"thresholds must satisfy 0 <= lo < hi <= 1 (got lo={lo}, hi={hi})")
    df = pd.DataFrame({"Id": [str(i) for i in ids], "prob": np.asarray(probs, dtype=np.float64)})
    fake = df[df.prob > hi].sort_values(["prob", "Id"], ascending=[False, True])
    real = df[df.prob < lo].sort_values(["prob", "Id"], ascending=[True, True])
    caps = [c for c in (max_per_class if max_per_class > 0 else None,
                        min(len(fake), len(real)) if balance else None) if c is not None]
    if caps:
        fake, real = fake.head(min(caps)), real.head(min(caps))
    out = pd.concat([fake.assign(target_feature=1), real.assign(target_feature=0)])
    return in_id_order(out[["Id", "target_feature", "prob"]].reset_index(drop=True))


def training_rows(train: pd.DataFrame, diamonds: pd.DataFrame) -> pd.DataFrame:
    """The original rows (is_pseudo=False) followed by the diamonds (is_pseudo=True). A ``group``
    column is kept: original rows keep theirs, diamonds get a blank one (they only ever train)."""
    orig = train[["Id", "target_feature"]].assign(is_pseudo=False)
    new = diamonds[["Id", "target_feature"]].assign(is_pseudo=True)
    if GROUP in train.columns:
        orig, new = orig.assign(**{GROUP: train[GROUP].to_numpy()}), new.assign(**{GROUP: ""})
    return pd.concat([orig, new], ignore_index=True)


def text_histogram(probs: np.ndarray, bins: int = 20, width: int = 40) -> str:
    """One line per probability bin: range, count and a bar (scaled to the largest bin)."""
    p = np.asarray(probs, dtype=np.float64)
    p = p[np.isfinite(p)]
    counts, edges = np.histogram(p, bins=bins, range=(0.0, 1.0))
    top = max(int(counts.max()) if len(counts) else 0, 1)
    lines = []
    for c, a, b in zip(counts, edges[:-1], edges[1:]):
        bar = "#" * int(round(width * c / top)) if c else ""
        lines.append(f"  {a:4.2f}-{b:4.2f} {int(c):7d} {bar}".rstrip())
    return "\n".join(lines)


def _fold_files(cfg: DiamondConfig):
    if cfg.backbones or cfg.heads:
        if not (cfg.backbones and cfg.heads):
            raise DiamondError("--backbones and --heads go together: give both globs")
        return pair_globs(cfg.backbones, cfg.heads), f"--backbones {cfg.backbones!r} / --heads {cfg.heads!r}"
    rf = RunFiles(Path(cfg.weights_dir), cfg.prefix)
    where = f"{rf.folder / rf.fold_glob()} + {rf.fold_glob('head')}"
    return find_fold_files(cfg.weights_dir, cfg.prefix), where


def _test_index(test_dir: str) -> ImageIndex:
    try:
        index = ImageIndex(test_dir)
    except FileNotFoundError:
        raise DiamondError(f"{test_dir}: test face folder not found; run align_faces.py or pass --test-dir") from None
    if len(index) == 0:
        raise DiamondError(f"{test_dir}: no test images in the folder; run align_faces.py or pass --test-dir")
    return index


@holds_folder(lambda cfg, runlog=None: Path(cfg.out).parent)
def make_diamonds(cfg: DiamondConfig, runlog: RunLog | None = None) -> DiamondSummary:
    """Score the test faces with the fold ensemble and write the training CSV with diamonds.

    Every check that can fail runs before anything is written; the CSV and PNG are atomic."""
    say = runlog.info if runlog else (lambda msg: None)
    if not 0.0 <= cfg.lo < cfg.hi <= 1.0:
        raise DiamondError(f"thresholds must satisfy 0 <= lo < hi <= 1 (got --lo {cfg.lo}, --hi {cfg.hi})")
    files, where = _fold_files(cfg)
    if not files:
        raise DiamondError(f"no fold weights found ({where}); pass --weights-dir/--prefix (v42 for our own "
                           f"folds) or --backbones/--heads")
    train = read_labels(cfg.train_csv)
    if train.is_pseudo.any():
        say(f"{cfg.train_csv}: dropping {int(train.is_pseudo.sum())} earlier pseudo-labelled rows (diamonds are rebuilt)")
        train = train[~train.is_pseudo].reset_index(drop=True)
    index = _test_index(cfg.test_dir)
    test_ids = index.ids()
    clash = sorted(set(test_ids) & set(train.Id))
    if clash:
        raise DiamondError(f"{len(clash)} test Id(s) in {cfg.test_dir} are also training Ids in {cfg.train_csv}: "
                           f"{clash[:10]}{' …' if len(clash) > 10 else ''}. A diamond would duplicate a labelled row; "
                           f"check that --test-dir holds the test faces")
    try:
        fs = FoldSet.load(files, True, cfg.variant, cfg.head, None if cfg.backbones else RunFiles(Path(cfg.weights_dir), cfg.prefix))
        prep = cfg.resolve(fs, say)
    except FoldSetError as e:
        raise DiamondError(str(e)) from None
    except CheckpointError as e:
        raise DiamondError(f"fold weights do not load (wrong architecture or a broken file): {e}") from None
    say(f"loaded {fs.describe()} from {where}")
    say(f"scoring {len(test_ids)} test faces from {cfg.test_dir} at {prep.img_size} px, TTA {','.join(prep.tta)}")

    scored = score_fold_set(fs, prep, test_ids, index, batch_size=cfg.batch_size, device=cfg.device, amp=cfg.amp,
                            num_workers=cfg.num_workers, progress=cfg.progress, say=say)
    scores = scored.scores
    if not scores.fold_names:
        raise DiamondError("every fold produced non-finite outputs; the weights are broken")
    unreadable = [scores.ids[i] for i in np.flatnonzero(scores.status == FAILED)]
    for i in np.flatnonzero(scores.status == FAILED)[:10]:
        say(f"unreadable test face, not a diamond: {scores.reasons[i]}")
    probs = scored.prob

    diamonds = select_diamonds(test_ids, probs, cfg.hi, cfg.lo, cfg.max_per_class, cfg.balance)
    rows = training_rows(train, diamonds)
    out = Path(cfg.out)
    atomic_write(out, lambda tmp: rows.to_csv(tmp, index=False))
    scores_csv = out.with_name(out.stem + "_scores.csv")
    scores_df = in_id_order(pd.DataFrame({"Id": test_ids, "prob": probs}))
    atomic_write(scores_csv, lambda tmp: scores_df.to_csv(tmp, index=False))
    n_fake, n_real = int((diamonds.target_feature == 1).sum()), int((diamonds.target_feature == 0).sum())

    n_scored = int(scores.scored.sum())
    hist = text_histogram(probs)
    share = (n_fake + n_real) / max(len(test_ids), 1)
    say(f"diamonds: {n_fake} fake (p > {cfg.hi:g}) + {n_real} real (p < {cfg.lo:g}) = {n_fake + n_real} "
        f"of {len(test_ids)} test faces ({share:.1%})"
        + (f"; {len(unreadable)} unreadable" if unreadable else "")
        + (f"; capped at {cfg.max_per_class}/class" if cfg.max_per_class > 0 else "")
        + ("; balanced" if cfg.balance else ""))
    say("ensemble P(fake) histogram:\n" + hist)
    for note in scores.notes:
        say(f"degraded: {note}")
    say(f"wrote {out} ({len(train)} original + {len(diamonds)} diamond rows), {scores_csv}")
    return DiamondSummary(out, len(scores.fold_names), len(test_ids), n_scored, n_fake, n_real, prep.img_size, hist,
                          probs, out.with_name(out.stem + "_hist.png"), unreadable, scores.notes)
