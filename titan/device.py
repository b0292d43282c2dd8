"""The one device policy: which device, which autocast dtype, NHWC or not, uint8 → float, what
``torch.compile`` covers, what counts as out of memory and how a batch shrinks after it.

Training, inference, alignment and the benchmarks all ask here, so a GPU run and a CPU run
differ in one place only.
"""
from __future__ import annotations

import resource
import sys
from contextlib import nullcontext
from typing import Callable, TypeVar

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


HALF = ("auto", "fp16")  # auto: bf16 where supported; fp16: the original project's CUDA AMP


def amp_dtype(device: torch.device, enabled: bool = True, half: str = "auto") -> torch.dtype | None:
    """bf16 on CUDA where supported, else fp16 (``half="fp16"`` forces fp16, as the original
    project's ``torch.cuda.amp`` did); None (fp32) on CPU or when disabled."""
    if half not in HALF:
        raise ValueError(f"half precision {half!r}: choose one of {HALF}")
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if half == "auto" and torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, enabled: bool = True, half: str = "auto"):
    """Autocast at ``amp_dtype`` on CUDA; a no-op context (fp32) elsewhere."""
    dtype = amp_dtype(device, enabled, half)
    return torch.autocast("cuda", dtype=dtype) if dtype is not None else nullcontext()


def full_precision(device: torch.device):
    """Autocast off: for ops that must run in fp32 inside an autocast region (the FFT, kornia's
    colour and JPEG augmentations)."""
    return torch.autocast(device.type, enabled=False)


def make_scaler(device: torch.device, enabled: bool = True, half: str = "auto") -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 (bf16 and fp32 need none)."""
    return torch.amp.GradScaler("cuda" if device.type == "cuda" else "cpu",
                                enabled=amp_dtype(device, enabled, half) == torch.float16)


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


# --- torch.compile -----------------------------------------------------------------------------------

Fn = TypeVar("Fn", bound=Callable)


def eager(fn: Fn) -> Fn:
    """Keep ``fn`` out of ``torch.compile`` graphs: it runs eagerly and the graph resumes after it.

    For the 9-channel input: inductor cannot lower the FFT, so compiling it fails or falls back
    op by op; with the input left eager, everything after it (stem, stages, head, loss) compiles
    as one graph — exactly one graph break, at the input."""
    return torch.compiler.disable(fn)


def compile_model(model: nn.Module) -> nn.Module:
    """``torch.compile`` the model; functions marked ``eager`` (the FFT input) stay out of the graph."""
    return torch.compile(model)


def graph_breaks(model: nn.Module, *args) -> dict:
    """How dynamo splits ``model(*args)`` into graphs: ``graphs``, ``breaks``, ``reasons`` (one
    line each), ``ops`` (traced per graph) and ``fft_in_graph``.

    Tracing only (``torch._dynamo.explain``): no inductor compile, so it is cheap on any device.
    The 9-channel models give one break — at the ``eager`` input — and no FFT inside a graph."""
    import torch._dynamo as dynamo

    ex = dynamo.explain(model)(*args)
    ops = [[str(o) for o in g] for g in ex.ops_per_graph]
    return {"graphs": int(ex.graph_count), "breaks": int(ex.graph_break_count),
            "reasons": [str(getattr(b, "reason", b)).splitlines()[0] for b in ex.break_reasons],
            "ops": [len(g) for g in ops], "fft_in_graph": any("fft" in o for g in ops for o in g)}


# --- memory ------------------------------------------------------------------------------------------

def is_oom(e: BaseException) -> bool:
    """An out-of-memory error on any device (CUDA's own class, or the allocator's message)."""
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and ("out of memory" in str(e).lower() or "can't allocate memory" in str(e).lower()))


def release_memory(device: torch.device) -> None:
    """Return cached blocks after an OOM so the smaller retry starts clean."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def trim_host_memory() -> bool:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``): a long-lived server that decodes
    in many threads otherwise keeps every arena's high-water mark. False where there is no glibc."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def halved(batch: int, multiple_of: int | None = None) -> int:
    """The next batch to try after an OOM: half (at least 1); with ``multiple_of``, the largest
    divisor of it not above half, so that batch × accumulation can stay exactly ``multiple_of``."""
    half = max(1, batch // 2)
    if multiple_of:
        half = next(d for d in range(half, 0, -1) if multiple_of % d == 0)
    return half


def fit_batch(try_batch: Callable[[int], None], start: int, device: torch.device,
              multiple_of: int | None = None) -> tuple[int, list[str]]:
    """The largest batch from ``start`` down (``halved`` after each out-of-memory) for which
    ``try_batch(b)`` runs → (batch, one note per batch that did not fit). Other errors propagate;
    out of memory at batch 1 too is re-raised."""
    batch, notes = start, []
    while True:
        try:
            try_batch(batch)
            return batch, notes
        except Exception as e:  # noqa: BLE001 — only OOM is retried
            if not is_oom(e) or batch == 1:
                raise
            why = f"batch {batch}: out of memory ({type(e).__name__})"
        # Outside the except block, so the failed attempt's tensors are already released.
        notes.append(why)
        release_memory(device)
        batch = halved(batch, multiple_of)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory since ``reset_peak_memory``: CUDA allocated bytes; on CPU the process's peak
    resident set (a whole-process figure: it never goes down)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a wall-clock reading covers the work (timings only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
