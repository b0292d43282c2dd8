"""Never silently wrong: reruns notice new inputs, the submission covers exactly the test set, input
errors come before the hours of work, every failure ends in one line, the original's meta files load."""
from __future__ import annotations

import errno
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from _single_thread import single_thread  # noqa: F401  (autouse fixture)
from fold_fixtures import write_v42_folds
from test_train_pipeline import cfg_for, cli_args, make_faces
from titan.data.align import AlignOptions, run_align
from titan.data.images import ImageDecodeError, ImageIndex, decode_image
from titan.data.labels import LabelCSVError, read_labels
from titan.infer.folds import FoldSet
from titan.infer.safe import SafeConfig, safe_inference
from titan.runlog import RunLog, read_jsonl
from titan.train import pipeline

import train_v42_diamond

TRAIN = dict(ssl_epochs=1, n_folds=2, ft_epochs=1, img_size=32, batch_size=16)


def log_text(out: Path) -> str:
    return (out / "training_v42_log.txt").read_text()


# --- 1. a rerun notices new inputs ----------------------------------------------------------------

def test_rerun_with_changed_labels_retrains_every_fold_and_says_why(tmp_path):
    root = make_faces(tmp_path, n_train=16, n_test=6, n_pseudo=0)
    pipeline.run_stages(cfg_for(root, "run", **TRAIN), ["ssl", "finetune"])
    before = pd.read_csv(root / "run" / "oof_v42.csv", dtype={"Id": str})
    labels = pd.read_csv(root / "train_diamond.csv", dtype={"Id": str})
    labels["target_feature"] = 1 - labels.target_feature
    labels.to_csv(root / "train_diamond.csv", index=False)

    pipeline.run_stages(cfg_for(root, "run", **TRAIN), ["ssl", "finetune"])
    text = log_text(root / "run")
    assert "SSL already complete" in text  # the images did not change: SimMIM is reused
    assert "Fold 0: retraining — its labels changed since it was trained" in text
    assert "Fold 1: retraining — its labels changed" in text
    after = pd.read_csv(root / "run" / "oof_v42.csv", dtype={"Id": str})
    assert (after.target_feature.to_numpy() == 1 - before.target_feature.to_numpy()).all()


def test_new_diamonds_in_the_same_folder_are_trained_on(tmp_path):
    root = make_faces(tmp_path, n_train=16, n_test=6, n_pseudo=0)
    pipeline.run_stages(cfg_for(root, "run", **TRAIN), ["finetune"])
    rows = pd.read_csv(root / "train_diamond.csv", dtype={"Id": str})
    diamonds = pd.DataFrame({"Id": ["100", "101"], "target_feature": [0, 1], "is_pseudo": [True, True]})
    pd.concat([rows, diamonds]).to_csv(root / "train_diamond.csv", index=False)
    pipeline.run_stages(cfg_for(root, "run", **TRAIN), ["finetune"])
    text = log_text(root / "run")
    assert "Fold 0: retraining — its labels and images changed" in text and "2 pseudo rows" in text
    assert "Fold 0: 10 training rows (2 pseudo)" in text


def test_changed_face_images_retrain_simmim(tmp_path):
    root = make_faces(tmp_path, n_train=16, n_test=6, n_pseudo=0)
    pipeline.run_stages(cfg_for(root, "run", **TRAIN), ["ssl"])
    img = Image.open(root / "faces" / "train" / "0.jpg")
    img.transpose(Image.FLIP_LEFT_RIGHT).save(root / "faces" / "train" / "0.jpg", quality=80)
    pipeline.run_stages(cfg_for(root, "run", **TRAIN), ["ssl"])
    assert "SSL: retraining — the face images differ" in log_text(root / "run")


def test_resume_mid_fold_with_changed_labels_is_refused_saying_how_to_start_fresh(tmp_path, monkeypatch):
    root = make_faces(tmp_path, n_train=16, n_test=6, n_pseudo=0)
    over = dict(TRAIN, ft_epochs=2, ssl_epochs=0)
    # Fold 0 writes its epoch states, then the run dies before the fold is finished.
    monkeypatch.setattr("titan.train.finetune.finish_fold", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_stages(cfg_for(root, "run", **over), ["finetune"])
    monkeypatch.undo()
    labels = pd.read_csv(root / "train_diamond.csv", dtype={"Id": str})
    labels.loc[0, "target_feature"] = 1 - labels.loc[0, "target_feature"]
    labels.to_csv(root / "train_diamond.csv", index=False)
    with pytest.raises(ValueError, match=r"made from other labels .* delete .*fold0_ep\*\.pth.*fresh --out-dir"):
        pipeline.run_stages(cfg_for(root, "run", **over), ["finetune"])


# --- 2. the submission covers exactly the test set --------------------------------------------------

def bad_test_files(raw: Path, faces: Path) -> dict[str, str]:
    """Raw test images the crops cannot cover: what the test set must still give a row each."""
    raw.mkdir(parents=True, exist_ok=True)
    for p in sorted(faces.glob("*.jpg")):
        shutil.copy(p, raw / p.name)
    (raw / "empty.jpg").write_bytes(b"")
    (raw / "truncated.jpg").write_bytes((faces / "100.jpg").read_bytes()[:200])
    Image.new("RGB", (1, 1)).save(raw / "tiny.png")
    Image.new("RGB", (48, 40), (90, 20, 20)).save(raw / "anim.gif")
    Image.new("RGB", (48, 40), (20, 90, 20)).save(raw / "photo.jfif", format="JPEG")
    (raw / "notes.txt").write_text("not an image")
    return {"empty": "no crop", "truncated": "no crop", "tiny": "no crop", "anim": "no crop", "photo": "no crop"}


def test_training_inference_gives_every_raw_test_image_a_row_and_lists_the_guessed(tmp_path):
    root = make_faces(tmp_path, n_train=16, n_test=6, n_pseudo=0)
    raw = root / "raw_test"
    extra = bad_test_files(raw, root / "faces" / "test")
    (root / "faces" / "test" / "103.jpg").write_bytes(b"garbage")  # an unreadable crop
    cfg = cfg_for(root, "run", **TRAIN, raw_test_dir=str(raw))
    pipeline.run_stages(cfg, ["finetune", "infer"])
    sub = pd.read_csv(root / "run" / "submission_v42.csv", dtype={"Id": str})
    expected = sorted([str(i) for i in range(100, 106)] + list(extra), key=str)
    assert sorted(sub.Id) == expected and "notes" not in set(sub.Id)
    issues = pd.read_csv(root / "run" / "submission_v42_issues.csv", dtype={"Id": str})
    assert sorted(issues.Id) == sorted(["103", *extra])
    assert (issues.resolution == "prior").all()
    text = log_text(root / "run")
    assert f"{len(issues)} of {len(sub)} row(s) guessed" in text and "notes.txt" in text


def test_crops_whose_original_was_deleted_are_left_out_of_both_submissions(tmp_path):
    root = make_faces(tmp_path, n_train=16, n_test=6, n_pseudo=0)
    raw = root / "raw_test"
    raw.mkdir()
    for p in sorted((root / "faces" / "test").glob("*.jpg"))[:-1]:  # 105's original is gone
        shutil.copy(p, raw / p.name)
    pipeline.run_stages(cfg_for(root, "run", **TRAIN, raw_test_dir=str(raw)), ["finetune", "infer"])
    main = pd.read_csv(root / "run" / "submission_v42.csv", dtype={"Id": str})
    safe_inference(SafeConfig(weights_dir=str(root / "run"), test_dir=str(root / "faces" / "test"), raw_test_dir=str(raw),
                              out=str(tmp_path / "safe.csv"), device="cpu", num_workers=0, progress=False))
    safe = pd.read_csv(tmp_path / "safe.csv", dtype={"Id": str})
    assert "105" not in set(main.Id) and main.Id.tolist() == safe.Id.tolist() == [str(i) for i in range(100, 105)]
    assert "have no original" in log_text(root / "run")


# --- 3. alignment notices other settings and deleted originals --------------------------------------

def align_opts(root: Path, out: Path, **kw) -> AlignOptions:
    return AlignOptions(**{**dict(input=str(root), output=str(out), splits="train", size=32, device="cpu", workers=0,
                                  writers=1), **kw})


def test_alignment_rerun_with_another_size_or_margin_redoes_the_crops(tmp_path):
    src = tmp_path / "data" / "train_images"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(src / f"{i}.png")
    out = tmp_path / "faces"
    run_align(align_opts(tmp_path / "data", out), RunLog(None, None, echo=False))
    log = RunLog(tmp_path / "l.txt", None, echo=False)
    (s,) = run_align(align_opts(tmp_path / "data", out, size=48), log)
    assert s.skipped == 0 and s.face + s.fallback == 3
    assert all(Image.open(out / "train" / f"{i}.jpg").size == (48, 48) for i in range(3))
    assert "crop settings changed" in (tmp_path / "l.txt").read_text() and "'size': (32, 48)" in (tmp_path / "l.txt").read_text()
    (s,) = run_align(align_opts(tmp_path / "data", out, size=48, margin=0.3), log)
    assert s.skipped == 0
    (s,) = run_align(align_opts(tmp_path / "data", out, size=48, margin=0.3), log)
    assert s.skipped == 3  # the same settings: nothing to redo


def test_crops_of_deleted_originals_are_moved_aside_and_not_trained_on(tmp_path):
    src = tmp_path / "data" / "train_images"
    src.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (40, 40), (10 * i, 50, 90)).save(src / f"{i}.png")
    out = tmp_path / "faces"
    run_align(align_opts(tmp_path / "data", out), RunLog(None, None, echo=False))
    (src / "2.png").unlink()
    (s,) = run_align(align_opts(tmp_path / "data", out), RunLog(None, None, echo=False))
    assert s.stale == 1 and (out / "train" / "stale" / "2.jpg").is_file()
    assert ImageIndex(out / "train").ids() == ["0", "1"]
    assert "2" not in pd.read_csv(out / "train" / "manifest.csv", dtype={"Id": str}).Id.tolist()


def test_tiny_and_extreme_aspect_images_get_the_centre_fallback(tmp_path):
    src = tmp_path / "data" / "train_images"
    src.mkdir(parents=True)
    Image.new("RGB", (1, 1), (200, 10, 10)).save(src / "dot.png")
    Image.new("RGB", (20000, 100), (10, 200, 10)).save(src / "strip.png")
    out = tmp_path / "faces"
    (s,) = run_align(align_opts(tmp_path / "data", out), RunLog(None, None, echo=False))
    assert (s.fallback, s.failed) == (2, 0)
    assert Image.open(out / "train" / "dot.jpg").size == (32, 32)


def test_a_decompression_bomb_sized_image_is_refused_by_name_from_its_header(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("L", (3000, 2000)).save(path)
    with pytest.raises(ImageDecodeError, match=r"huge\.png.*6,000,000 pixels, above the limit of 1,000,000"):
        decode_image(path, max_pixels=1_000_000)
    assert decode_image(path, max_pixels=0).shape == (2000, 3000, 3)


# --- 4. input errors before the hours of work ---------------------------------------------------------

@pytest.mark.parametrize("csv, message", [
    ("Id,target_feature\n", "no label rows"),
    ("Id,target_feature\n0,0\n1,0\n2,0\n3,0\n", "both classes are needed"),
])
def test_label_errors_stop_the_run_before_simmim(tmp_path, capsys, csv, message):
    root = make_faces(tmp_path, n_train=4, n_test=2, n_pseudo=0)
    (root / "train_diamond.csv").write_text(csv)
    rc = train_v42_diamond.main(cli_args(root, "run", "--n-folds", "2"))
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "train_diamond.csv" in err and "Traceback" not in err
    assert not (root / "run" / "titan_v42_ssl.pth").exists() and "SSL Ep" not in log_text(root / "run")


def test_header_only_csv_is_a_clear_label_error(tmp_path):
    (tmp_path / "labels.csv").write_text("Id,target_feature,is_pseudo\n")
    with pytest.raises(LabelCSVError, match=r"labels\.csv: no label rows"):
        read_labels(tmp_path / "labels.csv")


# --- 5. every failure ends in one line ---------------------------------------------------------------

def test_disk_full_while_saving_a_checkpoint_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    root = make_faces(tmp_path, n_train=8, n_test=2, n_pseudo=0)

    def full(obj, f, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    rc = train_v42_diamond.main(cli_args(root, "run", "--n-folds", "2", "--img-size", "32", "--stages", "ssl"))
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # above it: the run log's own lines
    assert rc == 3 and "Traceback" not in err
    assert last.startswith("train_v42_diamond.py: error: disk full while writing") and "ssl_ep1.pth" in last
    assert last.endswith("rerun the same command to resume")
    assert not list((root / "run" / "checkpoints_v42").glob("*.tmp"))


def test_unwritable_output_folder_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    root = make_faces(tmp_path, n_train=8, n_test=2, n_pseudo=0)
    real = Path.write_text

    def refuse(self, *a, **kw):
        if self.name == ".write_test":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "write_text", refuse)
    rc = train_v42_diamond.main(cli_args(root, "run"))
    err = capsys.readouterr().err
    assert rc == 3 and "cannot write" in err and str(root / "run") in err and "Traceback" not in err


def test_ctrl_c_says_how_to_resume_without_a_traceback(tmp_path, capsys, monkeypatch):
    root = make_faces(tmp_path, n_train=8, n_test=2, n_pseudo=0)
    monkeypatch.setattr("train_v42_diamond.run_stages", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert train_v42_diamond.main(cli_args(root, "run")) == 130
    assert capsys.readouterr().err.strip() == "train_v42_diamond.py: interrupted; rerun the same command to resume"


def test_debug_adds_the_traceback(tmp_path, capsys, monkeypatch):
    root = make_faces(tmp_path, n_train=8, n_test=2, n_pseudo=0)
    (root / "train_diamond.csv").write_text("Id,target_feature\n")
    assert train_v42_diamond.main(cli_args(root, "run", "--debug")) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "no label rows" in err


def test_infer_on_some_of_the_folds_says_how_many_and_which_threshold(tmp_path):
    root = make_faces(tmp_path, n_train=16, n_test=4, n_pseudo=0)
    pipeline.run_stages(cfg_for(root, "run", **TRAIN), ["finetune"])
    for part in ("backbone", "head", "meta"):
        (root / "run" / f"v42_{part}_fold1.pth").unlink()
    pipeline.run_stages(cfg_for(root, "run", **TRAIN), ["infer"])
    text = log_text(root / "run")
    assert "using 1 of 2 folds (fold0)" in text and "threshold " in text and "out-of-fold best F1" in text


def test_a_fold_of_the_wrong_shape_is_named_in_infer(tmp_path, capsys):
    root = make_faces(tmp_path, n_train=16, n_test=4, n_pseudo=0)
    pipeline.run_stages(cfg_for(root, "run", **TRAIN), ["finetune"])
    other = tmp_path / "femto"
    other.mkdir()
    write_v42_folds(other, n=1, variant="femto", size=32)
    shutil.copy(other / "v42_backbone_fold0.pth", root / "run" / "v42_backbone_fold0.pth")
    rc = train_v42_diamond.main(cli_args(root, "run", "--n-folds", "2", "--img-size", "32", "--stages", "infer"))
    err = capsys.readouterr().err
    assert rc == 2 and "v42_backbone_fold0.pth" in err and "v42_head_fold0.pth" in err


# --- 6. the original's meta files -----------------------------------------------------------------------

def test_the_originals_numpy_threshold_meta_file_loads_safely(tmp_path):
    write_v42_folds(tmp_path, n=2, th=None)
    best_th = np.linspace(0.1, 0.9, 81)[30]  # as the original's training script picks it
    for k in range(2):
        torch.save({"th": best_th}, tmp_path / f"v42_meta_fold{k}.pth")
    fs = FoldSet.from_folder(tmp_path)
    assert fs.names == ["fold0", "fold1"] and all(f.threshold == pytest.approx(0.4) for f in fs.folds)
    assert fs.threshold() == (pytest.approx(0.4), "mean of 2 fold threshold(s)")


def test_a_meta_file_that_is_refused_costs_only_its_threshold(tmp_path):
    import collections

    write_v42_folds(tmp_path, n=2)
    torch.save({"th": collections.OrderedDict(a=1), "evil": pd.Timestamp("2020-01-01")}, tmp_path / "v42_meta_fold1.pth")
    fs = FoldSet.from_folder(tmp_path)
    assert fs.names == ["fold0", "fold1"] and fs.folds[1].threshold is None
    assert any("meta file ignored" in n for n in fs.notes)
    assert fs.threshold()[0] == pytest.approx(0.4)  # fold0's own


def test_jsonl_records_still_parse_after_a_retrain(tmp_path):
    root = make_faces(tmp_path, n_train=16, n_test=4, n_pseudo=0)
    pipeline.run_stages(cfg_for(root, "run", **TRAIN), ["finetune"])
    recs, bad = read_jsonl(root / "run" / "training_v42_log.jsonl")
    assert bad == 0 and any(r["event"] == "oof" for r in recs)
