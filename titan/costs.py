"""What a run will cost, measured before paying for it.

A ``TimedLoader`` records how long the model waits on each batch; ``StageCost`` is one row of the
estimate (warm images/s, steps and images of the whole run, projected wall time, peak memory,
the share of time spent waiting on data); ``workload`` counts the images and steps of a
training command; ``cost_table`` prints the rows and says where the data loader is the
bottleneck. Shared by ``train_v42_diamond.py --estimate``, ``align_faces.py --estimate`` and
``make bench`` (which projects the README recipe with the same ``workload``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

# The model counts as waiting on the loader when it idles this share of the warm stretch or more.
BOTTLENECK_WAIT = 0.10

# The README recipe (≈58k faces at 512 px): train (labelled) and test faces, and its schedule.
RECIPE = dict(n_train=46_000, n_test=12_000, ssl_epochs=50, n_folds=5, ft_epochs=10, batch_size=8, accum_steps=4,
              infer_batch_size=32, n_views=4)


def _batch_len(batch) -> int:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    return len(x)


class TimedLoader:
    """An iterable loader that records, per batch, when it was asked for and when it came.

    It passes ``len`` and ``sampler`` through, so the training code iterates it as the loader."""

    def __init__(self, loader: Iterable, size_of: Callable[[object], int] = _batch_len) -> None:
        self.loader, self.sampler, self.size_of = loader, getattr(loader, "sampler", None), size_of
        self.asked: list[float] = []
        self.came: list[float] = []
        self.sizes: list[int] = []
        self.end = math.nan

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator:
        it = iter(self.loader)
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                self.end = time.perf_counter()
                return
            self.asked.append(t)
            self.came.append(time.perf_counter())
            self.sizes.append(self.size_of(batch))
            yield batch

    def window(self, warm: int) -> tuple[int, float, float]:
        """(images, seconds, seconds waiting on data) from batch ``warm`` on: the warm stretch.
        Batch ``warm`` is in hand when the window opens; later batches' waits count."""
        if len(self.came) <= warm or not math.isfinite(self.end):
            raise ValueError(f"the timed stretch is empty: {len(self.came)} batch(es), {warm} for warm-up")
        wait = sum(c - a for a, c in zip(self.asked[warm + 1:], self.came[warm + 1:]))
        return sum(self.sizes[warm:]), self.end - self.came[warm], wait

    def warmup_seconds(self, warm: int) -> float:
        """From asking for the first batch to holding batch ``warm`` (worker start, compile, autotune)."""
        return self.came[min(warm, len(self.came) - 1)] - self.asked[0] if self.asked else math.nan


@dataclass
class Work:
    """What a stage does over the whole command: images through the model and steps taken."""

    images: int
    steps: int


@dataclass
class StageCost:
    stage: str
    img_s: float        # warm images/s of one process (TTA: test images, every view)
    work: Work
    peak_gib: float
    wait: float = 0.0   # share of the warm stretch the model waited on data
    warmup_s: float = 0.0
    world: int = 1      # processes sharing the work (projection assumes linear scaling)
    notes: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.work.images / (self.img_s * self.world) if self.work.images else 0.0

    def as_dict(self) -> dict:
        return {"stage": self.stage, "img_s": self.img_s, "images": self.work.images, "steps": self.work.steps,
                "seconds": self.seconds, "peak_gib": self.peak_gib, "data_wait": self.wait, "warmup_s": self.warmup_s}


def timed_cost(stage: str, loader: TimedLoader, warm: int, work: Work, peak_gib: float, world: int = 1) -> StageCost:
    """The row for a stage whose warm stretch ran through ``loader``."""
    images, seconds, wait = loader.window(warm)
    return StageCost(stage, images / max(seconds, 1e-9), work, peak_gib, wait / max(seconds, 1e-9),
                     loader.warmup_seconds(warm), world)


def workload(n_ssl: int, folds: Sequence[tuple[int, int]], n_test: int, *, ssl_epochs: int, ft_epochs: int,
             batch_size: int, accum_steps: int, infer_batch_size: int, world: int = 1) -> dict[str, Work]:
    """Images and steps per stage of a training command. ``folds``: (training rows, validation rows)
    per fold to train; SSL and fine-tuning steps are optimiser steps (``accum_steps`` micro-batches,
    a partial window at an epoch's end included), validation and inference steps are batches."""
    def opt_steps(n: int) -> int:
        micro = math.ceil(math.ceil(n / world) / batch_size)
        return math.ceil(micro / max(1, accum_steps))

    def batches(n: int) -> int:
        return math.ceil(math.ceil(n / world) / infer_batch_size)

    return {"ssl": Work(ssl_epochs * n_ssl, ssl_epochs * opt_steps(n_ssl)),
            "finetune": Work(ft_epochs * sum(t for t, _ in folds), ft_epochs * sum(opt_steps(t) for t, _ in folds)),
            "validation": Work(ft_epochs * sum(v for _, v in folds), ft_epochs * sum(batches(v) for _, v in folds)),
            "infer": Work(n_test * len(folds), len(folds) * batches(n_test))}


def recipe_workload(**override) -> dict[str, Work]:
    """``workload`` of the README recipe (``RECIPE``; keys overridable)."""
    r = {**RECIPE, **override}
    val = r["n_train"] // r["n_folds"]
    return workload(r["n_train"] + r["n_test"], [(r["n_train"] - val, val)] * r["n_folds"], r["n_test"],
                    ssl_epochs=r["ssl_epochs"], ft_epochs=r["ft_epochs"], batch_size=r["batch_size"],
                    accum_steps=r["accum_steps"], infer_batch_size=r["infer_batch_size"])


def duration(seconds: float) -> str:
    """3 h 05 min / 12 min 30 s / 45.0 s."""
    if not math.isfinite(seconds):
        return "?"
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    if seconds >= 60:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{seconds:.1f} s"


def bottlenecks(rows: Sequence[StageCost]) -> list[str]:
    """One line per stage whose model waits on the data loader, saying by how much."""
    out = []
    for r in rows:
        if r.wait >= BOTTLENECK_WAIT:
            fed = r.img_s / max(1e-9, 1 - r.wait)
            out.append(f"{r.stage}: the data loader is the bottleneck — the model waits {r.wait:.0%} of the time; "
                       f"fed, it would run {1 / max(1e-9, 1 - r.wait):.2f}× faster ({fed:.1f} images/s). "
                       "Raise --num-workers, or decode on the GPU (--gpu-decode).")
    return out


def cost_table(rows: Sequence[StageCost], memory_label: str = "peak GiB") -> list[str]:
    """The estimate as text lines: one row per stage, the total, then the bottleneck lines."""
    head = f"{'stage':<22} {'images/s':>9} {'steps':>9} {'images':>10} {'projected':>14} {memory_label:>9} {'data wait':>9} {'warm-up':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.stage:<22} {r.img_s:9.2f} {r.work.steps:9d} {r.work.images:10d} {duration(r.seconds):>14} "
                     f"{r.peak_gib:9.2f} {r.wait:9.0%} {r.warmup_s:7.1f}s")
        lines += [f"  {n}" for n in r.notes]
    total = sum(r.seconds for r in rows)
    lines.append(f"{'total':<22} {'':>9} {sum(r.work.steps for r in rows):9d} {'':>10} {duration(total):>14}")
    slow = bottlenecks(rows)
    if rows and not slow:
        lines.append(f"the data loader keeps up: the model waits at most {max(r.wait for r in rows):.0%} of the time")
    return lines + slow
