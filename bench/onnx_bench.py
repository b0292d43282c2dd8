#!/usr/bin/env python
"""ONNX Runtime against eager PyTorch on the same faces: images/s and verdicts (CPU).

    python bench/onnx_bench.py [--models efficientnet-lite0@128,titan-atto@64] [--folds 3] [--n 32]
                               [--threads 1,2] [--tta full] [--optimization all] [--json out.json]

Per model (arch@size): ``--folds`` folds (EfficientNet-Lite0 from its packaged ImageNet weights,
TitanNet from random initialisation, heads seeded: speed does not depend on the weights) are
saved as a run, exported with export.py's ``export_onnx`` (parity checked there), then the same
``--n`` faces — square crops of real photos scikit-image ships — are scored by the eager path
(``ResilientPredictor``: per fold, per view, fp32, each fold in its ``for_inference`` form in CPU
passes of ``CPU_CHUNK`` faces) and by ``OnnxEnsemble`` (all views of a batch
in one session call) at each thread count (torch.set_num_threads / intra-op threads), interleaved,
best of ``--repeats``. Verdicts: ``Calibration`` at the folds' threshold on the fold-mean logits;
the table gives how many differ and the largest logit difference. Model loading and export are
not timed.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from titan.checkpoints import atomic_json, save_checkpoint  # noqa: E402
from titan.config import ScriptOptions, option, parse_config  # noqa: E402
from titan.data.images import square_resize, to_chw_uint8  # noqa: E402
from titan.infer.folds import FoldSet  # noqa: E402
from titan.infer.onnx_engine import OPTIMIZATION, OnnxEnsemble  # noqa: E402
from titan.infer.onnx_export import PARITY_PHOTOS, ExportOptions, export_onnx  # noqa: E402
from titan.infer.resilient import ResilientPredictor  # noqa: E402
from titan.infer.tta import resolve_tta  # noqa: E402
from titan.models.archs import build_arch_backbone, default_start, parse_arch  # noqa: E402
from titan.models.heads import build_head  # noqa: E402


@dataclass
class BenchOptions(ScriptOptions):
    models: str = option("efficientnet-lite0@128,titan-atto@64", "comma-separated arch@size")
    folds: int = option(3, "folds per ensemble")
    n: int = option(32, "faces scored per measurement")
    threads: str = option("1,2", "comma-separated thread counts")
    tta: str = option("full", "TTA views: full, minimal or a list")
    batch_size: int = option(32, "inputs per forward: faces per eager pass, faces × views per ONNX call")
    optimization: str = option("all", f"ONNX Runtime graph optimisation, one or a comma-separated list of {OPTIMIZATION}")
    repeats: int = option(3, "timed runs per path (best kept)")
    json: str = option("", "also write the results here")


def bench_faces(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """``n`` uint8 (3,S,S) faces: random square crops (½ to all of the short side) of real photos."""
    from skimage import data

    rng = np.random.default_rng(seed)
    photos = []
    for name in PARITY_PHOTOS:
        img = getattr(data, name)()
        photos.append(np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3])
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        s = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        out.append(to_chw_uint8(square_resize(np.ascontiguousarray(img[y:y + s, x:x + s]), size)))
    return torch.stack(out)


def make_run(folder: Path, arch: str, size: int, n_folds: int) -> Path:
    for k in range(n_folds):
        torch.manual_seed(1000 + k)
        body = build_arch_backbone(arch, img_size=size)
        if not parse_arch(arch).variant:
            default_start(body, parse_arch(arch))  # EfficientNet-Lite0: its packaged ImageNet weights
        meta = dict(arch=arch, head=parse_arch(arch).head, img_size=size, epoch=1)
        save_checkpoint(body, folder / f"v42_backbone_fold{k}.pth", **meta)
        save_checkpoint(build_head(parse_arch(arch).head, body.num_features), folder / f"v42_head_fold{k}.pth", **meta)
    return folder


def _best(fn, x: torch.Tensor, repeats: int) -> tuple[float, np.ndarray]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(x)
        best = min(best, time.perf_counter() - t0)
    return best, out


def measure(opts: BenchOptions) -> dict:
    views = resolve_tta(opts.tta)
    levels = [s.strip() for s in opts.optimization.split(",") if s.strip()]
    rows = []
    torch_threads = torch.get_num_threads()
    for spec in opts.models.split(","):
        arch, size = spec.strip().split("@")
        size = int(size)
        with tempfile.TemporaryDirectory() as tmp:
            run = make_run(Path(tmp), arch, size, opts.folds)
            exp = export_onnx(ExportOptions(weights_dir=tmp, tta=opts.tta), lambda s: None)
            fs = FoldSet.from_folder(tmp)
            cal = fs.calibration(say=lambda s: None)
            faces = bench_faces(opts.n, size)
            for threads in [int(t) for t in opts.threads.split(",")]:
                torch.set_num_threads(threads)
                eager = ResilientPredictor(fs.models, fs.names, torch.device("cpu"), views, opts.batch_size, amp=False)
                engines = {lv: OnnxEnsemble(exp.onnx, run, threads=threads, batch_size=opts.batch_size, optimization=lv)
                           for lv in levels}
                eager(faces[:2])  # warm-up: allocator, thread pools, the sessions' first run
                for e in engines.values():
                    e(faces[:2])
                t_eager, t_onnx, out = float("inf"), {lv: float("inf") for lv in levels}, {}
                for _ in range(opts.repeats):  # interleaved: a noisy neighbour slows both paths alike
                    t, want = _best(eager, faces, 1)
                    t_eager = min(t_eager, t)
                    for lv, e in engines.items():
                        t, out[lv] = _best(e, faces, 1)
                        t_onnx[lv] = min(t_onnx[lv], t)
                v_eager = cal.verdicts(want.mean(0))[1]
                for lv in levels:
                    rows.append({
                        "model": f"{arch}@{size}", "folds": len(fs.names), "tta": ",".join(views), "threads": threads,
                        "optimization": lv, "n": opts.n,
                        "eager_img_s": opts.n / t_eager, "onnx_img_s": opts.n / t_onnx[lv],
                        "speedup": t_eager / t_onnx[lv],
                        "max_abs_logit_diff": float(np.abs(out[lv] - want).max()),
                        "verdicts_differing": int((cal.verdicts(out[lv].mean(0))[1] != v_eager).sum()),
                        "export_parity": exp.max_abs_diff})
    torch.set_num_threads(torch_threads)
    import onnxruntime

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    opts = parse_config(BenchOptions, argv, __doc__)
    res = measure(opts)
    print("| model | folds × views | threads | graph opt. | eager img/s | ONNX img/s | ONNX / eager | verdicts differing | max Δlogit |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        print(f"| {r['model']} | {r['folds']} × {len(r['tta'].split(','))} | {r['threads']} | {r['optimization']} | "
              f"{r['eager_img_s']:.1f} | {r['onnx_img_s']:.1f} | {r['speedup']:.2f}× | {r['verdicts_differing']}/{r['n']} | "
              f"{r['max_abs_logit_diff']:.1e} |")
    if opts.json:
        atomic_json(res, opts.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
