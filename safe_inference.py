"""Fallback inference: always writes a complete submission from whatever fold weights exist.

    python safe_inference.py                     # README defaults
    python safe_inference.py --tta full          # identity, h-flip and ±5° rotations

Inputs:  fold weights v42_backbone_fold{k}.pth + v42_head_fold{k}.pth (+ v42_meta_fold{k}.pth for
         the threshold) in --weights-dir, any subset; test faces data/faces_512/test; originals
         data/dataset/test_images (re-cropped when a face crop is missing or unreadable).
Outputs: submission_v42.csv (Id,target_feature; every test Id once, in Id order),
         safe_inference_issues.csv (rows re-cropped or given the prior decision, and why),
         safe_inference_log.txt. The last log line says what was degraded.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from titan.fallback import SafeConfig, SafeInferenceError, safe_inference
from titan.runlog import RunLog
from titan.scoring import add_scoring_args


def parse_args(argv=None) -> SafeConfig:
    d = SafeConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_scoring_args(p, d)
    p.add_argument("--raw-test-dir", default=d.raw_test_dir, help="original test images, re-cropped when a face crop fails")
    p.add_argument("--out", default=d.out, help="submission CSV")
    p.add_argument("--issues", default=d.issues, help="issues CSV; empty = safe_inference_issues.csv beside --out")
    p.add_argument("--tta", default=d.tta, help="minimal (identity,hflip), full (identity,hflip,rot+5,rot-5) or a list")
    p.add_argument("--margin", type=float, default=d.margin, help="face-box margin for re-crops of originals")
    return SafeConfig(**vars(p.parse_args(argv)))


def main(argv=None) -> int:
    cfg = parse_args(argv)
    try:
        safe_inference(cfg, RunLog(Path(cfg.out).with_name("safe_inference_log.txt")))
    except SafeInferenceError as e:
        print(f"safe_inference: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
