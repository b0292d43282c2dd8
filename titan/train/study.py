"""The architecture study: several architectures, the same folds, the same budget, one table.

Each architecture is trained by the training pipeline itself (``run_ssl`` for TitanNet, then
``run_finetune``) in ``{out}/{arch}/``; the fold split depends only on the labels and
``fold_seed``, so every row is scored on the same out-of-fold predictions' Ids. A finished
architecture's row is kept in ``{out}/{arch}/study_row.json`` and reused by a rerun with the
same budget.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from ..models.archs import build_arch_backbone, parse_arch
from ..checkpoints import atomic_json, atomic_write
from ..config import TrainConfig, make_config
from ..models.heads import build_head
from ..runfiles import DATASET_DIR, FACES_DIR, TRAIN_CSV, log_files
from ..runlog import RunLog

DEFAULT_ARCHS = ("mobilenetv2", "effnet-b3-fpn-cbam", "titan-atto")
ROW_JSON = "study_row.json"
COLUMNS = {  # row key → table heading
    "arch": "Architecture", "params_m": "Params (M)", "f1": "F1", "precision": "Precision", "recall": "Recall",
    "roc_auc": "ROC-AUC", "missed": "Missed fakes", "s_per_epoch": "s / epoch", "ssl_s": "SSL s",
}


@dataclasses.dataclass
class StudyData:
    faces_dir: Path   # holds train/ (and maybe test/)
    labels: Path      # Id,target_feature
    note: str         # how the faces were found, for the log and the table's caption


def find_data(root: str | os.PathLike, faces: Path) -> StudyData:
    """The README layout under ``root``: face crops in data/faces_512/train when align_faces.py ran,
    else the raw data/dataset/train_images (linked as ``{faces}/train``, uncropped)."""
    root = Path(root)
    labels = root / TRAIN_CSV
    if not labels.is_file():
        raise FileNotFoundError(f"{labels} not found: --data must hold the README layout "
                                "(data/dataset/train_solution.csv with data/faces_512/train/ or data/dataset/train_images/)")
    crops = root / FACES_DIR
    if (crops / "train").is_dir():
        return StudyData(crops, labels, f"face crops from {crops}/train")
    raw = root / DATASET_DIR / "train_images"
    if not raw.is_dir():
        raise FileNotFoundError(f"neither {crops}/train nor {raw} exists under --data {root}")
    faces.mkdir(parents=True, exist_ok=True)
    link = faces / "train"
    if link.is_symlink() and link.resolve() != raw.resolve():
        link.unlink()  # left by a study of other data in the same --out
    if not link.exists():
        link.symlink_to(raw.resolve(), target_is_directory=True)
    elif link.resolve() != raw.resolve():
        raise FileExistsError(f"{link} exists and is not a link to {raw}; use another --out")
    return StudyData(faces, labels, f"uncropped images from {raw} (no data/faces_512/train: align_faces.py not run)")


def build_demo(out: Path, log: RunLog) -> Path:
    """``python -m titan.demo --out OUT`` (once): the default data set of the study."""
    if (out / TRAIN_CSV).is_file():
        return out
    if not (Path(__file__).with_name("demo.py")).is_file():
        raise FileNotFoundError("the demo set builder (titan/demo/) is not installed; pass --data DIR "
                                "holding data/dataset/train_solution.csv and the images")
    log.info(f"building the demo set in {out} (python -m titan.demo)")
    subprocess.run([sys.executable, "-m", "titan.demo", "--out", str(out.resolve())], check=True,
                   cwd=Path(__file__).resolve().parents[2])
    return out


def count_params(arch: str, head: str) -> int:
    body = build_arch_backbone(arch)
    return sum(p.numel() for m in (body, build_head(head, body.num_features)) for p in m.parameters())


def arch_config(arch: str, data: StudyData, out: Path, preset: str, budget: dict[str, Any]) -> TrainConfig:
    """The pipeline's config for one architecture: same data, folds and budget as every other row."""
    spec = parse_arch(arch)
    return make_config(preset=preset, overrides={
        **budget, "arch": arch, "head": spec.head, "faces_dir": str(data.faces_dir), "train_csv": str(data.labels),
        "fallback_csv": str(data.labels), "out_dir": str(out / arch)})


def train_arch(cfg: TrainConfig) -> dict[str, Any]:
    """SSL (TitanNet only) and k-fold fine-tuning through the pipeline → the study's row."""
    from .finetune import run_finetune
    from .ssl import run_ssl
    from .session import session

    spec = parse_arch(cfg.arch)
    with session(cfg) as r:
        t0 = time.time()
        run_ssl(cfg, r)
        t1 = time.time()
        summary = run_finetune(cfg, r)
        t2 = time.time()
    oof = summary["oof"]
    return {"arch": cfg.arch, "params_m": count_params(cfg.arch, spec.head) / 1e6,
            "f1": oof["f1"], "precision": oof["precision"], "recall": oof["recall"], "roc_auc": oof["roc_auc"],
            "missed": f"{oof['missed_fakes']} / {oof['n_fakes']}", "missed_fakes": oof["missed_fakes"],
            "n_fakes": oof["n_fakes"], "n": oof["n"], "threshold": oof["threshold"],
            # fine-tuning wall time per fold-epoch (validation pass included); SSL reported apart
            "s_per_epoch": (t2 - t1) / (cfg.n_folds * cfg.ft_epochs), "ssl_s": (t1 - t0) if spec.ssl else float("nan")}


def run_study(archs: Sequence[str], data: StudyData, out: str | os.PathLike, preset: str = "default",
              budget: dict[str, Any] | None = None, log: RunLog | None = None) -> pd.DataFrame:
    """Train every arch on the same folds and budget → the table (also ``archs.csv`` / ``archs.md`` in ``out``)."""
    out = Path(out)
    budget = dict(budget or {})
    log = log or RunLog(*log_files(out, "compare_archs"))
    for a in archs:
        parse_arch(a)  # every name valid before hours of training
    rows = []
    for a in archs:
        cfg = arch_config(a, data, out, preset, budget)
        row_path = out / a / ROW_JSON
        key = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out_dir", "num_workers", "device", "threads")}
        if row_path.is_file():
            saved = json.loads(row_path.read_text())
            if saved.get("config") != key:
                raise ValueError(f"{row_path} was trained with another budget or data; use a fresh --out")
            log.info(f"{a}: finished earlier; row from {row_path}")
            rows.append(saved["row"])
            continue
        log.info(f"{a}: training {cfg.n_folds} folds × {cfg.ft_epochs} epoch(s) at {cfg.img_size}px, batch {cfg.batch_size}")
        row = train_arch(cfg)
        atomic_json({"row": row, "config": key}, row_path)  # strict JSON: a NaN score is null
        log.record("study_row", **row)
        rows.append(row)
    table = pd.DataFrame(rows)
    write_table(table, out, data.note)
    log.info("architecture study:\n" + markdown_table(table))
    return table


def markdown_table(table: pd.DataFrame) -> str:
    def cell(key: str, v: Any) -> str:
        if isinstance(v, float):
            return "–" if v != v else (f"{v:.2f}" if key in ("params_m", "ssl_s") else
                                       f"{v:.1f}" if key == "s_per_epoch" else f"{v:.3f}")
        return str(v)

    lines = ["| " + " | ".join(COLUMNS.values()) + " |", "|" + "---|" * len(COLUMNS)]
    for _, r in table.iterrows():
        lines.append("| " + " | ".join(cell(k, r[k]) for k in COLUMNS) + " |")
    return "\n".join(lines)


def write_table(table: pd.DataFrame, out: Path, note: str) -> None:
    atomic_write(out / "archs.csv", lambda tmp: table.to_csv(tmp, index=False))
    md = markdown_table(table) + f"\n\nData: {note}. Metrics are out-of-fold over every labelled image.\n"
    atomic_write(out / "archs.md", lambda tmp: Path(tmp).write_text(md))
