"""The pieces of the fit loop: device and AMP, DDP, optimiser and schedule, accumulation with
non-finite-loss guarding, data loaders, and resumable training checkpoints.

The loops themselves live in ``titan/pipeline.py`` so each reads top to bottom in one place.
"""
from __future__ import annotations

import math
import os
import random
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .checkpoints import CheckpointError, load_file, save_atomic
from .ensemble import amp_dtype, autocast_for, resolve_device


# --- device and processes ---------------------------------------------------------------------

@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> DistEnv:
    """Read torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK); join the process group when >1 process.

    NCCL on CUDA, gloo on CPU. A single process never touches torch.distributed.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistEnv(rank, world, local, dev)


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(env: DistEnv, *values: float) -> list[float]:
    """Sum plain numbers over ranks (fp64 on the training device)."""
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    if env.distributed:
        dist.all_reduce(t)
    return t.tolist()


def epoch_mean(env: DistEnv, loss_sum: torch.Tensor | float, seen: int, sampled: int, t0: float) -> tuple[float, float]:
    """(mean loss over every rank's finite steps, images/s over all ranks) for an epoch begun at ``t0``."""
    total, seen, images = all_reduce_sum(env, float(loss_sum), seen, sampled)
    return total / max(seen, 1), images / max(time.time() - t0, 1e-9)


def all_gather_cat(env: DistEnv, t: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor from every rank (ranks may hold different lengths)."""
    if not env.distributed:
        return t
    t = t.to(env.device)
    n = torch.tensor([t.numel()], device=env.device)
    sizes = [torch.zeros_like(n) for _ in range(env.world_size)]
    dist.all_gather(sizes, n)
    m = int(max(s.item() for s in sizes))
    padded = torch.zeros(m, dtype=t.dtype, device=env.device)
    padded[: t.numel()] = t
    parts = [torch.zeros_like(padded) for _ in range(env.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)]).cpu()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- mixed precision ----------------------------------------------------------------------------

def autocast(device: torch.device, enabled: bool):
    return autocast_for(device, enabled) if amp_dtype(device, enabled) else nullcontext()


def make_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 (bf16 and fp32 need none)."""
    return torch.amp.GradScaler("cuda" if device.type == "cuda" else "cpu",
                                enabled=amp_dtype(device, enabled) == torch.float16)


# --- model wrapping -----------------------------------------------------------------------------

def prepare_model(model: nn.Module, env: DistEnv, channels_last: bool = False, compile: bool = False) -> nn.Module:
    """Move to the device (NHWC weights if asked), wrap in DDP, then torch.compile if asked.

    Keep a reference to the unwrapped model for state dicts; checkpoints strip prefixes anyway.
    """
    model = model.to(env.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if env.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if compile:
        model = torch.compile(model)
    return model


def no_sync(model: nn.Module, sync: bool):
    """Skip DDP's gradient all-reduce on accumulation micro-steps that do not update."""
    inner = getattr(model, "_orig_mod", model)
    if not sync and isinstance(inner, nn.parallel.DistributedDataParallel):
        return inner.no_sync()
    return nullcontext()


# --- optimiser, schedule, stepping -----------------------------------------------------------

def make_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW without weight decay on norms, biases, GRN and mask tokens (all ≤1-D or tokens)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(("gamma", "beta", "mask_token")) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=device.type == "cuda")


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.01):
    """Linear warm-up from ~0 to the base LR, then cosine decay to ``min_ratio`` × base."""
    warmup_steps, total_steps = max(0, warmup_steps), max(1, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row; the message names the step."""


class Stepper:
    """Gradient accumulation, AMP scaling and the non-finite-loss guard for one training run.

    ``backward(loss, where)`` is called once per micro-batch; every ``accum_steps`` micro-batches
    (or at the end of an epoch via ``flush``) it updates the weights and steps the schedule.
    A non-finite loss is not back-propagated: it is counted, and ``max_bad_steps`` in a row raise
    ``NonFiniteLossError`` naming the step. In DDP all ranks agree to skip (one all-reduce).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler,
                 env: DistEnv, accum_steps: int = 1, max_bad_steps: int = 5) -> None:
        self.model, self.optimizer, self.scheduler, self.scaler, self.env = model, optimizer, scheduler, scaler, env
        self.accum_steps, self.max_bad_steps = max(1, accum_steps), max_bad_steps
        self.micro = 0          # micro-batches accumulated since the last update
        self.unsynced = False   # DDP: the window's last backward ran under no_sync
        self.bad_in_row = 0
        self.bad_total = 0

    def sync_next(self, last_in_epoch: bool) -> bool:
        """Whether the coming micro-batch ends an accumulation window (DDP must all-reduce)."""
        return last_in_epoch or self.micro + 1 >= self.accum_steps

    def backward(self, loss: torch.Tensor, where: str, synced: bool = True) -> bool:
        """Back-propagate one micro-batch's loss (forward ran under ``no_sync`` unless ``synced``);
        returns False when the loss was non-finite and skipped."""
        finite = torch.isfinite(loss.detach()).float()
        if self.env.distributed:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() < 1:
            self.bad_in_row += 1
            self.bad_total += 1
            if self.bad_in_row >= self.max_bad_steps:
                raise NonFiniteLossError(
                    f"{self.bad_in_row} non-finite losses in a row, the last at {where}; stopping. "
                    "Lower the learning rate, turn off --amp, or check the inputs of that step.")
            return False
        self.bad_in_row = 0
        self.scaler.scale(loss / self.accum_steps).backward()
        self.micro += 1
        self.unsynced = not synced
        if self.micro >= self.accum_steps:
            self.update()
        return True

    def update(self) -> None:
        if self.micro == 0:
            return
        if self.env.distributed and self.unsynced:
            # The window ended early (a skipped step or the epoch's end): average gradients by hand.
            for p in self.model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(self.env.world_size)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.micro = 0

    def flush(self) -> None:
        """Apply a partial accumulation window at the end of an epoch (no gradient is dropped)."""
        self.update()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "bad_total": self.bad_total}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(sd["optimizer"])
        self.scheduler.load_state_dict(sd["scheduler"])
        if sd.get("scaler"):
            self.scaler.load_state_dict(sd["scaler"])
        self.bad_total = int(sd.get("bad_total", 0))


# --- data loading -------------------------------------------------------------------------------

class WeightedDistributedSampler(Sampler[int]):
    """Class-balanced sampling with replacement, split over ranks, reproducible per epoch."""

    def __init__(self, weights: Sequence[float], num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        self.weights = torch.as_tensor(np.asarray(weights, dtype=np.float64))
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.num_samples = math.ceil(len(self.weights) / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        idx = torch.multinomial(self.weights, self.num_samples * self.num_replicas, replacement=True, generator=g)
        return iter(idx[self.rank::self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


def make_sampler(n: int, env: DistEnv, shuffle: bool, seed: int, weights: Sequence[float] | None = None) -> Sampler[int]:
    """DistributedSampler (also for one process: same order rules everywhere), or the weighted one."""
    if weights is not None:
        return WeightedDistributedSampler(weights, env.world_size, env.rank, seed)
    return DistributedSampler(range(n), num_replicas=env.world_size, rank=env.rank, shuffle=shuffle, seed=seed, drop_last=False)


def _worker_init(worker_id: int) -> None:
    # torch seeds each worker; numpy and random would otherwise repeat across workers.
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def make_loader(dataset: Dataset, batch_size: int, sampler: Sampler[int], num_workers: int, device: torch.device,
                collate_fn=None) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate_fn,
                      # Not persistent: every epoch's iterator draws its seed from the global RNG, so a
                      # resumed run consumes the RNG exactly as an uninterrupted one.
                      pin_memory=device.type == "cuda", persistent_workers=False,
                      worker_init_fn=_worker_init if num_workers else None,
                      prefetch_factor=4 if num_workers else None)


# --- RNG and training checkpoints ---------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """All RNG states as tensors and plain types (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
          "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    kind, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_train_state(directory: str | os.PathLike, stem: str, epoch: int, keep: int = 2, **state: Any) -> Path:
    """Atomically write ``{stem}_ep{epoch}.pth`` (model/optimiser/... + epoch + RNG) and keep the newest ``keep``."""
    directory = Path(directory)
    path = save_atomic({"epoch": int(epoch), "rng": rng_state(), **state}, directory / f"{stem}_ep{epoch}.pth")
    for old in checkpoint_files(directory, stem)[keep:]:
        old[1].unlink(missing_ok=True)
    return path


def checkpoint_files(directory: str | os.PathLike, stem: str) -> list[tuple[int, Path]]:
    """(epoch, path) of ``{stem}_ep{N}.pth`` files, newest epoch first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    out = []
    for p in directory.glob(f"{stem}_ep*.pth"):
        m = re.fullmatch(rf"{re.escape(stem)}_ep(\d+)\.pth", p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out, reverse=True)


def load_latest_state(directory: str | os.PathLike, stem: str, on_skip=None) -> dict[str, Any] | None:
    """The newest checkpoint that loads completely (a corrupt newer one is reported and passed over)."""
    for epoch, path in checkpoint_files(directory, stem):
        try:
            st = load_file(path)
            if not isinstance(st, dict) or int(st.get("epoch", -1)) != epoch or "model" not in st:
                raise CheckpointError(f"{path}: incomplete training checkpoint")
            return st
        except CheckpointError as e:
            if on_skip:
                on_skip(f"skipping unreadable checkpoint: {e}")
    return None


def remove_train_states(directory: str | os.PathLike, stem: str) -> None:
    for _, p in checkpoint_files(directory, stem):
        p.unlink(missing_ok=True)
