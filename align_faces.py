"""Stage 1: square face crops for every image, with a manifest, resumable.

    python align_faces.py                       # data/dataset/{train,test}_images → data/faces_512/{train,test}
    python align_faces.py --splits test --shard 0/2 --device cuda:0
    python align_faces.py --estimate            # time a sample, print the projected cost; writes no crops

Inputs:  {--input}/train_images/, {--input}/test_images/ — any PIL-readable image, named {Id}.<ext>.
Outputs: {--output}/{train,test}/{Id}.jpg (size×size; the largest MTCNN face with margin, or the
         centre square when no face is found) and manifest.csv beside them (Id, source, status
         face/fallback/failed, prob, box_x1..box_y2 in source pixels, n_faces, error);
         {--output}/align_faces_log.txt and .jsonl (settings, per-split counts and images/s).
Re-running skips images already done; --overwrite redoes them. Exit code 1 with --strict if any
image failed.
"""
import sys

from titan.config import parse_config
from titan.data.align import AlignOptions, estimate_align, run_align
from titan.data.images import ImageDecodeError
from titan.errors import run_command


def main(argv: list[str] | None = None) -> int:
    opts = parse_config(AlignOptions, argv, __doc__)

    def align() -> int:
        if opts.estimate:
            estimate_align(opts)
            return 0
        summaries = run_align(opts)
        return 1 if opts.strict and any(s.failed for s in summaries) else 0

    return run_command("align_faces.py", align, (FileNotFoundError, ValueError, ImageDecodeError), opts.debug)


if __name__ == "__main__":
    sys.exit(main())
