"""Optimiser, learning-rate schedule, and the stepper: gradient accumulation, AMP scaling and
the non-finite-loss guard."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from ..device import make_scaler
from .distributed import DistEnv


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device,
                   head_lr_mult: float = 1.0) -> torch.optim.AdamW:
    """AdamW without weight decay on norms, biases, GRN and mask tokens (all ≤1-D or tokens);
    parameters under ``head.`` learn at ``head_lr_mult`` × ``lr`` (a new head on a pretrained body)."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(("gamma", "beta", "mask_token"))
        groups.setdefault((no_decay, head_lr_mult != 1.0 and name.startswith("head.")), []).append(p)
    param_groups = [{"params": groups.get((nd, head), []), "weight_decay": 0.0 if nd else weight_decay,
                     "lr": lr * (head_lr_mult if head else 1.0)}
                    for head in (False, True) for nd in (False, True) if (nd, head) in groups or not head]
    return torch.optim.AdamW(param_groups, lr=lr, betas=(0.9, 0.999), fused=device.type == "cuda")


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
    (and at the end of an epoch via ``update``, so no gradient is dropped) it updates the weights
    and steps the schedule.
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


def fit_warmup(warmup_epochs: int, epochs: int, steps_per_epoch: int, name: str) -> tuple[int, str | None]:
    """Warm-up steps for a run of ``epochs`` → (steps, notice or None).

    A warm-up may take at most half the run: a longer one is clamped to half (and said so), since
    the run would otherwise end before its learning rate got near the configured one (5 warm-up
    epochs in a 1-epoch SimMIM run never pass 1/6 of ``--ssl-lr``)."""
    asked, total = max(0, warmup_epochs) * steps_per_epoch, max(1, epochs * steps_per_epoch)
    if asked <= total // 2:
        return asked, None
    return total // 2, (f"NOTICE: {name}: {warmup_epochs} warm-up epoch(s) do not fit a {epochs}-epoch run; "
                        f"warm-up clamped to {total // 2} of its {total} optimiser steps (half the run)")


def make_stepper(raw: nn.Module, model: nn.Module, lr: float, weight_decay: float, warmup_epochs: int, epochs: int,
                 steps_per_epoch: int, cfg, env: DistEnv, name: str = "training",
                 notify: Callable[[str], None] | None = None) -> Stepper:
    """AdamW over ``raw``'s parameters, warm-up + cosine over ``epochs``, and the stepper driving
    ``model`` (``raw`` wrapped for the device); ``cfg`` gives the AMP, accumulation and guard settings.
    A warm-up longer than half the run is clamped (``fit_warmup``); ``notify`` gets the notice."""
    optimizer = make_optimizer(raw, lr, weight_decay, env.device, getattr(cfg, "head_lr_mult", 1.0))
    warmup, notice = fit_warmup(warmup_epochs, epochs, steps_per_epoch, name)
    if notice and notify:
        notify(notice)
    scheduler = warmup_cosine(optimizer, warmup, epochs * steps_per_epoch, cfg.min_lr_ratio)
    return Stepper(model, optimizer, scheduler, make_scaler(env.device, cfg.amp), env, cfg.accum_steps, cfg.max_bad_steps)
