"""Test-time augmentation and the fold ensemble's prediction.

Every fold model yields one fake logit per image; TTA averages logits over views, the ensemble
averages over folds; ``titan.infer.calibration`` turns the ensemble logit into P(fake).

One vocabulary for every script: ``full``, ``minimal`` or a comma-separated list of views (``resolve_tta``).
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..device import autocast, to_float_image


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


# The view sets every script accepts by name: "full" is the README's inference (and the default when the
# folds record none), "minimal" the cheap one.
TTA_PRESETS = {"minimal": "identity,hflip", "full": "identity,hflip,rot+5,rot-5"}
DEFAULT_TTA = "full"
TTA_HELP = "TTA views: full (identity,hflip,rot+5,rot-5), minimal (identity,hflip) or a comma-separated list"


def resolve_tta(spec: str | Sequence[str]) -> list[str]:
    """A preset name (``minimal``, ``full``), a comma-separated list or a sequence of views → the views."""
    spec = TTA_PRESETS.get(spec, spec) if isinstance(spec, str) else spec
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    probe = torch.zeros(1, 3, 8, 8)
    for n in names:
        tta_view(probe, n)  # validates
    return names or ["identity"]


@torch.no_grad()
def tta_logits(model: nn.Module, x: torch.Tensor, views: Sequence[str], amp: bool = True) -> torch.Tensor:
    """Mean logit over TTA views for a float batch already on the model's device → (B,)."""
    with autocast(x.device, amp):
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

