"""Datasets of face crops: uint8 CHW tensors (normalisation and augmentation run on the device),
and decoding JPEG batches on the training device (``gpu_decode``).
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .images import ImageDecodeError, ImageIndex, centre_square, decode_image, square_resize, to_chw_uint8
from .ids import check_id

log = logging.getLogger("titan")


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

    x0, y0, s = centre_square(*img.shape[-2:])
    img = img[:, y0:y0 + s, x0:x0 + s]
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
