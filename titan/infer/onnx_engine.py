"""The fold ensemble on ONNX Runtime: ``OnnxEnsemble``, a drop-in for ``ResilientPredictor``.

``export.py`` (``titan.infer.onnx_export``) writes one ``.onnx`` graph — float [0,1] faces
(N,3,S,S) → per-fold logits (n_folds, N) — and a JSON sidecar beside it with the folds'
resolved preprocessing record (``Preprocessing.as_record``), threshold, calibration and digest.
``OnnxEnsemble`` loads both and keeps ``ResilientPredictor.__call__``'s contract: uint8
(B,3,S,S) → logits (n_folds, B), the TTA views averaged per fold, so detect, evaluate and serve
can swap engines. The TTA views are applied here, outside the graph, with the same
``titan.infer.tta.tta_view`` as the PyTorch path, and all views of a chunk go through the graph
as one batch (one session call instead of one per view). ``for_folds`` is how detect, evaluate
and serve (``--engine onnx``) open it: the sidecar must name the same fold files (digest) and the
same graph preprocessing (``GRAPH_FIELDS``) as the folds and flags they resolved, else the export
is stale and refused, naming export.py as the fix.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..checkpoints import CheckpointError
from .folds import FoldSet
from .record import Preprocessing
from .tta import resolve_tta, tta_view

log = logging.getLogger("titan")

FORMAT = "titan-onnx-ensemble/2"  # /2: the preprocessing record as Preprocessing.as_record gives it
# What the graph itself does with the faces, fixed at export: a consumer resolving other values
# needs another export. Crop and TTA are applied outside the graph, by the consumer's own values.
GRAPH_FIELDS = ("arch", "input", "img_size", "mean", "std")
INPUT, OUTPUT = "faces", "logits"
OPTIMIZATION = ("disable", "basic", "extended", "all")


class OnnxEngineError(CheckpointError):
    """The ONNX ensemble or its sidecar is missing, stale or does not fit the input; the message says the fix."""


def sidecar_path(onnx_path: str | os.PathLike) -> Path:
    """The preprocessing record beside ``model.onnx``: ``model.json``."""
    return Path(onnx_path).with_suffix(".json")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_sidecar(onnx_path: str | os.PathLike) -> dict:
    """The sidecar of ``onnx_path`` as a dict; an error naming the file when it is missing or not ours."""
    path = sidecar_path(onnx_path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OnnxEngineError(f"{path}: the ONNX ensemble's sidecar is missing; re-run export.py for {onnx_path}") from None
    except (OSError, ValueError) as e:
        raise OnnxEngineError(f"{path}: unreadable sidecar ({e}); re-run export.py") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise OnnxEngineError(f"{path}: not a Titan ONNX sidecar (format {record.get('format') if isinstance(record, dict) else None!r}, "
                              f"expected {FORMAT!r}); re-run export.py")
    return record


def export_command(onnx_path: str | os.PathLike, record: dict | None = None) -> str:
    """The export.py command that rewrites ``onnx_path`` (for the messages that refuse a stale one)."""
    record = record or {}
    return (f"python export.py --weights-dir {record.get('weights_dir') or 'RUN'} --prefix {record.get('prefix') or 'v42'} "
            f"--out {onnx_path}")


def stack_views(x: torch.Tensor, views: Sequence[str]) -> torch.Tensor:
    """Float (B,3,S,S) → every TTA view of it, view-major: (V·B,3,S,S)."""
    return torch.cat([tta_view(x, v) for v in views]) if len(views) > 1 else tta_view(x, views[0])


def session_options(threads: int = 0, optimization: str = "all"):
    """ONNX Runtime options: ``threads`` intra-op threads (0: torch's own count, which follows
    OMP_NUM_THREADS), one inter-op thread (one graph, run sequentially), graph optimisation level."""
    import onnxruntime as ort

    if optimization not in OPTIMIZATION:
        raise ValueError(f"graph optimisation {optimization!r}: choose one of {', '.join(OPTIMIZATION)}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads) if threads > 0 else torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                   "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[optimization]
    return so


class OnnxEnsemble:
    """Per-fold TTA logits from an exported ensemble; ``__call__`` as ``ResilientPredictor.__call__``.

    ``weights_dir`` (optional): the run folder the export came from; its fold files must still have
    the digest the sidecar records (else the export is stale: an error saying to re-export); a
    loaded fold set is checked with ``for_folds`` instead. ``views``: TTA views (a preset or list); default the sidecar's. ``threads``: intra-op threads
    (0: torch's count). ``batch_size``: inputs per session call, the views of ``batch_size // V`` faces
(measured: a few dozen inputs per call run faster on CPU than every view of 32 faces at once).
CPU only (the onnxruntime package in requirements.txt).
    """

    def __init__(self, onnx_path: str | os.PathLike, weights_dir: str | os.PathLike | None = None, prefix: str = "v42",
                 views: str | Sequence[str] | None = None, threads: int = 0, batch_size: int = 32,
                 optimization: str = "all") -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise OnnxEngineError("the ONNX engine needs onnxruntime: pip install -r requirements.txt") from None
        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise OnnxEngineError(f"{self.path}: no such ONNX file; export one with export.py --weights-dir RUN")
        self.record = read_sidecar(self.path)
        if file_sha256(self.path) != self.record.get("onnx_sha256"):
            raise OnnxEngineError(f"{self.path} does not match its sidecar {sidecar_path(self.path)} (another export's "
                                  "file?); re-run export.py")
        if weights_dir is not None:
            self._check_digest(FoldSet.folder_digest(weights_dir, prefix), f"those now in {weights_dir}")
        self.names: list[str] = list(self.record["folds"])
        self.prep: dict = self.record["preprocessing"]
        self.img_size = int(self.prep["img_size"])
        views = views or self.prep["tta"]
        self.views = resolve_tta(views)
        self.batch_size = max(1, int(batch_size))
        self.device = torch.device("cpu")
        self.notes: list[str] = []
        self.dead: set[int] = set()  # the graph runs every fold at once: none is retired on its own
        self.session = ort.InferenceSession(str(self.path), session_options(threads, optimization),
                                            providers=["CPUExecutionProvider"])
        self.threads = self.session.get_session_options().intra_op_num_threads
        log.info("ONNX ensemble %s: %d fold(s) of %s at %d px, TTA %s, %d intra-op thread(s)", self.path, len(self.names),
                 self.record["arch"], self.img_size, ",".join(self.views), self.threads)

    @classmethod
    def for_folds(cls, onnx_path: str | os.PathLike, fs: FoldSet, prep: Preprocessing, **kwargs) -> "OnnxEnsemble":
        """The export of ``fs`` to score with ``prep`` (its TTA views): refused (``OnnxEngineError``
        naming export.py) unless the sidecar names the same fold files (``fs.digest()``, the same
        folds in the same order) and the same ``GRAPH_FIELDS`` as ``prep``."""
        engine = cls(onnx_path, views=list(prep.tta), **kwargs)
        engine._check_digest(fs.digest(), f"the folds loaded now ({', '.join(fs.names)})")
        want = {k: v for k, v in prep.as_record().items() if k in GRAPH_FIELDS}
        have = {k: engine.prep.get(k) for k in GRAPH_FIELDS}
        clash = [f"{k} {have[k]!r} in the export, {want[k]!r} now" for k in GRAPH_FIELDS if have[k] != want[k]]
        if clash or engine.names != fs.names:
            clash += [] if engine.names == fs.names else [f"folds {engine.names} in the export, {fs.names} now"]
            raise OnnxEngineError(f"{engine.path} was exported with other preprocessing than the folds and flags resolve "
                                  f"to now ({'; '.join(clash)}); re-export with the same flags: "
                                  f"{export_command(engine.path, engine.record)}")
        return engine

    def _check_digest(self, now: str, what: str) -> None:
        if now != self.record.get("folds_digest"):
            raise OnnxEngineError(f"{self.path} is stale: it was exported from other fold files than {what} (digest "
                                  f"{self.record.get('folds_digest')} in its sidecar, {now} now); re-export it: "
                                  f"{export_command(self.path, self.record)}")

    @property
    def n_folds(self) -> int:
        return len(self.names)

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT], {INPUT: x})[0]

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        """uint8 (B,3,S,S) (or float in [0,1]) → logits (n_folds, B), the TTA views averaged per fold."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (self.img_size,) * 2:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise OnnxEngineError(f"the ONNX ensemble {self.path.name} takes (B,3,{self.img_size},{self.img_size}) faces, "
                                  f"got {shape}; resize the faces to the folds' input size")
        out = np.zeros((self.n_folds, x.shape[0]), dtype=np.float32)
        v = len(self.views)
        step = max(1, self.batch_size // v)  # one session call holds batch_size inputs, as one eager forward does
        for i in range(0, x.shape[0], step):
            chunk = x[i:i + step].cpu()
            xf = chunk.float().div_(255.0) if chunk.dtype == torch.uint8 else chunk.float()
            logits = self._run(stack_views(xf, self.views).numpy())  # (n_folds, V·b), view-major
            out[:, i:i + chunk.shape[0]] = logits.reshape(self.n_folds, v, chunk.shape[0]).mean(1)
        return out
