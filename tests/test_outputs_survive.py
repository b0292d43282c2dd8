"""Outputs survive any input name and say what they rest on: names that are not UTF-8 are escaped
and flagged, spreadsheet formulas in names are neutralised, --out/--html are checked before any
scoring, JSON is strict, one class is refused unless meant, Ctrl-C keeps the rows scored so far,
one file reached by two paths is scored once, and rows name the folds that scored them."""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from _single_thread import single_thread  # noqa: F401  (autouse fixture)
from test_detect import detect_cli, photos, run_dir  # noqa: F401  (module fixtures)
from titan.checkpoints import atomic_json
from titan.data.align import Manifest, manifest_row
from titan.safe_text import csv_cell, display_path, restore_cell

import evaluate


def raw_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# --- 3. outputs that survive any input name ----------------------------------------------------------

def test_a_name_that_is_not_utf8_is_escaped_and_flagged_and_every_result_is_written(run_dir, photos, tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(photos["astro"]).save(d / "ok.jpg")
    with open(os.path.join(os.fsencode(d), b"bad\xff.jpg"), "wb") as f:
        f.write((d / "ok.jpg").read_bytes())
    for out in ("d.csv", "d.jsonl"):
        assert detect_cli(d, "--weights-dir", run_dir, "--out", tmp_path / out, "--html", tmp_path / "p.html") == 0
    assert "bad\\xff.jpg" in capsys.readouterr().out  # the table printed too
    rows = {r["path"]: r for r in raw_rows(tmp_path / "d.csv") if r["face"] == ""}
    bad = next(r for p, r in rows.items() if p.endswith("bad\\xff.jpg"))
    assert bad["status"] == "ok" and bad["name_escaped"] == "true" and rows[str(d / "ok.jpg")]["name_escaped"] == ""
    jsonl = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sum(r["name_escaped"] for r in jsonl) == 2  # the face row and the summary row
    assert display_path(os.fsdecode(b"x\xfe.png")) == ("x\\xfe.png", True)


def test_names_a_spreadsheet_would_run_are_neutralised_and_numbers_stay_numbers(run_dir, photos, tmp_path):
    names = ['=HYPERLINK("http:evil","x").jpg', "+SUM(1).jpg", "@cmd.jpg", "-2+3.jpg"]
    for n in names:
        Image.fromarray(photos["astro"]).save(tmp_path / n, format="JPEG")
    assert detect_cli(".", "--weights-dir", run_dir, "--out", tmp_path / "d.csv", cwd=tmp_path) == 0
    paths = [r["path"] for r in raw_rows(tmp_path / "d.csv")]
    assert set(paths) == {"'" + n for n in names}
    assert all(not p.startswith(("=", "+", "-", "@")) for p in paths)
    assert all(float(r["prob"]) >= 0 for r in raw_rows(tmp_path / "d.csv"))
    assert csv_cell(-0.5) == -0.5 and csv_cell("-0.5") == "-0.5" and csv_cell("\tx") == "'\tx"
    assert restore_cell(csv_cell("'=quoted")) == "'=quoted"
    # The align manifest keeps its Ids exact through the round trip.
    m = Manifest(tmp_path / "faces" / "manifest.csv")
    m.append([manifest_row("=cmd", Path("/x/=cmd.jpg"), "failed", error="@bad")])
    assert "'=cmd" in m.path.read_text() and m.read()["=cmd"]["error"] == "@bad"


def test_out_and_html_are_checked_before_any_scoring_with_one_line_and_exit_codes(tmp_path, capsys):
    (tmp_path / "a.jpg").write_bytes(b"x")
    no_weights = tmp_path / "no_run"  # were anything scored first, this would be the error instead
    (tmp_path / "dir.csv").mkdir()
    cases = [("--out", tmp_path / "dir.csv", 2, "is a folder"), ("--out", tmp_path / "d.xlsx", 2, ".csv or .jsonl"),
             ("--html", tmp_path / "p.txt", 2, ".html")]
    if Path("/sys").is_dir():  # read-only even for root
        cases.append(("--out", Path("/sys/titan_detect.csv"), 3, "cannot write /sys/titan_detect.csv"))
    for flag, path, code, words in cases:
        assert detect_cli(tmp_path / "a.jpg", "--weights-dir", no_weights, flag, path) == code, (flag, path)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0] and "unexpected" not in err[0], err


def test_json_files_are_strict_null_never_nan(tmp_path):
    atomic_json({"a": float("nan"), "b": [np.float32("inf"), 1.5], "c": {"d": np.float64("nan")}}, tmp_path / "m.json")
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "c": {"d": None}}


# --- 5. one class, Ctrl-C, two paths, folds -------------------------------------------------------------

def one_class_set(tmp_path: Path, photos) -> tuple[Path, Path]:
    data = tmp_path / "data"
    data.mkdir()
    for i, key in enumerate(["astro", "grace", "coffee"]):
        Image.fromarray(photos[key]).save(data / f"r{i}.jpg")
    pd.DataFrame({"Id": ["r0", "r1", "r2"], "target_feature": [0, 0, 0]}).to_csv(tmp_path / "labels.csv", index=False)
    return data, tmp_path / "labels.csv"


def test_evaluate_refuses_one_class_unless_told_and_then_reports_only_what_is_defined(run_dir, photos, tmp_path, capsys):
    data, labels = one_class_set(tmp_path, photos)
    args = ["--data", str(data), "--labels", str(labels), "--weights-dir", str(run_dir), "--out", str(tmp_path / "ev"),
            "--device", "cpu", "--no-progress", "--degradations", "jpeg", "--reduced", "--bootstrap", "50"]
    assert evaluate.main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("evaluate.py")]
    assert len(err) == 1 and str(labels) in err[0] and "real (0)" in err[0] and "--one-class" in err[0]
    assert not (tmp_path / "ev" / "metrics.json").exists()

    assert evaluate.main(args + ["--one-class"]) == 0
    text = (tmp_path / "ev" / "metrics.json").read_text()
    assert "NaN" not in text
    m = json.loads(text)
    r = m["run_threshold"]
    assert r["f1"] is None and r["precision"] is None and r["roc_auc"] is None and m["best_threshold"] is None
    assert 0 <= r["false_positive_rate"]["value"] <= 1
    assert math.isclose(r["specificity"]["value"], 1 - r["false_positive_rate"]["value"])
    md = (tmp_path / "ev" / "evaluation.md").read_text()
    assert "| n/a (one class) | n/a (one class) | n/a (one class) | n/a (one class) |" in md and "not defined" in md


def test_ctrl_c_writes_the_rows_scored_so_far_and_says_detect_does_not_resume(run_dir, photos, tmp_path, capsys,
                                                                              monkeypatch):
    for i in range(4):
        Image.fromarray(photos["astro"]).save(tmp_path / f"p{i}.jpg")
    from titan.infer.detect import Detector
    real, calls = Detector.image_result, []

    def interrupt_third(self, *a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *a, **kw)
    monkeypatch.setattr(Detector, "image_result", interrupt_third)
    assert detect_cli(*[tmp_path / f"p{i}.jpg" for i in range(4)], "--weights-dir", run_dir, "--out", tmp_path / "d.csv") == 130
    err = capsys.readouterr().err
    assert "interrupted after 2 of 4 input(s)" in err and "partial" in err and "does not resume" in err
    assert "rerun the same command to resume" not in err
    summary = [r for r in raw_rows(tmp_path / "d.csv") if r["face"] == ""]
    assert [Path(r["path"]).name for r in summary] == ["p0.jpg", "p1.jpg"]


def test_one_file_reached_by_two_paths_is_scored_once_listed_as_first_given(run_dir, photos, tmp_path):
    Image.fromarray(photos["astro"]).save(tmp_path / "photo.jpg")
    (tmp_path / "link.jpg").symlink_to(tmp_path / "photo.jpg")
    assert detect_cli("photo.jpg", "link.jpg", str(tmp_path / "photo.jpg"), ".", "--weights-dir", run_dir,
                      "--out", tmp_path / "d.csv", cwd=tmp_path) == 0
    summary = [r for r in raw_rows(tmp_path / "d.csv") if r["face"] == ""]
    assert [r["path"] for r in summary] == ["photo.jpg"]


def test_rows_name_the_folds_that_scored_them_when_one_did_not_load(run_dir, photos, tmp_path):
    run = tmp_path / "run3"
    shutil.copytree(run_dir, run)
    shutil.copy(run / "v42_head_fold1.pth", run / "v42_head_fold2.pth")
    (run / "v42_backbone_fold2.pth").write_bytes(b"torn")  # the third fold does not load
    Image.fromarray(photos["astro"]).save(tmp_path / "p.jpg")
    assert detect_cli(tmp_path / "p.jpg", "--weights-dir", run, "--out", tmp_path / "d.csv") == 0
    rows = raw_rows(tmp_path / "d.csv")
    assert rows and all("(2 of 3)" in r["folds"] and "fold2" not in r["folds"].split(" (")[0] for r in rows)
    assert detect_cli(tmp_path / "p.jpg", "--weights-dir", run_dir, "--out", tmp_path / "all.csv") == 0
    assert all(r["folds"] == "" for r in raw_rows(tmp_path / "all.csv"))  # every fold scored: nothing to say
