#!/usr/bin/env python
"""detect.py as a whole process, this checkout against another (a commit, a branch): images/s and verdicts.

    python bench/detect_speed.py --inputs ../shared/data/realfaces/images --n 100 --weights-dir RUN \\
        --baseline-repo ../base [--engines torch,onnx] [--onnx RUN_COPY/v42_ensemble.onnx] \\
        [--threads 2] [--repeats 1] [--json out.json]

The first ``--n`` photos of ``--inputs`` (sorted by name) are linked into a temporary folder, and
``detect.py FOLDER --weights-dir RUN --out rows.csv`` is timed from process start to exit (Python
and torch start-up, loading the folds and MTCNN, decoding, faces, the ensemble, the CSV): the
baseline checkout's detect.py (``--baseline-repo``, run with this interpreter), then this
checkout's with each ``--engines`` entry (``--engine torch`` / ``--engine onnx``), interleaved,
``--repeats`` rounds, the best kept. OMP_NUM_THREADS (``--threads``) and the decoding workers are
the same for every command; each reads the same folds with its defaults (TTA and crop from the
run). Verdicts are compared row by row with the baseline's (each input's summary row): how many
differ and the largest |Δ P(fake)|. The load average is printed before and after (a shared
machine's figures move with it). Exit 1 when a command fails or a verdict differs.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from titan.config import ScriptOptions, option, parse_config  # noqa: E402
from titan.data.images import IMAGE_EXTS  # noqa: E402


@dataclass
class SpeedOptions(ScriptOptions):
    inputs: str = option("", "folder of photos (its first --n by name are scored)")
    n: int = option(100, "photos scored per run")
    weights_dir: str = option("", "the run folder both checkouts read")
    baseline_repo: str = option("", "another checkout whose detect.py is the baseline ('' = none: this checkout only)")
    engines: str = option("torch", "this checkout's engines to time: torch, onnx or torch,onnx")
    onnx: str = option("", "--engine onnx's graph ('' = detect.py's default: WEIGHTS_DIR/PREFIX_ensemble.onnx)")
    threads: int = option(2, "OMP_NUM_THREADS of every command")
    workers: int = option(2, "detect.py's decoding threads (--workers) for every command")
    repeats: int = option(1, "interleaved rounds (the best time kept)")
    json: str = option("", "also write the results here")


def link_photos(folder: str, n: int, into: Path) -> list[Path]:
    """The first ``n`` images of ``folder`` by name, linked (not copied) into ``into``."""
    photos = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTS)[:n]
    if not photos:
        raise SystemExit(f"{folder}: no image ({', '.join(IMAGE_EXTS)}) to score")
    into.mkdir(parents=True)
    for p in photos:
        (into / p.name).symlink_to(p.resolve())
    return photos


def summary_rows(path: Path) -> dict[str, dict]:
    """Each input's summary row (empty ``face``) of a detect.py CSV, by file name."""
    with open(path, newline="", encoding="utf-8") as f:
        return {Path(r["path"]).name: r for r in csv.DictReader(f) if not r["face"]}


def compare(base: dict[str, dict], other: dict[str, dict]) -> tuple[int, float, list[str]]:
    """(verdicts that differ, largest |Δ prob|, the inputs whose verdict differs) over the inputs both scored."""
    differ, worst = [], 0.0
    for name, row in base.items():
        o = other.get(name)
        if o is None or o["verdict"] != row["verdict"]:
            differ.append(name)
            continue
        if row["prob"] and o["prob"]:
            worst = max(worst, abs(float(row["prob"]) - float(o["prob"])))
    return len(differ), worst, differ


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv=None) -> int:
    opts = parse_config(SpeedOptions, argv, __doc__)
    if not opts.inputs or not opts.weights_dir:
        raise SystemExit("give --inputs FOLDER and --weights-dir RUN")
    env = {**os.environ, "OMP_NUM_THREADS": str(opts.threads), "MKL_NUM_THREADS": str(opts.threads)}
    commands: dict[str, tuple[Path, list[str]]] = {}
    if opts.baseline_repo:
        commands[f"baseline {opts.baseline_repo}"] = (Path(opts.baseline_repo), [])
    for engine in [e.strip() for e in opts.engines.split(",") if e.strip()]:
        extra = ["--engine", engine] + (["--onnx", opts.onnx] if engine == "onnx" and opts.onnx else [])
        commands[f"this checkout, --engine {engine}"] = (ROOT, extra)
    best = {k: float("inf") for k in commands}
    before = load_average()
    print(f"load average before: {before} ({os.cpu_count()} cores)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        photos = link_photos(opts.inputs, opts.n, Path(tmp) / "photos")
        outs = {k: Path(tmp) / f"rows{i}.csv" for i, k in enumerate(commands)}
        for _ in range(max(1, opts.repeats)):
            for name, (repo, extra) in commands.items():
                cmd = [sys.executable, str(repo / "detect.py"), str(Path(tmp) / "photos"), "--weights-dir",
                       opts.weights_dir, "--out", str(outs[name]), "--workers", str(opts.workers), *extra]
                t0 = time.perf_counter()
                done = subprocess.run(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                sec = time.perf_counter() - t0
                if done.returncode != 0:
                    print(f"{name}: exit {done.returncode}\n{done.stderr[-3000:]}", file=sys.stderr)
                    return 1
                best[name] = min(best[name], sec)
                print(f"  {name}: {sec:.1f} s", flush=True)
        rows = {k: summary_rows(p) for k, p in outs.items()}
    after = load_average()
    ref = next(iter(commands))
    n = len(photos)
    print(f"\n{n} photos of {opts.inputs}, run {opts.weights_dir}, OMP_NUM_THREADS={opts.threads}, "
          f"best of {opts.repeats}; load average after: {after}")
    print(f"{'command':<60} {'s':>7} {'img/s':>7} {'speed-up':>9} {'verdicts differ':>16} {'max |Δp|':>9}")
    results, failed = [], False
    for name in commands:
        differ, worst, which = compare(rows[ref], rows[name])
        failed |= differ > 0
        results.append({"command": name, "seconds": best[name], "img_s": n / best[name], "speedup": best[ref] / best[name],
                        "verdicts_differ": differ, "differ": which[:20], "max_abs_prob_diff": worst})
        print(f"{name:<60} {best[name]:7.1f} {n / best[name]:7.2f} {best[ref] / best[name]:8.2f}× {differ:>16} {worst:9.2g}")
    if opts.json:
        Path(opts.json).write_text(json.dumps({"n": n, "inputs": opts.inputs, "weights_dir": opts.weights_dir,
                                               "threads": opts.threads, "repeats": opts.repeats, "cores": os.cpu_count(),
                                               "load_before": before, "load_after": after, "results": results}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
