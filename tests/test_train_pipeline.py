"""train_v42_diamond.py end to end on tiny generated faces: outputs, log contract, folds, resume, faults, DDP."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from _single_thread import single_thread  # noqa: F401  (autouse fixture)
from titan.data import ids
from titan.train import finetune, optim, pipeline
from titan.runlog import RunLog
from titan.checkpoints import load_file, load_state_dict
from titan.config import make_config
from titan.data.labels import LabelCSVError
from titan.runlog import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_v42_diamond  # noqa: E402


def make_faces(root: Path, n_train: int = 24, n_test: int = 8, n_pseudo: int = 4, seed: int = 0) -> Path:
    """64-px JPEG 'faces': fakes carry a faint checkerboard (a learnable high-frequency cue)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    rows = []

    def face(fake: int) -> Image.Image:
        a = rng.normal(128, 25, (64, 64, 3)) + 40 * np.sin(xx / rng.uniform(4, 8))[..., None]
        if fake:
            a += 30 * ((xx + yy) % 2)[..., None]
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))

    for split in ("train", "test"):
        (root / "faces" / split).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        face(i % 2).save(root / "faces" / "train" / f"{i}.jpg", quality=92)
        rows.append((str(i), i % 2, False))
    for i in range(100, 100 + n_test):
        face(i % 2).save(root / "faces" / "test" / f"{i}.jpg", quality=92)
        if i < 100 + n_pseudo:
            rows.append((str(i), i % 2, True))
    pd.DataFrame(rows, columns=["Id", "target_feature", "is_pseudo"]).to_csv(root / "train_diamond.csv", index=False)
    return root


def cfg_for(root: Path, out: str, **over):
    base = dict(faces_dir=str(root / "faces"), train_csv=str(root / "train_diamond.csv"),
                fallback_csv=str(root / "none.csv"), out_dir=str(root / out), raw_test_dir=str(root / "raw_test"))
    return make_config(preset="tiny", overrides={**base, **over})


def cli_args(root: Path, out: str, *extra: str) -> list[str]:
    return ["--preset", "tiny", "--faces-dir", str(root / "faces"), "--train-csv", str(root / "train_diamond.csv"),
            "--raw-test-dir", str(root / "raw_test"), "--out-dir", str(root / out), *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_faces(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_run(data: Path) -> Path:
    """One full ssl → finetune → infer run through the script's CLI (2 folds to keep tests quick)."""
    assert train_v42_diamond.main(cli_args(data, "full", "--n-folds", "2")) == 0
    return data / "full"


SSL_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] SSL Ep (\d+) \| Loss: \d+\.\d{4} \| LR: \d\.\de[+-]\d\d$")
FT_LINE = re.compile(r"^\[[^\]]+\] Fold (\d+) Ep (\d+) \| Loss: \d+\.\d{4} \| Val F1: \d\.\d{4} \(th=\d\.\d\d\) \| "
                     r"AUC: (\d\.\d{4}|nan) \| AP: \d\.\d{4} \| LR: \d\.\de[+-]\d\d$")


def test_tiny_run_writes_every_output(tiny_run: Path, data: Path):
    names = ["titan_v42_ssl.pth", "oof_v42.csv", "metrics_v42.json", "predictions_v42.csv", "submission_v42.csv",
             "training_v42_log.txt", "training_v42_log.jsonl", "config_v42.json"]
    names += [f"v42_{p}_fold{k}.pth" for k in range(2) for p in ("backbone", "head", "meta")]
    assert not [n for n in names if not (tiny_run / n).is_file()]
    cfg = json.loads((tiny_run / "config_v42.json").read_text())
    assert cfg["n_folds"] == 2 and cfg["variant"] == "atto"
    assert load_file(tiny_run / "v42_backbone_fold0.pth")["meta"]["config"]["n_folds"] == 2  # config as plain types
    meta = load_file(tiny_run / "v42_meta_fold1.pth")  # weights_only=True
    assert {"th", "f1", "auc", "variant", "head", "img_size", "epoch"} <= set(meta) and 0 < meta["th"] < 1
    assert load_state_dict(tiny_run / "v42_head_fold0.pth")["head.1.weight"].shape == (1, 320)
    metrics = json.loads((tiny_run / "metrics_v42.json").read_text())
    assert {"threshold", "f1", "roc_auc", "ap", "precision", "recall", "tn", "fp", "fn", "tp", "missed_fakes"} <= set(metrics["oof"])
    assert [f["fold"] for f in metrics["folds"]] == [0, 1]
    # detect.py's temperature and uncertain band, fitted on the same OOF rows
    cal = metrics["calibration"]
    assert 0.05 <= cal["temperature"] <= 20 and 0 < cal["uncertain_band"] <= 0.5
    assert cal["nll_calibrated"] <= cal["nll_raw"] + 1e-9 and cal["n"] == len(pd.read_csv(tiny_run / "oof_v42.csv"))
    # Every resumable training state is cleaned up once its fold is done.
    assert not list((tiny_run / "checkpoints_v42").glob("fold*_ep*.pth"))


def test_log_lines_follow_the_plotter_contract(tiny_run: Path):
    lines = (tiny_run / "training_v42_log.txt").read_text().splitlines()
    assert [int(m.group(1)) for m in map(SSL_LINE.match, lines) if m] == [1]
    ft = [(int(m.group(1)), int(m.group(2))) for m in map(FT_LINE.match, lines) if m]
    assert ft == [(k, e) for k in range(2) for e in (1, 2)]
    recs, bad = read_jsonl(tiny_run / "training_v42_log.jsonl")
    assert bad == 0
    by = lambda ev: [r for r in recs if r["event"] == ev]  # noqa: E731
    assert set(by("ssl_epoch")[0]) == {"event", "time", "epoch", "loss", "lr", "img_s", "bad_steps"}
    assert set(by("ft_epoch")[0]) == {"event", "time", "fold", "epoch", "train_loss", "val_loss", "f1", "th", "auc", "ap",
                                      "precision", "recall", "lr", "img_s"}
    assert [r["fold"] for r in by("fold_done")] == [0, 1]
    assert len(by("oof")) == 1 and len(by("config")) == 1


def test_submission_has_every_test_id_once_in_id_order(tiny_run: Path, data: Path):
    sub = pd.read_csv(tiny_run / "submission_v42.csv", dtype={"Id": str})
    assert list(sub.columns) == ["Id", "target_feature"]
    assert sub.Id.tolist() == [str(i) for i in range(100, 108)]
    assert set(sub.target_feature) <= {0, 1}
    pred = pd.read_csv(tiny_run / "predictions_v42.csv", dtype={"Id": str})
    assert pred.Id.tolist() == sub.Id.tolist() and {"prob", "fold0", "fold1"} <= set(pred.columns)
    th = json.loads((tiny_run / "metrics_v42.json").read_text())["oof"]["threshold"]
    assert (sub.target_feature == (pred.prob >= th).astype(int)).all()
    assert ids.id_order(["10", "9", "100"]) == ["9", "10", "100"]


def test_folds_never_validate_on_pseudo_rows(tiny_run: Path, data: Path):
    labels = pd.read_csv(data / "train_diamond.csv", dtype={"Id": str})
    oof = pd.read_csv(tiny_run / "oof_v42.csv", dtype={"Id": str})
    real = labels[~labels.is_pseudo]
    assert sorted(oof.Id) == sorted(real.Id)  # each real row validated exactly once, no pseudo row ever
    assert list(oof.columns) == ["Id", "target_feature", "prob", "fold"]
    df = pd.DataFrame({"Id": [str(i) for i in range(30)], "target_feature": [i % 2 for i in range(30)],
                       "is_pseudo": [i >= 20 for i in range(30)]})
    folds = finetune.assign_folds(df, 5, seed=1)
    assert (folds[20:] == -1).all() and sorted(set(folds[:20])) == [0, 1, 2, 3, 4]
    for k in range(5):  # stratified: two fakes and two reals per fold
        assert sorted(df.target_feature[folds == k]) == [0, 0, 1, 1]
    assert (finetune.assign_folds(df, 5, seed=1) == folds).all()
    with pytest.raises(ValueError, match="stratified folds"):
        finetune.assign_folds(df.iloc[:6], 5, seed=1)


def test_rerun_skips_finished_stages_and_folds(tiny_run: Path, data: Path):
    before = (tiny_run / "submission_v42.csv").read_text()
    assert train_v42_diamond.main(cli_args(data, "full", "--n-folds", "2")) == 0
    text = (tiny_run / "training_v42_log.txt").read_text()
    assert "SSL already complete" in text and all(f"Fold {k} already complete; skipping" in text for k in range(2))
    assert len([1 for line in text.splitlines() if SSL_LINE.match(line)]) == 1  # no epoch redone
    assert (tiny_run / "submission_v42.csv").read_text() == before


def test_gpu_decode_path_predicts_like_cpu_decoding(tiny_run: Path, data: Path):
    """--gpu-decode (torchvision decode_jpeg on the training device; here the CPU) gives the same predictions."""
    before = pd.read_csv(tiny_run / "predictions_v42.csv", dtype={"Id": str})
    pipeline.run_stages(cfg_for(data, "full", n_folds=2, gpu_decode=True), ["infer"])
    after = pd.read_csv(tiny_run / "predictions_v42.csv", dtype={"Id": str})
    assert after.Id.tolist() == before.Id.tolist()
    assert np.allclose(after.prob, before.prob, atol=0.02)


def test_device_decoding_matches_cpu_decoding_and_replaces_a_corrupt_jpeg(data: Path, tmp_path: Path, caplog):
    from titan.data.datasets import EncodedFaceDataset, FaceDataset, collate_encoded, decode_on_device

    folder = data / "faces" / "train"
    enc = EncodedFaceDataset(["0", "1", "2"], folder, 32)
    x = decode_on_device(collate_encoded([enc[i] for i in range(3)])[0], 32, torch.device("cpu"))
    ref = torch.stack([FaceDataset(["0", "1", "2"], folder, 32)[i][0] for i in range(3)])
    assert x.shape == (3, 3, 32, 32) and (x.int() - ref.int()).abs().max() <= 2
    (tmp_path / "0.jpg").write_bytes((folder / "0.jpg").read_bytes())
    (tmp_path / "1.jpg").write_bytes((folder / "1.jpg").read_bytes()[:200])  # truncated
    enc = EncodedFaceDataset(["0", "1"], tmp_path, 32)
    x = decode_on_device(collate_encoded([enc[0], enc[1]])[0], 32, torch.device("cpu"))
    assert torch.equal(x[0], x[1]) and x[0].float().std() > 5  # replaced by a real image, not black
    assert "1.jpg" in caplog.text and "replaced" in caplog.text


class Killed(RuntimeError):
    pass


def kill_after(monkeypatch, n_steps: int) -> None:
    """Make the n-th optimiser micro-step raise, as a crash mid-epoch would."""
    real, calls = optim.Stepper.backward, {"n": 0}

    def backward(self, loss, where, synced=True):
        calls["n"] += 1
        if calls["n"] > n_steps:
            raise Killed(f"killed at {where}")
        return real(self, loss, where, synced)

    monkeypatch.setattr(optim.Stepper, "backward", backward)


def test_ssl_resumes_after_a_kill_and_matches_an_uninterrupted_run(data: Path, monkeypatch):
    # 32-px images and batch 16 keep this quick; resume logic does not depend on either.
    over = dict(ssl_epochs=2, img_size=32, batch_size=16)
    pipeline.run_stages(cfg_for(data, "ssl_a", **over), ["ssl"])
    steps_per_epoch = 2  # 32 images / batch 16
    kill_after(monkeypatch, steps_per_epoch + 1)
    with pytest.raises(Killed, match="SSL epoch 2"):
        pipeline.run_stages(cfg_for(data, "ssl_b", **over), ["ssl"])
    assert not (data / "ssl_b" / "titan_v42_ssl.pth").exists()
    monkeypatch.undo()
    pipeline.run_stages(cfg_for(data, "ssl_b", **over), ["ssl"])
    a, b = load_state_dict(data / "ssl_a" / "titan_v42_ssl.pth"), load_state_dict(data / "ssl_b" / "titan_v42_ssl.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    recs, _ = read_jsonl(data / "ssl_b" / "training_v42_log.jsonl")
    assert [r["epoch"] for r in recs if r["event"] == "ssl_epoch"] == [1, 2]  # epoch 1 not redone
    assert "SSL: resuming after epoch 1" in (data / "ssl_b" / "training_v42_log.txt").read_text()


def test_fold_resumes_after_a_kill_and_matches_an_uninterrupted_run(data: Path, monkeypatch):
    over = dict(n_folds=2, ft_epochs=2, img_size=32, batch_size=16)
    pipeline.run_stages(cfg_for(data, "ft_a", **over), ["finetune"])
    # fold 0: 2 epochs × 1 step (16 rows / 16) and fold 1's first epoch; then die in its second.
    kill_after(monkeypatch, 2 + 1)
    with pytest.raises(Killed, match="Fold 1 epoch 2"):
        pipeline.run_stages(cfg_for(data, "ft_b", **over), ["finetune"])
    assert (data / "ft_b" / "v42_meta_fold0.pth").is_file() and not (data / "ft_b" / "v42_meta_fold1.pth").exists()
    monkeypatch.undo()
    pipeline.run_stages(cfg_for(data, "ft_b", **over), ["finetune"])
    text = (data / "ft_b" / "training_v42_log.txt").read_text()
    assert "Fold 0 already complete; skipping" in text and "Fold 1: resuming after epoch 1" in text
    for k in range(2):
        a = load_state_dict(data / "ft_a" / f"v42_backbone_fold{k}.pth")
        b = load_state_dict(data / "ft_b" / f"v42_backbone_fold{k}.pth")
        assert all(torch.equal(a[n], b[n]) for n in a)
    oof_a, oof_b = (pd.read_csv(data / d / "oof_v42.csv") for d in ("ft_a", "ft_b"))
    pd.testing.assert_frame_equal(oof_a, oof_b)
    recs, _ = read_jsonl(data / "ft_b" / "training_v42_log.jsonl")
    assert [(r["fold"], r["epoch"]) for r in recs if r["event"] == "ft_epoch"] == [(0, 1), (0, 2), (1, 1), (1, 2)]


def test_highpass_stem_survives_ssl_and_fine_tuning_into_the_saved_weights(data: Path):
    over = dict(stem="highpass", ssl_epochs=1, n_folds=2, ft_epochs=1, img_size=32, batch_size=16)
    pipeline.run_stages(cfg_for(data, "hp", **over), ["ssl", "finetune"])
    for name in ("titan_v42_ssl.pth", "v42_backbone_fold0.pth", "v42_backbone_fold1.pth"):
        w = load_state_dict(data / "hp" / name)["downsamples.0.0.weight"]
        assert torch.allclose(w.sum(dim=(2, 3)), torch.zeros(w.shape[:2]), atol=1e-5), name
        assert w.abs().sum() > 0, name


def test_zero_ssl_epochs_skips_simmim_and_fine_tunes_from_scratch(data: Path):
    pipeline.run_stages(cfg_for(data, "nossl", ssl_epochs=0, n_folds=2, ft_epochs=1, img_size=32, batch_size=16),
                        ["ssl", "finetune"])
    assert not (data / "nossl" / "titan_v42_ssl.pth").exists()
    assert (data / "nossl" / "v42_backbone_fold1.pth").is_file()
    text = (data / "nossl" / "training_v42_log.txt").read_text()
    assert "SimMIM skipped" in text and "SSL off (--ssl-epochs 0): fine-tuning from random initialisation" in text


def test_non_finite_ssl_loss_is_skipped_and_counted_then_stops_the_run_naming_the_step(data: Path, monkeypatch):
    from titan.models.simmim import SimMIM

    real, calls = SimMIM.forward, {"n": 0}

    def nan_on(steps):
        def forward(self, x, mask=None):
            calls["n"] += 1
            loss, rec, m = real(self, x, mask)
            return (loss * float("nan") if calls["n"] in steps else loss), rec, m
        return forward

    over = dict(img_size=32, batch_size=8, max_bad_steps=2)
    monkeypatch.setattr(SimMIM, "forward", nan_on({2}))
    pipeline.run_stages(cfg_for(data, "nan_once", **over), ["ssl"])
    recs, _ = read_jsonl(data / "nan_once" / "training_v42_log.jsonl")
    ep = [r for r in recs if r["event"] == "ssl_epoch"]
    assert ep[0]["bad_steps"] == 1 and np.isfinite(ep[0]["loss"])
    calls["n"] = 0
    monkeypatch.setattr(SimMIM, "forward", nan_on({2, 3}))
    with pytest.raises(optim.NonFiniteLossError, match="2 non-finite losses in a row, the last at SSL epoch 1 step 3"):
        pipeline.run_stages(cfg_for(data, "nan_twice", **over), ["ssl"])


def test_missing_faces_are_an_error_listing_them_unless_skipped(tmp_path: Path):
    root = make_faces(tmp_path, n_train=12, n_test=4, n_pseudo=2)
    (root / "faces" / "train" / "3.jpg").unlink()
    (root / "faces" / "test" / "101.jpg").unlink()
    with pytest.raises(LabelCSVError, match=r"2 Id\(s\) have no face image: '3' \(line 5.*'101'.*--skip-missing"):
        pipeline.run_stages(cfg_for(root, "out"), ["finetune"])
    log = RunLog(None)
    df = finetune.load_labels(cfg_for(root, "out", skip_missing=True), log)
    assert "3" not in set(df.Id) and "101" not in set(df.Id) and len(df) == 12


def test_missing_train_csv_falls_back_with_a_notice(tmp_path: Path):
    root = make_faces(tmp_path, n_train=10, n_test=2, n_pseudo=0)
    fallback = root / "train_solution.csv"
    (root / "train_diamond.csv").rename(fallback)
    cfg = cfg_for(root, "out", fallback_csv=str(fallback))
    messages = []
    log = RunLog(None)
    log.info = messages.append
    assert len(finetune.load_labels(cfg, log)) == 10
    assert any("not found (no diamonds yet)" in m and str(fallback) in m for m in messages)


def test_unreadable_image_mid_training_is_replaced_and_reported(tmp_path: Path):
    root = make_faces(tmp_path, n_train=8, n_test=2, n_pseudo=0)
    (root / "faces" / "train" / "5.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    pipeline.run_stages(cfg_for(root, "out"), ["ssl"])
    text = (root / "out" / "training_v42_log.txt").read_text()
    assert re.search(r"WARNING: unreadable image replaced by another sample: .*5\.jpg", text)
    assert "SSL Ep 1 |" in text and (root / "out" / "titan_v42_ssl.pth").is_file()


def test_script_help_lists_every_config_field(capsys):
    with pytest.raises(SystemExit):
        train_v42_diamond.main(["--help"])
    out = capsys.readouterr().out
    from dataclasses import fields
    from titan.config import TrainConfig
    assert all(f"--{f.name.replace('_', '-')}" in out for f in fields(TrainConfig)) and "--stages" in out
    with pytest.raises(SystemExit):
        train_v42_diamond.main(["--stages", "ssl,train"])


def test_script_reports_bad_input_without_a_traceback(tmp_path, capsys):
    rc = train_v42_diamond.main(["--faces-dir", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "out")])
    assert rc == 2 and "nowhere/train: face folder not found — run align_faces.py" in capsys.readouterr().err


def test_ddp_two_cpu_processes_over_gloo(data: Path):
    """torchrun, 2 processes, gloo: one tiny epoch of each stage with the ArcFace head."""
    out = data / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train_v42_diamond.py"), *cli_args(data, "ddp", "--n-folds", "2", "--ft-epochs", "1", "--head", "arcface",
                                                         "--device", "cpu", "--img-size", "32")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (out / "training_v42_log.txt").read_text()
    assert "× 2 process(es)" in text
    assert len([1 for line in text.splitlines() if SSL_LINE.match(line)]) == 1  # rank 0 alone writes
    oof = pd.read_csv(out / "oof_v42.csv", dtype={"Id": str})
    assert len(oof) == 24 and oof.Id.is_unique  # validation gathered from both ranks, padding removed
    sub = pd.read_csv(out / "submission_v42.csv", dtype={"Id": str})
    assert sub.Id.tolist() == [str(i) for i in range(100, 108)]
    assert load_file(out / "v42_meta_fold0.pth")["head"] == "arcface"
