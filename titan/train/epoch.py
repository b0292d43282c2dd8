"""One epoch of training, and one pass of prediction, for every stage that trains
(as ConvNeXt-V2's ``engine_finetune.train_one_epoch`` / ``evaluate`` serve its main script).

SimMIM and fine-tuning differ only in how a batch becomes inputs (``inputs``, run outside
autocast: decoding, augmentation) and how the model's output becomes a loss (``loss_of``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..device import autocast
from .distributed import DistEnv, all_gather_cat, epoch_mean, no_sync
from .optim import Stepper


@dataclass
class EpochStats:
    loss: float       # mean over every rank's finite micro-batches
    img_s: float      # images per second, all ranks
    bad_steps: int    # non-finite losses skipped this epoch


def train_one_epoch(model: nn.Module, loader: DataLoader, stepper: Stepper, env: DistEnv, amp: bool,
                    inputs: Callable[[tuple], tuple[torch.Tensor, ...]],
                    loss_of: Callable[..., torch.Tensor], name: str) -> EpochStats:
    """One pass over ``loader``: ``loss_of(model, *inputs(batch))`` per micro-batch, accumulated and
    stepped by ``stepper`` (DDP all-reduces only on the micro-batch that ends a window)."""
    dev = env.device
    model.train()
    t0, total, seen, bad0 = time.time(), torch.zeros((), device=dev), 0, stepper.bad_total
    for i, batch in enumerate(tqdm(loader, desc=name, disable=not env.is_main, leave=False)):
        xs = inputs(batch)
        sync = stepper.sync_next(i == len(loader) - 1)
        with no_sync(model, sync), autocast(dev, amp):
            loss = loss_of(model, *xs)
        if stepper.backward(loss, f"{name} step {i + 1}", sync):
            total += loss.detach().float() * len(xs[0])
            seen += len(xs[0])
    stepper.update()  # a partial window at the epoch's end: no gradient is dropped
    loss, img_s = epoch_mean(env, total, seen, len(loader.sampler), t0)
    return EpochStats(loss, img_s, stepper.bad_total - bad0)


@torch.no_grad()
def predict_logits(model: nn.Module, loader: DataLoader, env: DistEnv, amp: bool,
                   images: Callable[[object], torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """(dataset indices, logits) over every rank's share of ``loader``, gathered and de-duplicated."""
    idx_all, out = [], []
    model.eval()
    for x, _, idx in loader:
        with autocast(env.device, amp):
            logit, _ = model(images(x))
        out.append(logit.float().cpu())
        idx_all.append(idx.cpu())
    idx = all_gather_cat(env, torch.cat(idx_all) if idx_all else torch.zeros(0, dtype=torch.long))
    logits = all_gather_cat(env, torch.cat(out) if out else torch.zeros(0))
    uniq, first = np.unique(idx.numpy(), return_index=True)  # DistributedSampler pads with repeats
    return uniq, logits.numpy()[first]
