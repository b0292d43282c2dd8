#!/usr/bin/env python
"""Stage 3: SimMIM pretraining, 5-fold fine-tuning and TTA inference of the V42 detector.

Command (README recipe; every config field is a flag, ``--help`` lists them):
    python train_v42_diamond.py                       # ssl → finetune → infer
    python train_v42_diamond.py --stages infer        # one stage
    python train_v42_diamond.py --estimate            # time each stage briefly, print the projected cost; writes no weights
    python train_v42_diamond.py --batch-size auto     # the largest batch that fits, accumulation keeps batch × accum
    python train_v42_diamond.py --preset tiny --faces-dir data/demo_faces --out-dir runs/tiny
    torchrun --nproc_per_node 8 train_v42_diamond.py  # DDP, same outputs
    python train_v42_diamond.py --arch mobilenetv2    # a baseline of the architecture study:
        # mobilenetv2 | effnet-b3-fpn-cbam skip SSL; --init-weights PATH loads local ImageNet weights

Inputs:  {faces_dir}/train/{Id}.jpg, {faces_dir}/test/{Id}.jpg (default data/faces_512);
         train_csv (default train_diamond.csv: Id,target_feature,is_pseudo[,group]), falling back to
         fallback_csv (data/dataset/train_solution.csv) with a logged notice.
Outputs (in out_dir, default .): titan_v42_ssl.pth; v42_backbone_fold{k}.pth,
         v42_head_fold{k}.pth, v42_meta_fold{k}.pth; oof_v42.csv; metrics_v42.json;
         predictions_v42.csv; submission_v42.csv; training_v42_log.txt / .jsonl;
         config_v42.json; resumable states in {out_dir}/checkpoints_v42/.
A rerun resumes: finished stages and folds are skipped, interrupted ones continue.
"""
from __future__ import annotations

import sys

from titan.checkpoints import CheckpointError
from titan.config import TrainConfig, parse_config
from titan.data.labels import LabelCSVError
from titan.errors import run_command
from titan.train.optim import NonFiniteLossError
from titan.train.pipeline import StageOptions, run_stages


def main(argv: list[str] | None = None) -> int:
    cfg, opts = parse_config(TrainConfig, argv, __doc__, extra=StageOptions)
    # Bad input or a refused resume: the message names the file/row and the fix; no traceback.
    steps = max(1, opts.estimate_steps) if opts.estimate else 0
    return run_command("train_v42_diamond.py", lambda: run_stages(cfg, opts.stage_list(), steps),
                       (FileNotFoundError, LabelCSVError, CheckpointError, NonFiniteLossError, ValueError), opts.debug)


if __name__ == "__main__":
    sys.exit(main())
