"""SimMIM (Xie et al., 2022) for the ConvNeXt V2 backbone.

Random 32-px patches of the 9-channel input are masked at the stem (a learnable mask token
replaces their stem features); a 1×1 conv to 9·P² channels + PixelShuffle(P) reconstructs the
9-channel input and the L1 loss is taken on masked pixels only.

SimMIM owns the masking, as microsoft/SimMIM's ``SwinTransformerForSimMIM`` does: the mask
token (key ``mask_token``) and the masked forward live here; the backbone only exposes its stem
and body, so its keys and outputs are those of a plain classifier backbone.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .convnextv2 import ConvNeXtV2


def random_patch_mask(batch: int, grid: tuple[int, int], ratio: float, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,gh,gw) float mask with exactly round(ratio·gh·gw) ones per image."""
    gh, gw = grid
    n = gh * gw
    k = max(1, int(round(ratio * n)))
    noise = torch.rand(batch, n, device=device, generator=generator)
    ids = noise.argsort(dim=1)[:, :k]
    mask = torch.zeros(batch, n, device=device)
    mask.scatter_(1, ids, 1.0)
    return mask.view(batch, gh, gw)


class SimMIM(nn.Module):
    def __init__(self, encoder: ConvNeXtV2, patch_size: int = 32, mask_ratio: float = 0.4) -> None:
        super().__init__()
        if patch_size % encoder.stem_stride:
            raise ValueError(f"patch_size must be a multiple of the stem stride ({encoder.stem_stride})")
        self.encoder, self.patch_size, self.mask_ratio = encoder, patch_size, mask_ratio
        self.mask_token = nn.Parameter(torch.zeros(1, encoder.dims[0], 1, 1))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        s, c = encoder.stride, encoder.preproc.out_chans  # read from the encoder, not hard-coded
        self.decoder = nn.Sequential(nn.Conv2d(encoder.num_features, c * s * s, kernel_size=1), nn.PixelShuffle(s))

    def masked_maps(self, x9: torch.Tensor, stem_mask: torch.Tensor) -> torch.Tensor:
        """(B,9,H,W), mask (B,1,H/4,W/4) in {0,1} → last-stage map with masked stem features
        replaced by the mask token (B,C,H/32,W/32)."""
        z = self.encoder.stem(x9)
        m = stem_mask.to(z.dtype)
        return self.encoder.forward_body(z * (1.0 - m) + self.mask_token.to(z.dtype) * m)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [0,1] RGB (B,3,H,W). Returns (loss, reconstruction (B,9,H,W), pixel mask (B,1,H,W))."""
        b, _, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}×{w} is not a multiple of the mask patch size {p}")
        x9 = self.encoder.preproc(x)
        if mask is None:
            mask = random_patch_mask(b, (h // p, w // p), self.mask_ratio, device=x.device)
        r = p // self.encoder.stem_stride
        stem_mask = mask.repeat_interleave(r, 1).repeat_interleave(r, 2).unsqueeze(1)
        rec = self.decoder(self.masked_maps(x9, stem_mask))
        pix_mask = mask.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1).to(rec.dtype)
        loss_map = F.l1_loss(rec.float(), x9.float(), reduction="none")
        loss = (loss_map * pix_mask).sum() / (pix_mask.sum() * x9.shape[1] + 1e-5)
        return loss, rec, pix_mask
