#!/usr/bin/env python
"""JPEG decode + resize throughput per loader worker at 512 px: the CPU path and the --gpu-decode path.

    python bench/data_bench.py [--n 64] [--size 512] [--device auto] [--json out.json]

CPU path: what one loader worker does per face (``FaceDataset.load``: ``decode_image`` with PIL,
EXIF and colour handling, ``square_resize``, uint8 CHW), one process, one OpenCV thread — images/s
per worker. ``--gpu-decode`` path: the worker only reads the file's bytes; the batch is decoded by
``decode_on_device`` (``torchvision.io.decode_jpeg`` on the device, nvJPEG on CUDA) and resized
there. On a machine without CUDA the second path runs on the CPU and is labelled so.

Sources are generated JPEGs (q95, textured like faces): 512² (what align_faces.py writes) and
1024² (resized down to 512), so both decode and resize are timed.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from titan.data.datasets import EncodedFaceDataset, FaceDataset, collate_encoded, decode_on_device  # noqa: E402
from titan.device import resolve_device, synchronize  # noqa: E402


def make_jpegs(folder: Path, n: int, side: int, seed: int = 0) -> list[str]:
    """``n`` side×side JPEGs (q95): smooth shading plus fine noise, so they compress like photos."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:side, :side] / side
    ids = []
    for i in range(n):
        base = np.stack([128 + 90 * np.sin(6 * xx * rng.uniform(0.5, 2) + c) * np.cos(4 * yy) for c in range(3)], -1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / f"{i}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        ids.append(str(i))
    return ids


def cpu_path(folder: Path, ids: list[str], size: int, repeats: int) -> float:
    """Images/s of one worker running FaceDataset.load (best of ``repeats``)."""
    ds = FaceDataset(ids, folder, size)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(len(ds)):
            ds.load(i)
        best = max(best, len(ds) / (time.perf_counter() - t0))
    return best


def gpu_decode_path(folder: Path, ids: list[str], size: int, device: torch.device, batch: int, repeats: int) -> tuple[float, float]:
    """(images/s of one worker reading bytes, images/s of decode_on_device on ``device``)."""
    ds = EncodedFaceDataset(ids, folder, size)
    t0 = time.perf_counter()
    payloads = [ds[i] for i in range(len(ds))]
    read = len(ds) / (time.perf_counter() - t0)
    batches = [collate_encoded(payloads[k:k + batch])[0] for k in range(0, len(payloads), batch)]
    decode_on_device(batches[0], size, device)  # warm-up (nvJPEG handles, kernels)
    best = 0.0
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        for b in batches:
            decode_on_device(b, size, device)
        synchronize(device)
        best = max(best, len(ds) / (time.perf_counter() - t0))
    return read, best


def measure(device: torch.device, n: int = 64, size: int = 512, batch: int = 32, repeats: int = 2) -> dict:
    """Per source size: CPU-path images/s per worker, and the --gpu-decode path's two rates."""
    cv2.setNumThreads(1)  # one worker = one core: what a DataLoader worker gets
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {"device": str(device), "size": size, "n": n, "rows": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for side in (512, 1024):
                folder = Path(tmp) / str(side)
                ids = make_jpegs(folder, n, side)
                read, dec = gpu_decode_path(folder, ids, size, device, batch, repeats)
                out["rows"].append({"source": f"{side}²", "cpu_worker_img_s": cpu_path(folder, ids, size, repeats),
                                    "gpu_decode_read_img_s": read, "gpu_decode_img_s": dec,
                                    "gpu_decode_device": device.type})
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(-1)
    return out


def workers_needed(step_img_s: float, per_worker_img_s: float) -> int:
    """Loader workers that keep a model at ``step_img_s`` fed (each decodes ``per_worker_img_s``)."""
    return max(1, int(np.ceil(step_img_s / per_worker_img_s)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="images per source size")
    ap.add_argument("--size", type=int, default=512, help="training input side")
    ap.add_argument("--batch", type=int, default=32, help="--gpu-decode batch")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    res = measure(resolve_device(a.device), a.n, a.size, a.batch)
    print("| source → 512 | CPU path: img/s per worker | --gpu-decode: worker reads img/s | --gpu-decode: decode+resize img/s (device) |")
    print("|---|---|---|---|")
    for r in res["rows"]:
        print(f"| {r['source']} | {r['cpu_worker_img_s']:.1f} | {r['gpu_decode_read_img_s']:.0f} | "
              f"{r['gpu_decode_img_s']:.1f} ({r['gpu_decode_device']}) |")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
