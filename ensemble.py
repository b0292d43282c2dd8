#!/usr/bin/env python
"""An ensemble of training runs (e.g. a Lite0 run and a CLIP probe run), fitted on their combined OOF.

    python ensemble.py runs/lite0 runs/clip --out runs/ens
    python detect.py photos/ --weights-dir runs/ens        # detect, evaluate, serve, safe_inference score it

Inputs:  two or more run folders, each with its folds ({prefix}_{backbone,head,meta}_fold{k}.pth) and
         oof_{prefix}.csv for the same Ids (same labels).
Outputs: {out}/ensemble.json (the members with their digests; the threshold, temperature and band fitted on
         the mean of the members' OOF logits; the OOF metrics) and {out}/oof_ensemble.csv.
Exit code 0 when fitted, 2 when the members do not make an ensemble (the message says why).
"""
import sys

from titan.config import parse_config
from titan.errors import run_command
from titan.infer.ensemble import EnsembleFitOptions, fit_ensemble
from titan.infer.folds import FoldSetError


def main(argv: list[str] | None = None) -> int:
    opts = parse_config(EnsembleFitOptions, argv, __doc__)
    return run_command("ensemble.py", lambda: fit_ensemble(opts.members, opts.out, opts.prefix, say=print),
                       (FoldSetError, FileNotFoundError, ValueError), opts.debug)


if __name__ == "__main__":
    sys.exit(main())
