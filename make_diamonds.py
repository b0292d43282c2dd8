"""Stage 2: pseudo-label confident test faces ("diamonds") with a previous fold ensemble.

    python make_diamonds.py                      # README defaults (the V38 ensemble)
    python make_diamonds.py --prefix v42         # our own fold weights from an earlier run

Inputs:  fold weights titan_backbone_fold[0-4].pth + titan_head_fold[0-4].pth in --weights-dir
         (or --backbones/--heads globs; v42_meta_fold{k}.pth read when present),
         test faces data/faces_512/test, originals data/dataset/train_solution.csv.
Outputs: train_diamond.csv (Id,target_feature,is_pseudo: original rows, then the diamonds),
         beside it train_diamond_scores.csv (Id,prob for every test face),
         train_diamond_hist.png and train_diamond_log.txt.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from titan.data import LabelCSVError
from titan.pseudo import DiamondConfig, DiamondError, make_diamonds
from titan.runlog import RunLog
from titan.scoring import add_scoring_args


def parse_args(argv=None) -> DiamondConfig:
    d = DiamondConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_scoring_args(p, d)
    p.add_argument("--backbones", default=d.backbones, help="glob of backbone files (with --heads; replaces --weights-dir/--prefix)")
    p.add_argument("--heads", default=d.heads, help="glob of head files (with --backbones)")
    p.add_argument("--variant", default=d.variant, help="backbone variant; empty = read from the weights")
    p.add_argument("--head", default=d.head, choices=["", "linear", "arcface"], help="head type; empty = read from the weights")
    p.add_argument("--train-csv", default=d.train_csv, help="original labelled rows (Id,target_feature)")
    p.add_argument("--out", default=d.out, help="output CSV")
    p.add_argument("--hi", type=float, default=d.hi, help="P(fake) above this → fake diamond")
    p.add_argument("--lo", type=float, default=d.lo, help="P(fake) below this → real diamond")
    p.add_argument("--tta", default=d.tta, help="TTA views: identity,hflip,vflip,rot+5,rot-5")
    p.add_argument("--max-per-class", type=int, default=d.max_per_class, help="keep at most N most confident per class; 0 = all")
    p.add_argument("--balance", action="store_true", help="keep as many real as fake diamonds (the smaller count)")
    return DiamondConfig(**vars(p.parse_args(argv)))


def main(argv=None) -> int:
    cfg = parse_args(argv)
    out = Path(cfg.out)
    try:
        make_diamonds(cfg, RunLog(out.with_name(out.stem + "_log.txt")))
    except (DiamondError, LabelCSVError) as e:
        print(f"make_diamonds: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
