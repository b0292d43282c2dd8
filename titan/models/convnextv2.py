"""ConvNeXt V2 backbone over the 9-channel frequency input (or another of ``frequency.INPUTS``).

Follows facebookresearch/ConvNeXt-V2 (GRN blocks, no layer scale) with the key layout of the
released Titan weights: ``preproc``, ``downsamples.i``, ``stages.i.j``, ``norm``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..checkpoints import CheckpointError
from .frequency import build_input


@dataclass(frozen=True)
class Variant:
    depths: tuple[int, int, int, int]
    dims: tuple[int, int, int, int]


# v42/v38 are the released Titan models; atto/femto/pico/nano are the paper's small sizes,
# for CPU runs, tests and the demo; base is the paper's, for timm's pretrained weights.
VARIANTS: dict[str, Variant] = {
    "v42": Variant((3, 3, 12, 3), (96, 192, 384, 768)),
    "v38": Variant((3, 3, 9, 3), (96, 192, 384, 768)),  # = convnextv2_tiny's shape
    "base": Variant((3, 3, 27, 3), (128, 256, 512, 1024)),  # convnextv2_base (timm --init-weights)
    "atto": Variant((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": Variant((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": Variant((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": Variant((2, 2, 8, 2), (80, 160, 320, 640)),
}


STEMS = ("standard", "highpass")


@torch.no_grad()
def highpass_(conv: nn.Conv2d) -> nn.Conv2d:
    """Project each filter onto zero sum over its kernel window, per input channel."""
    conv.weight.sub_(conv.weight.mean(dim=(2, 3), keepdim=True))
    return conv


def keep_stem_highpass(backbone: "ConvNeXtV2", optimizer: torch.optim.Optimizer) -> None:
    """The ``highpass`` stem: zero-sum stem filters now and after every optimizer step.

    Why: the patchify stem is linear and LayerNorm follows it, so each 4×4 patch's mean colour
    swamps the within-patch detail where blending and resampling artefacts live; a from-scratch
    model on a small set then memorises layouts instead. This is Bayar & Stamm's constrained
    first layer for manipulation detection (2016, 2018) in its zero-sum form: the stem can only
    learn high-pass (prediction-error) filters. Keys, shapes and the input transform are
    unchanged, so the weights load anywhere; loaded weights are projected once, here.
    """
    conv = backbone.downsamples[0][0]
    highpass_(conv)
    optimizer.register_step_post_hook(lambda *_: highpass_(conv))


class LayerNorm2d(nn.Module):
    """LayerNorm over channels of an NCHW map (held as ``norm`` to match released keys)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global Response Normalization on NHWC input (ConvNeXt V2, eq. 1–3)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The spatial L2 norm overflows fp16 on large maps: compute it in fp32.
        gx = torch.linalg.vector_norm(x.float(), ord=2, dim=(1, 2), keepdim=True)
        nx = (gx / (gx.mean(dim=-1, keepdim=True) + self.eps)).to(x.dtype)
        return self.gamma * (x * nx) + self.beta + x


class DropPath(nn.Module):
    """Stochastic depth per sample; identity at p=0 and in eval."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """dwconv 7×7 → LN → 1×1 (d→4d) → GELU → GRN → 1×1 (4d→d), residual."""

    def __init__(self, dim: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = GRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.dwconv(x).permute(0, 2, 3, 1)  # (B,H,W,C)
        x = self.pwconv2(self.grn(self.act(self.pwconv1(self.norm(x)))))
        return shortcut + self.drop_path(x.permute(0, 3, 1, 2))


class ConvNeXtV2(nn.Module):
    """RGB in [0,1] (B,3,H,W) → pooled, normalised features (B, dims[-1]).

    H and W must be multiples of 32 (the total stride). ``input_name`` picks ``preproc`` (and the
    stem's input channels) from ``frequency.INPUTS``: the released weights' is ``rgb+fft+srm``.
    """

    stride = 32       # total: the input must be a multiple of it
    stem_stride = 4   # the patchify stem

    def __init__(self, depths=(3, 3, 12, 3), dims=(96, 192, 384, 768), drop_path_rate: float = 0.0,
                 stem: str = "standard", input_name: str = "rgb+fft+srm") -> None:
        super().__init__()
        self.depths, self.dims = tuple(depths), tuple(dims)
        self.num_features = dims[-1]
        self.input_name = input_name
        self.preproc = build_input(input_name)
        in_chans = self.preproc.out_chans
        self.downsamples = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0]))]
            + [nn.Sequential(LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], dims[i], kernel_size=2, stride=2)) for i in range(1, 4)]
        )
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.stages.append(nn.Sequential(*[Block(dims[i], rates[start + j]) for j in range(depth)]))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.apply(self._init_weights)
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; choose one of {STEMS}")
        if stem == "highpass":  # training keeps it so: keep_stem_highpass
            highpass_(self.downsamples[0][0])

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def stem(self, x9: torch.Tensor) -> torch.Tensor:
        """``preproc``'s output (B,9,H,W) → patch features (B,C0,H/4,W/4)."""
        return self.downsamples[0](x9)

    def forward_body(self, x: torch.Tensor) -> torch.Tensor:
        """Stem features (B,C0,H/4,W/4) → last-stage map (B,C,H/32,W/32)."""
        x = self.stages[0](x)
        for i in range(1, 4):
            x = self.stages[i](self.downsamples[i](x))
        return x

    def forward_maps(self, x9: torch.Tensor) -> torch.Tensor:
        """9-channel input (B,9,H,W) → last-stage map (B,C,H/32,W/32)."""
        return self.forward_body(self.stem(x9))

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.norm(fmap.mean(dim=(-2, -1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_maps(self.preproc(x)))


def build_backbone(variant: str = "v42", drop_path_rate: float = 0.0, stem: str = "standard",
                   input_name: str = "rgb+fft+srm") -> ConvNeXtV2:
    """A backbone by variant name: v42, v38, atto, femto, pico, nano; ``stem``: one of ``STEMS``;
    ``input_name``: one of ``frequency.INPUTS``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown backbone variant {variant!r}; choose one of {sorted(VARIANTS)}")
    v = VARIANTS[variant]
    return ConvNeXtV2(v.depths, v.dims, drop_path_rate=drop_path_rate, stem=stem, input_name=input_name)


def variant_of(sd: dict[str, torch.Tensor]) -> str:
    """The variant whose depths and widths match a backbone state dict (released files carry no name)."""
    dims = tuple(int(sd[f"downsamples.{i}.{0 if i == 0 else 1}.weight"].shape[0]) for i in range(4)) \
        if "downsamples.0.0.weight" in sd else None
    depths = tuple(len({k.split(".")[2] for k in sd if k.startswith(f"stages.{i}.")}) for i in range(4))
    for name, v in VARIANTS.items():
        if v.dims == dims and v.depths == depths:
            return name
    raise CheckpointError(f"no known backbone variant has depths {depths} and widths {dims}")
