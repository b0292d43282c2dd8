"""The 9-channel input: RGB, FFT log-amplitude and SRM high-pass residuals.

Released weights were trained on exactly this transform, so every constant here is part of
the checkpoint contract (docs/checkpoints.md): change one and old weights silently degrade.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..device import eager, full_precision

SRM_SCALE = 3.0
FFT_SHIFT, FFT_SCALE = 3.0, 3.0


def srm_kernel() -> torch.Tensor:
    """(3,1,3,3) per-channel filters: R and B keep a −1 centre tap, G gets the Laplacian."""
    k = torch.zeros(3, 1, 3, 3)
    k[0, 0, 1, 1] = -1.0
    k[2, 0, 1, 1] = -1.0
    k[1, 0] = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]])
    return k


class FrequencyInput(nn.Module):
    """[0,1] RGB (B,3,H,W) → (B,9,H,W): RGB normalised, FFT log-amplitude, SRM residuals."""

    out_chans = 9

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("srm_kernel", srm_kernel())

    @eager  # inductor cannot lower the FFT: torch.compile covers what follows this input
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # FFT has no bf16/fp16 kernels worth trusting: the whole transform runs in fp32.
        with full_precision(x.device):
            x = x.float()
            h, w = x.shape[-2:]
            rgb = (x - 0.5) / 0.5
            amp = torch.log1p(self.rfft2_abs(x))  # (B,3,H,W//2+1)
            amp = (amp - FFT_SHIFT) / FFT_SCALE
            amp = F.interpolate(amp, size=(h, w), mode="bilinear", align_corners=False)
            srm = F.conv2d(x, self.srm_kernel.float(), padding=1, groups=3) * SRM_SCALE
            return torch.cat([rgb, amp, srm], dim=1)

    def rfft2_abs(self, x: torch.Tensor) -> torch.Tensor:
        """|rfft2(x)| over the last two dims: (…,H,W) → (…,H,W//2+1)."""
        return torch.fft.rfft2(x).abs()


class MatmulFrequencyInput(FrequencyInput):
    """``FrequencyInput`` with the FFT written as two real matrix products, for ONNX export.

    Why: the TorchScript ONNX exporter has no ``aten::fft_rfft2`` (torch 2.14.1, opset 17: "not
    supported") and the dynamo exporter needs onnxscript. The DFT as cos/sin matrices (built in
    float64 for the input size it is traced at) is exact up to float rounding: with X = C_H·x·C_W
    − S_H·x·S_W + i(−S_H·x·C_W − C_H·x·S_W), |X| is the FFT's amplitude. Same state dict
    (``srm_kernel``); the matrices are rebuilt, not saved.
    """

    def __init__(self) -> None:
        super().__init__()

    @staticmethod
    def _dft(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of 2π·j·k/n for j < n, k < m (float64, then float32)."""
        jk = torch.outer(torch.arange(n, dtype=torch.float64), torch.arange(m, dtype=torch.float64))
        a = 2.0 * torch.pi * torch.remainder(jk, n) / n  # reduce first: exact angles for large j·k
        return torch.cos(a).float(), torch.sin(a).float()

    def rfft2_abs(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ch, sh = self._dft(h, h)
        cw, sw = self._dft(w, w // 2 + 1)
        ch, sh, cw, sw = (t.to(x.device) for t in (ch, sh, cw, sw))
        a, b = x @ cw, x @ sw  # the real DFT along W
        re = ch @ a - sh @ b
        im = sh @ a + ch @ b  # the sign of the imaginary part does not change |X|
        return torch.sqrt(re * re + im * im)
