"""Plot training curves and write a one-page run report.

    python plot_training_curves.py [RUN ...] [--out plots] [--explain N --weights-dir . --test-dir data/faces_512/test]

Inputs: each RUN is a log file or a run folder (default: the working directory). A folder's log is
``training_v42_log.jsonl`` (else ``training_v42_log.txt``, also the original project's text format);
beside it ``oof_v42.csv``, ``predictions_v42.csv``, ``metrics_v42.json`` and ``config_v42.json``
are used when present. ``--explain`` reads ``v42_{backbone,head,meta}_fold{k}.pth`` and
``predictions_v42.csv`` from ``--weights-dir`` and the faces in ``--test-dir``.
Outputs (in ``--out``): ssl_loss.png, ft_loss.png, val_f1_auc.png, learning_rate.png, roc_pr.png,
f1_threshold.png, confusion_matrix.png, test_probabilities.png, gradcam.png (with --explain) and
report.md. Several runs are overlaid with a legend. Exit status 2 when a log has no usable line.
"""
from __future__ import annotations

import argparse
import logging
import sys

from titan.checkpoints import CheckpointError
from titan.logparse import LogError
from titan.report import make_report


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="*", default=["."], help="log files or run folders to plot (overlaid)")
    p.add_argument("--out", default="plots", help="folder for the PNGs and report.md")
    p.add_argument("--prefix", default="v42", help="file prefix: training_{prefix}_log.*, oof_{prefix}.csv, {prefix}_*_fold{k}.pth")
    p.add_argument("--explain", type=int, default=0, metavar="N", help="Grad-CAM gallery of N test faces (0 = off)")
    p.add_argument("--weights-dir", default=".", help="fold weights and predictions_{prefix}.csv for --explain")
    p.add_argument("--test-dir", default="data/faces_512/test", help="test face crops for --explain")
    p.add_argument("--img-size", type=int, default=None, help="--explain input size (None: img_size from the fold meta)")
    p.add_argument("--device", default="cpu", help="--explain device (cpu, cuda, auto)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        written = make_report(args.runs, args.out, args.prefix, args.explain, args.weights_dir, args.test_dir,
                              args.img_size, args.device)
    except (LogError, CheckpointError, OSError, ValueError, RuntimeError) as e:  # bad input: say so, exit 2
        print(f"plot_training_curves.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} file(s) to {args.out}: {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
