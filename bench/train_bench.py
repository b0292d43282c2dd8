#!/usr/bin/env python
"""Training throughput of the fine-tuning step (forward, loss, backward, fused AdamW) on this device.

    python bench/train_bench.py                                  # v42@512 and atto@128, every mode
    python bench/train_bench.py --configs atto:128 --steps 5 --json bench_train.json

Rows: variant@size × mode (eager | channels_last | compile) × precision (fp32 | amp = bf16, or
fp16 + GradScaler, on CUDA). Each row reports images/s; FLOPs per step are counted once with
torch.utils.flop_counter, giving achieved TFLOP/s, and on a known GPU the fraction of its dense
peak for that precision. On CPU the pipeline trains in fp32, so amp rows are skipped there.
Uses the pipeline's own pieces (titan.device, titan.train, titan.models.classifier.Classifier): what it measures is what trains.

``--compare`` times the original project's way of training against this project's, in one run,
on the same model, batch and device (``compare`` below; ``make bench`` calls it):

    original  fp16 autocast + GradScaler (torch.cuda.amp: on a CPU both are no-ops, so fp32), NCHW,
              eager, plain AdamW (foreach, no fused kernel, decay on every parameter), the batch
              arriving as normalised float32 from pageable memory, the 9-channel input computed
              eagerly in front of the backbone
    ours      bf16 autocast (no scaler), channels_last on CUDA, fused AdamW on CUDA, uint8 batches
              from pinned memory converted on the device, and with ``compile`` torch.compile over
              everything after the 9-channel input (the FFT stays eager: titan.device.eager)

The graph-break check is ``titan.device.graph_breaks`` (torch._dynamo.explain: tracing only, no
inductor compile): it prints the number of graphs and breaks and whether an FFT op was traced.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from titan.device import (amp_dtype, autocast, compile_model, graph_breaks, make_scaler, synchronize, to_float_image,  # noqa: E402
                          use_channels_last)
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


def step_flops(step) -> float:
    """Forward + backward FLOPs of one call of ``step`` (torch.utils.flop_counter; run eagerly)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step()
    return float(fc.get_total_flops())


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
    synchronize(device)
    warm_s = time.perf_counter() - t0
    def one_step() -> None:
        with autocast(device, amp):
            _, loss = raw(x, y)
        loss.backward()

    flops = step_flops(one_step)
    opt.zero_grad(set_to_none=True)
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    dt = time.perf_counter() - t0
    tflops = flops * steps / dt / 1e12
    peak = gpu_peak(device, amp)
    return {"variant": variant, "img_size": size, "mode": mode, "precision": (str(amp_dtype(device, amp)).replace("torch.", "") if amp else "fp32"),
            "batch": batch, "steps": steps, "images_per_s": batch * steps / dt, "step_ms": 1000 * dt / steps,
            "warmup_s": warm_s, "gflop_per_step": flops / 1e9, "tflops": tflops,
            "peak_fraction": (tflops / peak) if peak else None, "device": device_name(device)}


WAYS = ("original", "ours", "ours+compile")


def way_step(way: str, variant: str, size: int, batch: int, device: torch.device):
    """(one training step of ``way``, the uncompiled model, a FLOP-counting step) on a fixed batch."""
    torch.manual_seed(0)
    backbone = build_backbone(variant)
    raw = Classifier(backbone, build_head("linear", backbone.num_features), 0.1, 1.0).to(device)
    y = (torch.arange(batch, device=device) % 2).float()
    if way == "original":
        half, channels_last, model = "fp16", False, raw
        opt = torch.optim.AdamW(raw.parameters(), lr=1e-4, weight_decay=0.05)  # foreach, not fused
        host = torch.rand(batch, 3, size, size)  # ToTensor + Normalize on the CPU: float32, pageable

        def batch_in() -> torch.Tensor:
            return host.to(device)
    else:
        half, channels_last = "auto", use_channels_last(device)
        raw = raw.to(memory_format=torch.channels_last) if channels_last else raw
        model = compile_model(raw) if way == "ours+compile" else raw
        opt = optim.make_optimizer(raw, 1e-4, 0.05, device)  # fused on CUDA
        host = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
        host = host.pin_memory() if device.type == "cuda" else host

        def batch_in() -> torch.Tensor:
            return to_float_image(host, device, channels_last)
    scaler = make_scaler(device, True, half)

    def step(m=model) -> None:
        with autocast(device, True, half):
            _, loss = m(batch_in(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    return step, raw, lambda: step(raw)


def prepared(way: str, variant: str, size: int, batch: int, warmup: int, device: torch.device) -> dict:
    """A way's step, warmed up (compilation and cuDNN autotuning happen here), with its FLOPs per step."""
    step, raw, eager_step = way_step(way, variant, size, batch, device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(device)
    warm_s = time.perf_counter() - t0
    return {"step": step, "warmup_s": warm_s, "flops": step_flops(eager_step)}


def timed(p: dict, steps: int, device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        p["step"]()
    synchronize(device)
    return time.perf_counter() - t0


def row(way: str, variant: str, size: int, batch: int, steps: int, p: dict, dt: float, device: torch.device) -> dict:
    tflops = p["flops"] * steps / dt / 1e12
    peak = gpu_peak(device, device.type == "cuda")
    return {"way": way, "variant": variant, "img_size": size, "batch": batch, "steps": steps,
            "precision": str(amp_dtype(device, True, "fp16" if way == "original" else "auto") or "fp32").replace("torch.", ""),
            "images_per_s": batch * steps / dt, "step_ms": 1000 * dt / steps, "warmup_s": p["warmup_s"],
            "gflop_per_step": p["flops"] / 1e9, "tflops": tflops, "peak_fraction": tflops / peak if peak else None,
            "device": device_name(device)}


def compare(variant: str, size: int, batch: int, steps: int, warmup: int, device: torch.device,
            ways: tuple[str, ...] = WAYS, rounds: int = 3, say=print) -> dict:
    """The original's way against ours on one model and batch: rows, ratios (ours ÷ original) and
    the graph-break check of the compiled model. The ways are timed in alternating rounds and the
    best round of each is kept, so a machine whose load drifts slows every way alike."""
    backbone = build_backbone(variant)
    probe = Classifier(backbone, build_head("linear", backbone.num_features))
    g = graph_breaks(probe, torch.rand(2, 3, size, size), torch.tensor([0.0, 1.0]))
    say(f"graph-break check (torch._dynamo.explain of {variant} + head + loss): {g['graphs']} graph(s), "
        f"{g['breaks']} break(s) — the eager 9-channel input; FFT inside a graph: {'yes' if g['fft_in_graph'] else 'no'}; "
        f"ops per graph {g['ops']}")
    ready = {}
    for way in ways:
        try:
            ready[way] = prepared(way, variant, size, batch, warmup, device)
        except Exception as e:  # e.g. no C++ compiler for inductor: report, keep going
            say(f"{way:<14} failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
    best = {way: timed(p, steps, device) for way, p in ready.items()}
    for _ in range(rounds - 1):
        for way, p in ready.items():
            best[way] = min(best[way], timed(p, steps, device))
    rows = [row(way, variant, size, batch, steps, ready[way], best[way], device) for way in ready]
    for r in rows:
        peak = f"{100 * r['peak_fraction']:.1f}%" if r["peak_fraction"] is not None else "-"
        say(f"{r['way']:<14} {variant}@{size} batch {batch} {r['precision']:<8} {r['images_per_s']:8.2f} img/s "
            f"{r['step_ms']:9.1f} ms/step {r['tflops']:8.3f} TFLOP/s peak {peak:>6} (warm-up {r['warmup_s']:.1f} s)")
    base = next((r for r in rows if r["way"] == "original"), None)
    ratios = {r["way"]: r["images_per_s"] / base["images_per_s"] for r in rows if base and r["way"] != "original"}
    for way, x in ratios.items():
        say(f"{way} ÷ original: {x:.2f}×")
    return {"rows": rows, "ratios": ratios, "graph_check": g, "rounds": rounds}


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
    p.add_argument("--compare", action="store_true", help="the original's way against ours (see above) for each config")
    a = p.parse_args(argv)
    device = distributed.setup_distributed(a.device).device
    gpu = device.type == "cuda"
    batch, steps, warmup = a.batch or (8 if gpu else 2), a.steps or (20 if gpu else 3), a.warmup or (5 if gpu else 1)
    if a.compare:
        out = {spec: compare(spec.split(":")[0], int(spec.split(":")[1]), batch, steps, warmup, device)
               for spec in a.configs.split(",")}
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
        return 0
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
