"""The backbones' inputs: what a [0,1] RGB batch becomes before the first convolution.

``rgb+fft+srm`` is the 9-channel input (RGB, FFT log-amplitude and SRM high-pass residuals).
Released weights were trained on exactly this transform, so every constant here is part of
the checkpoint contract (docs/checkpoints.md): change one and old weights silently degrade.
``rgb`` is the normalised RGB alone; ``npr`` the neighbouring-pixel residual of Tan et al.
(CVPR 2024), alone or after the RGB (``rgb+npr``). ``INPUTS`` names them all; a fold records
its input's name, so inference rebuilds the same one (``build_input``).
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


RGB_SHIFT = RGB_SCALE = 0.5
# NPR's own code feeds the residual of the ImageNet-normalised image (std ≈ 0.226) times 2/3 to
# its first conv: on the [0,1] image that is ×2.95, so ×3 keeps NPR's scale (and SRM's).
NPR_SCALE = 3.0


def rgb(x: torch.Tensor) -> torch.Tensor:
    """[0,1] RGB → (x−0.5)/0.5, the RGB channels of every input here."""
    return (x.float() - RGB_SHIFT) / RGB_SCALE


def npr(x: torch.Tensor) -> torch.Tensor:
    """Neighbouring pixel relationships (Tan et al., CVPR 2024): x − up(down(x)) with nearest
    interpolation at ½ then ×2, i.e. each pixel minus the top-left pixel of its 2×2 block; zero on
    an image that is constant on 2×2 blocks. (B,C,H,W) → (B,C,H,W) for any H, W: on an odd size
    the last row (column) is its own block's top row (column) — as if the image were padded by
    replication to even size and the result cropped back."""
    h, w = x.shape[-2:]
    anchors = F.interpolate(x[..., ::2, ::2], scale_factor=2.0, mode="nearest")[..., :h, :w]
    return x - anchors


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
            amp = torch.log1p(self.rfft2_abs(x))  # (B,3,H,W//2+1)
            amp = (amp - FFT_SHIFT) / FFT_SCALE
            amp = F.interpolate(amp, size=(h, w), mode="bilinear", align_corners=False)
            srm = F.conv2d(x, self.srm_kernel.float(), padding=1, groups=3) * SRM_SCALE
            return torch.cat([rgb(x), amp, srm], dim=1)

    def rfft2_abs(self, x: torch.Tensor) -> torch.Tensor:
        """|rfft2(x)| over the last two dims: (…,H,W) → (…,H,W//2+1)."""
        return torch.fft.rfft2(x).abs()


class RGBInput(nn.Module):
    """[0,1] RGB (B,3,H,W) → (x−0.5)/0.5."""

    out_chans = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rgb(x)


class NPRInput(nn.Module):
    """[0,1] RGB (B,3,H,W) → its NPR residual × ``NPR_SCALE`` (B,3,H,W); with ``with_rgb`` the
    normalised RGB first (B,6,H,W)."""

    def __init__(self, with_rgb: bool = False) -> None:
        super().__init__()
        self.with_rgb = with_rgb
        self.out_chans = 6 if with_rgb else 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        r = npr(x) * NPR_SCALE
        return torch.cat([rgb(x), r], dim=1) if self.with_rgb else r


# name → constructor; the name is what a fold records (meta "input")
INPUTS = {"rgb": RGBInput, "rgb+fft+srm": FrequencyInput, "npr": NPRInput, "rgb+npr": lambda: NPRInput(with_rgb=True)}


def build_input(name: str) -> nn.Module:
    """The input module called ``name`` (one of ``INPUTS``); it has ``out_chans``."""
    if name not in INPUTS:
        raise ValueError(f"unknown input {name!r}; choose one of {sorted(INPUTS)}")
    return INPUTS[name]()


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
