"""A tiny but complete training-run folder, as train_v42_diamond.py leaves it, for plot/report tests."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from titan import build_backbone, build_head
from titan.checkpoints import save_atomic, save_checkpoint
from titan.metrics import binary_metrics

FIXTURES = Path(__file__).parent / "fixtures"
IMG_SIZE = 64


def real_photos() -> dict[str, np.ndarray]:
    """Real photos shipped with scikit-image (offline), different sizes and one greyscale."""
    from skimage import data

    gray = data.camera()
    return {"astronaut": data.astronaut(), "camera": np.stack([gray] * 3, -1), "chelsea": data.chelsea(),
            "coffee": data.coffee(), "rocket": data.rocket(), "horse": (np.stack([data.horse()] * 3, -1) * 255).astype(np.uint8)}


def make_fake_run(root: Path, n_folds: int = 2, weights: bool = True, seed: int = 0) -> Path:
    """Log, oof/predictions/metrics/config files, test faces and (optionally) atto fold weights."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shutil.copy(FIXTURES / "training_v42_log.jsonl", root / "training_v42_log.jsonl")
    # OOF: 40 rows, fakes score higher on average but the classes overlap (some missed fakes).
    y = np.r_[np.ones(18, int), np.zeros(22, int)]
    p = np.clip(0.35 * y + 0.3 + rng.normal(0, 0.17, y.size), 0.001, 0.999)
    oof = pd.DataFrame({"Id": [f"tr{i:03d}" for i in range(y.size)], "target_feature": y, "prob": p,
                        "fold": np.arange(y.size) % n_folds})
    oof.to_csv(root / "oof_v42.csv", index=False)
    oof_report = binary_metrics(y, p)
    folds = [{"fold": k, "best_epoch": 2 + k, "f1": 0.8 + 0.05 * k, "th": 0.43, "auc": 0.9, "ap": 0.88} for k in range(n_folds)]
    (root / "metrics_v42.json").write_text(json.dumps({"oof": oof_report, "folds": folds}))
    (root / "config_v42.json").write_text(json.dumps({"variant": "atto", "img_size": IMG_SIZE, "n_folds": n_folds, "seed": 3407}))
    test_dir = root / "faces" / "test"
    test_dir.mkdir(parents=True)
    photos = real_photos()
    for name, img in photos.items():
        Image.fromarray(img).resize((96, 80)).save(test_dir / f"{name}.png")
    probs = [0.97, 0.08, 0.45, 0.88, 0.02, 0.51]
    pd.DataFrame({"Id": list(photos), "prob": probs}).to_csv(root / "predictions_v42.csv", index=False)
    if weights:
        for k in range(n_folds):
            torch.manual_seed(100 + k)
            bb, head = build_backbone("atto"), build_head("linear", 320)
            meta = dict(variant="atto", head="linear", img_size=IMG_SIZE, epoch=2, metrics=folds[k])
            save_checkpoint(bb, root / f"v42_backbone_fold{k}.pth", **meta)
            save_checkpoint(head, root / f"v42_head_fold{k}.pth", **meta)
            save_atomic({"th": 0.43, "f1": folds[k]["f1"], "auc": 0.9, "variant": "atto", "head": "linear",
                         "img_size": IMG_SIZE, "epoch": 2}, root / f"v42_meta_fold{k}.pth")
    return root
