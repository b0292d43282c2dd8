"""Safe inference: always writes a complete submission from whatever fold weights exist.

    python safe_inference.py                     # README defaults
    python safe_inference.py --tta full          # identity, h-flip and ±5° rotations

Inputs:  fold weights v42_backbone_fold{k}.pth + v42_head_fold{k}.pth (+ v42_meta_fold{k}.pth for
         the threshold) in --weights-dir, any subset; test faces data/faces_512/test; originals
         data/dataset/test_images (re-cropped when a face crop is missing or unreadable).
Outputs: submission_v42.csv (Id,target_feature; every test Id once, in Id order),
         safe_inference_issues.csv (rows re-cropped or given the prior decision, and why),
         safe_inference_log.txt/.jsonl. The last log line says what was degraded.
"""
from __future__ import annotations

import sys
from pathlib import Path

from titan.config import parse_config
from titan.errors import run_command
from titan.infer.safe import SafeConfig, SafeInferenceError, safe_inference
from titan.runfiles import log_files
from titan.runlog import RunLog


def parse_args(argv=None) -> SafeConfig:
    return parse_config(SafeConfig, argv, __doc__)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    return run_command("safe_inference.py",
                       lambda: safe_inference(cfg, RunLog(*log_files(Path(cfg.out).parent, "safe_inference"))),
                       (SafeInferenceError,), cfg.debug)


if __name__ == "__main__":
    sys.exit(main())
