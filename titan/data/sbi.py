"""Self-blended images online (Shiohara & Yamasaki, CVPR 2022), batched on the training device.

``--sbi-p P`` turns a share P of the *real* faces of each training batch into fakes: the same
face, altered in colour, sharpness and scale/position, is blended back into itself through a
soft, randomly deformed face-region mask, and labelled fake. The only evidence left is what
face swaps leave: a blending boundary, and colour/sharpness statistics that differ inside it.
Identity, pose and background are the original's, so the model cannot learn those instead.

Inputs are the aligned face crops of ``align_faces.py`` (the face box × 1.4, centred), so the
inner face sits near the crop's centre: the mask is an ellipse there (centre, axes drawn per
image), warped by a smooth random displacement field and feathered by a per-image Gaussian.
Every draw is per image (kornia, torch RNG on the batch's device): one seed, the same batch.
Pixels where the mask is exactly 0 are the input's own, bit for bit.
"""
from __future__ import annotations

import kornia.augmentation as K
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..device import full_precision


def _odd(n: float) -> int:
    n = max(3, int(n))
    return n if n % 2 else n + 1


class SelfBlend(nn.Module):
    """(x [0,1] (B,3,H,W), y (B,)) → (x', y', mask (B,1,H,W)): each real image (y == 0) becomes a
    self-blended fake with probability ``p``; the others pass unchanged (mask 0)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"sbi_p must lie in [0, 1], not {p}")
        self.p = p
        # The source: the same face, re-coloured, softened or sharpened, slightly moved and scaled
        # (SBI's source-target augmentation: the misalignment and statistics of a swapped face).
        self.source_aug = K.AugmentationSequential(
            K.ColorJiggle(brightness=0.1, contrast=0.1, saturation=0.15, hue=0.03, p=1.0),
            K.RandomGaussianBlur(kernel_size=(5, 5), sigma=(0.3, 1.2), p=0.4),
            K.RandomSharpness(sharpness=(0.5, 1.5), p=0.3),
            K.RandomAffine(degrees=2.0, translate=(0.03, 0.03), scale=(0.95, 1.05), padding_mode="reflection", p=1.0),
        )

    def face_masks(self, n: int, h: int, w: int, device: torch.device) -> torch.Tensor:
        """(n,1,h,w) soft masks in [0,1]: jittered ellipses over the inner face, deformed, feathered,
        scaled by a per-image blend ratio; exactly 0 away from the face."""
        r = lambda lo, hi: torch.empty(n, 1, 1, device=device).uniform_(lo, hi)  # noqa: E731
        cx, cy, ax, ay = r(0.44, 0.56), r(0.50, 0.60), r(0.22, 0.32), r(0.26, 0.38)
        ys = torch.linspace(0, 1, h, device=device).view(1, h, 1)
        xs = torch.linspace(0, 1, w, device=device).view(1, 1, w)
        ellipse = ((((xs - cx) / ax) ** 2 + ((ys - cy) / ay) ** 2) <= 1).float().unsqueeze(1)
        # A smooth random warp (4×4 control displacements, bicubic) makes each outline irregular.
        disp = F.interpolate(torch.empty(n, 2, 4, 4, device=device).uniform_(-0.08, 0.08), size=(h, w),
                             mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        base = torch.stack(torch.meshgrid(torch.linspace(-1, 1, h, device=device),
                                          torch.linspace(-1, 1, w, device=device), indexing="ij")[::-1], -1)
        mask = F.grid_sample(ellipse, base.unsqueeze(0) + disp, mode="bilinear", padding_mode="zeros", align_corners=True)
        feather = K.RandomGaussianBlur(kernel_size=_odd(0.2 * min(h, w)), sigma=(0.01 * h + 0.3, 0.04 * h + 0.5), p=1.0)
        mask = feather(mask)
        ratio = torch.tensor([0.5, 0.75, 1.0, 1.0, 1.0], device=device)[torch.randint(0, 5, (n,), device=device)]
        mask = mask * ratio.view(n, 1, 1, 1)
        return torch.where(mask < 1e-3, torch.zeros_like(mask), mask.clamp(0, 1))

    @torch.no_grad()
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, _, h, w = x.shape
        mask = torch.zeros(b, 1, h, w, device=x.device, dtype=torch.float32)
        chosen = (y == 0) & (torch.rand(b, device=x.device) < self.p)
        idx = chosen.nonzero().flatten()
        if self.p == 0 or len(idx) == 0:
            return x, y, mask
        with full_precision(x.device):
            xs = x[idx].float()
            src = self.source_aug(xs).clamp(0, 1)
            m = self.face_masks(len(idx), h, w, x.device)
            blended = torch.where(m > 0, m * src + (1 - m) * xs, xs)
        out = x.clone()
        out[idx] = blended.to(x.dtype)
        mask[idx] = m
        y_out = y.clone()
        y_out[idx] = 1
        return out, y_out, mask
