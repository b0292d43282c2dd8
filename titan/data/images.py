"""Images on disk: finding them by Id in a folder, decoding any of them robustly, encoding crops.

Decoding never returns a silent black image: an unreadable file raises ``ImageDecodeError``
naming it.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .ids import check_id

# Listed by extension (preferred first when two files share a stem). With ``probe_unknown`` a
# file with any other extension counts too when PIL recognises its header.
IMAGE_EXTS = (".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff",
              ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".jp2")
# Larger images are refused by name rather than decoded into gigabytes (align_faces.py --max-pixels).
MAX_PIXELS = 100_000_000


class ImageDecodeError(OSError):
    """An image file could not be decoded; the message names the file and why."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: cannot read image — {reason}")


# --- finding images ---------------------------------------------------------------------------

class ImageIndex:
    """Map Id (file stem) → image path in one folder: any extension of ``IMAGE_EXTS`` (``.jpg``
    preferred), and with ``probe_unknown`` any other file whose header PIL recognises; other
    files are listed in ``ignored``."""

    def __init__(self, folder: str | os.PathLike, probe_unknown: bool = False) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder}: image folder not found")
        rank = {e: i for i, e in enumerate(IMAGE_EXTS)}
        best: dict[str, tuple[int, Path]] = {}
        self.ignored: list[Path] = []
        with os.scandir(self.folder) as it:
            for entry in it:
                stem, ext = os.path.splitext(entry.name)
                if stem.startswith(".") or not entry.is_file():
                    continue
                r = rank.get(ext.lower())
                if r is None and probe_unknown and _pil_recognises(entry.path):
                    r = len(IMAGE_EXTS)
                if r is None:
                    self.ignored.append(Path(entry.path))
                elif stem not in best or r < best[stem][0]:
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


def _pil_recognises(path: str) -> bool:
    try:
        with Image.open(path):  # reads the header only
            return True
    except Exception:  # noqa: BLE001 — anything PIL cannot identify is not an image
        return False


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


def decode_image(path: str | os.PathLike, max_pixels: int | None = None, data: bytes | None = None) -> np.ndarray:
    """Decode any PIL-readable image → (H,W,3) uint8 RGB, EXIF orientation applied.

    Decoding happens inside the try (``load()``), so a truncated file fails here, by name. An
    image of more than ``max_pixels`` (default ``MAX_PIXELS``) is refused from its header, before
    any pixel is decoded. With ``data`` the image is decoded from those bytes (an upload) and
    ``path`` only names it: nothing is read from the file system.
    """
    return decode_reduced(path, 0, max_pixels, data)[0]


def _shrink_decoded(img: Image.Image, max_side: int) -> Image.Image:
    """``img`` with its long side at most ``max_side``, before it is widened to 8-bit RGB (a 1-bit
    10000² PNG is 100 MB as L, 300 MB as RGB)."""
    if max(img.size) <= max_side:
        return img
    if img.mode == "1" and img.width * img.height <= 32_000_000:  # grey averages dithering; a larger one stays
        img = img.convert("L")                                  # 1-bit (nearest) rather than take a copy as big
    try:
        img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    except ValueError:  # a mode resize does not take (16-bit, float): widened first
        img = _to_rgb(img)
        img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return img


def decode_reduced(path: str | os.PathLike, max_side: int = 0, max_pixels: int | None = None,
                   data: bytes | None = None) -> tuple[np.ndarray, float]:
    """``decode_image`` (``data``: from those bytes, ``path`` only names it) with the long side
    reduced to ``max_side`` (0: full size) as the file is decoded — JPEG in draft mode (the decoder's own 1/2…1/8 scaling), others right after loading —
    so memory follows ``max_side``, not the file's pixel count. Returns (image, scale): decoded
    pixels per source pixel (1.0 when not reduced), to map boxes back to the source."""
    path = Path(path)
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    try:
        if (len(data) if data is not None else path.stat().st_size) == 0:
            raise ImageDecodeError(path, "file is empty (0 bytes)")
        with Image.open(io.BytesIO(data) if data is not None else path) as img:
            if limit and img.width * img.height > limit:
                raise ImageDecodeError(path, f"{img.width}×{img.height} = {img.width * img.height:,} pixels, above the "
                                             f"limit of {limit:,} (align_faces.py --max-pixels raises it)")
            full_side = max(img.size)
            if max_side and full_side > max_side and img.format == "JPEG":
                f = max_side / full_side
                img.draft(img.mode, (max(1, int(img.width * f + 1)), max(1, int(img.height * f + 1))))
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # no full-size copy when there is nothing to turn
            if max_side:
                img = _shrink_decoded(img, max_side)
            scale = max(img.size) / full_side
            arr = np.asarray(_to_rgb(img))
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(path, "not an image format PIL recognises") from None
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(path, f"decompression bomb refused ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageDecodeError(path, f"{type(e).__name__}: {e}") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageDecodeError(path, f"unexpected decoded shape {arr.shape}")
    return np.ascontiguousarray(arr), scale


def to_rgb_array(img, name: str = "image") -> np.ndarray:
    """An in-memory image (PIL, or a uint8 array HxW / HxWx1 / HxWx3 / HxWx4) → (H,W,3) uint8 RGB,
    by the same rules as ``decode_image`` (transparency on white, 16-bit scaled); anything else
    raises ``ImageDecodeError`` naming ``name``."""
    if isinstance(img, Image.Image):
        try:
            arr = np.asarray(_to_rgb(img))
        except (OSError, ValueError) as e:
            raise ImageDecodeError(name, f"{type(e).__name__}: {e}") from None
    else:
        arr = np.asarray(img)
        if arr.dtype != np.uint8:
            raise ImageDecodeError(name, f"expected a uint8 array, got {arr.dtype}")
        if arr.ndim == 3 and arr.shape[2] in (1, 4):
            arr = np.asarray(_to_rgb(Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)))
        elif arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageDecodeError(name, f"unexpected image shape {arr.shape}")
    return np.ascontiguousarray(arr)


def encode_image(img: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    """(H,W,3) uint8 RGB → the bytes of a ``jpg`` (at ``quality``) or ``png`` file (OpenCV)."""
    bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if fmt == "jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 3]
    ok, buf = cv2.imencode(f".{fmt}", bgr, params)
    if not ok:
        raise OSError(f"OpenCV could not encode a {img.shape} image as {fmt}")
    return buf.tobytes()


def centre_square(h: int, w: int) -> tuple[int, int, int]:
    """(x0, y0, side) of the largest centred square in an h×w image: the crop when no face is found."""
    s = min(h, w)
    return (w - s) // 2, (h - s) // 2, s


def square_resize(img: np.ndarray, size: int) -> np.ndarray:
    """Centre-square crop (no distortion) then resize to size×size (area filter when shrinking)."""
    h, w = img.shape[:2]
    if h != w:
        x0, y0, s = centre_square(h, w)
        img = img[y0:y0 + s, x0:x0 + s]
    if img.shape[0] != size:
        interp = cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_CUBIC
        img = cv2.resize(img, (size, size), interpolation=interp)
    return img


def to_chw_uint8(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))

