"""Run a trained detector on any photo, folder or video: calibrated verdicts, a table, CSV/JSONL, heatmaps, HTML.

    python detect.py photo.jpg                         # one image: verdict on the terminal
    python detect.py photos/ more/*.png clip.mp4 --weights-dir run2 --out detections.csv
    python detect.py photos/ --html report.html --heatmaps heatmaps/

Inputs:  files, folders (recursive), globs and videos (mp4, mov, avi, mkv, webm; --frames sampled
         evenly); the fold weights {prefix}_{backbone,head,meta}_fold{k}.pth of --weights-dir, with
         its metrics_{prefix}.json (threshold, temperature, uncertain band) when there is one.
Outputs: the table on stdout; only what --out (.csv or .jsonl: a row per face and a summary row per
         input), --heatmaps (Grad-CAM PNGs) and --html (one self-contained page) name.
Exit code 0 when at least one input was scored, 2 when none was or no weights load.
"""
import sys

from titan.config import parse_config
from titan.data.images import ImageDecodeError
from titan.errors import run_command
from titan.infer.detect import DetectError, DetectOptions
from titan.report.detect_report import run_detect


def main(argv: list[str] | None = None) -> int:
    opts = parse_config(DetectOptions, argv, __doc__)

    def detect() -> int:
        run = run_detect(opts)
        print(run.table, flush=True)
        return run.exit_code

    return run_command("detect.py", detect, (DetectError, FileNotFoundError, ValueError, ImageDecodeError), opts.debug)


if __name__ == "__main__":
    sys.exit(main())
