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


def parse_args(argv=None) -> SafeConfig:
    d = SafeConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights-dir", default=d.weights_dir, help="folder holding the fold weights")
    p.add_argument("--prefix", default=d.prefix, help="file prefix of the fold weights")
    p.add_argument("--test-dir", default=d.test_dir, help="test face crops")
    p.add_argument("--raw-test-dir", default=d.raw_test_dir, help="original test images, re-cropped when a face crop fails")
    p.add_argument("--out", default=d.out, help="submission CSV")
    p.add_argument("--issues", default=d.issues, help="issues CSV; empty = safe_inference_issues.csv beside --out")
    p.add_argument("--img-size", type=int, default=d.img_size, help="input size; 0 = from checkpoint metadata, else 512")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per forward pass (halved on OOM)")
    p.add_argument("--device", default=d.device, help="auto, cuda, cpu; an unusable CUDA falls back to CPU")
    p.add_argument("--tta", default=d.tta, help="minimal (identity,hflip), full (identity,hflip,rot+5,rot-5) or a list")
    p.add_argument("--margin", type=float, default=d.margin, help="face-box margin for re-crops of originals")
    p.add_argument("--num-workers", type=int, default=d.num_workers, help="image-decoding workers")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="disable CUDA autocast")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
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
