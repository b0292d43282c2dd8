#!/usr/bin/env python
"""The architecture study: MobileNetV2, EfficientNet-B3 + FPN + CBAM and TitanNet on the same folds.

    python bench/compare_archs.py                                   # the demo set, README budget
    python bench/compare_archs.py --data DIR --archs mobilenetv2,titan-atto --epochs 3 --img-size 128 --out runs/archs

Inputs:  --data DIR in the README layout: DIR/data/dataset/train_solution.csv (Id,target_feature) and
         the faces in DIR/data/faces_512/train/ (else the uncropped DIR/data/dataset/train_images/).
         Without --data the demo set is built in OUT/demo_data (python -m titan.demo).
Outputs (in --out, default runs/archs): archs.csv and archs.md (F1, precision, recall, ROC-AUC, missed
         fakes / fakes out-of-fold, seconds per fine-tuning epoch, parameters); per architecture
         OUT/{arch}/ with the training pipeline's usual files (folds, oof_v42.csv, logs).
Every architecture gets the same folds (--fold-seed) and budget (--epochs, --img-size, --batch-size,
--n-folds; --ssl-epochs for TitanNet only: the baselines skip SSL). A rerun reuses finished rows.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from titan.config import PRESETS  # noqa: E402
from titan.runlog import RunLog  # noqa: E402
from titan.train.study import DEFAULT_ARCHS, build_demo, find_data, run_study  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default=",".join(DEFAULT_ARCHS),
                   help="comma-separated: titan-v42, titan-v38, titan-<atto|femto|pico|nano>, mobilenetv2, "
                        "effnet-b3-fpn-cbam (default: %(default)s)")
    p.add_argument("--data", default="", help="dataset root in the README layout (default: build the demo set in OUT/demo_data)")
    p.add_argument("--out", default="runs/archs", help="output folder (default: %(default)s)")
    p.add_argument("--preset", default="default", choices=sorted(PRESETS), help="base training config (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs per fold (default: %(default)s)")
    p.add_argument("--ssl-epochs", type=int, default=50, help="SimMIM epochs, TitanNet only (default: %(default)s)")
    p.add_argument("--img-size", type=int, default=512, help="image size, a multiple of 32 (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size (default: %(default)s)")
    p.add_argument("--accum-steps", type=int, default=4, help="gradient accumulation steps (default: %(default)s)")
    p.add_argument("--n-folds", type=int, default=5, help="stratified folds (default: %(default)s)")
    p.add_argument("--fold-seed", type=int, default=3407, help="seed of the fold split (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: %(default)s)")
    p.add_argument("--num-workers", type=int, default=4, help="data loader workers (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="CPU intra-op threads, 0 = torch's default (default: %(default)s)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    log = RunLog(out / "compare_archs_log.txt", out / "compare_archs_log.jsonl")
    root = a.data or build_demo(out / "demo_data", log)
    data = find_data(root, out / "faces")
    log.info(f"data: {data.note}; labels {data.labels}")
    budget = dict(ft_epochs=a.epochs, ssl_epochs=a.ssl_epochs, img_size=a.img_size, batch_size=a.batch_size,
                  accum_steps=a.accum_steps, n_folds=a.n_folds, fold_seed=a.fold_seed, device=a.device,
                  num_workers=a.num_workers, threads=a.threads)
    archs = [s.strip() for s in a.archs.split(",") if s.strip()]
    table = run_study(archs, data, out, a.preset, budget, log)
    print((out / "archs.md").read_text())
    return 0 if len(table) == len(archs) else 1


if __name__ == "__main__":
    sys.exit(main())
