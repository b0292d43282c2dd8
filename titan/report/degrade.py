"""Degradations for the robustness sweep: how images travel on the internet.

Each degradation maps an HxWx3 uint8 RGB photo and a level to a new photo; its ``clean`` level is
the identity (the image object itself comes back), so the clean row of the sweep is the image as
given. ``margin`` is not a pixel operation: it changes the face-crop margin, so it returns the
image unchanged and the sweep passes the level to the cropper (``crop_margin``).

Levels run from mild to harsh, in the units a user knows: JPEG quality, the scale factor of a
down-and-back-up resize, the blur's sigma and the noise's standard deviation in pixels / grey
levels of the photo as given, the crop margin as a share of the face box.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable, Sequence

import cv2
import numpy as np
from PIL import Image

from ..data.faces import DEFAULT_MARGIN


def jpeg_bytes(img: np.ndarray, quality: int) -> bytes:
    """The photo encoded once as a baseline JPEG at ``quality`` (libjpeg's IJG scale, 4:2:0)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=int(quality), subsampling=2)
    return buf.getvalue()


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """Re-encode at ``quality`` and decode again (100 = clean: left as is)."""
    if quality >= 100:
        return img
    return np.asarray(Image.open(io.BytesIO(jpeg_bytes(img, quality))).convert("RGB"))


def rescale(img: np.ndarray, factor: float) -> np.ndarray:
    """Shrink by ``factor`` (area-averaged) and enlarge back to the original grid (bilinear): the
    detail lost to a thumbnail that is shown large again."""
    if factor >= 1.0:
        return img
    h, w = img.shape[:2]
    small = cv2.resize(img, (max(1, round(w * factor)), max(1, round(h * factor))), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of standard deviation ``sigma`` pixels (kernel ±3σ)."""
    if sigma <= 0:
        return img
    k = 2 * int(np.ceil(3 * sigma)) + 1
    return cv2.GaussianBlur(img, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


def noise(img: np.ndarray, std: float, seed: int = 0) -> np.ndarray:
    """Additive Gaussian noise of ``std`` grey levels, the same draw for the same image and seed."""
    if std <= 0:
        return img
    rng = np.random.default_rng(seed)
    return np.clip(img.astype(np.float32) + rng.normal(0.0, std, img.shape), 0, 255).round().astype(np.uint8)


def social(img: np.ndarray, long_side: int, quality: int = 75) -> np.ndarray:
    """A photo sharing site's chain: the long side brought down to ``long_side`` (never enlarged:
    sites do not upscale), then JPEG at ``quality``. ``long_side`` 0 = clean."""
    if long_side <= 0:
        return img
    h, w = img.shape[:2]
    s = long_side / max(h, w)
    if s < 1.0:
        img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    return jpeg(img, quality)


@dataclass(frozen=True)
class Degradation:
    """One kind of damage: its levels (mild → harsh), the clean level, and how to apply a level."""

    name: str
    unit: str
    clean: float
    levels: tuple[float, ...]
    fn: Callable[[np.ndarray, float], np.ndarray]

    def apply(self, img: np.ndarray, level: float) -> np.ndarray:
        if level == self.clean:
            return img
        return self.fn(img, level)

    def crop_margin(self, level: float, default: float) -> float:
        """The face-crop margin at this level: the level for ``margin``, else the usual one."""
        return float(level) if self.name == "margin" else default


# The full sweep (issue 16): JPEG 95 → 30, down-and-up ×0.75 → ×0.25, blur, noise, margin 0.1 → 0.4,
# and the social chain (1080 px long side + JPEG 75).
DEGRADATIONS: dict[str, Degradation] = {d.name: d for d in (
    Degradation("jpeg", "quality", 100, (95, 75, 50, 30), lambda im, q: jpeg(im, int(q))),
    Degradation("downscale", "scale", 1.0, (0.75, 0.5, 0.25), rescale),
    Degradation("blur", "sigma (px)", 0.0, (0.5, 1.0, 2.0, 3.0), blur),
    Degradation("noise", "std (grey levels)", 0.0, (2.0, 5.0, 10.0, 20.0), lambda im, s: noise(im, s)),
    Degradation("margin", "crop margin", DEFAULT_MARGIN, (0.1, 0.3, 0.4), lambda im, m: im),
    Degradation("social", "long side (px), JPEG 75", 0, (1080,), lambda im, n: social(im, int(n))),
)}
# make demo's reduced sweep: one harsh-but-common level of each.
REDUCED_LEVELS: dict[str, tuple[float, ...]] = {
    "jpeg": (50,), "downscale": (0.5,), "blur": (1.0,), "noise": (5.0,), "margin": (0.4,), "social": (1080,),
}


def sweep_plan(names: Sequence[str] | None = None, reduced: bool = False) -> list[tuple[str, float]]:
    """(degradation, level) pairs to score, clean first (``("clean", 0)``)."""
    names = list(names) if names else list(DEGRADATIONS)
    unknown = [n for n in names if n not in DEGRADATIONS]
    if unknown:
        raise ValueError(f"unknown degradation(s) {unknown}; choose from {sorted(DEGRADATIONS)}")
    plan: list[tuple[str, float]] = [("clean", 0.0)]
    for n in names:
        levels = REDUCED_LEVELS[n] if reduced else DEGRADATIONS[n].levels
        plan += [(n, float(v)) for v in levels]
    return plan


def degraded(img: np.ndarray, name: str, level: float) -> np.ndarray:
    """The photo at one point of the plan (``clean`` → the photo itself)."""
    return img if name == "clean" else DEGRADATIONS[name].apply(img, level)


def crop_margin(name: str, level: float, default: float) -> float:
    return default if name == "clean" else DEGRADATIONS[name].crop_margin(level, default)
