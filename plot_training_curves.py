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

import logging
import sys

from titan.checkpoints import CheckpointError
from titan.config import parse_config
from titan.errors import run_command
from titan.report.logparse import LogError
from titan.report.run_report import ReportOptions, make_report


def parse_args(argv=None) -> ReportOptions:
    return parse_config(ReportOptions, argv, __doc__)


def main(argv=None) -> int:
    opts = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    def report() -> int:
        written = make_report(opts)
        print(f"wrote {len(written)} file(s) to {opts.out}: {', '.join(written)}")
        return 0

    # Bad input (a log with no usable line, unreadable weights, no test faces …): one line, exit 2.
    return run_command("plot_training_curves.py", report,
                       (LogError, CheckpointError, FileNotFoundError, ValueError, RuntimeError), opts.debug)


if __name__ == "__main__":
    sys.exit(main())
