"""The one device policy: which device, which autocast dtype, NHWC or not, and uint8 → float.

Training, inference, alignment and the benchmarks all ask here, so a GPU run and a CPU run
differ in one place only.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when present, else CPU; an explicit CUDA device without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return dev


def configure_cuda(device: torch.device) -> None:
    """Fast CUDA defaults for fixed-size batches: cuDNN autotuning and TF32 matmuls."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def amp_dtype(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """bf16 on CUDA where supported, else fp16; None (fp32) on CPU or when disabled."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, enabled: bool = True):
    """Autocast at ``amp_dtype`` on CUDA; a no-op context (fp32) elsewhere."""
    dtype = amp_dtype(device, enabled)
    return torch.autocast("cuda", dtype=dtype) if dtype is not None else nullcontext()


def full_precision(device: torch.device):
    """Autocast off: for ops that must run in fp32 inside an autocast region (the FFT, kornia's
    colour and JPEG augmentations)."""
    return torch.autocast(device.type, enabled=False)


def make_scaler(device: torch.device, enabled: bool = True) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 (bf16 and fp32 need none)."""
    return torch.amp.GradScaler("cuda" if device.type == "cuda" else "cpu",
                                enabled=amp_dtype(device, enabled) == torch.float16)


def use_channels_last(device: torch.device, wanted: bool = True) -> bool:
    """NHWC only with cuDNN: on CPU it only adds layout copies to ConvNeXt."""
    return wanted and device.type == "cuda"


def place(model: nn.Module, device: torch.device, channels_last: bool = False) -> nn.Module:
    """The model on ``device``, NHWC weights when ``channels_last``."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def to_float_image(x: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """uint8 (B,3,H,W) → float [0,1] on ``device`` (the copy is non-blocking from pinned memory)."""
    x = x.to(device, non_blocking=True)
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
