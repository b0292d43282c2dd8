"""Scoring a folder of test faces with a fold ensemble, without giving up on bad images or CUDA.

- An unreadable image is never a black tensor: it is marked failed (or re-read through a
  ``recrop``, e.g. a fresh crop of the original) and left out of the forward pass.
- CUDA out of memory halves the compute batch and retries the same images; CUDA unusable (or
  dying mid-run) moves the work to CPU copies of the models that were kept aside.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..config import ScriptOptions, option
from ..runfiles import DEFAULT_PREFIX, TEST_FACES
from ..data.images import ImageDecodeError, ImageIndex, square_resize, to_chw_uint8, decode_image
from ..data.faces import DEFAULT_MARGIN, DEFAULT_MAX_SIDE, DEFAULT_MIN_PROB
from ..models.archs import for_inference
from .folds import Fold, FoldSet
from .record import CROP, Preprocessing
from .tta import DEFAULT_TTA, TTA_HELP
from .calibration import ensemble_probability
from .tta import predict_batches
from ..device import halved, is_oom, release_memory, resolve_device

log = logging.getLogger("titan")

OK, RECROPPED, FAILED = 0, 1, 2
# Faces per forward pass on CPU: a batch of 32 at 128 px holds ~50 MB per activation of
# EfficientNet-Lite0 and runs ~1.5× slower per face than 16 (out of cache); docs/export.md.
CPU_CHUNK = 16


class ImagesToScore(Dataset):
    """Test Ids → (uint8 (3,S,S), index, status, reason).

    A crop missing from ``index`` or failing to decode goes to ``recrop(id)`` (an HxWx3 uint8
    image) when given; if that fails too the item is FAILED with both reasons and an all-zero
    placeholder that scoring never feeds to a model.
    """

    def __init__(self, ids: Sequence[str], index: ImageIndex | None, img_size: int,
                 recrop: Callable[[str], np.ndarray] | None = None) -> None:
        self.ids, self.index, self.img_size, self.recrop = list(ids), index, img_size, recrop

    def __len__(self) -> int:
        return len(self.ids)

    def _read(self, image_id: str) -> np.ndarray:
        if self.index is None:
            raise FileNotFoundError(f"no face-crop folder to read Id {image_id!r} from")
        return decode_image(self.index.path(image_id))

    def __getitem__(self, i: int):
        image_id, status, reason = self.ids[i], OK, ""
        try:
            img = self._read(image_id)
        except (ImageDecodeError, FileNotFoundError) as e:
            status, reason, img = FAILED, str(e), None
            if self.recrop is not None:
                try:
                    img, status = self.recrop(image_id), RECROPPED
                except Exception as e2:  # noqa: BLE001 — any re-crop failure leaves the row failed
                    reason += f"; re-crop failed: {e2}"
        if img is None:
            x = torch.zeros(3, self.img_size, self.img_size, dtype=torch.uint8)
        else:
            x = to_chw_uint8(square_resize(img, self.img_size))
        return x, i, status, reason


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else ""


@dataclass
class ResilientPredictor:
    """Per-fold TTA logits for uint8 batches; shrinks the batch on OOM, falls back to CPU."""

    models: list[torch.nn.Module]  # CPU originals, kept for moving to CPU
    names: list[str]
    device: torch.device
    views: Sequence[str]
    batch_size: int
    amp: bool = True
    notes: list[str] = field(default_factory=list)
    dead: set[int] = field(default_factory=set)  # folds whose forward raised: NaN from then on

    def __post_init__(self) -> None:
        self.on_device = self._move(self.device)  # the models as trained (Grad-CAM hooks these)
        self.scoring = [for_inference(m) for m in self.on_device]  # their fastest eval-only form

    def _move(self, device: torch.device) -> list[torch.nn.Module]:
        if device.type == "cpu":
            return self.models
        try:
            moved = [copy.deepcopy(m).to(device) for m in self.models]
            torch.zeros(1, device=device).add_(1).cpu()  # a real kernel: fails now if CUDA is broken
            return moved
        except Exception as e:  # noqa: BLE001
            self._to_cpu(f"could not use {device} ({type(e).__name__}: {_first_line(e)})")
            return self.models

    def _to_cpu(self, why: str) -> None:
        self.notes.append(f"device: {why}; continued on CPU")
        log.warning("%s; continuing on CPU", why)
        self.device, self.on_device = torch.device("cpu"), self.models
        self.scoring = [for_inference(m) for m in self.models]

    def _shrink(self, error_name: str) -> None:
        release_memory(self.device)
        new = halved(self.batch_size)
        self.notes.append(f"out of memory at batch {self.batch_size}: retried at {new}")
        log.warning("out of memory at batch %d (%s); retrying at %d", self.batch_size, error_name, new)
        self.batch_size = new

    def _predict(self, x: torch.Tensor, ks: Sequence[int]) -> np.ndarray:
        parts = x.split(CPU_CHUNK) if self.device.type == "cpu" else [x]
        return predict_batches([self.scoring[k] for k in ks], parts, self.device, self.views, amp=self.amp)

    def _find_broken(self, x: torch.Tensor) -> bool:
        """After an error that is neither OOM nor CUDA: retire the folds that fail on their own."""
        broken = []
        for k in sorted(set(range(len(self.models))) - self.dead):
            try:
                self._predict(x[:1], [k])
            except Exception as e2:  # noqa: BLE001
                broken.append(k)
                self.notes.append(f"fold {self.names[k]} failed at inference ({type(e2).__name__}: {e2}); left out")
                log.warning("fold %s failed at inference: %s", self.names[k], e2)
        self.dead.update(broken)
        return bool(broken) and len(self.dead) < len(self.models)

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        """uint8 (B,3,S,S) → logits (n_models, B); NaN rows for retired folds."""
        out = np.full((len(self.models), x.shape[0]), np.nan, dtype=np.float32)
        i = 0
        while i < x.shape[0]:
            chunk = x[i:i + self.batch_size]
            live = [k for k in range(len(self.models)) if k not in self.dead]
            try:
                out[live, i:i + chunk.shape[0]] = self._predict(chunk, live)
                i += chunk.shape[0]
                continue
            except Exception as e:  # noqa: BLE001
                if is_oom(e) and self.batch_size > 1:
                    action = ("shrink", type(e).__name__)
                elif self.device.type == "cuda":
                    action = ("cpu", f"CUDA failed mid-run ({type(e).__name__}: {_first_line(e)})")
                elif self._find_broken(chunk):
                    continue
                else:
                    raise
            # Acted on outside the except block, once the failed attempt's tensors are released.
            if action[0] == "shrink":
                self._shrink(action[1])
            else:
                self._to_cpu(action[1])
        return out


@dataclass
class Scores:
    """Per-fold logits (n_folds, N) with NaN for failed rows, and what happened on the way."""

    ids: list[str]
    logits: np.ndarray
    status: np.ndarray
    reasons: list[str]
    fold_names: list[str]
    device: str
    batch_size: int
    notes: list[str]

    @property
    def scored(self) -> np.ndarray:
        return self.status != FAILED

    def probabilities(self) -> np.ndarray:
        """The ensemble's P(fake) per row; NaN where the image could not be read or no fold is left."""
        prob = np.full(len(self.ids), np.nan)
        ok = self.scored & (len(self.fold_names) > 0)
        if ok.any():
            prob[ok] = ensemble_probability(self.logits[:, ok])
        return prob

    def failure_reasons(self) -> list[str]:
        """Why each row could not be read; "" for the rows that were."""
        return [r if s == FAILED else "" for r, s in zip(self.reasons, self.status)]

    def drop_nonfinite_folds(self) -> list[str]:
        """Remove folds whose logits are not finite on some scored row; returns their names."""
        bad = [k for k in range(len(self.fold_names)) if not np.isfinite(self.logits[k, self.scored]).all()]
        if bad:
            keep = [k for k in range(len(self.fold_names)) if k not in bad]
            dropped = [self.fold_names[k] for k in bad]
            self.logits, self.fold_names = self.logits[keep], [self.fold_names[k] for k in keep]
            self.notes.append(f"dropped folds with non-finite outputs: {', '.join(dropped)}")
            return dropped
        return []


def pick_device(name: str, notes: list[str]) -> torch.device:
    """``resolve_device`` that degrades to CPU (with a note) instead of raising."""
    try:
        return resolve_device(name)
    except Exception as e:  # noqa: BLE001
        notes.append(f"device: {e}; continued on CPU")
        log.warning("%s; continuing on CPU", e)
        return torch.device("cpu")


def score_images(folds: Sequence[Fold], dataset: ImagesToScore, batch_size: int = 32, device: str = "auto",
                 views: Sequence[str] = ("identity", "hflip"), amp: bool = True, num_workers: int = 0,
                 progress: bool = True) -> Scores:
    """Score every image of ``dataset`` with every fold (TTA logits), resiliently."""
    notes: list[str] = []
    dev = pick_device(device, notes)
    predictor = ResilientPredictor([f.model.eval() for f in folds], [f.name for f in folds], dev, list(views),
                                   batch_size, amp, notes)
    loader = scoring_loader(dataset, batch_size, num_workers, predictor.device)
    logits, status, reasons = score_batches(predictor, loader, len(dataset), progress)
    return Scores(list(dataset.ids), logits, status, reasons, [f.name for f in folds], str(predictor.device),
                  predictor.batch_size, notes)


def scoring_loader(dataset: ImagesToScore, batch_size: int, num_workers: int, device: torch.device,
                   sampler=None) -> DataLoader:
    """Batches of ``dataset`` in order (or in ``sampler``'s), pinned for CUDA."""
    return DataLoader(dataset, batch_size=max(1, batch_size), shuffle=False, sampler=sampler, num_workers=num_workers,
                      pin_memory=device.type == "cuda", persistent_workers=False)


def score_batches(predictor: ResilientPredictor, loader, n: int, progress: bool = True) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(logits (n_folds, n), status, reasons) over an ``ImagesToScore`` loader of ``n`` images
    (``--estimate`` times this same loop over a few batches)."""
    from tqdm import tqdm

    logits = np.full((len(predictor.models), n), np.nan, dtype=np.float32)
    status = np.full(n, FAILED, dtype=np.int64)
    reasons = [""] * n
    with tqdm(total=n, desc="scoring", unit="img", disable=not progress, leave=False) as bar:
        for x, idx, st, why in loader:
            idx, st = idx.numpy(), st.numpy()
            status[idx] = st
            for j, r in zip(idx, why):
                reasons[j] = r
            ok = st != FAILED
            if ok.any():
                logits[:, idx[ok]] = predictor(x[torch.from_numpy(ok)])
            bar.update(len(idx))
    return logits, status, reasons


@dataclass
class FoldSetFlags:
    """Which folds and the preprocessing flags checked against their record: every script that
    runs or exports a training run's fold ensemble (``EnsembleOptions``, export.py)."""

    weights_dir: str = option(".", "folder holding the fold weights (a training run's folder)")
    prefix: str = option(DEFAULT_PREFIX, "fold file prefix: v42 (ours) or titan (V38 release)")
    img_size: int = option(0, "input size; 0 = from the folds (their preprocessing record, else 512)")
    force_preprocessing: bool = option(False, "apply --img-size / --margin / --min-prob / --max-side even where they "
                                              "contradict the folds' preprocessing record (logged)",
                                       aliases=("--force-img-size",))
    tta: str = option("", f"{TTA_HELP}; empty = the folds' record (the run's --tta), else {DEFAULT_TTA}")

    def resolve(self, fs: FoldSet, say: Callable[[str], None] = log.info) -> Preprocessing:
        """These flags against the folds' preprocessing record (``FoldSet.resolve``); the crop flags
        where the script has them (``CropFlags``)."""
        crop = {k: getattr(self, k) for k in CROP if hasattr(self, k)}
        return fs.resolve(img_size=self.img_size, tta=self.tta, force=self.force_preprocessing, say=say, **crop)


@dataclass
class EnsembleOptions(FoldSetFlags, ScriptOptions):
    """The flags of every script that runs a training run's fold ensemble (scoring, detection)."""

    batch_size: int = option(32, "faces per forward pass (halved on OOM)")
    device: str = option("auto", "auto (CUDA if present), cuda, cuda:1, cpu")
    amp: bool = option(True, "CUDA autocast (--no-amp: off)")
    progress: bool = option(True, "the progress bar (--no-progress: hidden)")


@dataclass
class CropFlags:
    """The face-crop flags of every script that crops faces itself (detect, evaluate, safe inference's
    re-crops); each defaults to the folds' record (the faces they were trained on), else align_faces.py's."""

    margin: float = option(-1.0, f"face-box margin of the square crop; -1 = the folds' record, else {DEFAULT_MARGIN}")
    min_prob: float = option(-1.0, f"ignore faces the detector scores below this; -1 = the folds' record, "
                                   f"else {DEFAULT_MIN_PROB}")
    max_side: int = option(0, f"shrink larger images for face detection only; 0 = the folds' record, else {DEFAULT_MAX_SIDE}")


@dataclass
class ScoringOptions(EnsembleOptions):
    """The flags of every script that scores test face crops with a fold set."""

    test_dir: str = option(TEST_FACES, "test face crops")
    num_workers: int = option(2, "image-decoding workers")
