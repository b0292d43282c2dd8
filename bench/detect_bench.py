"""Benchmark detect.py's batched path against a plain per-image loop of the same steps.

    python bench/detect_bench.py [--n 48] [--weights-dir RUN] [--img-size 96] [--tta minimal] [--json out.json]

End to end per image: decode (titan.data.images.decode_image), every face (MTCNN, ≥ 0.9),
align_faces.py's square crop (titan.data.faces.face_crop), the fold ensemble with TTA. The batched
path is ``titan.infer.detect.Detector.run``: decoding threads, faces found in equal-size buckets,
all crops of a chunk scored in batches. The baseline does the same steps one image at a time:
face detection on one image, then one forward pass per fold and view for each of its crops.
The images are bench/align_bench.py's generated set (the astronaut on varied backgrounds at six
canvas sizes, a quarter pure noise). Without --weights-dir the folds are random atto folds at
--img-size (the demo's model: speed does not depend on the weights). Model and detector loading are
excluded; the methods run interleaved, --repeats times, best kept.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from align_bench import make_images  # noqa: E402  (the same generated set as the alignment benchmark)
from titan.checkpoints import save_checkpoint  # noqa: E402
from titan.data.faces import NO_FACE, face_crop  # noqa: E402
from titan.data.images import decode_image, to_chw_uint8  # noqa: E402
from titan.device import to_float_image  # noqa: E402
from titan.infer.detect import Detector, Source  # noqa: E402
from titan.infer.tta import tta_logits  # noqa: E402
from titan.models.convnextv2 import build_backbone  # noqa: E402
from titan.models.heads import build_head  # noqa: E402


def random_folds(folder: Path, n: int, size: int, variant: str = "atto") -> Path:
    for k in range(n):
        bb = build_backbone(variant)
        meta = dict(variant=variant, head="linear", img_size=size, epoch=1)
        save_checkpoint(bb, folder / f"v42_backbone_fold{k}.pth", **meta)
        save_checkpoint(build_head("linear", bb.num_features), folder / f"v42_head_fold{k}.pth", **meta)
    return folder


def per_image(det: Detector, paths: list[Path]) -> list[float]:
    """The baseline: every step for one image before the next image starts."""
    models, views = [f.model for f in det.folds.folds], det.views
    out = []
    for p in paths:
        img = decode_image(p)
        faces = det.face_detector.detect_all([img])[0] or [NO_FACE]
        logits = []
        for f in faces:
            x = to_float_image(to_chw_uint8(face_crop(img, f, det.img_size, det.margin)[0])[None], det.device)
            logits.append(float(torch.stack([tta_logits(m, x, views) for m in models]).mean()))
        out.append(max(logits))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=48, help="generated images (default: %(default)s)")
    ap.add_argument("--weights-dir", default="", help="a run folder to time; default: random atto folds")
    ap.add_argument("--folds", type=int, default=3, help="random folds when no --weights-dir (default: %(default)s)")
    ap.add_argument("--img-size", type=int, default=96, help="random folds' input size (default: %(default)s)")
    ap.add_argument("--tta", default="minimal", help="TTA views for both methods (default: %(default)s)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, auto (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=2, help="decoding threads of the batched path (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per method, best kept (default: %(default)s)")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_images(tmp / "images", args.n)
        paths = sorted((tmp / "images").iterdir())
        run = Path(args.weights_dir) if args.weights_dir else random_folds(tmp, args.folds, args.img_size)
        det = Detector.from_run(run, tta=args.tta, device=args.device, say=lambda s: print(s, file=sys.stderr))
        sources = [Source(str(p), "image") for p in paths]
        det.run(sources[:4], workers=0, progress=False)  # warm-up (allocator, MTCNN, cuDNN)
        methods = {
            "per-image loop (decode, faces, crop, forward: one image at a time)": lambda: per_image(det, paths),
            f"detect batched, {args.workers} decode threads": lambda: det.run(sources, workers=args.workers, progress=False),
            "detect batched, decoding in the main thread": lambda: det.run(sources, workers=0, progress=False),
        }
        best = {k: float("inf") for k in methods}
        for _ in range(args.repeats):
            for name, fn in methods.items():
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
    base = args.n / best[next(iter(methods))]
    device = f"{det.device}" + (f" ({torch.cuda.get_device_name(det.device)})" if det.device.type == "cuda" else
                                f", {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    print(f"\n{args.n} images, {det.folds.describe()}, TTA {','.join(det.views)}, {device}")
    print(f"{'method':<78} {'img/s':>7} {'vs loop':>8}")
    rows = []
    for name, sec in best.items():
        rows.append({"method": name, "img_s": args.n / sec, "speedup": args.n / sec / base})
        print(f"{name:<78} {args.n / sec:7.1f} {args.n / sec / base:7.2f}×")
    if args.json:
        Path(args.json).write_text(json.dumps({"n": args.n, "device": device, "folds": det.folds.describe(),
                                               "tta": det.views, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
