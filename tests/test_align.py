"""align_faces.py: real face crops on mixed sizes, fallbacks, failures, resume, shards, CLI."""
from __future__ import annotations

import csv
import os
import sys

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

import titan.data.align as align
from titan.data.align import AlignOptions, Manifest, in_shard, parse_shard, run_align
from titan.data.faces import Detection, FaceDetector, face_crop, square_around
from titan.runlog import RunLog

# Where MTCNN puts the astronaut's face in the 512×512 original, as fractions of the side.
FACE_CX, FACE_CY, FACE_W = 0.438, 0.229, 0.17
OUT = 48  # output side in tests: small so encoding is instant


def _scene(canvas_hw, face_side, at, seed):
    """Astronaut rescaled to face_side on a smooth coloured background → (image, true face centre)."""
    h, w = canvas_hw
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    bg = np.stack([(xx * c / w + yy * (1 - c) / h) * 255 for c in rng.uniform(0.2, 0.8, 3)], -1).astype(np.uint8)
    a = cv2.resize(skdata.astronaut(), (face_side, face_side), interpolation=cv2.INTER_AREA)
    y, x = at
    bg[y:y + face_side, x:x + face_side] = a
    return bg, (x + FACE_CX * face_side, y + FACE_CY * face_side)


def _save(img, path, mode=None, **kw):
    im = Image.fromarray(img)
    if mode:
        im = im.convert(mode)
    im.save(path, **kw)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A folder of mixed sizes and formats → (root, {Id: true face centre or None}, expected status)."""
    root = tmp_path_factory.mktemp("align") / "dataset"
    src = root / "train_images"
    src.mkdir(parents=True)
    truth, status = {}, {}
    scenes = {"face_a": ((200, 260), 160, (30, 80)), "face_b": ((240, 300), 200, (30, 20)),
              "face_c": ((280, 280), 240, (20, 30)), "face_d": ((256, 200), 150, (90, 30)),
              "face_e": ((200, 260), 170, (20, 70))}  # face_e: same size as face_a → one batch
    for i, (name, (hw, side, at)) in enumerate(scenes.items()):
        img, truth[name] = _scene(hw, side, at, i)
        _save(img, src / f"{name}.jpg", quality=95)
        status[name] = "face"
    img, truth["gray_png"] = _scene((220, 240), 180, (30, 50), 10)
    _save(img, src / "gray_png.png", "L")
    img, truth["rgba_png"] = _scene((260, 220), 180, (60, 30), 11)
    _save(img, src / "rgba_png.png", "RGBA")
    img, truth["palette_png"] = _scene((220, 220), 180, (20, 30), 12)
    _save(img, src / "palette_png.png", "P")
    img, truth["png16"] = _scene((240, 240), 180, (40, 50), 13)
    g16 = (cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.uint16) * 257)
    Image.fromarray(g16).save(src / "png16.png")
    assert Image.open(src / "png16.png").mode.startswith("I")
    img, truth["exif_rot"] = _scene((220, 280), 170, (30, 100), 14)  # as displayed
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90° clockwise
    Image.fromarray(np.ascontiguousarray(np.rot90(img, 1))).save(src / "exif_rot.jpg", exif=exif, quality=95)
    for name in ("gray_png", "rgba_png", "palette_png", "png16", "exif_rot"):
        status[name] = "face"
    rng = np.random.default_rng(0)
    for i, hw in enumerate([(96, 96), (80, 120), (120, 100)]):  # noise is MTCNN's slowest input: keep it small
        _save(rng.integers(0, 256, (*hw, 3), dtype=np.uint8), src / f"noise_{i}.png")
        truth[f"noise_{i}"], status[f"noise_{i}"] = None, "fallback"
    good = (src / "face_a.jpg").read_bytes()
    (src / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (src / "empty.jpg").write_bytes(b"")
    (src / "text.jpg").write_bytes(b"this is not an image\n" * 10)
    for name in ("truncated", "empty", "text"):
        truth[name], status[name] = None, "failed"
    return root, truth, status


def _opts(root, out, **kw):
    base = dict(input=str(root), output=str(out), splits="train", size=OUT, device="cpu", batch_size=4,
                workers=0, writers=2)
    return AlignOptions(**{**base, **kw})


def _run(opts):
    return run_align(opts, RunLog(None, None, echo=False))


def _rows(out):
    with open(out / "train" / "manifest.csv", newline="") as f:
        return {r["Id"]: r for r in csv.DictReader(f)}


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


# --- the crop geometry ------------------------------------------------------------------------

def test_square_side_is_larger_box_side_times_one_plus_two_margins_centred_on_the_face():
    x0, y0, side = square_around((100, 100, 140, 160), 400, 400, margin=0.2)
    assert side == round(60 * 1.4)
    assert (x0 + side / 2, y0 + side / 2) == pytest.approx((120, 130), abs=1)


def test_square_is_shifted_to_stay_inside_the_image():
    x0, y0, side = square_around((0, 250, 50, 300), 400, 300, margin=0.5)  # face at the bottom-left corner
    assert (x0, y0, side) == (0, 300 - side, 100)


def test_square_is_padded_only_when_the_image_is_smaller_than_the_crop():
    img = np.full((100, 300, 3), 200, np.uint8)
    det = Detection((120.0, 10.0, 200.0, 90.0), 0.99, 1)  # side 80 × 1.4 = 112 > height 100
    x0, y0, side = square_around(det.box, 300, 100, margin=0.2)
    assert side == 112 and y0 == -6 and 0 <= x0 <= 300 - side  # centred vertically, inside horizontally
    crop, status = face_crop(img, det, 64, margin=0.2)
    assert status == "face" and crop.shape == (64, 64, 3) and (crop == 200).all()  # replicated edge, no black band


def test_no_face_falls_back_to_the_centre_square():
    img = np.zeros((100, 200, 3), np.uint8)
    img[:, 50:150] = 255
    crop, status = face_crop(img, Detection(None, None, 0), 32)
    assert status == "fallback" and crop.shape == (32, 32, 3) and (crop == 255).all()


# --- detection --------------------------------------------------------------------------------

def test_detector_batches_mixed_sizes_and_finds_every_face():
    """The original batched mixed sizes, caught MTCNN's exception and centre-cropped them all."""
    scenes = [_scene(hw, side, (10, 10), i) for i, (hw, side) in enumerate([((200, 260), 150), ((260, 200), 180), ((200, 260), 170)])]
    dets = FaceDetector("cpu", batch_size=8).detect([img for img, _ in scenes])
    for det, (_, (cx, cy)) in zip(dets, scenes):
        assert det.box is not None and det.prob > 0.9
        bx, by = (det.box[0] + det.box[2]) / 2, (det.box[1] + det.box[3]) / 2
        assert abs(bx - cx) < 15 and abs(by - cy) < 15


def test_large_images_are_shrunk_for_detection_and_boxes_come_back_in_source_pixels():
    img, (cx, cy) = _scene((300, 300), 260, (20, 20), 3)
    (det,) = FaceDetector("cpu", max_side=160).detect([img])
    assert det.box is not None
    assert abs((det.box[0] + det.box[2]) / 2 - cx) < 15 and abs((det.box[1] + det.box[3]) / 2 - cy) < 15


# --- the run ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def first_run(dataset, tmp_path_factory):
    root, truth, status = dataset
    out = tmp_path_factory.mktemp("faces")
    (summary,) = _run(_opts(root, out, workers=2))  # real loader worker processes
    return out, summary


def test_mixed_folder_gets_face_crops_centred_on_faces_fallbacks_and_failures(dataset, first_run):
    root, truth, status = dataset
    out, summary = first_run
    rows = _rows(out)
    assert set(rows) == set(truth)
    assert {k: r["status"] for k, r in rows.items()} == status
    for name, centre in truth.items():
        r = rows[name]
        assert r["source"].endswith(os.path.basename(r["source"])) and os.path.isfile(r["source"])
        if r["status"] == "failed":
            assert r["error"] and not (out / "train" / f"{name}.jpg").exists()
            continue
        crop = cv2.imread(str(out / "train" / f"{name}.jpg"))
        assert crop.shape == (OUT, OUT, 3)
        if centre is None:
            assert r["box_x1"] == "" and r["n_faces"] == "0"
            continue
        box = [float(r[f"box_{c}"]) for c in ("x1", "y1", "x2", "y2")]
        assert float(r["prob"]) > 0.9 and int(r["n_faces"]) >= 1
        size = box[2] - box[0]
        assert abs((box[0] + box[2]) / 2 - centre[0]) < 0.3 * size, name
        assert abs((box[1] + box[3]) / 2 - centre[1]) < 0.3 * size, name
    assert "empty" in rows["empty"]["error"] and "truncated" in rows["truncated"]["error"]
    assert (summary.face, summary.fallback, summary.failed, summary.skipped) == (10, 3, 3, 0)


def test_crop_matches_the_square_around_the_manifest_box(dataset, first_run):
    root, _, _ = dataset
    out, _ = first_run
    r = _rows(out)["face_b"]
    src = cv2.cvtColor(cv2.imread(r["source"]), cv2.COLOR_BGR2RGB)
    det = Detection(tuple(float(r[f"box_{c}"]) for c in ("x1", "y1", "x2", "y2")), 1.0, 1)
    expected, _ = face_crop(src, det, OUT, 0.2)
    got = cv2.cvtColor(cv2.imread(str(out / "train" / "face_b.jpg")), cv2.COLOR_BGR2RGB)
    assert np.abs(got.astype(int) - expected.astype(int)).mean() < 4  # JPEG noise only


def test_second_run_does_no_work(dataset, first_run, monkeypatch):
    root, _, _ = dataset
    out, _ = first_run
    before = {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("*.jpg")}

    def no_detection(*a, **k):
        raise AssertionError("the detector ran on a second run")

    monkeypatch.setattr(FaceDetector, "detect", no_detection)
    (s,) = _run(_opts(root, out))
    assert (s.skipped, s.face, s.fallback) == (13, 0, 0)
    assert s.failed == 3  # unreadable files are retried (cheaply): they may have been replaced
    assert before == {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("*.jpg")}


def test_run_killed_part_way_then_restarted_ends_with_the_same_outputs(dataset, first_run, tmp_path, monkeypatch):
    root, _, _ = dataset
    ref_out, _ = first_run
    out = tmp_path / "faces"
    real, calls = align._write_crop, []

    def dies_after_five(*a, **k):
        if len(calls) >= 5:
            raise KeyboardInterrupt  # as if the process were stopped here
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(align, "_write_crop", dies_after_five)
    with pytest.raises(KeyboardInterrupt):
        _run(_opts(root, out))
    assert 0 < len(list((out / "train").glob("*.jpg"))) < 13
    with open(out / "train" / "manifest.csv", "a") as f:
        f.write("face_c,/torn/by/a/kill,fa")  # a row half-written when the process died
    monkeypatch.setattr(align, "_write_crop", real)
    (s,) = _run(_opts(root, out))
    assert s.skipped >= 3 and s.face + s.fallback + s.skipped == 13
    assert _snapshot(out / "train").keys() == _snapshot(ref_out / "train").keys()
    ours, ref = _rows(out), _rows(ref_out)
    assert {k: r["status"] for k, r in ours.items()} == {k: r["status"] for k, r in ref.items()}
    for k, r in ref.items():
        if r["status"] != "failed":
            assert ours[k]["box_x1"] == r["box_x1"]
            a = cv2.imread(str(out / "train" / f"{k}.jpg")).astype(int)
            b = cv2.imread(str(ref_out / "train" / f"{k}.jpg")).astype(int)
            assert np.abs(a - b).max() <= 1, k


def test_shards_split_a_folder_disjointly_and_together_cover_it(tmp_path):
    src = tmp_path / "dataset" / "train_images"
    src.mkdir(parents=True)
    names = [f"img{i:02d}" for i in range(12)]
    for i, name in enumerate(names):
        _save(np.full((40 + i, 50, 3), 20 * i, np.uint8), src / f"{name}.png")
    out = tmp_path / "faces"
    seen = []
    for i in range(3):
        (s,) = _run(_opts(tmp_path / "dataset", out, shard=f"{i}/3"))
        seen.append({k for k in names if in_shard(k, (i, 3))})
        assert s.total == len(seen[-1]) == s.fallback
    assert sum(map(len, seen)) == len(names) and set().union(*seen) == set(names)
    assert set(_rows(out)) == set(names)  # every shard's rows in the one manifest
    assert {p.stem for p in (out / "train").glob("*.jpg")} == set(names)
    with pytest.raises(ValueError, match="0 ≤ I < N"):
        parse_shard("3/3")


def test_manifest_keeps_the_last_row_per_id_and_skips_torn_lines(tmp_path):
    m = Manifest(tmp_path / "manifest.csv")
    row = dict(Id="a", source="s", status="failed", prob="", box_x1="", box_y1="", box_x2="", box_y2="", n_faces=0, error="x")
    m.append([row])
    with open(m.path, "a") as f:
        f.write("b,s,fac")
    m.append([{**row, "status": "face", "error": ""}, {**row, "Id": "c,1"}])
    rows = m.read()
    assert set(rows) == {"a", "c,1"} and rows["a"]["status"] == "face"
    assert m.compact() == 2 and m.path.read_text().count("\n") == 3


# --- the script -------------------------------------------------------------------------------

def _main(monkeypatch, cwd, *args):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import align_faces

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["align_faces.py", *args])
    return align_faces.main()


def test_script_with_no_arguments_reads_and_writes_the_readme_paths(tmp_path, monkeypatch):
    img, _ = _scene((200, 240), 150, (20, 40), 0)
    for split in ("train", "test"):
        (tmp_path / "data/dataset" / f"{split}_images").mkdir(parents=True)
        _save(img, tmp_path / "data/dataset" / f"{split}_images" / f"{split}1.png")
    assert _main(monkeypatch, tmp_path) == 0
    for split in ("train", "test"):
        crop = Image.open(tmp_path / "data/faces_512" / split / f"{split}1.jpg")
        assert crop.size == (512, 512)
        assert (tmp_path / "data/faces_512" / split / "manifest.csv").is_file()


def test_strict_exits_non_zero_when_an_image_failed(dataset, tmp_path, monkeypatch):
    root, _, _ = dataset
    shard = next(i for i in range(4) if any(in_shard(k, (i, 4)) for k in ("truncated", "empty", "text")))
    args = ["--input", str(root), "--output", str(tmp_path / "o"), "--splits", "train", "--size", "32",
            "--device", "cpu", "--workers", "0", "--shard", f"{shard}/4"]  # a quarter of the folder: fast
    assert _main(monkeypatch, tmp_path, *args) == 0
    assert _main(monkeypatch, tmp_path, *args, "--strict") == 1


def test_missing_input_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="test_images"):
        _run(_opts(tmp_path, tmp_path / "o", splits="train,test"))
