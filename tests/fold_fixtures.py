"""Tiny fold checkpoints in both released formats, and tiny test-image folders."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from titan import build_backbone, build_head
from titan.checkpoints import save_checkpoint

SIZE = 32  # atto at 32 px: one 1×1 final map, milliseconds per image


def write_v38_folds(folder: Path, n: int = 2, variant: str = "atto") -> None:
    """The original release's layout: raw state dicts, ArcFace head, no metadata."""
    for k in range(n):
        torch.save(build_backbone(variant).state_dict(), folder / f"titan_backbone_fold{k}.pth")
        torch.save(build_head("arcface", build_backbone(variant).num_features).state_dict(), folder / f"titan_head_fold{k}.pth")


def write_v42_folds(folder: Path, n: int = 2, variant: str = "atto", th: float | None = 0.4, size: int = SIZE) -> list:
    """Our layout: {"model", "meta"} checkpoints for a linear head, plus a plain meta dict → the models."""
    models = []
    for k in range(n):
        bb = build_backbone(variant)
        save_checkpoint(bb, folder / f"v42_backbone_fold{k}.pth", variant=variant, head="linear", img_size=size, epoch=1)
        head = build_head("linear", bb.num_features)
        save_checkpoint(head, folder / f"v42_head_fold{k}.pth", variant=variant,
                        head="linear", img_size=size, epoch=1)
        if th is not None:
            torch.save({"th": th + 0.02 * k, "f1": 0.9, "variant": variant, "head": "linear", "img_size": size, "epoch": 1},
                       folder / f"v42_meta_fold{k}.pth")
        models.append((bb, head))
    return models


def write_calibrated_run(folder: Path, threshold: float, temperature: float, band: float, size: int = 32) -> Path:
    """Two atto folds at ``size`` px and a metrics file with the OOF threshold, temperature and band:
    a run folder as detect.py and serve.py read it."""
    write_v42_folds(folder, n=2, size=size)
    (folder / "metrics_v42.json").write_text(json.dumps({
        "oof": {"threshold": threshold}, "folds": [],
        "calibration": {"temperature": temperature, "uncertain_band": band, "band_share": 0.1}}))
    return folder


def write_images(folder: Path, values: dict[str, int], size: int = 40) -> None:
    """One constant-grey PNG per Id (the grey level lets a patched model return a known score)."""
    folder.mkdir(parents=True, exist_ok=True)
    for image_id, v in values.items():
        Image.fromarray(np.full((size, size + 8, 3), v, np.uint8)).save(folder / f"{image_id}.png")


def grey_logit(x: torch.Tensor) -> torch.Tensor:
    """The known score of a constant image: logit = 20·(grey − 0.5)."""
    return (x.mean(dim=(1, 2, 3)) - 0.5) * 20.0


def grey_prob(v: int) -> float:
    return float(1.0 / (1.0 + np.exp(-20.0 * (v / 255.0 - 0.5))))


def copy_files(src: Path, dst: Path) -> Path:
    """Copy a prepared folder tree into a test's own tmp_path (building models is the slow part)."""
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


@pytest.fixture(scope="session")
def v38_dir(tmp_path_factory) -> Path:
    """Two V38-layout atto folds, built once per session."""
    d = tmp_path_factory.mktemp("v38_folds")
    write_v38_folds(d, n=2)
    return d
