"""Stage 1: square face crops for every image, with a manifest, resumable.

    python align_faces.py                       # data/dataset/{train,test}_images → data/faces_512/{train,test}
    python align_faces.py --splits test --shard 0/2 --device cuda:0

Inputs:  {--input}/train_images/, {--input}/test_images/ — any PIL-readable image, named {Id}.<ext>.
Outputs: {--output}/{train,test}/{Id}.jpg (size×size; the largest MTCNN face with margin, or the
         centre square when no face is found) and manifest.csv beside them (Id, source, status
         face/fallback/failed, prob, box_x1..box_y2 in source pixels, n_faces, error);
         {--output}/align_faces_log.txt and .jsonl (settings, per-split counts and images/s).
Re-running skips images already done; --overwrite redoes them. Exit code 1 with --strict if any
image failed.
"""
import argparse
import sys

from titan.align import AlignOptions, run_align

D = AlignOptions()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", default=D.input, help="dataset folder holding {split}_images/")
    p.add_argument("--output", default=D.output, help="writes {split}/ under it")
    p.add_argument("--splits", default=D.splits, help="comma-separated splits")
    p.add_argument("--size", type=int, default=D.size, help="output side in pixels")
    p.add_argument("--margin", type=float, default=D.margin, help="crop side = larger box side × (1 + 2·margin)")
    p.add_argument("--device", default=D.device, help="auto = CUDA if present, else cpu")
    p.add_argument("--batch-size", type=int, default=D.batch_size, help="detection batch per size bucket; 0 = 32 on GPU, 8 on CPU")
    p.add_argument("--workers", type=int, default=D.workers, help="image-decoding loader threads (0 = in the main thread)")
    p.add_argument("--writers", type=int, default=D.writers, help="threads cropping and encoding outputs")
    p.add_argument("--format", default=D.format, choices=["jpg", "png"], help="output format")
    p.add_argument("--quality", type=int, default=D.quality, help="JPEG quality")
    p.add_argument("--shard", default=D.shard, help="I/N: process only shard I (0-based) of N, split by a hash of the Id")
    p.add_argument("--max-side", type=int, default=D.max_side, help="shrink larger images for detection only")
    p.add_argument("--min-prob", type=float, default=D.min_prob, help="ignore faces the detector scores below this")
    p.add_argument("--overwrite", action="store_true", help="redo images already done")
    p.add_argument("--strict", action="store_true", help="exit 1 if any image failed")
    opts = AlignOptions(**vars(p.parse_args()))
    summaries = run_align(opts)
    return 1 if opts.strict and any(s.failed for s in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())
