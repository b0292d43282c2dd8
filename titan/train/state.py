"""Resumable training state: RNG streams and per-epoch checkpoints (newest *complete* one wins)."""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoints import CheckpointError, load_file, save_atomic


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
