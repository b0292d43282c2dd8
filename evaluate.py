"""How far to trust a trained detector: metrics with intervals, calibration and a robustness sweep on any labelled set.

    python evaluate.py --data DIR --labels CSV --weights-dir RUN [--out DIR]
    python evaluate.py --data photos/ --labels photos.csv --weights-dir run2 --reduced   # one level per degradation

Inputs:  labelled photos (raw or already cropped; any format) in --data, their labels
         (Id,target_feature, 1 = fake) in --labels, the fold weights of --weights-dir.
Outputs in --out: metrics.json (F1, precision, recall, ROC-AUC, AP, TPR at 1 % and 5 % FPR,
         missed fakes at the run's and the best threshold, bootstrap 95 % intervals; ECE before and
         after the run's temperature), robustness.csv / .md (degradation × level → AUC, F1, share of
         verdicts flipped), reliability.png, robustness_<degradation>.png, errors.csv, scores.csv
         (every image at every level: the resume point) and evaluation.md tying them together.
Re-running the same command resumes; other weights, images or settings start afresh (said so).
"""
import sys

from titan.config import parse_config
from titan.data.images import ImageDecodeError
from titan.data.labels import LabelCSVError
from titan.errors import run_command
from titan.infer.detect import DetectError
from titan.report.evaluation import EvalOptions, EvaluationError, evaluate


def main(argv: list[str] | None = None) -> int:
    opts = parse_config(EvalOptions, argv, __doc__)
    return run_command("evaluate.py", lambda: evaluate(opts) and 0,
                       (EvaluationError, DetectError, LabelCSVError, ValueError, ImageDecodeError), opts.debug)


if __name__ == "__main__":
    sys.exit(main())
