#!/usr/bin/env python
"""`make bench`: every benchmark on whatever device is here → bench/results/<device>.json and .md.

    python bench/bench_all.py [--setting auto|cpu|readme] [--out bench/results]

Settings: ``readme`` (the default where CUDA is present) — v42 at 512 px, the README batch;
``cpu`` (the default without CUDA) — sized to finish in a few minutes on 2 cores.

1. The original's way of training against ours on one model and batch (bench/train_bench.py
   ``compare``: images/s, ratio, TFLOP/s, share of the device's peak), with the graph-break check.
2. The README recipe (≈58k faces at 512 px, 50 SimMIM epochs, 5 folds × 10 epochs, 4-view TTA)
   projected for this device: ``train_v42_diamond.py --estimate`` — the same code — runs on a
   generated set of 512-px faces with v42, and each stage's warm images/s is applied to the
   recipe's images (``titan.costs.recipe_workload``). The original's training stages are that
   time ÷ the measured ratio (its validation and inference run as ours do).
3. JPEG decode + resize per loader worker at 512 px, CPU and --gpu-decode (bench/data_bench.py),
   and the workers that keep one H100 fed.
4. Face alignment against MTCNN.detect image by image (bench/align_bench.py).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import data_bench  # noqa: E402
import train_bench  # noqa: E402
from titan.config import make_config  # noqa: E402
from titan.costs import RECIPE, duration, recipe_workload  # noqa: E402
from titan.device import resolve_device  # noqa: E402
from titan.runlog import read_jsonl  # noqa: E402
from titan.train.pipeline import STAGES, run_stages  # noqa: E402

H100_BF16_PEAK = 989e12   # dense bf16 FLOP/s
ASSUMED_MFU = 0.30        # share of that peak a ConvNeXt training step reaches (used only without a GPU)

SETTINGS = {
    # compare: variant, size, batch, timed steps, warm-up steps, ways; estimate: batch, accum, infer batch, workers, steps, faces
    "readme": dict(compare=("v42", 512, 8, 20, 5, train_bench.WAYS), estimate=dict(batch_size=8, accum_steps=4,
                   infer_batch_size=32, num_workers=4, compile=False), estimate_steps=8, faces=(64, 32),
                   data_n=64, align=["--n", "48", "--repeats", "2"]),
    # CPU: atto at 128 px for the comparison; torch.compile is left out (inductor takes minutes to
    # build it on 2 cores); the recipe estimate at v42 512 px with 2-image batches.
    "cpu": dict(compare=("atto", 128, 4, 4, 1, ("original", "ours")), estimate=dict(batch_size=2, accum_steps=1,
                infer_batch_size=2, num_workers=0, compile=False), estimate_steps=1, faces=(10, 4),
                data_n=32, align=["--n", "16", "--repeats", "1", "--batch-size", "8"]),
}


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        model = next((ln.split(":", 1)[1] for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("model name")), "cpu") if Path("/proc/cpuinfo").is_file() else "cpu"
        name = f"cpu {model} {os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def make_faces(root: Path, n_train: int, n_test: int, size: int = 512) -> None:
    """Generated 512-px JPEG faces and labels in the README layout (content does not matter for speed)."""
    rng = np.random.default_rng(0)
    rows = []
    for split, n in (("train", n_train), ("test", n_test)):
        (root / "faces" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = np.clip(rng.normal(128, 40, (size // 8, size // 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).resize((size, size), Image.BICUBIC).save(root / "faces" / split / f"{split}{i}.jpg", quality=95)
            if split == "train":
                rows.append((f"train{i}", i % 2))
    pd.DataFrame(rows, columns=["Id", "target_feature"]).to_csv(root / "labels.csv", index=False)


def recipe_estimate(s: dict, say=print) -> dict:
    """Per-stage warm images/s of v42 at 512 px from ``--estimate`` on generated faces, and the
    README recipe projected with them."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_faces(root, *s["faces"])
        cfg = make_config(overrides=dict(faces_dir=str(root / "faces"), train_csv=str(root / "labels.csv"),
                                         out_dir=str(root / "out"), raw_test_dir=str(root / "none"), **s["estimate"]))
        t0 = time.perf_counter()
        run_stages(cfg, STAGES, s["estimate_steps"])
        recs, _ = read_jsonl(root / "out" / "estimate_v42_log.jsonl")
    est = [r for r in recs if r["event"] == "estimate"][-1]
    work = recipe_workload()
    keys = {"SSL step": "ssl", "fine-tune step (+aug)": "finetune", "validation": "validation"}
    stages = []
    for st in est["stages"]:
        key = keys.get(st["stage"], "infer")
        stages.append({**st, "recipe_images": work[key].images, "recipe_steps": work[key].steps,
                       "recipe_seconds": work[key].images / st["img_s"]})
    total = sum(st["recipe_seconds"] for st in stages)
    say(f"README recipe on this device (v42, 512 px): {duration(total)} "
        + ", ".join(f"{st['stage']} {duration(st['recipe_seconds'])}" for st in stages)
        + f"  [estimate took {time.perf_counter() - t0:.0f} s]")
    return {"settings": {**s["estimate"], "estimate_steps": s["estimate_steps"], "faces": s["faces"]},
            "recipe": RECIPE, "stages": stages, "total_hours": total / 3600}


def flops_per_image(variant: str = "v42", size: int = 512) -> float:
    """Forward + backward FLOPs of one fine-tuning image (counted on the CPU, batch 1)."""
    from titan.models.classifier import Classifier
    from titan.models.convnextv2 import build_backbone
    from titan.models.heads import build_head

    b = build_backbone(variant)
    m = Classifier(b, build_head("linear", b.num_features))
    return train_bench.step_flops(lambda: m(torch.rand(1, 3, size, size), torch.ones(1))[1].backward())


def feeding(device: torch.device, data: dict, recipe: dict) -> dict:
    """Loader workers one H100 needs: the fine-tuning step rate (measured on CUDA; without one,
    ASSUMED_MFU of the H100's bf16 peak ÷ FLOPs per image) ÷ one worker's decode rate at 512 px."""
    per_worker = next(r for r in data["rows"] if r["source"] == "512²")["cpu_worker_img_s"]
    ft = next(st for st in recipe["stages"] if st["stage"].startswith("fine-tune"))
    if device.type == "cuda":
        rate, how = ft["img_s"], f"measured fine-tuning step rate on {torch.cuda.get_device_name(device)}"
    else:
        f = flops_per_image()
        rate = ASSUMED_MFU * H100_BF16_PEAK / f
        how = (f"projected: {ASSUMED_MFU:.0%} of the H100's {H100_BF16_PEAK / 1e12:.0f} TFLOP/s bf16 peak ÷ "
               f"{f / 1e9:.0f} GFLOP per image (forward + backward, v42 at 512 px)")
    return {"step_img_s": rate, "how": how, "per_worker_img_s": per_worker,
            "workers": data_bench.workers_needed(rate, per_worker)}


def align(args: list[str]) -> dict | None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "align.json"
        p = subprocess.run([sys.executable, str(ROOT / "bench" / "align_bench.py"), *args, "--json", str(out)],
                           capture_output=True, text=True, cwd=ROOT)
        return json.loads(out.read_text()) if p.returncode == 0 and out.is_file() else {"error": p.stderr[-500:]}


def markdown(res: dict) -> str:
    c, r, d, f = res["compare"], res["recipe"], res["data"], res["feeding"]
    lines = [f"Device: **{res['device_name']}** (setting `{res['setting']}`, {res['date']}).", "",
             "| way | model | batch | precision | img/s | ms/step | TFLOP/s | of peak | vs original |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in c["rows"]:
        peak = f"{100 * row['peak_fraction']:.1f} %" if row["peak_fraction"] is not None else "–"
        ratio = f"{c['ratios'].get(row['way'], 1.0):.2f}×"
        lines.append(f"| {row['way']} | {row['variant']}@{row['img_size']} | {row['batch']} | {row['precision']} | "
                     f"{row['images_per_s']:.2f} | {row['step_ms']:.0f} | {row['tflops']:.3f} | {peak} | {ratio} |")
    g = c["graph_check"]
    lines += ["", f"Graph-break check: {g['graphs']} graph(s), {g['breaks']} break(s), FFT inside a graph: "
                  f"{'yes' if g['fft_in_graph'] else 'no'}.", "",
              "| stage (v42, 512 px) | img/s | README recipe: images | projected |", "|---|---|---|---|"]
    for st in r["stages"]:
        lines.append(f"| {st['stage']} | {st['img_s']:.3f} | {st['recipe_images']:,} | {duration(st['recipe_seconds'])} |")
    lines.append(f"| **total** | | | **{r['total_hours']:.1f} h** |")
    lines += ["", "| source → 512 px | CPU path, img/s per worker | --gpu-decode: decode+resize img/s |", "|---|---|---|"]
    for row in d["rows"]:
        lines.append(f"| {row['source']} | {row['cpu_worker_img_s']:.1f} | {row['gpu_decode_img_s']:.1f} ({row['gpu_decode_device']}) |")
    lines += ["", f"One H100 at {f['step_img_s']:.0f} img/s ({f['how']}) needs **{f['workers']}** loader workers "
                  f"at {f['per_worker_img_s']:.0f} img/s each."]
    a = res.get("align") or {}
    if "ratio" in a:
        lines.append(f"Alignment: {a['ours_img_s']:.1f} img/s vs MTCNN.detect per image {a['baseline_img_s']:.1f} "
                     f"({a['ratio']:.2f}×, {a['n_images']} images).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    ap.add_argument("--setting", default="auto", choices=("auto", "cpu", "readme"), help="default: readme with CUDA, else cpu")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for <device>.json and <device>.md")
    ap.add_argument("--skip-align", action="store_true", help="leave out the alignment benchmark")
    ap.add_argument("--with-compile", action="store_true", help="time ours+compile in the cpu setting too (inductor "
                    "builds the model for about 2 minutes on 2 cores)")
    a = ap.parse_args(argv)
    device = resolve_device("auto")
    setting = a.setting if a.setting != "auto" else ("readme" if device.type == "cuda" else "cpu")
    s = SETTINGS[setting]
    name = train_bench.device_name(device)
    print(f"make bench on {name}, setting {setting}", flush=True)
    t0 = time.perf_counter()
    res = {"device_name": name, "setting": setting, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
           "threads": torch.get_num_threads()}
    ways = tuple(train_bench.WAYS) if a.with_compile else s["compare"][5]
    res["compare"] = train_bench.compare(*s["compare"][:5], device, ways=ways)
    res["recipe"] = recipe_estimate(s)
    ratio = res["compare"]["ratios"].get("ours+compile") or res["compare"]["ratios"].get("ours", 1.0)
    train_s = sum(st["recipe_seconds"] for st in res["recipe"]["stages"] if "step" in st["stage"])
    other_s = res["recipe"]["total_hours"] * 3600 - train_s
    res["recipe"]["original_hours"] = (train_s * ratio + other_s) / 3600
    res["recipe"]["ratio_used"] = ratio
    res["data"] = data_bench.measure(device, s["data_n"])
    res["feeding"] = feeding(device, res["data"], res["recipe"])
    res["align"] = None if a.skip_align else align(s["align"])
    res["seconds"] = time.perf_counter() - t0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = device_slug(device)
    (out / f"{slug}.json").write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    (out / f"{slug}.md").write_text(md)
    print(md)
    print(f"original's way, projected: {res['recipe']['original_hours']:.1f} h (ours × {ratio:.2f} on the training steps); "
          f"written {out / slug}.json and .md in {res['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
