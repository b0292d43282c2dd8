"""Processes: torchrun ranks, DDP wrapping, samplers and loaders split over ranks, and
gathering results across them. A single process never touches ``torch.distributed``.
"""
from __future__ import annotations

import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..device import compile_model, configure_cuda, place, resolve_device


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
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local % max(1, torch.cuda.device_count()))
    configure_cuda(dev)
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


def all_gather_objects(env: DistEnv, items: list) -> list:
    """Concatenate a list of picklable items from every rank, in rank order."""
    if not env.distributed:
        return list(items)
    parts: list = [None] * env.world_size
    dist.all_gather_object(parts, list(items))
    return [x for p in parts for x in p]


def prepare_model(model: nn.Module, env: DistEnv, channels_last: bool = False, compile: bool = False) -> nn.Module:
    """Place on the device (NHWC weights if asked), wrap in DDP, then torch.compile if asked
    (everything after the eager 9-channel input: ``titan.device.compile_model``).

    Keep a reference to the unwrapped model for state dicts; checkpoints strip prefixes anyway.
    """
    model = place(model, env.device, channels_last)
    if env.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if compile:
        model = compile_model(model)
    return model

def no_sync(model: nn.Module, sync: bool):
    """Skip DDP's gradient all-reduce on accumulation micro-steps that do not update."""
    inner = getattr(model, "_orig_mod", model)
    if not sync and isinstance(inner, nn.parallel.DistributedDataParallel):
        return inner.no_sync()
    return nullcontext()


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
