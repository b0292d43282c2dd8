"""timm's ConvNeXt V2 checkpoints (ImageNet or FCMAE) → TitanNet's backbone, block by block.

A user downloads e.g. ``convnextv2_atto.fcmae_ft_in1k`` (``pytorch_model.bin`` / ``.pth`` or
``model.safetensors``) on their own machine and passes it as ``--init-weights``; nothing here
downloads. Key layout (timm ``timm/models/convnext.py`` → ours, ``docs``/DESIGN "Checkpoint
compatibility"):

    stem.0 (Conv 3→d0, 4×4/4)            downsamples.0.0  (Conv 9→d0: RGB part converted, FFT/SRM = 0)
    stem.1 (LayerNorm2d)                 downsamples.0.1.norm
    stages.i.downsample.0 (LayerNorm2d)  downsamples.i.0.norm          (i = 1..3)
    stages.i.downsample.1 (Conv 2×2/2)   downsamples.i.1
    stages.i.blocks.j.conv_dw            stages.i.j.dwconv
    stages.i.blocks.j.norm               stages.i.j.norm
    stages.i.blocks.j.mlp.fc1 / fc2      stages.i.j.pwconv1 / pwconv2   (1×1 conv or linear → linear)
    stages.i.blocks.j.mlp.grn.weight     stages.i.j.grn.gamma           ((4d,) → (1,1,1,4d)); bias → beta
    head.norm                            norm                           (absent in FCMAE files: kept at init)
    head.fc                              dropped (our head is trained from scratch)

Input: timm normalises RGB with ImageNet's mean/std; ours feeds ``(x−0.5)/0.5``. Since the stem
is linear, ``W·((x−m)/s) + b`` is rewritten for ``u = 2x−1`` as ``W/(2s)·u + (b + Σ W·(0.5−m)/s)``,
so the pretrained model sees exactly what it was trained on. The FFT and SRM input weights start
at zero: at step 0 the backbone's pooled features equal timm's on the same image.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch
import torch.nn as nn

from ..checkpoints import CheckpointError

# timm's ConvNeXt V2 pretrained configs (``timm/models/convnext.py``): ImageNet mean/std.
TIMM_MEAN = (0.485, 0.456, 0.406)
TIMM_STD = (0.229, 0.224, 0.225)

_RULES = (  # (timm pattern, our key template)
    (r"stem\.0\.(weight|bias)", "downsamples.0.0.{0}"),
    (r"stem\.1\.(weight|bias)", "downsamples.0.1.norm.{0}"),
    (r"stages\.(\d)\.downsample\.0\.(weight|bias)", "downsamples.{0}.0.norm.{1}"),
    (r"stages\.(\d)\.downsample\.1\.(weight|bias)", "downsamples.{0}.1.{1}"),
    (r"stages\.(\d)\.blocks\.(\d+)\.conv_dw\.(weight|bias)", "stages.{0}.{1}.dwconv.{2}"),
    (r"stages\.(\d)\.blocks\.(\d+)\.norm\.(weight|bias)", "stages.{0}.{1}.norm.{2}"),
    (r"stages\.(\d)\.blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", "stages.{0}.{1}.pwconv1.{2}"),
    (r"stages\.(\d)\.blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", "stages.{0}.{1}.pwconv2.{2}"),
    (r"stages\.(\d)\.blocks\.(\d+)\.mlp\.grn\.weight", "stages.{0}.{1}.grn.gamma"),
    (r"stages\.(\d)\.blocks\.(\d+)\.mlp\.grn\.bias", "stages.{0}.{1}.grn.beta"),
    (r"head\.norm\.(weight|bias)", "norm.{0}"),
)
_DROPPED = re.compile(r"head\.fc\.(weight|bias)")


def is_timm_convnextv2(sd: Mapping[str, torch.Tensor]) -> bool:
    """A state dict in timm's ConvNeXt key layout (ours has ``downsamples.*``, timm ``stem.*``)."""
    return "stem.0.weight" in sd and any(k.startswith("stages.0.blocks.") for k in sd)


def timm_key(key: str) -> str | None:
    """Our key for one timm key (None: dropped, e.g. the ImageNet classifier)."""
    if _DROPPED.fullmatch(key):
        return None
    for pattern, template in _RULES:
        m = re.fullmatch(pattern, key)
        if m:
            return template.format(*m.groups())
    raise CheckpointError(f"timm ConvNeXt V2 checkpoint: no mapping for key {key!r}; is it a ConvNeXt V2 "
                          "(not V1, with layer scale) checkpoint in timm's layout?")


@torch.no_grad()
def convert_stem(weight: torch.Tensor, bias: torch.Tensor, in_chans: int,
                 mean=TIMM_MEAN, std=TIMM_STD) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's RGB stem (d0,3,k,k) for ImageNet-normalised input → ours (d0,in_chans,k,k) for
    ``(x−0.5)/0.5`` RGB in channels 0–2, zero on the other (FFT, SRM) channels."""
    m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    w = weight.double()
    new_w = torch.zeros(w.shape[0], in_chans, *w.shape[2:], dtype=torch.float64)
    new_w[:, :3] = w / (2 * s)
    new_b = bias.double() + (w * ((0.5 - m) / s)).sum(dim=(1, 2, 3))
    return new_w.to(weight.dtype), new_b.to(bias.dtype)


def map_timm_convnextv2(sd: Mapping[str, torch.Tensor], backbone: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """timm state dict → (a full state dict for ``backbone``, notes for the log).

    Refuses (``CheckpointError``) a checkpoint of another size or depth, naming the keys: each
    timm key with its shape and ours, the keys only one side has."""
    own = backbone.state_dict()
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}  # our key → "timm key (its shape in the file)"
    for k, v in sd.items():
        ours = timm_key(k)
        if ours is None:
            continue
        origin[ours] = f"{k} {tuple(v.shape)}"
        if ours in own and v.ndim == 4 and own[ours].ndim == 2 and v.shape[2:] == (1, 1):
            v = v.flatten(1)  # timm's small variants use 1×1 convs for the MLP
        elif ours in own and own[ours].ndim == 4 and v.ndim == 1 and ours.endswith(("gamma", "beta")):
            v = v.view(1, 1, 1, -1)
        out[ours] = v
    stem_w, stem_b = "downsamples.0.0.weight", "downsamples.0.0.bias"
    if stem_w in out and out[stem_w].shape[1] == 3 and own[stem_w].shape[1] != 3:
        out[stem_w], out[stem_b] = convert_stem(out[stem_w], out[stem_b], own[stem_w].shape[1])
    notes = []
    kept = [k for k in ("norm.weight", "norm.bias") if k not in out]
    if kept:  # FCMAE (self-supervised) files stop before the head
        notes.append("no head.norm in the file (an FCMAE checkpoint?): the pooled-feature norm starts at its initial values")
        out.update({k: own[k] for k in kept})
    wrong = [f"{origin[k]} → {k} {tuple(own[k].shape)}"
             for k in out if k in own and out[k].shape != own[k].shape]
    extra = [f"{origin[k]} (→ {k})" for k in out if k not in own]
    missing = [k for k in own if k not in out and not k.startswith("preproc.")]
    if wrong or extra or missing:
        show = lambda title, keys: f"\n  {title} ({len(keys)}): " + ", ".join(keys[:12]) + (" …" if len(keys) > 12 else "") if keys else ""  # noqa: E731
        raise CheckpointError("timm ConvNeXt V2 checkpoint does not fit this backbone (another size or depth?):"
                              + show("wrong shape (file → ours)", wrong) + show("not in this backbone", extra)
                              + show("missing from the file", missing)
                              + "\n  Pick the matching --arch titan-<variant> (atto, femto, pico, nano, …) for the file.")
    out.update({k: own[k] for k in own if k.startswith("preproc.")})  # our fixed SRM kernel
    return out, notes
