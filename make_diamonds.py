"""Stage 2: pseudo-label confident test faces ("diamonds") with a previous fold ensemble.

    python make_diamonds.py                      # README defaults (the V38 ensemble)
    python make_diamonds.py --prefix v42         # our own fold weights from an earlier run

Inputs:  fold weights titan_backbone_fold[0-4].pth + titan_head_fold[0-4].pth in --weights-dir
         (or --backbones/--heads globs; v42_meta_fold{k}.pth read when present),
         test faces data/faces_512/test, originals data/dataset/train_solution.csv.
Outputs: train_diamond.csv (Id,target_feature,is_pseudo: original rows, then the diamonds;
         a group column of --train-csv is kept, blank for the diamonds),
         beside it train_diamond_scores.csv (Id,prob for every test face),
         train_diamond_hist.png and train_diamond_log.txt/.jsonl.
"""
from __future__ import annotations

import sys
from pathlib import Path

from titan.config import parse_config
from titan.data.labels import LabelCSVError
from titan.errors import run_command
from titan.infer.diamonds import DiamondConfig, DiamondError, make_diamonds
from titan.report.plots import diamond_histogram
from titan.runfiles import log_files
from titan.runlog import RunLog


def parse_args(argv=None) -> DiamondConfig:
    return parse_config(DiamondConfig, argv, __doc__)


def run(cfg: DiamondConfig):
    """The diamonds, then their histogram (drawn by titan.report, which infer/ does not import)."""
    out = Path(cfg.out)
    log = RunLog(*log_files(out.parent, out.stem))
    summary = make_diamonds(cfg, log)
    log.info(f"wrote {diamond_histogram(summary, cfg.hi, cfg.lo)}")
    return summary


def main(argv=None) -> int:
    cfg = parse_args(argv)
    return run_command("make_diamonds.py", lambda: run(cfg), (DiamondError, LabelCSVError), cfg.debug)


if __name__ == "__main__":
    sys.exit(main())
