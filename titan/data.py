"""The label-CSV contract, finding images by Id, robust decoding and the datasets.

Datasets yield uint8 CHW tensors: normalisation and augmentation run on the training device.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

log = logging.getLogger("titan")

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
ID_ALIASES = ("Id", "id", "ID", "image_id")
LABEL_ALIASES = ("target_feature", "target", "label")


class LabelCSVError(ValueError):
    """The label CSV breaks the contract; the message names the row(s) and the fix."""


class ImageDecodeError(OSError):
    """An image file could not be decoded; the message names the file and why."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: cannot read image — {reason}")


# --- Ids -------------------------------------------------------------------------------------

def check_id(image_id: str, where: str = "") -> str:
    """Refuse Ids that could leave their folder (separators, '..', absolute, empty, NUL)."""
    s = str(image_id)
    bad = (not s.strip() or "/" in s or "\\" in s or s in (".", "..") or ".." in s.split(".")
           or "\x00" in s or os.path.isabs(s) or (len(s) > 1 and s[1] == ":"))
    if bad:
        raise LabelCSVError(f"{where}Id {s!r} is not a plain file name (no path separators, '..' or drive); fix the CSV")
    return s


# --- label CSV -------------------------------------------------------------------------------

def _pick(columns: Sequence[str], aliases: Sequence[str]) -> str | None:
    return next((a for a in aliases if a in columns), None)


def _as_bool(v) -> bool:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    s = str(v).strip().lower()
    if s in ("true", "1", "yes", "t", "1.0"):
        return True
    if s in ("false", "0", "no", "f", "", "nan", "0.0"):
        return False
    raise ValueError(v)


def read_labels(csv_path: str | os.PathLike, image_dir: str | os.PathLike | None = None, allow_missing: bool = False) -> pd.DataFrame:
    """Read and validate a label CSV → DataFrame[Id:str, target_feature:int, is_pseudo:bool].

    Row numbers in errors are the CSV's line numbers (header = line 1). With ``image_dir`` every
    Id must have an image there (``allow_missing`` drops those rows with a warning instead).
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise LabelCSVError(f"{csv_path}: label CSV not found")
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except Exception as e:
        raise LabelCSVError(f"{csv_path}: not a readable CSV ({e})") from None
    id_col, y_col = _pick(df.columns, ID_ALIASES), _pick(df.columns, LABEL_ALIASES)
    for col, aliases in ((id_col, ID_ALIASES), (y_col, LABEL_ALIASES)):
        if col is None:
            raise LabelCSVError(f"{csv_path}: missing column — need one of {list(aliases)}, found {list(df.columns)}")
    line = lambda i: f"{csv_path} line {i + 2}: "  # noqa: E731
    ids = [check_id(s.strip(), line(i)) for i, s in enumerate(df[id_col])]
    labels = []
    for i, v in enumerate(df[y_col]):
        try:
            f = float(v)
            if f not in (0.0, 1.0):
                raise ValueError
        except ValueError:
            raise LabelCSVError(f"{line(i)}label {v!r} for Id {ids[i]!r} is not 0 or 1 (1 = fake)") from None
        labels.append(int(f))
    pseudo = [False] * len(ids)
    if "is_pseudo" in df.columns:
        try:
            pseudo = [_as_bool(v) for v in df["is_pseudo"]]
        except ValueError as e:
            raise LabelCSVError(f"{csv_path}: is_pseudo value {e} is not true/false") from None
    out = pd.DataFrame({"Id": ids, "target_feature": labels, "is_pseudo": pseudo})
    dup = out["Id"].duplicated(keep=False)
    if dup.any():
        rows = [f"{out.Id[i]!r} (line {i + 2})" for i in np.flatnonzero(dup)[:10]]
        raise LabelCSVError(f"{csv_path}: duplicate Ids — {', '.join(rows)}; each image must appear once")
    if image_dir is not None:
        index = ImageIndex(image_dir)
        missing = [(i, s) for i, s in enumerate(out.Id) if s not in index]
        if missing and not allow_missing:
            shown = ", ".join(f"{s!r} (line {i + 2})" for i, s in missing[:10])
            raise LabelCSVError(
                f"{csv_path}: {len(missing)} Id(s) have no image in {image_dir}: {shown}"
                + (" …" if len(missing) > 10 else "") + ". Run align_faces.py for them, or drop them (--skip-missing)."
            )
        if missing:
            log.warning("dropping %d Id(s) with no image in %s: %s", len(missing), image_dir, [s for _, s in missing[:10]])
            out = out[~out.Id.isin({s for _, s in missing})].reset_index(drop=True)
    return out


# --- finding images ---------------------------------------------------------------------------

class ImageIndex:
    """Map Id → image path in one folder, any common extension (``.jpg`` preferred)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder}: image folder not found")
        rank = {e: i for i, e in enumerate(IMAGE_EXTS)}
        best: dict[str, tuple[int, Path]] = {}
        with os.scandir(self.folder) as it:
            for entry in it:
                stem, ext = os.path.splitext(entry.name)
                r = rank.get(ext.lower())
                if r is None or stem.startswith(".") or not entry.is_file():
                    continue
                if stem not in best or r < best[stem][0]:
                    best[stem] = (r, Path(entry.path))
        self.paths = {k: v for k, (_, v) in best.items()}

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.paths

    def __len__(self) -> int:
        return len(self.paths)

    def ids(self) -> list[str]:
        return sorted(self.paths)

    def path(self, image_id: str) -> Path:
        check_id(image_id)
        try:
            return self.paths[image_id]
        except KeyError:
            raise FileNotFoundError(f"no image for Id {image_id!r} in {self.folder} (tried {', '.join(IMAGE_EXTS)})") from None


# --- decoding ---------------------------------------------------------------------------------

def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        # Transparent areas become white, not black: black borders look like a (fake) artefact.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    return img.convert("RGB")


def decode_image(path: str | os.PathLike) -> np.ndarray:
    """Decode any PIL-readable image → (H,W,3) uint8 RGB, EXIF orientation applied.

    Decoding happens inside the try (``load()``), so a truncated file fails here, by name.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageDecodeError(path, "file is empty (0 bytes)")
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            arr = np.asarray(_to_rgb(img))
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(path, "not an image format PIL recognises") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(path, f"{type(e).__name__}: {e}") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageDecodeError(path, f"unexpected decoded shape {arr.shape}")
    return np.ascontiguousarray(arr)


def square_resize(img: np.ndarray, size: int) -> np.ndarray:
    """Centre-square crop (no distortion) then resize to size×size (area filter when shrinking)."""
    import cv2

    h, w = img.shape[:2]
    if h != w:
        s = min(h, w)
        y0, x0 = (h - s) // 2, (w - s) // 2
        img = img[y0:y0 + s, x0:x0 + s]
    if img.shape[0] != size:
        interp = cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_CUBIC
        img = cv2.resize(img, (size, size), interpolation=interp)
    return img


def to_chw_uint8(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


# --- datasets ---------------------------------------------------------------------------------

class FaceDataset(Dataset):
    """Face crops by Id → (uint8 (3,S,S), label float, index).

    ``on_error="replace"`` logs an unreadable image and serves the next readable one instead
    (training keeps going, no black tensor); ``"raise"`` propagates ``ImageDecodeError``.
    """

    def __init__(self, ids: Sequence[str], folder: str | os.PathLike | ImageIndex, img_size: int,
                 labels: Sequence[float] | None = None, on_error: str = "raise") -> None:
        self.index = folder if isinstance(folder, ImageIndex) else ImageIndex(folder)
        self.ids = [check_id(i) for i in ids]
        self.labels = None if labels is None else np.asarray(labels, dtype=np.float32)
        self.img_size, self.on_error = img_size, on_error
        missing = [i for i in self.ids if i not in self.index]
        if missing:
            raise FileNotFoundError(f"{len(missing)} Id(s) have no image in {self.index.folder}: {missing[:10]}")

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, i: int) -> torch.Tensor:
        return to_chw_uint8(square_resize(decode_image(self.index.path(self.ids[i])), self.img_size))

    def __getitem__(self, i: int):
        for attempt in range(min(len(self), 16)):
            j = (i + attempt) % len(self)
            try:
                x = self.load(j)
                break
            except ImageDecodeError as e:
                if self.on_error == "raise":
                    raise
                log.warning("unreadable image replaced by another sample: %s", e)
        else:
            raise ImageDecodeError(self.index.path(self.ids[i]), "this and the next 15 samples are unreadable")
        y = float(self.labels[j]) if self.labels is not None else -1.0
        return x, torch.tensor(y), j


# --- decoding on the training device --------------------------------------------------------------

class EncodedFaceDataset(FaceDataset):
    """FaceDataset for ``gpu_decode``: a JPEG comes out as (its bytes as 1-D uint8, its path) so the
    batch is decoded on the device by ``decode_on_device``; other formats are decoded here as usual."""

    def __getitem__(self, i: int):
        path = self.index.path(self.ids[i])
        if path.suffix.lower() not in (".jpg", ".jpeg"):
            return super().__getitem__(i)
        try:
            data = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
        except OSError as e:
            raise ImageDecodeError(path, f"{type(e).__name__}: {e}") from None
        y = float(self.labels[i]) if self.labels is not None else -1.0
        return (data, str(path)), torch.tensor(y), i


def collate_encoded(batch):
    """Keep per-sample payloads as a list (JPEG sizes differ); stack labels and indices."""
    xs, ys, idx = zip(*batch)
    return list(xs), torch.stack(ys), torch.tensor(idx)


def _square_resize_chw(img: torch.Tensor, size: int) -> torch.Tensor:
    """Torch twin of ``square_resize`` for (3,H,W) uint8 on any device (area when shrinking, bicubic up)."""
    import torch.nn.functional as F

    h, w = img.shape[-2:]
    s = min(h, w)
    img = img[:, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    if s == size:
        return img
    mode = "area" if s > size else "bicubic"
    out = F.interpolate(img[None].float(), size=(size, size), mode=mode, **({} if mode == "area" else {"align_corners": False}))
    return out[0].round_().clamp_(0, 255).to(torch.uint8)


def decode_on_device(payloads: Sequence, size: int, device: torch.device) -> torch.Tensor:
    """(B,3,S,S) uint8 on ``device`` from EncodedFaceDataset payloads.

    All JPEGs go through one ``torchvision.io.decode_jpeg`` call on the device. If that fails, each
    is retried alone, then with PIL on the CPU (CMYK, odd markers); a file nothing can read is
    logged by name and its slot takes another image of the batch — never a black tensor.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    def one(data: torch.Tensor, path: str) -> torch.Tensor | None:
        try:
            return _square_resize_chw(decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True), size)
        except RuntimeError:
            try:
                return to_chw_uint8(square_resize(decode_image(path), size)).to(device)
            except ImageDecodeError as e:
                log.warning("unreadable image replaced by another sample: %s", e)
                return None

    out: list[torch.Tensor | None] = [p.to(device) if isinstance(p, torch.Tensor) else None for p in payloads]
    todo = [k for k, p in enumerate(payloads) if not isinstance(p, torch.Tensor)]
    if todo:
        try:
            imgs = decode_jpeg([payloads[k][0] for k in todo], mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
            for k, img in zip(todo, imgs):
                out[k] = _square_resize_chw(img, size)
        except RuntimeError:
            for k in todo:
                out[k] = one(*payloads[k])
    good = [t for t in out if t is not None]
    if not good:
        raise ImageDecodeError(payloads[0][1], "no image of this batch could be decoded")
    return torch.stack([t if t is not None else good[k % len(good)] for k, t in enumerate(out)])
