"""Benchmark align_faces (titan.align) against plain MTCNN.detect image by image.

    python bench/align_bench.py [--n 48] [--device cpu] [--json bench_align.json]

Both sides decode with titan.data.decode_image, keep the largest face scoring ≥ 0.9, crop with
titan.faces.face_crop and write JPEG q95; the baseline does it all in one loop, one image per
MTCNN.detect call. The image set is generated: scikit-image's astronaut rescaled and placed on
varied backgrounds at several canvas sizes, mixed with noise images (no face). Model loading is
excluded from both timings; each side runs --repeats times and the best is kept.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from titan.data.align import AlignOptions, align_split  # noqa: E402
from titan.data.images import encode_image  # noqa: E402
from titan.data.images import decode_image  # noqa: E402
from titan.device import resolve_device  # noqa: E402
from titan.data.faces import FaceDetector, face_crop, largest_face  # noqa: E402
from titan.runlog import RunLog  # noqa: E402

CANVASES = [(256, 256), (360, 480), (480, 360), (512, 512), (480, 640), (600, 400)]


def background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    kind = rng.integers(3)
    if kind == 0:  # flat colour
        return np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (h, w, 3)).copy()
    if kind == 1:  # gradient
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        return np.stack([(xx * a + yy * (1 - a)) * 255 for a in rng.uniform(0, 1, 3)], -1).astype(np.uint8)
    noise = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)  # blurry texture
    return cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)


def make_images(folder: Path, n: int, noise_frac: float = 0.25, seed: int = 0) -> None:
    from skimage.data import astronaut

    rng, face = np.random.default_rng(seed), astronaut()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = CANVASES[i % len(CANVASES)]
        if rng.random() < noise_frac:
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        else:
            img = background(h, w, rng)
            side = int(rng.uniform(0.45, 1.0) * min(h, w))
            y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            img[y:y + side, x:x + side] = cv2.resize(face, (side, side), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(folder / f"img{i:04d}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])


def baseline(detector: FaceDetector, paths: list[Path], out: Path, opts: AlignOptions) -> float:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for p in paths:
        img = decode_image(p)
        boxes, probs = detector.mtcnn.detect(img)
        crop, _ = face_crop(img, largest_face(boxes, probs, detector.min_prob), opts.size, opts.margin)
        (out / f"{p.stem}.jpg").write_bytes(encode_image(crop, "jpg", opts.quality))
    return len(paths) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--n", type=int, default=48, help="images in the generated set")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", default="0", help="ours: detection batch (0 = per device); a list such as 8,1 times each")
    ap.add_argument("--workers", type=int, default=AlignOptions.workers)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "bench_images"
        make_images(src, args.n)
        paths = sorted(src.iterdir())
        batches = [int(b) for b in args.batch_size.split(",")]
        detector = FaceDetector(device)
        detector.detect([decode_image(paths[0])])  # warm-up (cuDNN autotune, allocator)
        log = RunLog(None, None, echo=False)
        base, ours = [], {b or detector.batch_size: [] for b in batches}
        for r in range(args.repeats):  # interleaved, so drifting machine load hits every side alike
            opts = AlignOptions(device=str(device), workers=args.workers, overwrite=True)
            base.append(baseline(detector, paths, Path(tmp) / f"base{r}", opts))
            for b, runs in ours.items():
                detector.batch_size = b
                runs.append(align_split(detector, src, Path(tmp) / f"ours{r}_{b}", "bench", opts, log).img_s)
    first = next(iter(ours))
    res = {"ours_img_s": max(ours[first]), "baseline_img_s": max(base), "ratio": max(ours[first]) / max(base),
           "device": str(device), "n_images": args.n, "batch_size": first, "workers": args.workers,
           "cpu_threads": os.cpu_count(), "ours_by_batch": {b: max(v) for b, v in ours.items()}}
    print("| device | images | method | img/s | vs baseline |\n|---|---|---|---|---|")
    print(f"| {device} | {args.n} | baseline: MTCNN.detect per image | {max(base):.2f} | 1.00× |")
    for b, v in ours.items():
        print(f"| {device} | {args.n} | align_faces, batch {b}, {args.workers} workers | {max(v):.2f} | {max(v) / max(base):.2f}× |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
