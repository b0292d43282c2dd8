"""The one scorer: a fold set, the test images and the resolved preprocessing → the scores.

Training's inference (``titan.train.pipeline``), safe inference (``titan.infer.safe``) and diamonds
(``titan.infer.diamonds``) all score here and differ only in what they write. The flow:
every fold × every TTA view over every image, resiliently (``titan.infer.resilient``: unreadable
images marked, OOM and CUDA failures survived) → folds with non-finite outputs dropped (named) →
the threshold of the folds that voted and the run's calibration (``FoldSet``) → the ensemble's
P(fake) and decisions (``titan.infer.calibration``). The preprocessing comes resolved
(``FoldSet.resolve``), so every caller scores at the same size with the same views.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from ..data.images import ImageIndex
from .calibration import Calibration, probability
from .folds import FoldSet
from .record import Preprocessing
from .resilient import ImagesToScore, Scores, score_images

if TYPE_CHECKING:
    from .folds import EnsembleSet
from .submission import Filled, fill_unscored

log = logging.getLogger("titan")


@dataclass
class ScoredSet:
    """What the scorer hands back: the per-fold scores, the preprocessing and calibration they
    were made with, and the ensemble's P(fake) per image (NaN where no fold could score it)."""

    scores: Scores
    preprocessing: Preprocessing
    calibration: Calibration
    threshold_note: str
    prob: np.ndarray
    dropped: list[str]

    @property
    def ids(self) -> list[str]:
        return self.scores.ids

    def fold_probabilities(self) -> dict[str, np.ndarray]:
        """Each voting fold's own P(fake) per image."""
        return {n: probability(lg) for n, lg in zip(self.scores.fold_names, self.scores.logits)}

    def filled(self) -> Filled:
        """0/1 decisions for every image: the threshold rule where scored, the prior decision elsewhere."""
        return fill_unscored(self.ids, self.prob, self.calibration.threshold, self.scores.failure_reasons())


def score_fold_set(fs: FoldSet, prep: Preprocessing, ids: Sequence[str], faces: ImageIndex | None, *,
                   recrop: Callable[[str], np.ndarray] | None = None, batch_size: int = 32, device: str = "auto",
                   amp: bool = True, num_workers: int = 0, progress: bool = True,
                   share: tuple[np.ndarray, Callable[[np.ndarray, Scores], Scores]] | None = None,
                   say: Callable[[str], None] = log.info) -> ScoredSet:
    """Score ``ids`` (their face crops in ``faces``; ``recrop(id)`` for a crop that cannot be read)
    with every fold of ``fs`` at ``prep``'s input size and TTA views. ``share`` = (this process's
    positions in ``ids``, a gather of every process's scores) splits the work across processes."""
    mine = share[0] if share is not None else np.arange(len(ids))
    dataset = ImagesToScore([ids[i] for i in mine], faces, prep.img_size, recrop)
    scores = score_images(fs.folds, dataset, batch_size, device, prep.tta, amp, num_workers, progress)
    if share is not None:
        scores = share[1](mine, scores)
    dropped = scores.drop_nonfinite_folds()
    for name in dropped:
        say(f"WARNING: {name} gave non-finite scores; left out")
    th = fs.threshold(used=scores.fold_names)  # the folds' own thresholds: only those that voted
    cal = fs.calibration(th, say=lambda s: None)  # its NOTICE is for detect's calibrated verdicts
    return ScoredSet(scores, prep, cal, th[1], scores.probabilities(), dropped)


def score_ensemble(es: "EnsembleSet", preps: Sequence[Preprocessing], ids: Sequence[str], faces: ImageIndex | None, *,
                   recrops: Sequence[Callable[[str], np.ndarray] | None] = (), say: Callable[[str], None] = log.info,
                   **kwargs) -> ScoredSet:
    """An ensemble of runs (``titan.infer.ensemble``): every member scored by ``score_fold_set`` at its own
    preprocessing (``preps``, ``recrops`` per member), the image's logit the mean of the members' logits
    (each its voting folds' mean), decided with the ensemble's own threshold and calibration. The per-fold
    scores are kept under ``member/fold`` names; an image one member could not score is unscored."""
    from .ensemble import mean_member_logits

    recrops = list(recrops) or [None] * len(es.members)
    parts = [score_fold_set(m, p, ids, faces, recrop=rc, say=say, **kwargs) for m, p, rc in zip(es.members, preps, recrops)]
    member_logits = [np.where(part.scores.scored, part.scores.logits.astype(np.float64).mean(axis=0), np.nan)
                     if len(part.scores.fold_names) else np.full(len(ids), np.nan) for part in parts]
    status = np.max(np.stack([part.scores.status for part in parts]), axis=0)
    worst = np.argmax(np.stack([part.scores.status for part in parts]), axis=0)
    first = parts[0].scores
    scores = Scores(first.ids, np.concatenate([part.scores.logits for part in parts]), status,
                    [parts[w].scores.reasons[i] for i, w in enumerate(worst)],
                    [f"{label}/{n}" for label, part in zip(es.labels, parts) for n in part.scores.fold_names],
                    first.device, first.batch_size,
                    [f"{label}: {n}" for label, part in zip(es.labels, parts) for n in part.scores.notes])
    th = es.threshold()
    cal = es.calibration(th, say=lambda s: None)
    prob = probability(mean_member_logits(member_logits))
    return ScoredSet(scores, preps[0], cal, th[1], prob,
                     [f"{label}/{n}" for label, part in zip(es.labels, parts) for n in part.dropped])
