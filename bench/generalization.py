#!/usr/bin/env python
"""Generalization: one recipe, in-domain folds vs leave-source-out folds, scored per fake kind and source.

    python bench/generalization.py                                   # ../shared/data/realfaces, demo preset
    python bench/generalization.py --data DIR --out runs/gen --preset tiny --n-folds 2
    python bench/generalization.py -- --ft-epochs 4 --arch mobilenetv2   # train_v42_diamond.py flags after --

Inputs:  --data DIR holding images/{Id}.jpg, labels.csv (Id,target_feature; Ids read as strings) and
         sources.csv (Id,target_feature,fake_type,repo,...; real rows have fake_type empty or 'real');
         default <repo>/../shared/data/realfaces.
Outputs (in --out, default runs/generalization): generalization.json (strict JSON: in_domain and
         leave_source_out ROC-AUC with bootstrap 95 % CI, AP, F1 at the run's threshold; per_kind;
         per_source; recipe with seconds per protocol), generalization.md, generalization.png; the
         aligned faces (faces_{size}/), and per protocol its label CSV and training run.
Each protocol runs train_v42_diamond.py --stages finetune; its out-of-fold scores come from models
that never trained on the image. leave_source_out writes group = repo into its label CSV and fails
(exit 2, after writing the in-domain figures) if a repository ended up on both sides of a fold.
A rerun reuses a finished protocol whose label CSV, faces and recipe are unchanged.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from titan.config import parse_config  # noqa: E402
from titan.data.labels import LabelCSVError  # noqa: E402
from titan.errors import run_command  # noqa: E402
from titan.train.generalization import GeneralizationOptions, run_generalization  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    opts = parse_config(GeneralizationOptions, argv[:cut], __doc__)
    def bench() -> int:
        run_generalization(opts, argv[cut + 1:])
        return 0

    return run_command("generalization.py", bench, (FileNotFoundError, FileExistsError, LabelCSVError, ValueError),
                       opts.debug)


if __name__ == "__main__":
    sys.exit(main())
