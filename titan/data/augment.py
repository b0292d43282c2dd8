"""Batch augmentations on the training device (kornia), parameters drawn per image.

Inputs and outputs are float RGB in [0,1], (B,3,H,W). torchvision v2 on a batched tensor draws
one set of parameters for the whole batch; kornia draws them per image, which is what we want.
Augmentations run in fp32 outside autocast (kornia's colour and JPEG ops are not fp16-safe).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import kornia.augmentation as K

from ..device import full_precision

AUGMENTS = ("finetune", "ssl", "none")


def finetune_augment(jpeg_p: float = 0.3, blur_p: float = 0.15) -> nn.Module:
    """Flip, small affine, colour jitter, blur and JPEG re-compression (quality 40–95).

    The deepfake cues are partly high-frequency, so geometry stays mild and blur/JPEG are
    applied to a minority of images: the model must not learn that 'blurry = real'.
    """
    return K.AugmentationSequential(
        K.RandomHorizontalFlip(p=0.5),
        K.RandomAffine(degrees=8.0, translate=(0.05, 0.05), scale=(0.92, 1.08), padding_mode="reflection", p=0.5),
        K.ColorJiggle(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.8),
        K.RandomGaussianBlur(kernel_size=(5, 5), sigma=(0.1, 1.2), p=blur_p),
        K.RandomJPEG(jpeg_quality=(40.0, 95.0), p=jpeg_p),
    )


def ssl_augment() -> nn.Module:
    """SimMIM needs little: a flip and a light colour change keep the pixels it must predict."""
    return K.AugmentationSequential(
        K.RandomHorizontalFlip(p=0.5),
        K.ColorJiggle(brightness=0.1, contrast=0.1, saturation=0.1, p=0.5),
    )


class _Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def build_augment(kind: str, jpeg_p: float = 0.3, blur_p: float = 0.15) -> nn.Module:
    """``finetune`` | ``ssl`` | ``none`` → a module mapping a [0,1] batch to an augmented [0,1] batch."""
    if kind == "finetune":
        return finetune_augment(jpeg_p, blur_p)
    if kind == "ssl":
        return ssl_augment()
    if kind == "none":
        return _Identity()
    raise ValueError(f"unknown augmentation set {kind!r}; choose one of {AUGMENTS}")


@torch.no_grad()
def augment_batch(aug: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply ``aug`` in fp32 (autocast off) and keep the result in [0,1] and in x's memory format."""
    with full_precision(x.device):
        y = aug(x.float()).clamp_(0.0, 1.0)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        y = y.contiguous(memory_format=torch.channels_last)
    return y
