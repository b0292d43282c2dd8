"""Export a run's fold ensemble to ONNX, checked against PyTorch on real photos.

One graph per run: float [0,1] faces (N,3,S,S) at the folds' input size → per-fold logits
(n_folds, N), the numbers the PyTorch fold models give for one TTA view (the views are applied
by the caller: ``titan.infer.onnx_engine``). Beside it, a JSON sidecar holds what a consumer
needs: the folds' preprocessing record as ``FoldSet.resolve`` resolves it with the export's flags
(``Preprocessing.as_record``: architecture, input, size, mean/std, crop, TTA views, where each
came from), the threshold, the calibration, the folds' digest and the parity the export measured.

Exporter: torch.onnx's TorchScript exporter (``dynamo=False``), opset 17, works offline for
every architecture of the study. It has no ``aten::fft_rfft2``, so the 9-channel input's FFT is
exported as its DFT written as matrix products (``MatmulFrequencyInput``, exact up to float
rounding); the dynamo exporter would need onnxscript, which the project does not install.

Parity: before anything is written, the graph's logits are compared with PyTorch's on real
photos that scikit-image ships (every TTA view of each), and the export is refused when the
largest difference exceeds ``--tolerance`` (1e-3).
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..checkpoints import atomic_json, atomic_write
from ..config import ScriptOptions, option
from ..data.images import square_resize, to_chw_uint8
from ..models.frequency import FrequencyInput, MatmulFrequencyInput
from ..runfiles import RunFiles
from .folds import FoldSet
from .onnx_engine import FORMAT, INPUT, OUTPUT, OnnxEngineError, file_sha256, session_options, sidecar_path, stack_views
from .resilient import FoldSetFlags

log = logging.getLogger("titan")

OPSET = 17
PARITY_TOLERANCE = 1e-3
PARITY_PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket")  # scikit-image's, offline


class ExportError(OnnxEngineError):
    """The export was refused (no folds, a parity failure); nothing was written."""


@dataclass
class ExportOptions(FoldSetFlags, ScriptOptions):
    """export.py's flags: the folds and their preprocessing flags as every ensemble script has them
    (``FoldSetFlags``; ``--tta`` is the views the sidecar gives a consumer that names none), then its own."""

    out: str = option("", "the .onnx file to write; default WEIGHTS_DIR/PREFIX_ensemble.onnx (the sidecar .json beside it)")
    tolerance: float = option(PARITY_TOLERANCE, "largest |ONNX − PyTorch| logit allowed on the check photos")
    opset: int = option(OPSET, "ONNX opset")


@dataclass
class ExportResult:
    onnx: Path
    sidecar: Path
    max_abs_diff: float
    n_checked: int
    record: dict


class FoldLogits(nn.Module):
    """The fold models side by side: float [0,1] (N,3,S,S) → logits (n_folds, N)."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        self.folds = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x).float() for m in self.folds])


def exportable(model: nn.Module) -> nn.Module:
    """A copy of ``model`` the TorchScript exporter takes: every ``FrequencyInput`` becomes a
    ``MatmulFrequencyInput`` (same weights, the FFT as matrix products)."""
    model = copy.deepcopy(model).eval()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is FrequencyInput:
                twin = MatmulFrequencyInput()
                twin.load_state_dict(child.state_dict())
                setattr(parent, name, twin)
    return model


def parity_faces(size: int) -> tuple[list[str], torch.Tensor]:
    """Real photos scikit-image ships (offline), centre-square resized → (names, uint8 (n,3,S,S))."""
    from skimage import data

    names, faces = [], []
    for name in PARITY_PHOTOS:
        img = getattr(data, name)()
        img = np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3]
        names.append(name)
        faces.append(to_chw_uint8(square_resize(np.ascontiguousarray(img), size)))
    return names, torch.stack(faces)


def _export_graph(graph: nn.Module, example: torch.Tensor, path: str, opset: int) -> None:
    import warnings

    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notes: not ours to act on
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (example,), path, dynamo=False, opset_version=opset, input_names=[INPUT],
                          output_names=[OUTPUT], dynamic_axes={INPUT: {0: "N"}, OUTPUT: {1: "N"}}, do_constant_folding=True)


def check_parity(path: str | Path, reference: nn.Module, x: torch.Tensor) -> float:
    """Largest |ONNX − PyTorch| logit on the float batch ``x``; non-finite output counts as infinite."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    parts = torch.split(x, 4)  # a few inputs at a time: five 512 px folds stay within a laptop's memory
    got = np.concatenate([sess.run([OUTPUT], {INPUT: p.numpy()})[0] for p in parts], axis=1)
    with torch.no_grad():
        want = torch.cat([reference(p) for p in parts], dim=1).numpy()
    if got.shape != want.shape or not np.isfinite(got).all():
        return float("inf")
    return float(np.abs(got - want).max())


def export_onnx(opts: ExportOptions, say: Callable[[str], None] = log.info) -> ExportResult:
    """Write ``opts.out`` (.onnx) and its sidecar (.json), atomically, after the parity check."""
    t0 = time.time()
    out = Path(opts.out) if opts.out else RunFiles(Path(opts.weights_dir), opts.prefix).ensemble_onnx
    if out.suffix != ".onnx":
        raise ExportError(f"--out {out}: name the file .onnx (its sidecar is written beside it as .json)")
    fs = FoldSet.from_folder(opts.weights_dir, opts.prefix)
    prep = opts.resolve(fs, say)
    size, views = prep.img_size, list(prep.tta)
    threshold, th_note = fs.threshold()
    cal = fs.calibration((threshold, th_note), say)
    say(f"export: {fs.describe()} → {out} (opset {opts.opset})")

    reference = FoldLogits([m.eval() for m in fs.models]).eval()
    graph = FoldLogits([exportable(m) for m in fs.models]).eval()
    names, faces = parity_faces(size)
    x = stack_views(faces.float() / 255.0, views)  # every view of every photo: what the engine will feed
    diff = float("inf")

    def write(tmp: str) -> None:
        nonlocal diff
        _export_graph(graph, x[:2], tmp, opts.opset)
        diff = check_parity(tmp, reference, x)
        if not diff <= opts.tolerance:  # also refuses nan
            raise ExportError(f"ONNX logits differ from PyTorch by {diff:.3g} > {opts.tolerance:g} on {len(x)} views of "
                              f"{len(names)} real photos ({', '.join(names)}); nothing written. Rerun with --debug and "
                              "report it (or raise --tolerance if the difference is understood)")

    atomic_write(out, write)
    say(f"parity: max |ONNX − PyTorch| = {diff:.3g} over {len(x)} inputs ({len(names)} photos × {len(views)} views), "
        f"tolerance {opts.tolerance:g}")
    record = {
        "format": FORMAT, "onnx": out.name, "onnx_sha256": file_sha256(out), "opset": opts.opset,
        "exporter": f"torch.onnx TorchScript exporter (dynamo=False), torch {torch.__version__}",
        "input": {"name": INPUT, "shape": ["N", 3, size, size], "dtype": "float32", "range": [0.0, 1.0],
                  "layout": "RGB, NCHW; uint8 faces / 255; the TTA views are applied by the caller"},
        "output": {"name": OUTPUT, "shape": ["n_folds", "N"], "meaning": "fake logit per fold (sigmoid = P(fake))"},
        "arch": fs.arch, "variant": fs.variant, "head": fs.head, "folds": fs.names,
        "preprocessing": prep.as_record(),
        "fft": ("exported as the DFT in matrix products (MatmulFrequencyInput): the TorchScript exporter has no "
                "aten::fft_rfft2") if any(isinstance(m, FrequencyInput) for m in fs.models[0].modules()) else None,
        "threshold": threshold, "threshold_source": th_note,
        "calibration": {"temperature": cal.temperature, "band": cal.band, "threshold": cal.threshold, "note": cal.note},
        "folds_digest": fs.digest(), "weights_dir": str(Path(opts.weights_dir).resolve()), "prefix": opts.prefix,
        "parity": {"max_abs_diff": diff, "tolerance": opts.tolerance, "photos": names, "views": views, "n_inputs": len(x)},
    }
    side = atomic_json(record, sidecar_path(out))
    say(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) and {side.name} in {time.time() - t0:.1f} s")
    return ExportResult(out, side, diff, len(x), record)
