#!/usr/bin/env python
"""Training throughput of the fine-tuning step (forward, loss, backward, fused AdamW) on this device.

    python bench/train_bench.py                                  # v42@512 and atto@128, every mode
    python bench/train_bench.py --configs atto:128 --steps 5 --json bench_train.json

Rows: variant@size × mode (eager | channels_last | compile) × precision (fp32 | amp = bf16, or
fp16 + GradScaler, on CUDA). Each row reports images/s; FLOPs per step are counted once with
torch.utils.flop_counter, giving achieved TFLOP/s, and on a known GPU the fraction of its dense
peak for that precision. On CPU the pipeline trains in fp32, so amp rows are skipped there.
Uses the pipeline's own pieces (titan.device, titan.train, titan.models.classifier.Classifier): what it measures is what trains.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from titan.device import amp_dtype, autocast, make_scaler  # noqa: E402
from titan.train import distributed, optim  # noqa: E402
from titan.models.convnextv2 import build_backbone  # noqa: E402
from titan.models.heads import build_head  # noqa: E402
from titan.models.classifier import Classifier  # noqa: E402

# Dense (no sparsity) peak TFLOP/s: (bf16/fp16 tensor core, fp32 with TF32 tensor cores).
PEAKS = {"H100": (989.0, 494.0), "H200": (989.0, 494.0), "A100": (312.0, 156.0), "4090": (165.2, 82.6),
         "L40S": (362.0, 183.0), "A10": (125.0, 62.5)}


def gpu_peak(device: torch.device, amp: bool) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, tf32) in PEAKS.items():
        if key in name:
            return half if amp else tf32
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(variant: str, size: int, mode: str, amp: bool, batch: int, steps: int, warmup: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    env = distributed.DistEnv(device=device)
    backbone = build_backbone(variant)
    raw = Classifier(backbone, build_head("linear", backbone.num_features), 0.1, 1.0)
    channels_last = mode == "channels_last"
    model = distributed.prepare_model(raw, env, channels_last=channels_last, compile=mode == "compile")
    opt = optim.make_optimizer(raw, 1e-4, 0.05, device)
    scaler = make_scaler(device, amp)
    x = torch.rand(batch, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.arange(batch, device=device) % 2).float()

    def step() -> None:
        with autocast(device, amp):
            _, loss = model(x, y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(warmup):  # includes compilation for mode=compile
        step()
    sync(device)
    warm_s = time.perf_counter() - t0
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:  # forward + backward FLOPs of one step
        with autocast(device, amp):
            _, loss = raw(x, y)
        loss.backward()
    opt.zero_grad(set_to_none=True)
    flops = fc.get_total_flops()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    dt = time.perf_counter() - t0
    tflops = flops * steps / dt / 1e12
    peak = gpu_peak(device, amp)
    return {"variant": variant, "img_size": size, "mode": mode, "precision": (str(amp_dtype(device, amp)).replace("torch.", "") if amp else "fp32"),
            "batch": batch, "steps": steps, "images_per_s": batch * steps / dt, "step_ms": 1000 * dt / steps,
            "warmup_s": warm_s, "gflop_per_step": flops / 1e9, "tflops": tflops,
            "peak_fraction": (tflops / peak) if peak else None, "device": device_name(device)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--configs", default="v42:512,atto:128", help="variant:img_size list (default: %(default)s)")
    p.add_argument("--modes", default="eager,channels_last,compile", help="default: %(default)s")
    p.add_argument("--precisions", default="fp32,amp", help="default: %(default)s")
    p.add_argument("--batch", type=int, default=None, help="images per step (default: 8 on GPU, 2 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 on GPU, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 5 on GPU, 1 on CPU)")
    p.add_argument("--device", default="auto", help="default: %(default)s")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    a = p.parse_args(argv)
    device = distributed.setup_distributed(a.device).device
    gpu = device.type == "cuda"
    batch, steps, warmup = a.batch or (8 if gpu else 2), a.steps or (20 if gpu else 3), a.warmup or (5 if gpu else 1)
    rows = []
    print(f"device: {device_name(device)}; batch {batch}, {steps} timed steps after {warmup} warm-up")
    print(f"{'config':<12} {'mode':<14} {'precision':<9} {'img/s':>8} {'ms/step':>9} {'GFLOP/step':>11} {'TFLOP/s':>8} {'peak%':>6} {'warmup s':>9}")
    for spec in a.configs.split(","):
        variant, size = spec.split(":")
        for mode in a.modes.split(","):
            for prec in a.precisions.split(","):
                if prec == "amp" and not gpu:
                    continue  # the pipeline trains in fp32 on CPU
                try:
                    r = bench_one(variant, int(size), mode, prec == "amp", batch, steps, warmup, device)
                except Exception as e:  # e.g. no C++ compiler for inductor: report, keep going
                    print(f"{spec:<12} {mode:<14} {prec:<9} failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
                    continue
                rows.append(r)
                peak = f"{100 * r['peak_fraction']:.1f}" if r["peak_fraction"] is not None else "-"
                print(f"{spec:<12} {mode:<14} {r['precision']:<9} {r['images_per_s']:8.2f} {r['step_ms']:9.1f} "
                      f"{r['gflop_per_step']:11.1f} {r['tflops']:8.3f} {peak:>6} {r['warmup_s']:9.1f}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
