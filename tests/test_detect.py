"""detect.py on real photos, folders, a generated video and every kind of bad input, with tiny
atto folds built here (random weights: the checks are on the plumbing, the faces and the numbers'
consistency, not on accuracy)."""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from _single_thread import single_thread  # noqa: F401  (autouse fixture)
from fold_fixtures import write_calibrated_run
from titan.demo.dataset import FACE_PHOTOS, _rgb
from titan.infer.calibration import logit_of, sigmoid
from titan.infer.detect import ROW_COLUMNS, Detector, Source

import detect

TEMPERATURE, BAND, THRESHOLD = 2.0, 0.02, 0.5


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Two atto folds at 32 px and a metrics file with the OOF threshold, temperature and band."""
    root = tmp_path_factory.mktemp("detect_run")
    return write_calibrated_run(root, THRESHOLD, TEMPERATURE, BAND)


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    """Small real face photos (one face each), a two-face picture and a photo without a face."""
    astro = cv2.resize(_rgb(FACE_PHOTOS["astronaut"]()), (192, 192), interpolation=cv2.INTER_AREA)
    grace = cv2.resize(_rgb(FACE_PHOTOS["grace_hopper"]()), (160, 192), interpolation=cv2.INTER_AREA)
    from skimage import data
    coffee = cv2.resize(data.coffee(), (200, 150), interpolation=cv2.INTER_AREA)
    return {"astro": astro, "grace": grace, "two": np.concatenate([astro, grace], 1), "coffee": coffee}


def detect_cli(*args: str, cwd: Path | None = None) -> int:
    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return detect.main([*map(str, args), "--no-progress", "--device", "cpu", "--workers", "0"])
    finally:
        os.chdir(old)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def summaries(rows: list[dict]) -> dict[str, dict]:
    return {r["path"]: r for r in rows if r["face"] is None}


def write_video(path: Path, frame: np.ndarray, n: int = 10, fps: int = 10) -> None:
    """A short mpeg4 clip with PyAV: the photo drifting right by 2 px a frame."""
    import av

    h, w = frame.shape[:2]
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            img = np.roll(frame, 2 * i, axis=1)
            for pkt in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode(None):
            c.mux(pkt)


def test_one_image_prints_its_verdict_and_writes_the_csv_columns(run_dir, photos, tmp_path, capsys):
    Image.fromarray(photos["astro"]).save(tmp_path / "photo.jpg", quality=92)
    assert detect_cli(tmp_path / "photo.jpg", "--weights-dir", run_dir, "--out", tmp_path / "d.csv") == 0
    table = capsys.readouterr().out
    df = pd.read_csv(tmp_path / "d.csv", dtype={"face": "string"}, keep_default_na=False)
    assert list(df.columns) == ROW_COLUMNS == ["path", "frame", "face", "box", "prob", "calibrated_prob", "decision",
                                               "verdict", "status", "error", "folds", "name_escaped"]
    face, summary = df.iloc[0], df.iloc[1]
    assert len(df) == 2 and face.face == "0" and face.status == "face" and summary.face == "" and summary.status == "ok"
    x1, y1, x2, y2 = map(float, face.box.split())
    assert 40 < x1 < x2 < 130 and 0 < y1 < y2 < 100  # the astronaut's face, in source pixels
    assert float(summary.calibrated_prob) == pytest.approx(sigmoid(logit_of(float(summary.prob)) / TEMPERATURE), abs=1e-5)
    assert summary.decision == ("fake" if float(summary.prob) >= THRESHOLD else "real")
    line = next(line for line in table.splitlines() if "photo.jpg" in line)
    assert summary.verdict in line and f"{float(summary.calibrated_prob):.3f}" in line


def test_folder_of_mixed_sizes_and_formats_scores_every_image_recursively(run_dir, photos, tmp_path):
    d = tmp_path / "photos"
    (d / "nested" / "deeper").mkdir(parents=True)
    Image.fromarray(photos["astro"]).save(d / "a.jpg")
    Image.fromarray(photos["grace"]).convert("L").save(d / "nested" / "grey.png")            # greyscale
    Image.fromarray(photos["grace"]).convert("RGBA").save(d / "nested" / "deeper" / "rgba.png")  # alpha
    Image.fromarray(cv2.resize(photos["astro"], (320, 256))).save(d / "nested" / "wide.webp")
    Image.fromarray(photos["coffee"]).save(d / "c.bmp")
    (d / "notes.txt").write_text("not an image")  # passed over inside a folder
    assert detect_cli(d, "--weights-dir", run_dir, "--out", tmp_path / "d.jsonl") == 0
    rows = read_jsonl(tmp_path / "d.jsonl")
    s = summaries(rows)
    assert sorted(Path(p).relative_to(d).as_posix() for p in s) == [
        "a.jpg", "c.bmp", "nested/deeper/rgba.png", "nested/grey.png", "nested/wide.webp"]
    assert all(r["status"] in ("ok", "no_face") and 0 <= r["prob"] <= 1 for r in s.values())
    assert s[str(d / "c.bmp")]["status"] == "no_face"
    assert {s[str(d / n)]["status"] for n in ("a.jpg", "nested/grey.png", "nested/deeper/rgba.png", "nested/wide.webp")} == {"ok"}


def test_several_faces_are_all_scored_and_the_most_fake_decides(run_dir, photos, tmp_path):
    Image.fromarray(photos["two"]).save(tmp_path / "two.png")
    assert detect_cli(tmp_path / "two.png", "--weights-dir", run_dir, "--out", tmp_path / "d.jsonl") == 0
    rows = read_jsonl(tmp_path / "d.jsonl")
    faces = [r for r in rows if r["face"] is not None]
    assert len(faces) == 2 and {r["status"] for r in faces} == {"face"}
    left, right = sorted(faces, key=lambda r: r["box"][0])
    assert left["box"][2] < 192 <= right["box"][0]  # one face in each half
    assert summaries(rows)[str(tmp_path / "two.png")]["prob"] == pytest.approx(max(r["prob"] for r in faces))


def test_no_face_scores_the_centre_square_and_flags_it(run_dir, photos, tmp_path):
    Image.fromarray(photos["coffee"]).save(tmp_path / "cup.png")  # 200×150
    assert detect_cli(tmp_path / "cup.png", "--weights-dir", run_dir, "--out", tmp_path / "d.csv") == 0
    df = pd.read_csv(tmp_path / "d.csv", keep_default_na=False)
    assert df.status.tolist() == ["no_face", "no_face"]
    assert df.box[0] == "25.0 0.0 175.0 150.0" and "no face" in df.error[1]


def test_video_scores_sampled_frames_averages_their_logits_and_names_the_worst(run_dir, photos, tmp_path):
    write_video(tmp_path / "clip.mp4", photos["astro"], n=10)
    assert detect_cli(tmp_path / "clip.mp4", "--frames", "4", "--weights-dir", run_dir, "--out", tmp_path / "d.jsonl") == 0
    rows = read_jsonl(tmp_path / "d.jsonl")
    faces = [r for r in rows if r["face"] is not None]
    assert sorted({r["frame"] for r in faces}) == [0, 3, 6, 9]  # evenly spread, first and last
    frame_logit = {}
    for r in faces:
        frame_logit[r["frame"]] = max(frame_logit.get(r["frame"], -math.inf), float(logit_of(r["prob"])))
    s = summaries(rows)[str(tmp_path / "clip.mp4")]
    assert s["status"] == "ok" and s["frame"] == max(frame_logit, key=frame_logit.get)
    assert float(logit_of(s["prob"])) == pytest.approx(np.mean(list(frame_logit.values())), abs=1e-6)


def test_each_bad_input_is_one_error_row_and_the_rest_goes_on(run_dir, photos, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(photos["astro"]).save(d / "good.jpg", quality=90)
    (d / "corrupt.jpg").write_bytes(np.random.default_rng(0).integers(0, 255, 3000, dtype=np.uint8).tobytes())
    data = (d / "good.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (d / "empty.png").write_bytes(b"")
    (d / "notes.txt").write_text("hello")
    (d / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(500))
    names = ["good.jpg", "corrupt.jpg", "truncated.jpg", "empty.png", "notes.txt", "broken.mp4", "missing.jpg", "none*.png"]
    def tree() -> set[Path]:
        return {p for root in (tmp_path, run_dir) for p in root.rglob("*") if not p.is_relative_to(d / "out")}

    before = tree()
    rc = detect_cli(*names, "--weights-dir", run_dir, "--out", "out/d.csv", "--html", "out/r.html",
                    "--heatmaps", "out/hm", cwd=d)
    assert rc == 0
    df = pd.read_csv(d / "out" / "d.csv", keep_default_na=False)
    s = df[df.face == ""].set_index("path")
    assert list(s.index) == names  # every input once, in order
    assert s.status["good.jpg"] == "ok"
    bad = s.drop("good.jpg")
    assert (bad.status == "error").all() and (bad.error != "").all()
    assert (df.path.value_counts()[names[1:]] == 1).all()  # one row each: nothing else for a bad input
    assert "empty" in s.error["empty.png"] and "not found" in s.error["missing.jpg"]
    assert "no file matches" in s.error["none*.png"] and "video" in s.error["broken.mp4"]
    assert "nor a video" in s.error["notes.txt"]
    # Nothing is written outside --out, --html and --heatmaps (not beside the inputs, not in the run folder).
    assert tree() == before
    assert sorted(p.name for p in (d / "out").iterdir()) == ["d.csv", "hm", "r.html"]


def test_nothing_scored_exits_2_and_no_weights_exit_2_naming_the_files(run_dir, tmp_path, capsys):
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    assert detect_cli(tmp_path / "bad.jpg", tmp_path / "missing.png", "--weights-dir", run_dir, "--out", tmp_path / "d.csv") == 2
    assert (pd.read_csv(tmp_path / "d.csv").status == "error").all()
    capsys.readouterr()
    assert detect_cli(tmp_path / "bad.jpg", "--weights-dir", tmp_path / "empty") == 2
    err = capsys.readouterr().err
    assert "v42_backbone_fold*.pth" in err and "v42_head_fold*.pth" in err and "Traceback" not in err
    assert detect_cli(tmp_path / "bad.jpg", "--weights-dir", run_dir, "--out", tmp_path / "d.xlsx") == 2
    assert ".csv or .jsonl" in capsys.readouterr().err


def test_html_page_holds_every_input_embedded_and_no_external_url(run_dir, photos, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(photos["astro"]).save(d / "a <b>.jpg")
    Image.fromarray(photos["coffee"]).save(d / "cup.png")
    write_video(d / "clip.mp4", photos["grace"], n=6)
    (d / "bad.jpg").write_bytes(b"x")
    assert detect_cli(d, d / "gone.png", "--weights-dir", run_dir, "--frames", "3", "--html", tmp_path / "r.html",
                      "--heatmaps", tmp_path / "hm") == 0
    page = (tmp_path / "r.html").read_text()
    for p in ["a &lt;b&gt;.jpg", "cup.png", "clip.mp4", "bad.jpg", "gone.png"]:
        assert p in page, p
    text = re.sub(r"data:image/(jpeg|png);base64,[A-Za-z0-9+/=]+", "", page)  # base64 may hold "//"
    assert not re.search(r"https?:|//|<link|<script|@import|url\(|<iframe|<object", text, re.I)
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/") for s in srcs)
    assert page.count('class="card') == 5 and page.count('class="cam"') == 3  # a heatmap per scored input
    # --heatmaps: every face of an image, the most suspicious frame's faces of a video; all readable PNGs
    pngs = sorted(p.name for p in (tmp_path / "hm").iterdir())
    assert len(pngs) == 3 and any("_frame" in n for n in pngs)
    assert all(cv2.imread(str(tmp_path / "hm" / n)) is not None for n in pngs)


def test_in_memory_images_score_like_the_same_files(run_dir, photos, tmp_path):
    """The API evaluate.py uses: named PIL images / arrays in, per-face and per-image records out."""
    det = Detector.from_run(run_dir, tta="minimal", device="cpu")
    Image.fromarray(photos["two"]).save(tmp_path / "two.png")
    from_file = det.run([Source(str(tmp_path / "two.png"), "image")], progress=False)[0]
    mem = det.score_images([("pil", Image.fromarray(photos["two"])), ("array", photos["two"]), ("junk", np.zeros((4, 4), np.float32))])
    for r in mem[:2]:
        assert r.status == "ok" and len(r.faces) == 2
        assert r.prob == pytest.approx(from_file.prob, abs=1e-6)
        assert [f.logit for f in r.faces] == pytest.approx([f.logit for f in from_file.faces], abs=1e-6)
    assert mem[2].status == "error" and "uint8" in mem[2].error
    assert [f.row()["face"] for f in mem[0].faces] == [0, 1] and mem[0].rows()[-1]["face"] is None
