"""Export a training run's fold ensemble to ONNX, checked against PyTorch.

    python export.py --weights-dir run2                      # → run2/v42_ensemble.onnx + run2/v42_ensemble.json
    python export.py --weights-dir run2 --out model/titan.onnx --tta minimal
    python detect.py photos/ --weights-dir run2 --engine onnx                # score with it (evaluate.py, serve.py too)

Inputs:  the run's fold weights ({prefix}_backbone_fold{k}.pth + head, meta) and, when present,
         metrics_{prefix}.json / oof_{prefix}.csv (threshold, temperature, uncertain band).
Outputs: one .onnx graph — float [0,1] faces (N,3,S,S) at the folds' input size → per-fold fake
         logits (n_folds, N) for one TTA view — and beside it a .json sidecar: the folds'
         preprocessing record as resolved with these flags (arch, input, size, mean/std, crop, TTA
         views, each value's source), threshold, calibration, the folds' digest and the measured
         parity. Both written atomically. Reference: docs/export.md.
Exit 2 (nothing written) when the ONNX logits differ from PyTorch's by more than --tolerance on
the check photos, or when the folds do not load. Run with titan.infer.onnx_engine.OnnxEnsemble.
"""
from __future__ import annotations

import sys

from titan.checkpoints import CheckpointError
from titan.config import parse_config
from titan.errors import run_command
from titan.infer.onnx_export import ExportOptions, export_onnx
from titan.runlog import RunLog


def main(argv=None) -> int:
    opts = parse_config(ExportOptions, argv, __doc__)
    return run_command("export.py", lambda: export_onnx(opts, RunLog(None).info), (CheckpointError, ValueError), opts.debug)


if __name__ == "__main__":
    sys.exit(main())
