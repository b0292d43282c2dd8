"""Face detection (MTCNN), the square face crop, the centre fallback.

align_faces.py keeps the largest face of an image (``FaceDetector.detect``); detect.py and
evaluate.py score every face (``detect_all``); all crop with ``face_crop``.

``FaceDetector`` runs ``titan.data.mtcnn_fast``: facenet-pytorch's MTCNN (its nets and weights,
which ship inside the wheel) over photos of any mixed sizes in one batch, with the boxes facenet
finds in each photo alone (bench/face_bench.py measures both: speed, and the boxes' agreement).
``engine="facenet"`` runs facenet's own ``MTCNN.detect`` instead, in equal-size buckets (it only
batches images of equal size): the reference the tests and bench/face_bench.py compare against.
Boxes are in source pixels.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch

from .images import square_resize
from .mtcnn_fast import detect_faces

# The crop every stage makes unless told otherwise (align_faces.py's defaults, the README's): the
# face box widened by ``margin`` on each side, faces the detector scores below ``min_prob`` ignored,
# detection on a copy shrunk to ``max_side``. A fold set's preprocessing record overrides them.
DEFAULT_MARGIN = 0.2
DEFAULT_MIN_PROB = 0.9
DEFAULT_MAX_SIDE = 1024

# When the caller leaves the batch size to us. CPU: measured with bench/align_bench.py on
# 2 cores — equal-size batches of 8 beat image-by-image (docs/stages.md, "align_faces.py").
AUTO_BATCH = {"cuda": 32, "cpu": 8}
# How much zero padding (a share of the real pixels) P-Net may compute on to batch photos of
# different sizes. CPU: none, padding costs what batching saves (bench/face_bench.py); CUDA: fewer,
# larger calls are expected to win (not yet measured on a GPU).
PAD_WASTE = {"cuda": 1.0, "cpu": 0.0}
# The smallest face looked for, in pixels of the image MTCNN sees (≤ max_side). A smaller face
# makes a crop (box × 1.4) under 56 px, which the model sees upscaled 9× at 512 px (2.3× at the
# demo's 128): its frequency and SRM inputs then read the interpolation, not the photo. Above
# MTCNN's usual 20 px, the pyramid's finest scales (its costliest) are skipped and the others are
# unchanged (titan.data.mtcnn_fast.pyramid_scales); 20 gives facenet's own pyramid.
MIN_FACE_PX = 40


@dataclass(frozen=True)
class Detection:
    """The largest face in one image (``box`` None when there is none), in source pixels."""

    box: tuple[float, float, float, float] | None
    prob: float | None
    n_faces: int


NO_FACE = Detection(None, None, 0)


class FaceDetector:
    """MTCNN over lists of HxWx3 uint8 RGB images of any (mixed) sizes → one Detection each.

    ``max_side`` shrinks larger images before detection (boxes are scaled back): the P-net
    pyramid costs grow with pixel count, and faces worth cropping stay well above
    ``min_face_size`` (``MIN_FACE_PX``, the smallest face looked for). ``min_prob`` drops weak
    detections (MTCNN's last stage already keeps ≥0.7).
    ``engine``: "fast" (``titan.data.mtcnn_fast``) or "facenet" (facenet's own ``MTCNN.detect``,
    the reference; with ``min_face_size=20`` it is titan's detector before the fast one).
    """

    def __init__(self, device: str | torch.device = "cpu", batch_size: int | None = None,
                 max_side: int = DEFAULT_MAX_SIDE, min_prob: float = DEFAULT_MIN_PROB, min_face_size: int = MIN_FACE_PX,
                 engine: str = "fast") -> None:
        from facenet_pytorch import MTCNN

        if engine not in ("fast", "facenet"):
            raise ValueError(f"FaceDetector engine {engine!r}: choose 'fast' or 'facenet'")
        self.device = torch.device(device)
        self.batch_size = batch_size or AUTO_BATCH.get(self.device.type, 8)
        self.max_side, self.min_prob, self.min_face_size = max_side, min_prob, min_face_size
        self.engine, self.pad_waste = engine, PAD_WASTE.get(self.device.type, 0.0)
        self.mtcnn = MTCNN(keep_all=True, select_largest=True, min_face_size=min_face_size, device=self.device).eval()

    def detection_input(self, img: np.ndarray) -> np.ndarray:
        return shrink_for_detection(img, self.max_side)

    def detect(self, images: Sequence[np.ndarray], small: Sequence[np.ndarray] | None = None) -> list[Detection]:
        """The largest face of every image (NO_FACE when there is none); see ``detect_all``."""
        return [faces[0] if faces else NO_FACE for faces in self.detect_all(images, small)]

    def detect_all(self, images: Sequence[np.ndarray], small: Sequence[np.ndarray] | None = None) -> list[list[Detection]]:
        """Every face (≥ ``min_prob``) of every image, largest first; ``small`` = precomputed
        ``detection_input`` of each (optional).

        An image (as MTCNN sees it) narrower than the smallest face it looks for holds no face:
        it gets none, so the centre crop (1×1 or 20000×100 images included)."""
        small = list(small) if small is not None else [self.detection_input(im) for im in images]
        for s in small:
            if s.ndim != 3 or s.shape[2] != 3 or s.dtype != np.uint8:
                raise ValueError(f"face detection takes HxWx3 uint8 RGB images, got {s.dtype} {s.shape}: "
                                 "decode with titan.data.images.decode_image (it converts grey, RGBA and 16-bit)")
        found = self.boxes(small)
        return [[_rescale(d, images[i].shape, small[i].shape) for d in all_faces(b[:, :4], b[:, 4], self.min_prob)]
                for i, b in enumerate(found)]

    def boxes(self, small: Sequence[np.ndarray]) -> list[np.ndarray]:
        """MTCNN's raw answer per detection input: (n, 5) float32 x1, y1, x2, y2, probability,
        largest first (as facenet's ``MTCNN.detect(select_largest=True)``), any probability ≥ 0.7."""
        if self.engine == "facenet":
            return self._facenet_boxes(small)
        out: list[np.ndarray] = [np.zeros((0, 5), np.float32)] * len(small)
        order = sorted(range(len(small)), key=lambda i: small[i].shape[:2])  # similar sizes share P-Net canvases
        m = self.mtcnn
        for k in range(0, len(order), self.batch_size):
            chunk = order[k:k + self.batch_size]
            found = detect_faces([small[i] for i in chunk], m.pnet, m.rnet, m.onet, self.min_face_size, m.thresholds,
                                 m.factor, self.pad_waste, self.device)
            for i, b in zip(chunk, found):
                out[i] = b[np.argsort((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))[::-1]]
        return out

    def _facenet_boxes(self, small: Sequence[np.ndarray]) -> list[np.ndarray]:
        """facenet's ``MTCNN.detect`` in equal-size buckets (a mixed batch raises there); images
        narrower than the smallest face are skipped (facenet raises on them)."""
        buckets: dict[tuple[int, ...], list[int]] = defaultdict(list)
        out: list[np.ndarray] = [np.zeros((0, 5), np.float32)] * len(small)
        for i, s in enumerate(small):
            if min(s.shape[:2]) >= self.min_face_size:
                buckets[s.shape].append(i)
        for idx in buckets.values():
            for k in range(0, len(idx), self.batch_size):
                chunk = idx[k:k + self.batch_size]
                boxes, probs = self.mtcnn.detect(np.stack([small[i] for i in chunk]))
                for i, b, p in zip(chunk, boxes, probs):
                    if b is not None:
                        out[i] = np.concatenate([np.asarray(b, np.float32), np.asarray(p, np.float32)[:, None]], 1)
        return out


def all_faces(boxes, probs, min_prob: float = DEFAULT_MIN_PROB) -> list[Detection]:
    """MTCNN's boxes for one image scoring ≥ min_prob, largest first (n_faces counts them)."""
    if boxes is None:
        return []
    boxes, probs = np.asarray(boxes, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    keep = probs >= min_prob
    boxes, probs = boxes[keep], probs[keep]
    order = np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), kind="stable")
    return [Detection(tuple(float(v) for v in boxes[k]), float(probs[k]), int(len(boxes))) for k in order]


def largest_face(boxes, probs, min_prob: float = DEFAULT_MIN_PROB) -> Detection:
    """The largest of MTCNN's boxes for one image scoring ≥ min_prob (n_faces counts those)."""
    faces = all_faces(boxes, probs, min_prob)
    return faces[0] if faces else NO_FACE


def shrink_for_detection(img: np.ndarray, max_side: int) -> np.ndarray:
    """The (possibly shrunk) image MTCNN sees; its shape is the bucket key."""
    h, w = img.shape[:2]
    s = max_side / max(h, w)
    if s >= 1.0:
        return img
    return cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def _rescale(d: Detection, full_shape: tuple[int, ...], small_shape: tuple[int, ...]) -> Detection:
    if d.box is None or full_shape[:2] == small_shape[:2]:
        return d
    sy, sx = full_shape[0] / small_shape[0], full_shape[1] / small_shape[1]
    x1, y1, x2, y2 = d.box
    return Detection((x1 * sx, y1 * sy, x2 * sx, y2 * sy), d.prob, d.n_faces)


def square_around(box: Sequence[float], width: int, height: int, margin: float = DEFAULT_MARGIN) -> tuple[int, int, int]:
    """(x0, y0, side) of the square crop for a face box, in source pixels.

    side = the box's larger side × (1 + 2·margin), centred on the box, shifted to stay inside
    the image; only where the image is smaller than ``side`` does the square reach outside it
    (centred on the face as far as the image allows), and that part is padded.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    side = max(1, int(round(max(x2 - x1, y2 - y1) * (1.0 + 2.0 * margin))))
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0

    def place(c: float, extent: int) -> int:
        lo, hi = min(0, extent - side), max(0, extent - side)
        return int(min(max(round(c - side / 2.0), lo), hi))

    return place(cx, width), place(cy, height), side


def crop_square(img: np.ndarray, x0: int, y0: int, side: int) -> np.ndarray:
    """img[y0:y0+side, x0:x0+side], edge-replicated where the square leaves the image."""
    h, w = img.shape[:2]
    top, left = max(0, -y0), max(0, -x0)
    bottom, right = max(0, y0 + side - h), max(0, x0 + side - w)
    patch = img[max(0, y0):min(h, y0 + side), max(0, x0):min(w, x0 + side)]
    if top or left or bottom or right:
        # Replicated edges rather than black: a flat black band looks like a manipulation artefact.
        patch = cv2.copyMakeBorder(patch, top, bottom, left, right, cv2.BORDER_REPLICATE)
    return patch


def face_crop(img: np.ndarray, det: Detection, size: int, margin: float = DEFAULT_MARGIN) -> tuple[np.ndarray, str]:
    """(size×size crop, "face" | "fallback"): the square around the face, else the centre square."""
    if det.box is None or not all(math.isfinite(v) for v in det.box):
        return square_resize(img, size), "fallback"
    x0, y0, side = square_around(det.box, img.shape[1], img.shape[0], margin)
    return square_resize(crop_square(img, x0, y0, side), size), "face"


_DETECTORS: dict[str, FaceDetector] = {}


def crop_face(img: np.ndarray, size: int, margin: float = DEFAULT_MARGIN, device: str = "cpu",
              min_prob: float = DEFAULT_MIN_PROB, max_side: int = DEFAULT_MAX_SIDE) -> np.ndarray:
    """One image → its size×size face crop exactly as align_faces.py makes it (centre square if
    no face). The detector is built once per process, device and detection settings, for occasional re-crops."""
    key = f"{device}|{min_prob}|{max_side}"
    if key not in _DETECTORS:
        _DETECTORS[key] = FaceDetector(device, max_side=max_side, min_prob=min_prob)
    det = _DETECTORS[key].detect([img])[0]
    return face_crop(img, det, size, margin)[0]
