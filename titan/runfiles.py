"""The names of the files a training run writes (the file contract in the README), in one place.

Training writes them, and inference, diamonds, safe inference, Grad-CAM, the plots and the
report find them here, so a name cannot drift between a writer and its readers.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

FOLD_PARTS = ("backbone", "head", "meta")

# The defaults every script starts from (the README layout), defined here once and imported.
DEFAULT_PREFIX = "v42"  # our fold files; "titan" is the V38 release's
DATASET_DIR = "data/dataset"
TRAIN_CSV = f"{DATASET_DIR}/train_solution.csv"
TEST_IMAGES = f"{DATASET_DIR}/test_images"
FACES_DIR = "data/faces_512"
TEST_FACES = f"{FACES_DIR}/test"
DIAMOND_CSV = "train_diamond.csv"
ENSEMBLE_JSON = "ensemble.json"  # a folder naming member runs scored together (titan.infer.ensemble)


def log_files(folder: str | os.PathLike, stem: str) -> tuple[Path, Path]:
    """A stage's log pair: ``{stem}_log.txt`` (human lines) and ``{stem}_log.jsonl`` (one record per event)."""
    return Path(folder) / f"{stem}_log.txt", Path(folder) / f"{stem}_log.jsonl"


@dataclass(frozen=True)
class RunFiles:
    """``folder``'s run files for a prefix: ``v42`` (ours) or ``titan`` (the V38 release)."""

    folder: Path
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        object.__setattr__(self, "folder", Path(self.folder))

    def fold(self, part: str, k: int) -> Path:
        """``{prefix}_{backbone|head|meta}_fold{k}.pth``."""
        if part not in FOLD_PARTS:
            raise ValueError(f"unknown fold file part {part!r}; one of {FOLD_PARTS}")
        return self.folder / f"{self.prefix}_{part}_fold{k}.pth"

    def fold_oof(self, k: int, folder: str | os.PathLike | None = None) -> Path:
        """``oof_fold{k}.csv``: fold k's out-of-fold rows (training keeps them in its checkpoint folder)."""
        return Path(folder if folder is not None else self.folder) / f"oof_fold{k}.csv"

    def fold_glob(self, part: str = "backbone") -> str:
        """``{prefix}_{part}_fold*.pth``: the pattern of a fold part's files, for globbing and messages."""
        return f"{self.prefix}_{part}_fold*.pth"

    def fold_numbers(self) -> list[int]:
        """Every k with a ``{prefix}_backbone_fold{k}.pth`` here, ascending."""
        if not self.folder.is_dir():
            return []
        pattern = re.compile(rf"{re.escape(self.prefix)}_backbone_fold(\d+)\.pth")
        return sorted(int(m.group(1)) for p in self.folder.glob(self.fold_glob())
                      if (m := pattern.fullmatch(p.name)))

    def logs(self, stage: str) -> tuple[Path, Path]:
        """``{stage}_{prefix}_log.txt`` / ``.jsonl``."""
        return log_files(self.folder, f"{stage}_{self.prefix}")

    def named(self, template: str) -> Path:
        return self.folder / template.format(prefix=self.prefix)

    # a frozen start the folds' backbone files are differences from (--tune probe / layernorm: titan.train.tune)
    backbone_base = property(lambda self: self.named("{prefix}_backbone_base.pth"))
    ssl_weights = property(lambda self: self.named("titan_{prefix}_ssl.pth"))
    log_txt = property(lambda self: self.logs("training")[0])
    log_jsonl = property(lambda self: self.logs("training")[1])
    estimate_log_txt = property(lambda self: self.logs("estimate")[0])  # --estimate: its only output
    estimate_log_jsonl = property(lambda self: self.logs("estimate")[1])
    config_json = property(lambda self: self.named("config_{prefix}.json"))
    oof_csv = property(lambda self: self.named("oof_{prefix}.csv"))
    metrics_json = property(lambda self: self.named("metrics_{prefix}.json"))
    predictions_csv = property(lambda self: self.named("predictions_{prefix}.csv"))
    submission_csv = property(lambda self: self.named("submission_{prefix}.csv"))
    submission_issues_csv = property(lambda self: self.named("submission_{prefix}_issues.csv"))
    ensemble_onnx = property(lambda self: self.named("{prefix}_ensemble.onnx"))  # export.py (its sidecar: .json)


def fold_number(path: str | os.PathLike) -> int | None:
    """k of a file named ``…fold{k}…``, else None."""
    m = re.search(r"fold(\d+)", Path(path).stem)
    return int(m.group(1)) if m else None
