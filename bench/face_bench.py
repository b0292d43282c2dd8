"""Benchmark face detection: facenet-pytorch's MTCNN as titan called it before against titan's fast path.

    python bench/face_bench.py [--folder DIR] [--limit 100] [--min-face-size 40] [--json out.json]

Both paths see the same photos (decoded with titan.data.images.decode_image and shrunk for
detection as FaceDetector does; decoding is not timed) through ``FaceDetector.detect_all``:
``engine="facenet"`` (facenet's ``MTCNN.detect`` in equal-size buckets, which is photo by photo
when sizes differ) and the default fast engine (titan.data.mtcnn_fast: all photos in one batch).
Per path: whole-run images/s and ms per photo, the faces kept (≥ min_prob) and the largest box
and probability differences and the photos whose faces differ, both against the old path and
against facenet run on each photo alone (untimed; the old path's equal-size batches can pick
another of several equally scored boxes). Rows: old; new with the old pyramid (min face 20);
new with ``--min-face-size`` (default: FaceDetector's, which skips the finest scales).
The methods run interleaved, ``--repeats`` times, best kept; the load average is printed because
the machine may be shared. The default folder is the measurement-only realfaces set beside the
repository (never copied into it).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from titan.config import option, parse_config  # noqa: E402
from titan.data.faces import MIN_FACE_PX, FaceDetector  # noqa: E402
from titan.data.images import IMAGE_EXTS, decode_image  # noqa: E402

REALFACES = Path("shared") / "data" / "realfaces" / "images"


def default_folder() -> Path:
    """../shared/data/realfaces/images beside the repository (beside the main checkout when this is a git worktree)."""
    beside = [ROOT.parent]
    try:
        common = subprocess.run(["git", "rev-parse", "--path-format=absolute", "--git-common-dir"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.strip()
        beside.append(Path(common).parent.parent)
    except (OSError, subprocess.CalledProcessError):
        pass
    return next((b / REALFACES for b in beside if (b / REALFACES).is_dir()), ROOT.parent / REALFACES)


DEFAULT_FOLDER = default_folder()


@dataclass
class FaceBenchOptions:
    """Face detection benchmark: old (facenet) against new (titan.data.mtcnn_fast) on real photos."""

    folder: str = option(str(DEFAULT_FOLDER), "photos to detect faces in")
    limit: int = option(100, "the first N photos of the folder, sorted by name (0 = all)")
    min_face_size: int = option(MIN_FACE_PX, "also time the fast path with this smallest face (the default is FaceDetector's; the old path and the first new row use 20)")
    repeats: int = option(2, "timed runs per path (interleaved; the best is kept)")
    device: str = option("cpu", "device for both paths")
    json: str = option("", "write the figures here too")


def load_photos(folder: Path, limit: int) -> tuple[list[Path], list[np.ndarray]]:
    if not folder.is_dir():
        raise SystemExit(f"face_bench: {folder} not found. Pass --folder DIR with photos (the default is the "
                         f"measurement-only realfaces set, expected at {DEFAULT_FOLDER}).")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)[:limit or None]
    if not paths:
        raise SystemExit(f"face_bench: no images ({', '.join(sorted(IMAGE_EXTS))}) in {folder}; pass --folder DIR")
    return paths, [decode_image(p) for p in paths]


def face_diff(a: list, b: list) -> float:
    """Largest coordinate difference (px) between two photos' faces; inf when their counts differ."""
    if len(a) != len(b):
        return float("inf")
    return max((float(np.abs(np.subtract(fa.box, fb.box)).max()) for fa, fb in zip(a, b)), default=0.0)


def compare(ref: list, got: list, paths: list[Path]) -> dict:
    """Largest box / probability differences over photos with the same face count, and the photos
    whose faces differ (count, or a box by more than 1 px)."""
    box = prob = 0.0
    differ = []
    for p, a, b in zip(paths, ref, got):
        d = face_diff(a, b)
        if d > 1:
            differ.append(p)
        if len(a) == len(b):
            box = max(box, d)
            prob = max([prob] + [abs(fa.prob - fb.prob) for fa, fb in zip(a, b)])
    return {"max_box_diff_px": box, "max_prob_diff": prob, "differing_photos": differ}


def describe(fs: list) -> str:
    return "[" + ", ".join(f"{f.box[2] - f.box[0]:.0f} px wide, p={f.prob:.3f}" for f in fs) + "]"


def main() -> None:
    opts = parse_config(FaceBenchOptions, doc=__doc__)
    paths, images = load_photos(Path(opts.folder), opts.limit)
    detectors = {"old: facenet MTCNN.detect, equal-size buckets, min face 20": FaceDetector(opts.device, engine="facenet", min_face_size=20),
                 "new: titan mtcnn_fast, min face 20": FaceDetector(opts.device, min_face_size=20)}
    if opts.min_face_size != 20:
        detectors[f"new: titan mtcnn_fast, min face {opts.min_face_size}"] = FaceDetector(opts.device, min_face_size=opts.min_face_size)
    small = [next(iter(detectors.values())).detection_input(im) for im in images]
    for det in detectors.values():
        det.detect_all(images[:2], small[:2])  # warm-up (allocator, first-call costs)
    load = [os.getloadavg()[0]]
    secs: dict[str, list[float]] = {k: [] for k in detectors}
    found: dict[str, list] = {}
    for _ in range(opts.repeats):  # interleaved, so drifting machine load hits every path alike
        for name, det in detectors.items():
            t0 = time.perf_counter()
            found[name] = det.detect_all(images, small)
            secs[name].append(time.perf_counter() - t0)
            load.append(os.getloadavg()[0])
    old = next(iter(detectors))
    # facenet on each photo alone: its batched form (old, for photos of equal size) can pick another
    # of several equally scored boxes; the new path always answers as for the photo alone.
    alone = [detectors[old].detect_all([im], [sm])[0] for im, sm in zip(images, small)]
    rows = {}
    for name in detectors:
        best = min(secs[name])
        vs_old, vs_alone = compare(found[old], found[name], paths), compare(alone, found[name], paths)
        rows[name] = {"img_s": len(images) / best, "ms_per_photo": 1000 * best / len(images), "speedup": min(secs[old]) / best,
                      "faces": sum(map(len, found[name])), "vs_old": vs_old, "vs_alone": vs_alone}
    sizes = [im.shape[:2] for im in images]
    print(f"{len(images)} photos from {opts.folder} ({min(sizes)}–{max(sizes)} px), device {opts.device}, "
          f"{torch.get_num_threads()} torch threads on {os.cpu_count()} CPUs, load average (1 min) during the runs "
          f"{min(load):.1f}–{max(load):.1f}, best of {opts.repeats}\n")
    print("| path | img/s | ms/photo | vs old | faces ≥ min_prob | vs old: max box Δ px, max prob Δ, photos differing "
          "| vs facenet per photo: max box Δ px, max prob Δ, photos differing |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        cells = [f"{c['max_box_diff_px']:.2g}, {c['max_prob_diff']:.2g}, {len(c['differing_photos'])}" for c in (r["vs_old"], r["vs_alone"])]
        print(f"| {name} | {r['img_s']:.2f} | {r['ms_per_photo']:.0f} | {r['speedup']:.2f}× | {r['faces']} | {cells[0]} | {cells[1]} |")
    print("\nPhotos whose faces differ (count, or a box by more than 1 px):" if any(
        r["vs_old"]["differing_photos"] or r["vs_alone"]["differing_photos"] for r in rows.values()) else "\nNo photo's faces differ.")
    for name, r in rows.items():
        for p in sorted(set(r["vs_old"]["differing_photos"]) | set(r["vs_alone"]["differing_photos"])):
            i = paths.index(p)
            print(f"- {name}: {p.name}: old {describe(found[old][i])}, facenet alone {describe(alone[i])}, "
                  f"this {describe(found[name][i])}; box Δ vs old {face_diff(found[old][i], found[name][i]):.2g} px, "
                  f"vs alone {face_diff(alone[i], found[name][i]):.2g} px")
        for c in (r["vs_old"], r["vs_alone"]):
            c["differing_photos"] = [p.name for p in c["differing_photos"]]
    if opts.json:
        Path(opts.json).write_text(json.dumps({"photos": len(images), "folder": opts.folder, "device": opts.device,
                                               "threads": torch.get_num_threads(), "load_avg": [min(load), max(load)],
                                               "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
