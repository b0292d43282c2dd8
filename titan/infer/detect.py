"""Detection on raw photos, folders and videos: inputs → every face → the fold ensemble's calibrated verdict.

The reusable API behind detect.py (and evaluate.py):

- ``expand_inputs`` turns files, folders (recursive), globs and videos into ``Source`` items; a
  missing path or an empty glob becomes an item with its error, never dropped.
- ``Detector`` holds one fold set (``FoldSet``: files, architecture, input size, threshold), its
  calibration (``titan.infer.calibration``: temperature and uncertain band), align_faces.py's
  face detector and square crop (``titan.data.faces``: ``detect_all``, photos of any size in one batch,
  ``face_crop``) and the resilient TTA predictor (``titan.infer.resilient`` → ``titan.infer.tta``).
  ``score_images(named images)`` scores in-memory PIL images or uint8 arrays (nothing is read or
  written); ``run(specs)`` scores files, folders, globs and videos, decoding ahead in threads.
- Results are plain records: ``FaceResult`` per face, ``InputResult`` per input. An image's score
  is its most fake face (no face → the centre square, flagged ``no_face``); a video's is the mean
  over its sampled frames of each frame's most fake face, in logits, with the most suspicious
  frame named. ``InputResult.rows()`` gives the CSV/JSONL rows: the faces, then one summary row
  (empty ``face``).
"""
from __future__ import annotations

import glob
import logging
import math
import os
import threading
import warnings
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..config import option
from ..data.align import prefetch
from ..data.faces import NO_FACE, Detection, FaceDetector, face_crop
from ..data.images import IMAGE_EXTS, ImageDecodeError, centre_square, decode_reduced, to_chw_uint8, to_rgb_array
from ..runfiles import DEFAULT_PREFIX, TEST_IMAGES, RunFiles
from ..safe_text import display_path
from .calibration import Calibration
from .ensemble import mean_member_logits
from .folds import EnsembleSet, FoldSet, FoldSetError, load_scoring_set, members_of
from .onnx_engine import OnnxEngineError, OnnxEnsemble
from .record import Preprocessing
from .resilient import CropFlags, EnsembleOptions, ResilientPredictor, pick_device

log = logging.getLogger("titan")

VIDEO_EXTS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")
# folds: which folds scored the row (empty when every fold of the run did); name_escaped: the
# file name was not valid UTF-8 and ``path`` shows its bytes as \xNN escapes.
ROW_COLUMNS = ["path", "frame", "face", "box", "prob", "calibrated_prob", "decision", "verdict", "status", "error",
               "folds", "name_escaped"]
FACE, NO_FACE_STATUS, OK, ERROR = "face", "no_face", "ok", "error"
ENGINES = ("torch", "onnx")


class DetectError(RuntimeError):
    """No detection is possible (no weights load, folds that disagree, a bad option): the
    message names what is missing and the fix."""


@dataclass
class DetectorOptions(EnsembleOptions, CropFlags):
    """The flags of every command that scores raw photos with a run's detector (detect.py, evaluate.py, serve.py)."""

    engine: str = option("torch", "what runs the fold ensemble: torch (the PyTorch folds) or onnx (the graph "
                                  "export.py wrote, on ONNX Runtime, CPU); faces and Grad-CAM stay PyTorch",
                         choices=ENGINES)
    onnx: str = option("", "--engine onnx's graph; empty = WEIGHTS_DIR/PREFIX_ensemble.onnx (export.py's default)")

    def detector(self, say: Callable[[str], None] = log.info, band: float | None = None) -> "Detector":
        """The run's detector as these flags describe it (each preprocessing flag against the folds' record)."""
        return Detector.from_run(self.weights_dir, self.prefix, flags=self, band=band, say=say, device=self.device,
                                 batch_size=self.batch_size, amp=self.amp, engine=self.engine, onnx=self.onnx)


@dataclass
class DetectOptions(DetectorOptions):
    """detect.py's flags."""

    inputs: list[str] = option(help="images, folders (recursive), globs and videos (mp4, mov, avi, mkv, webm)",
                               positional=True, default_factory=lambda: [TEST_IMAGES])
    out: str = option("", "per-face and per-input rows: .csv or .jsonl (by extension); empty = the terminal table only")
    html: str = option("", "one self-contained HTML page (images embedded, no links): thumbnails, verdicts, bars, heatmaps")
    heatmaps: str = option("", "folder for Grad-CAM overlays: one PNG per face (videos: the most suspicious frame's)")
    frames: int = option(32, "frames sampled evenly from each video")
    uncertain_band: float = option(-1.0, "half-width of the uncertain band around the threshold, calibrated scale; "
                                         "-1 = the run's (holds its least-sure 10%% of out-of-fold faces)")
    workers: int = option(2, "decoding threads (0 = in the main thread)")
    memory_budget_mb: int = option(1024, "decoded pixels held at once (decoded ahead + waiting to be scored), in MB; "
                                         "images and video frames are also reduced as they are decoded")


# --- inputs ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """One input: ``kind`` image, video, or error (then ``error`` says why)."""

    path: str
    kind: str
    error: str = ""


def _kind(p: Path) -> str:
    return "video" if p.suffix.lower() in VIDEO_EXTS else "image"


def _media_in(folder: Path) -> tuple[list[Path], int]:
    """Images and videos under ``folder`` (recursive, sorted, hidden names skipped), and how many
    other files were passed over."""
    found, other = [], 0
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue
        if p.suffix.lower() in IMAGE_EXTS + VIDEO_EXTS:
            found.append(p)
        else:
            other += 1
    return found, other


def expand_inputs(specs: Sequence[str], say: Callable[[str], None] = log.info) -> list[Source]:
    """Files (any extension: a file given by name is tried as an image unless it is a video),
    folders (their images and videos, recursively), globs; each file once (by its resolved path:
    a photo reached through a symlink or another relative path is not scored twice), listed by
    the path it was first given as, in the order given."""
    out: list[Source] = []
    seen: set[str] = set()

    def add(p: Path) -> None:
        real = os.path.realpath(p)
        if real not in seen:
            seen.add(real)
            out.append(Source(str(p), _kind(p)))

    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            files, other = _media_in(p)
            if other:
                say(f"{spec}: {other} file(s) that are neither images nor videos passed over")
            if not files:
                out.append(Source(spec, ERROR, f"folder holds no image or video ({', '.join(IMAGE_EXTS + VIDEO_EXTS)})"))
            for f in files:
                add(f)
        elif p.is_file():
            add(p)
        elif set(spec) & set("*?["):
            matches = [Path(m) for m in sorted(glob.glob(spec, recursive=True))]
            files = [m for m in matches if m.is_file()] + [f for m in matches if m.is_dir() for f in _media_in(m)[0]]
            if not files:
                out.append(Source(spec, ERROR, "no file matches this pattern"))
            for f in files:
                add(f)
        else:
            out.append(Source(spec, ERROR, "not found (no such file or folder)"))
    return out


# --- videos ------------------------------------------------------------------------------------

def sample_indices(total: int, n: int) -> list[int]:
    """``n`` frame indices spread evenly over ``total`` frames, first and last included."""
    if total <= 0 or n <= 0:
        return []
    return sorted({int(round(v)) for v in np.linspace(0, total - 1, min(n, total))})


def _count_frames(path: str) -> int:
    import av

    with av.open(path) as c:
        return sum(1 for pkt in c.demux(c.streams.video[0]) if pkt.size)


def _frame_rgb(fr, max_side: int) -> np.ndarray:
    """A decoded frame as HxWx3 uint8 RGB, its long side reduced to ``max_side`` in the same
    conversion (FFmpeg's scaler), so a 4096² frame never exists as 50 MB of RGB."""
    w, h = fr.width, fr.height
    if max_side and max(w, h) > max_side:
        f = max_side / max(w, h)
        return fr.reformat(width=max(1, round(w * f)), height=max(1, round(h * f)), format="rgb24").to_ndarray()
    return fr.to_ndarray(format="rgb24")


def read_video(path: str | os.PathLike, n_frames: int, max_side: int = 0) -> tuple[list[tuple[int, np.ndarray]], str]:
    """(frame index, HxWx3 uint8 RGB) of ``n_frames`` frames sampled evenly, and a note ("" or why
    fewer came back); ``max_side`` > 0 reduces each frame as it is decoded. An unreadable video
    raises ``ImageDecodeError`` naming it and why."""
    import av

    path = str(path)
    frames: list[tuple[int, np.ndarray]] = []
    note = ""
    try:
        if os.path.getsize(path) == 0:
            raise ImageDecodeError(path, "file is empty (0 bytes)")
        with av.open(path) as c:
            if not c.streams.video:
                raise ImageDecodeError(path, "no video stream in this file")
            total = int(c.streams.video[0].frames or 0)
        total = total or _count_frames(path)  # containers that do not say how many frames they hold
        want = sample_indices(total, n_frames)
        keep = set(want)
        with av.open(path) as c:
            stream = c.streams.video[0]
            stream.thread_type = "AUTO"
            if max_side and stream.width * stream.height > 4 * max_side * max_side:
                stream.thread_count = 2  # each decoding thread holds whole frames: few for frames this large
            i = -1
            try:
                for i, fr in enumerate(c.decode(stream)):
                    if i in keep:
                        frames.append((i, _frame_rgb(fr, max_side)))
                    if i >= want[-1]:
                        break
            except Exception as e:  # noqa: BLE001 — a stream broken part-way keeps the frames before the break
                if not frames:
                    raise
                note = f"decoding stopped after frame {i}: {type(e).__name__}: {e}"
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except Exception as e:  # noqa: BLE001 — anything FFmpeg cannot read is this input's error, by name
        raise ImageDecodeError(path, f"cannot read video ({type(e).__name__}: {e})") from None
    if not frames:
        raise ImageDecodeError(path, f"no frame could be decoded (the container declares {total})")
    if len(frames) < len(want) and not note:
        note = f"{len(frames)} of {len(want)} sampled frames decoded (the container declares {total})"
    return frames, note


# --- results -----------------------------------------------------------------------------------

def _num(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


@dataclass
class FaceResult:
    """One scored face (or the centre square of an image without one: status ``no_face``)."""

    path: str
    frame: int | None
    face: int
    box: tuple[float, float, float, float]  # source pixels (x1, y1, x2, y2)
    logit: float  # the ensemble's: mean over folds of each fold's TTA-mean logit
    prob: float
    calibrated_prob: float
    decision: str  # at the run's threshold: fake | real
    verdict: str   # fake | real | uncertain (inside the band)
    status: str    # face | no_face
    detector_prob: float | None = None
    crop: np.ndarray | None = field(default=None, repr=False)  # the scored crop, while the input is being reported
    folds: str = ""  # the folds that scored it, when not every fold of the run did ("" = all)
    name_escaped: bool = False

    def row(self) -> dict:
        return {"path": self.path, "frame": self.frame, "face": self.face, "box": [round(v, 1) for v in self.box],
                "prob": _num(self.prob), "calibrated_prob": _num(self.calibrated_prob), "decision": self.decision,
                "verdict": self.verdict, "status": self.status, "error": "", "folds": self.folds,
                "name_escaped": self.name_escaped}


@dataclass
class InputResult:
    """One input's verdict: from its most fake face (a video: the mean over frames, in logits)."""

    path: str
    kind: str                     # image | video
    status: str                   # ok | no_face (scored on centre squares only) | error
    error: str = ""               # why it failed; for a scored input a note ("" when none)
    faces: list[FaceResult] = field(default_factory=list)
    logit: float = math.nan
    prob: float = math.nan
    calibrated_prob: float = math.nan
    decision: str = ""
    verdict: str = ""
    frame: int | None = None      # video: the most suspicious frame
    n_frames: int = 0
    image: np.ndarray | None = field(default=None, repr=False)  # the image / that frame, while being reported
    scale: float = 1.0            # ``image`` pixels per source pixel (images are reduced as they are decoded)
    name_escaped: bool = False    # ``path`` shows a name that is not UTF-8 with \xNN escapes

    @property
    def scored(self) -> bool:
        return self.status != ERROR

    @property
    def judged_by(self) -> list[FaceResult]:
        """The faces the verdict rests on: an image's faces, a video's most suspicious frame's."""
        return [f for f in self.faces if self.kind != "video" or f.frame == self.frame]

    @property
    def top_face(self) -> FaceResult | None:
        faces = self.judged_by
        return max(faces, key=lambda f: f.logit) if faces else None

    @property
    def folds(self) -> str:
        """The folds behind the verdict when not every fold of the run scored it ("" = all)."""
        return "; ".join(dict.fromkeys(f.folds for f in self.judged_by if f.folds))

    def summary_row(self) -> dict:
        return {"path": self.path, "frame": self.frame, "face": None, "box": None, "prob": _num(self.prob),
                "calibrated_prob": _num(self.calibrated_prob), "decision": self.decision, "verdict": self.verdict,
                "status": self.status, "error": self.error, "folds": self.folds, "name_escaped": self.name_escaped}

    def rows(self) -> list[dict]:
        """Its faces' rows, then its summary row (``face`` None)."""
        return [f.row() for f in self.faces] + [self.summary_row()]

    def release(self) -> None:
        """Drop the pixels kept for reporting."""
        self.image = None
        for f in self.faces:
            f.crop = None


def error_result(path: str, kind: str, reason: str) -> InputResult:
    return InputResult(path, kind, ERROR, reason)


def _centre_box(img: np.ndarray) -> tuple[float, float, float, float]:
    """The box of the centre square that stands in for a face (``square_resize``'s crop)."""
    x0, y0, s = centre_square(*img.shape[:2])
    return float(x0), float(y0), float(x0 + s), float(y0 + s)


# --- the detector ------------------------------------------------------------------------------

@dataclass
class _Member:
    """One run of the detector's scoring set: its folds, resolved preprocessing and predictor."""

    folds: FoldSet
    prep: Preprocessing
    n_run_folds: int
    predictor: ResilientPredictor | OnnxEnsemble  # OnnxEnsemble: --engine onnx (one run only)


class Detector:
    """A fold set, its calibration, the face detector and the ensemble's engine, loaded once:
    ``engine`` torch, the resilient TTA predictor over the PyTorch folds; onnx, the folds' export
    (``OnnxEnsemble.for_folds``: ``onnx`` or the run's ``RunFiles.ensemble_onnx``, refused when stale)."""

    def __init__(self, folds: FoldSet | EnsembleSet, calibration: Calibration, prep: Preprocessing | Sequence[Preprocessing],
                 device: str = "auto", batch_size: int = 32, amp: bool = True, engine: str = "torch",
                 onnx: str | os.PathLike = "") -> None:
        members = members_of(folds)
        preps = [prep] if isinstance(prep, Preprocessing) else list(prep)
        if not all(m.folds for m in members) or len(preps) != len(members):
            raise DetectError("no fold to score with")
        if engine not in ENGINES:
            raise DetectError(f"--engine {engine}: choose one of {', '.join(ENGINES)}")
        if onnx and engine != "onnx":
            raise DetectError(f"--onnx {onnx} is read by --engine onnx only; add --engine onnx (or drop --onnx)")
        if engine == "onnx" and len(members) > 1:
            raise DetectError("--engine onnx scores one run's folds; an ensemble of runs scores with --engine torch")
        # an ensemble (titan.infer.ensemble): each member crops and scores at its own preprocessing; the
        # first member's stands for the detector where one value is asked (face detection, reports)
        self.folds, self.calibration, self.preps = folds, calibration, preps
        self.prep = preps[0]
        self.views = list(self.prep.tta)
        self.notes: list[str] = []
        self.device = pick_device(device, self.notes)
        self.img_size, self.margin = self.prep.img_size, self.prep.margin
        # Decoded images are reduced to this long side at once: the face detector sees --max-side,
        # and a face spanning a quarter of the photo still crops at the model's full resolution.
        self.decode_side = max(self.prep.max_side, 4 * max(p.img_size for p in preps))
        self.face_detector = FaceDetector(self.device, None, max_side=self.prep.max_side, min_prob=self.prep.min_prob)
        self.engine = engine
        predictors = ([self._onnx_predictor(members[0], onnx, batch_size)] if engine == "onnx" else
                      [ResilientPredictor([f.model.eval() for f in m.folds], m.names, self.device, list(p.tta),
                                          max(1, batch_size), amp, self.notes) for m, p in zip(members, preps)])
        self.members = [_Member(m, p, len(m.folds) + len(m.skipped), pred)  # the run's folds, loaded or not
                        for m, p, pred in zip(members, preps, predictors)]
        self.predictor = self.members[0].predictor

    def _onnx_predictor(self, fs: FoldSet, onnx: str | os.PathLike, batch_size: int) -> OnnxEnsemble:
        """--engine onnx: the folds' export (``--onnx``, else the run folder's), checked against them."""
        path = Path(onnx) if onnx else fs.run.ensemble_onnx if fs.run is not None else None
        if path is None:
            raise DetectError("--engine onnx: name the exported graph with --onnx PATH (export.py writes it)")
        try:
            return OnnxEnsemble.for_folds(path, fs, self.prep, batch_size=max(1, batch_size))
        except OnnxEngineError as e:
            raise DetectError(str(e)) from None

    @property
    def fold_models(self) -> tuple[list[torch.nn.Module], torch.device]:
        """The PyTorch fold models as trained (the first member's) and the device they are on: Grad-CAM's
        (whichever engine scores, the heatmaps come from these)."""
        if isinstance(self.predictor, ResilientPredictor):
            return self.predictor.on_device, self.predictor.device
        return self.members[0].folds.models, torch.device("cpu")

    def engine_info(self) -> dict:
        """What runs the ensemble, for /v1/model and the log: ``{"name": "torch" | "onnx", ...}``."""
        if isinstance(self.predictor, OnnxEnsemble):
            return {"name": "onnx", "file": self.predictor.path.name, "sha256": self.predictor.record["onnx_sha256"],
                    "threads": self.predictor.threads, "device": "cpu"}
        return {"name": "torch", "device": str(self.predictor.device)}

    @classmethod
    def from_run(cls, weights_dir: str | os.PathLike = ".", prefix: str = DEFAULT_PREFIX, *, tta: str = "",
                 flags: EnsembleOptions | None = None, band: float | None = None,
                 say: Callable[[str], None] = log.info, **kwargs) -> "Detector":
        """The folds of a run folder (any that load; the others are named), with the preprocessing
        ``flags`` resolve against the folds' record (``tta`` alone when no flags are given), the run's
        threshold and calibration; ``band`` ≥ 0 replaces the run's uncertain band."""
        flags = flags or DetectorOptions(tta=tta)
        try:
            fs = load_scoring_set(weights_dir, prefix, strict=False)
            for name, why in fs.skipped:
                say(f"skipped {name}: {why}")
            if not fs.folds:
                rf = RunFiles(Path(weights_dir), prefix)
                raise DetectError(f"no fold in {weights_dir} loads ({'; '.join(w for _, w in fs.skipped)}); "
                                  f"detect needs {rf.fold_glob()} with {rf.fold_glob('head')}")
            prep = [flags.resolve(m, say) for m in members_of(fs)]
            cal = fs.calibration(say=say)
        except FoldSetError as e:
            raise DetectError(f"{e} (detect reads the folds of --weights-dir; --prefix titan for the V38 release)") from None
        if band is not None and band >= 0:
            if band > 0.5:
                raise DetectError(f"--uncertain-band {band}: a half-width on the probability scale must be ≤ 0.5")
            cal = replace(cal, band=float(band), note=f"{cal.note}; band set to ±{band:.3f} (--uncertain-band)")
        det = cls(fs, cal, prep, **kwargs)
        engine = "" if det.engine == "torch" else f"; engine onnx ({det.predictor.path})"
        say(f"{fs.describe()} from {weights_dir}; " + "; ".join(
            f"input {p.img_size} px, TTA {','.join(p.tta)}, crop margin {p.margin:g}" for p in prep)
            + f"; device {det.device}{engine}; {cal.note}")
        return det

    # --- faces and scores ---

    def _detect(self, images: Sequence[np.ndarray]) -> list[list[Detection] | str]:
        """Every face of every image, or (for an image the detector fails on) why."""
        try:
            return list(self.face_detector.detect_all(images))
        except Exception as e:  # noqa: BLE001 — retried image by image below, so one bad image fails alone
            if len(images) == 1:
                return [f"face detection failed: {type(e).__name__}: {e}"]
        return [r for im in images for r in self._detect([im])]

    def _logits(self, crops: list[list[np.ndarray]]) -> tuple[np.ndarray, list[str]]:
        """The ensemble logit of each face from its crop per member (a run: one member): each member's logit
        is the mean over its folds still scoring, the face's the mean over members; and which folds scored
        it when not every fold did ("" when all did)."""
        if not crops or not crops[0]:
            return np.zeros(0), []
        member_logits, used = [], []
        for m, mc in zip(self.members, crops):
            per_fold = m.predictor(torch.stack([to_chw_uint8(c) for c in mc]))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN: reported per input
                member_logits.append(np.nanmean(per_fold.astype(np.float64), axis=0))
            finite = np.isfinite(per_fold)
            used.append(["" if col.sum() == m.n_run_folds else
                         f"{'+'.join(n for n, ok in zip(m.folds.names, col) if ok)} ({int(col.sum())} of {m.n_run_folds})"
                         for col in finite.T])
        return mean_member_logits(member_logits), ["; ".join(u for u in col if u) for col in zip(*used)]

    def score_faces(self, images: Sequence[np.ndarray], names: Sequence[str],
                    frames: Sequence[int | None] | None = None, margin: float | None = None) -> list[list[FaceResult] | str]:
        """Per image: a FaceResult for every face (the centre square, ``no_face``, when there is
        none), each with its crop; or the reason the image could not be scored. ``margin``
        replaces the detector's crop margin for this call (evaluate.py's margin sweep)."""
        frames = list(frames) if frames is not None else [None] * len(images)
        found = self._detect(images)
        crops, made = [[] for _ in self.members], []  # each face cropped for every member, at its own size and margin
        for i, (img, dets) in enumerate(zip(images, found)):
            if isinstance(dets, str):
                continue
            for k, det in enumerate(dets or [NO_FACE]):
                for m, mc in zip(self.members, crops):
                    crop, how = face_crop(img, det, m.prep.img_size, m.prep.margin if margin is None else margin)
                    mc.append(crop)
                box = det.box if how == "face" else _centre_box(img)
                made.append((i, k, box, FACE if how == "face" else NO_FACE_STATUS, det.prob))
        logits, used = self._logits(crops)
        crops = crops[0]  # the faces reported (and explained) are the first member's crops
        prob, cal = self.calibration.probabilities(logits)
        decision, verdict = self.calibration.verdicts(logits)
        out: list[list[FaceResult] | str] = [d if isinstance(d, str) else [] for d in found]
        for j, (i, k, box, status, dprob) in enumerate(made):
            out[i].append(FaceResult(names[i], frames[i], k, tuple(float(v) for v in box), float(logits[j]),
                                     float(prob[j]), float(cal[j]), str(decision[j]), str(verdict[j]), status, dprob,
                                     crops[j], used[j]))
        for i, faces in enumerate(out):
            if isinstance(faces, list) and not all(math.isfinite(f.logit) for f in faces):
                out[i] = "no fold produced a finite score for this image (see the log for the folds left out)"
        return out

    def _verdict(self, res: InputResult, logit: float) -> InputResult:
        res.logit = float(logit)
        prob, cal = self.calibration.probabilities(np.array([logit]))
        decision, verdict = self.calibration.verdicts(np.array([logit]))
        res.prob, res.calibrated_prob, res.decision, res.verdict = float(prob[0]), float(cal[0]), str(decision[0]), str(verdict[0])
        return res

    def image_result(self, path: str, image: np.ndarray, faces: list[FaceResult] | str, scale: float = 1.0) -> InputResult:
        """``scale``: ``image`` pixels per source pixel (the boxes are given back in source pixels)."""
        if isinstance(faces, str):
            return error_result(path, "image", faces)
        _to_source(faces, scale)
        status = OK if any(f.status == FACE for f in faces) else NO_FACE_STATUS
        res = InputResult(path, "image", status, "" if status == OK else "no face found: scored the centre square",
                          faces, image=image, scale=scale)
        return self._verdict(res, max(f.logit for f in faces))

    def video_result(self, path: str, frames: list[tuple[int, np.ndarray]], note: str = "", scale: float = 1.0) -> InputResult:
        """Score every sampled frame; the video's logit is the mean of its frames' (most fake face) logits."""
        idx = [i for i, _ in frames]
        per_frame = self.score_faces([f for _, f in frames], [path] * len(frames), idx)
        faces = [f for fs in per_frame if isinstance(fs, list) for f in fs]
        _to_source(faces, scale)
        failed = [f"frame {i}: {r}" for i, r in zip(idx, per_frame) if isinstance(r, str)]
        notes = [n for n in [note, "; ".join(failed)] if n]
        scored = [(i, max(f.logit for f in fs), img) for i, fs, (_, img) in zip(idx, per_frame, frames) if isinstance(fs, list)]
        if not scored:
            return error_result(path, "video", "; ".join(notes) or "no frame could be scored")
        worst, _, worst_img = max(scored, key=lambda s: s[1])
        status = OK if any(f.status == FACE for f in faces) else NO_FACE_STATUS
        if status == NO_FACE_STATUS:
            notes.append("no face in any sampled frame: scored the centre squares")
        res = InputResult(path, "video", status, "; ".join(notes), faces, frame=worst, n_frames=len(scored), image=worst_img,
                          scale=scale)
        return self._verdict(res, float(np.mean([s[1] for s in scored])))

    # --- public entry points ---

    def score_images(self, named: Sequence[tuple[str, object]], margin: float | None = None) -> list[InputResult]:
        """In-memory images (PIL images or uint8 arrays) with their names → one InputResult each,
        faces included; nothing is read or written. Call ``release()`` on a result to drop its
        pixels. ``margin`` as in ``score_faces``."""
        arrays, results = [], [None] * len(named)
        for i, (name, img) in enumerate(named):
            try:
                arrays.append((i, to_rgb_array(img, name)))
            except ImageDecodeError as e:
                results[i] = error_result(name, "image", e.reason)
        scored = self.score_faces([a for _, a in arrays], [named[i][0] for i, _ in arrays], margin=margin)
        for (i, arr), faces in zip(arrays, scored):
            results[i] = self.image_result(named[i][0], arr, faces)
        return results  # type: ignore[return-value]

    def run(self, sources: Sequence[Source], n_frames: int = 32, workers: int = 2, chunk: int = 32,
            progress: bool = True, on_result: Callable[[InputResult], None] | None = None,
            memory_budget_mb: int = 1024) -> list[InputResult]:
        """Score every source, in order; images up to ``chunk`` at a time (decoded ahead by
        ``workers`` threads), each video on its own. Decoded pixels are bounded by
        ``memory_budget_mb``: half for images decoded ahead, half for those waiting to be scored
        (each image is reduced to ``decode_side`` as it is decoded). ``on_result`` sees each result
        with its pixels, which are released afterwards."""
        results: list[InputResult] = []
        pending: list[tuple[Source, np.ndarray | str | None, float]] = []
        budget = max(1, memory_budget_mb) * 2**20 // 2
        held = 0

        def flush() -> None:
            nonlocal held
            imgs = [(s, x) for s, x, _ in pending if isinstance(x, np.ndarray)]
            scored = iter(self.score_faces([x for _, x in imgs], [display_path(s.path)[0] for s, _ in imgs]))
            for s, x, scale in pending:
                name, escaped = display_path(s.path)
                if isinstance(x, np.ndarray):
                    res = self.image_result(name, x, next(scored), scale)
                elif isinstance(x, str):
                    res = error_result(name, s.kind if s.kind != ERROR else "image", x)
                else:
                    res = self._video(s.path, n_frames)
                    res.path = name
                    for f in res.faces:
                        f.path = name
                if escaped:
                    res.name_escaped = True
                    for f in res.faces:
                        f.name_escaped = True
                if on_result is not None:
                    on_result(res)
                res.release()
                results.append(res)
                bar.update(1)
            pending.clear()
            held = 0

        # A decode at full size before its reduction can hold far more than the result: such
        # images (over an eighth of the budget at 3 bytes a pixel) are decoded one at a time.
        load = partial(_load, max_side=self.decode_side, one_at_a_time=threading.Lock(), big=budget // 4)
        with logging_redirect_tqdm(), tqdm(total=len(sources), desc="detect", unit="input", disable=not progress) as bar:
            for _, (src, loaded, scale) in prefetch(load, list(sources), workers, depth=2 * chunk,
                                                    size=lambda r: _nbytes(r[1]), budget=budget):
                pending.append((src, loaded, scale))
                held += _nbytes(loaded)
                if src.kind == "video" or held >= budget or sum(isinstance(x, np.ndarray) for _, x, _ in pending) >= chunk:
                    flush()
            flush()
        return results

    def _video(self, path: str, n_frames: int) -> InputResult:
        try:
            frames, note = read_video(path, n_frames, self.decode_side)
            scale = frames[0][1].shape[1] / _video_width(path)
        except ImageDecodeError as e:
            return error_result(path, "video", e.reason)
        return self.video_result(path, frames, note, scale)


def _to_source(faces: list[FaceResult], scale: float) -> None:
    """Boxes found on an image reduced by ``scale`` → source pixels."""
    if scale != 1.0:
        for f in faces:
            f.box = tuple(v / scale for v in f.box)


def _full_bytes(path: str) -> int:
    """Bytes of the image at full size as RGB, from its header (0 when the header does not read:
    the decode then fails by name)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.width * img.height * 3
    except Exception:  # noqa: BLE001
        return 0


def _nbytes(x) -> int:
    return x.nbytes if isinstance(x, np.ndarray) else 0


def _video_width(path: str) -> int:
    import av

    with av.open(path) as c:
        return int(c.streams.video[0].width)


def _load(src: Source, max_side: int = 0, one_at_a_time: threading.Lock | None = None,
          big: int = 0) -> tuple[Source, np.ndarray | str | None, float]:
    """(source, decoded image reduced to ``max_side`` | why it failed | None for a video, read
    later in the main thread, and the image's scale: its pixels per source pixel). Images of
    more than ``big`` bytes at full size decode holding ``one_at_a_time``."""
    if src.kind == ERROR:
        return src, src.error, 1.0
    if src.kind == "video":
        return src, None, 1.0
    try:
        if one_at_a_time is not None and big and _full_bytes(src.path) > big:
            with one_at_a_time:
                return (src, *decode_reduced(src.path, max_side))
        return (src, *decode_reduced(src.path, max_side))
    except ImageDecodeError as e:
        reason = e.reason
        if reason.startswith("not an image format"):
            reason += f" (nor a video: {', '.join(VIDEO_EXTS)})"
        return src, reason, 1.0


def iter_rows(results: Sequence[InputResult]) -> Iterator[dict]:
    for r in results:
        yield from r.rows()
