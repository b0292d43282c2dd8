"""A few kilobytes must not take gigabytes: huge-but-small-on-disk images and a 4096² video through
detect.py stay under a bounded peak memory (decoded images and frames are reduced as they are
decoded, and the decode-ahead and scoring queues are bounded by bytes, not by count)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from fold_fixtures import write_v42_folds

ROOT = Path(__file__).resolve().parents[1]
PEAK_LIMIT_MB = 1536   # the whole process (the bound)
IMAGES_LIMIT_MB = 400  # what the images and the video may add to detect.py's own baseline


def write_big_video(path: Path, side: int = 4096, n: int = 32) -> None:
    """A 4096² clip of ``n`` frames, a few kB: flat frames with a moving bar."""
    import av

    frame = np.full((side, side, 3), 120, np.uint8)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = side, side, "yuv420p"
        for i in range(n):
            img = frame.copy()
            img[:, 64 * i:64 * i + 64] = 250
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode(None):
            c.mux(pkt)


def test_huge_images_and_a_4096_video_stay_under_the_memory_bound(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_v42_folds(run, n=1, size=32)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    big = Image.new("1", (10000, 10000), 1)  # 100 MP, under the limit; 12 kB as a PNG
    for i in range(8):
        big.save(inputs / f"big{i}.png")
    del big
    write_big_video(inputs / "clip.mp4")
    assert sum(p.stat().st_size for p in inputs.iterdir()) < 2_000_000
    small = tmp_path / "small"
    small.mkdir()
    Image.new("RGB", (64, 64), (90, 90, 90)).save(small / "one.png")
    base_mb = peak_of(small, run, tmp_path / "base.csv")[1]  # torch, the models and MTCNN alone
    rc, peak_mb, err = peak_of(inputs, run, tmp_path / "d.csv")
    assert rc == 0, err
    rows = [r for r in csv.DictReader((tmp_path / "d.csv").open()) if r["face"] == ""]
    assert len(rows) == 9 and all(r["status"] in ("ok", "no_face") for r in rows), rows
    print(json.dumps({"peak_rss_mb": peak_mb, "baseline_mb": base_mb}))
    # Measured: 1471 MB here (baseline 1284 MB: importing torch alone is ~700 MB); main peaked at 6.3 GB.
    assert peak_mb - base_mb < IMAGES_LIMIT_MB, f"detect.py peaked at {peak_mb} MB, {peak_mb - base_mb} MB over its baseline"
    assert peak_mb < PEAK_LIMIT_MB or base_mb > PEAK_LIMIT_MB - IMAGES_LIMIT_MB


def peak_of(inputs: Path, run: Path, out: Path) -> tuple[int, int, str]:
    """(exit code, peak RSS in MB, stderr) of detect.py, from a parent that runs only it (so its
    RUSAGE_CHILDREN is detect's peak alone)."""
    argv = [sys.executable, str(ROOT / "detect.py"), str(inputs), "--weights-dir", str(run), "--out", str(out),
            "--device", "cpu", "--no-progress", "--tta", "identity", "--max-side", "512", "--frames", "32"]
    code = ("import resource, subprocess\n"
            f"rc = subprocess.run({argv!r}).returncode\n"
            "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    rc, peak = map(int, proc.stdout.split()[-2:])
    return rc, peak, proc.stderr[-2000:]
