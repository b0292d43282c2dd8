"""A run owns its folder (a lock every writing stage takes) and reuse checks every setting that shapes
the weights: a second run in a folder is refused at once, a dead run's lock is taken over, and a
rerun with another learning rate or seed retrains, naming the setting."""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from _single_thread import single_thread  # noqa: F401  (autouse fixture)
from test_train_pipeline import cfg_for, make_faces
from titan.config import TrainConfig
from titan.errors import Refusal
from titan.runlock import LOCK_NAME, FolderInUse, folder_lock
from titan.train import pipeline
from titan.train.reuse import NOT_WEIGHT_SHAPING, WEIGHT_SHAPING, unclassified

import train_v42_diamond

ROOT = Path(__file__).resolve().parents[1]
TRAIN = dict(ssl_epochs=1, n_folds=2, ft_epochs=1, img_size=32, batch_size=16)


def log_text(out: Path) -> str:
    return (out / "training_v42_log.txt").read_text()


def hold_lock_in_child(folder: Path) -> subprocess.Popen:
    """Another live process (waiting on its stdin) holding ``folder``'s lock, as folder_lock writes it."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE, text=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"pid": child.pid, "host": socket.gethostname(), "started": "now",
                                                "command": "train_v42_diamond.py --out-dir race"}))
    return child


# --- 1. a run owns its folder ---------------------------------------------------------------------

def test_second_training_in_a_held_folder_is_refused_at_once_naming_the_holder(tmp_path, capsys):
    root = make_faces(tmp_path, n_train=16, n_test=4, n_pseudo=0)
    out = root / "race"
    child = hold_lock_in_child(out)
    try:
        args = ["--preset", "tiny", "--faces-dir", str(root / "faces"), "--train-csv", str(root / "train_diamond.csv"),
                "--out-dir", str(out), "--stages", "finetune", "--ft-lr", "0.01", "--seed", "7"]
        assert train_v42_diamond.main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"pid {child.pid}" in err[0] and socket.gethostname() in err[0]
        assert "--out-dir race" in err[0] and f"delete {out / LOCK_NAME}" in err[0]
        assert not (out / "config_v42.json").exists() and not list(out.glob("v42_*"))  # nothing written
    finally:
        child.communicate("")


def test_lock_of_a_dead_process_is_taken_over_with_a_notice_and_released(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                                  "started": "earlier", "command": "killed run"}))
    said = []
    with folder_lock(tmp_path, said.append) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
        with folder_lock(tmp_path, said.append):  # nested stages of one run share it
            pass
        assert path.exists()
    assert any("NOTICE: taking over" in s and "killed run" in s for s in said)
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_is_released_on_ctrl_c_and_other_hosts_locks_are_refused(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with folder_lock(tmp_path):
            raise KeyboardInterrupt
    assert not (tmp_path / LOCK_NAME).exists()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "now", "command": "x"}))
    with pytest.raises(FolderInUse, match="pid 1 on elsewhere") as e:
        with folder_lock(tmp_path):
            pass
    assert isinstance(e.value, Refusal)


def test_every_writing_stage_takes_the_lock(tmp_path):
    """align, diamonds, safe inference, evaluate and detect's heatmaps refuse a held folder."""
    from titan.data.align import AlignOptions, run_align
    from titan.infer.diamonds import DiamondConfig, make_diamonds
    from titan.infer.safe import SafeConfig, safe_inference
    from titan.report.evaluation import EvalOptions, evaluate

    held = tmp_path / "held"
    child = hold_lock_in_child(held)
    try:
        for call in (lambda: run_align(AlignOptions(input=str(tmp_path), output=str(held))),
                     lambda: make_diamonds(DiamondConfig(out=str(held / "train_diamond.csv"))),
                     lambda: safe_inference(SafeConfig(out=str(held / "submission.csv"))),
                     lambda: evaluate(EvalOptions(out=str(held)))):
            with pytest.raises(FolderInUse, match=f"pid {child.pid}"):
                call()
    finally:
        child.communicate("")


# --- 2. reuse checks every setting that shapes the weights ------------------------------------------

def test_every_train_config_field_is_classified_as_weight_shaping_or_not():
    assert unclassified() == []
    assert {"num_workers", "device", "threads", "infer_batch_size", "tta"} <= set(NOT_WEIGHT_SHAPING)
    assert {"seed", "ft_lr", "ssl_lr", "ft_epochs", "jpeg_p", "sbi_p", "arch", "img_size"} <= set(WEIGHT_SHAPING)

    @dataclasses.dataclass
    class Grown(TrainConfig):
        new_knob: float = 0.5
    assert unclassified(Grown) == ["new_knob"]


def test_rerun_with_other_weight_settings_retrains_naming_them_and_the_config_follows(tmp_path):
    root = make_faces(tmp_path, n_train=16, n_test=4, n_pseudo=0)
    pipeline.run_stages(cfg_for(root, "run", **TRAIN), ["ssl", "finetune"])
    # Settings that do not shape weights reuse everything.
    pipeline.run_stages(cfg_for(root, "run", **TRAIN, num_workers=0, tta="identity", infer_batch_size=3, threads=1),
                        ["ssl", "finetune"])
    text = log_text(root / "run")
    assert "retraining" not in text and "Fold 1 already complete; skipping" in text and "SSL already complete" in text
    # A stage that does not train leaves the config describing the weights in the folder.
    pipeline.run_stages(cfg_for(root, "run", **TRAIN, seed=7, ft_lr=0.01), [])
    assert json.loads((root / "run" / "config_v42.json").read_text())["seed"] == 3407
    assert "config_v42.json keeps describing the weights here" in log_text(root / "run")

    pipeline.run_stages(cfg_for(root, "run", **TRAIN, seed=7, ft_lr=0.01), ["ssl", "finetune"])
    text = log_text(root / "run")
    assert "SSL: retraining — titan_v42_ssl.pth was made with seed 3407 → 7" in text
    for k in (0, 1):
        assert f"Fold {k}: retraining — it was trained with" in text and "ft_lr 0.0003 → 0.01" in text
    saved = json.loads((root / "run" / "config_v42.json").read_text())
    assert saved["seed"] == 7 and saved["ft_lr"] == 0.01
