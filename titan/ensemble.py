"""Fold models, test-time augmentation and the fold ensemble.

Shared by training inference, make_diamonds.py and safe_inference.py. Every model yields one
fake logit per image; TTA averages logits over views, the ensemble averages over folds.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .archs import build_arch_backbone, parse_arch
from .checkpoints import CheckpointError, load_file, load_into, unwrap_state_dict
from .convnextv2 import VARIANTS, build_backbone
from .heads import build_head

TTA_VIEWS = ("identity", "hflip", "rot+5", "rot-5", "vflip")


class FoldModel(nn.Module):
    """backbone + head: [0,1] RGB (B,3,H,W) → fake logit (B,)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)).float()


def infer_variant(sd: dict[str, torch.Tensor]) -> str:
    """The backbone variant whose depths and widths match a state dict."""
    dims = tuple(int(sd[f"downsamples.{i}.{0 if i == 0 else 1}.weight"].shape[0]) for i in range(4)) \
        if "downsamples.0.0.weight" in sd else None
    depths = tuple(len({k.split(".")[2] for k in sd if k.startswith(f"stages.{i}.")}) for i in range(4))
    for name, v in VARIANTS.items():
        if v.dims == dims and v.depths == depths:
            return name
    raise CheckpointError(f"no known backbone variant has depths {depths} and widths {dims}")


def infer_head(sd: dict[str, torch.Tensor]) -> str:
    if "head.1.weight" in sd:
        return "linear"
    if "weight" in sd and "aux_head.weight" in sd:
        return "arcface"
    raise CheckpointError(f"unknown head layout (keys {sorted(sd)[:6]})")


@dataclass
class Fold:
    name: str
    model: FoldModel
    threshold: float | None = None
    meta: dict = field(default_factory=dict)


def load_fold(backbone_path: str | os.PathLike, head_path: str | os.PathLike, meta_path: str | os.PathLike | None = None,
              variant: str | None = None, head: str | None = None, arch: str | None = None) -> Fold:
    """Build a fold model from its files; arch, variant and head are read from the files unless given.

    The architecture comes from ``arch``, else the meta file's or the backbone checkpoint's
    ``arch`` (written since the architecture study); a ConvNeXt V2 variant is read off the weights.
    """
    bobj = load_file(backbone_path)
    bsd = unwrap_state_dict(bobj, str(backbone_path))
    hsd = unwrap_state_dict(load_file(head_path), str(head_path))
    meta: dict = {}
    if meta_path and Path(meta_path).is_file():
        obj = load_file(meta_path)
        meta = dict(obj) if isinstance(obj, dict) else {}
    file_meta = bobj.get("meta") if isinstance(bobj, dict) and isinstance(bobj.get("meta"), dict) else {}
    arch = arch or meta.get("arch") or file_meta.get("arch") or ""
    head = head or infer_head(hsd)
    if arch and not parse_arch(arch).variant:  # a baseline: its layout is named, not inferred
        backbone, variant = load_into(build_arch_backbone(arch), bsd), ""
    else:
        variant = variant or infer_variant(bsd)
        backbone, arch = load_into(build_backbone(variant), bsd), f"titan-{variant}"
    head_mod = load_into(build_head(head, backbone.num_features), hsd)
    th = meta.get("th", meta.get("threshold"))
    return Fold(Path(backbone_path).stem, FoldModel(backbone, head_mod).eval(), float(th) if th is not None else None,
                {**{k: v for k, v in meta.items() if isinstance(v, (int, float, str, bool))},
                 "arch": arch, "variant": variant, "head": head})


def find_folds(directory: str | os.PathLike, prefix: str = "v42",
               include_headless: bool = False) -> list[tuple[int, Path, Path | None, Path | None]]:
    """(k, backbone, head, meta-or-None) for every ``{prefix}_backbone_fold{k}.pth`` with its head.

    Also matches the original V38 names ``titan_backbone_fold{k}.pth`` when prefix='titan'.
    ``include_headless`` keeps backbones without a head file too (head None), so callers can name them.
    """
    directory = Path(directory)
    out = []
    for p in sorted(directory.glob(f"{prefix}_backbone_fold*.pth")):
        m = re.fullmatch(rf"{re.escape(prefix)}_backbone_fold(\d+)\.pth", p.name)
        if not m:
            continue
        k = int(m.group(1))
        head = directory / f"{prefix}_head_fold{k}.pth"
        meta = directory / f"{prefix}_meta_fold{k}.pth"
        if head.is_file() or include_headless:
            out.append((k, p, head if head.is_file() else None, meta if meta.is_file() else None))
    return sorted(out, key=lambda f: f[0])


# --- TTA --------------------------------------------------------------------------------------

def _rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]], device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def tta_view(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "identity":
        return x
    if name == "hflip":
        return x.flip(-1)
    if name == "vflip":
        return x.flip(-2)
    m = re.fullmatch(r"rot([+-]\d+(?:\.\d+)?)", name)
    if m:
        return _rotate(x, float(m.group(1)))
    raise ValueError(f"unknown TTA view {name!r}; use identity, hflip, vflip or rot±DEG")


def parse_tta(spec: str | Sequence[str]) -> list[str]:
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    probe = torch.zeros(1, 3, 8, 8)
    for n in names:
        tta_view(probe, n)  # validates
    return names or ["identity"]


def to_float_image(x: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """uint8 (B,3,H,W) → float [0,1] on ``device`` (the copy is non-blocking from pinned memory)."""
    x = x.to(device, non_blocking=True)
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def amp_dtype(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """bf16 on CUDA where supported, else fp16; None (fp32) on CPU or when disabled."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast_for(device: torch.device, enabled: bool = True):
    """Autocast at ``amp_dtype`` on CUDA; a disabled autocast (fp32) elsewhere."""
    dtype = amp_dtype(device, enabled)
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast("cuda", dtype=dtype)


@torch.no_grad()
def tta_logits(model: nn.Module, x: torch.Tensor, views: Sequence[str], amp: bool = True) -> torch.Tensor:
    """Mean logit over TTA views for a float batch already on the model's device → (B,)."""
    with autocast_for(x.device, amp):
        return torch.stack([model(tta_view(x, v)).float() for v in views]).mean(0)


@torch.no_grad()
def predict_batches(models: Sequence[nn.Module], batches: Iterable, device: torch.device, views: Sequence[str],
                    amp: bool = True, channels_last: bool = False, progress=None) -> np.ndarray:
    """Per-fold TTA logits (n_models, N) over ``batches`` of uint8 images (or (images, ...) tuples)."""
    out: list[list[torch.Tensor]] = [[] for _ in models]
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        x = to_float_image(x, device, channels_last)
        for i, m in enumerate(models):
            out[i].append(tta_logits(m, x, views, amp).cpu())
        if progress is not None:
            progress.update(x.shape[0])
    return np.stack([torch.cat(o).numpy() if o else np.zeros(0, np.float32) for o in out])


def ensemble_probability(fold_logits: np.ndarray) -> np.ndarray:
    """Average logits over folds, then the sigmoid → P(fake) per image."""
    return 1.0 / (1.0 + np.exp(-np.asarray(fold_logits, dtype=np.float64).mean(axis=0)))


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return dev
