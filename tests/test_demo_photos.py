"""The demo's many identities: registry photos fetched by the registries' clients into a cache,
each face its own identity, the test split by identity, and the bundled photos when offline."""
from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from titan.demo import dataset as demo, photos as reg
from titan.runlog import RunLog


@pytest.fixture(scope="module")
def group_photo_faces(demo_photos):
    """astronaut and grace_hopper side by side: one 'group photo' with two people."""
    import cv2

    a, g = (next(p.image for p in demo_photos if p.name == n) for n in ("astronaut", "grace_hopper"))
    g = cv2.resize(g, (round(g.shape[1] * a.shape[0] / g.shape[0]), a.shape[0]))
    return np.hstack([a, g])


def test_each_face_of_a_group_photo_is_its_own_identity_and_no_crop_shows_the_other(group_photo_faces, tmp_path):
    faces = reg.identities_in(demo.make_detector(), group_photo_faces, "pkg/group.jpg", tmp_path, min_px=60)
    assert sorted(f.name for f in faces) == ["pkg/group.jpg#0", "pkg/group.jpg#1"]
    for f in faces:
        h, w = f.image.shape[:2]
        x1, y1, x2, y2 = f.box
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h and w < group_photo_faces.shape[1] - 100
        assert all(x1 - 5 <= x <= x2 + 5 and y1 - 5 <= y <= y2 + 5 for x, y in f.landmarks)
    assert (tmp_path / "detections.json").is_file()  # MTCNN's answer is cached by the image's bytes
    # each crop shows only its own face: detecting again finds exactly one clear face
    for f in faces:
        _, probs, _ = reg.detect_all(demo.make_detector(), f.image)
        assert int((probs >= 0.9).sum()) == 1


def _people(demo_photos, group_photo_faces, tmp_path):
    faces = reg.identities_in(demo.make_detector(), group_photo_faces, "pkg/group.jpg", tmp_path, min_px=60)
    twin = demo.Photo("pkg/again.jpg", faces[0].image, faces[0].box, faces[0].landmarks, person=faces[0].name)
    return list(demo_photos) + faces + [twin]


@pytest.mark.parametrize("split", [True, False])
def test_the_test_split_takes_whole_identities(demo_photos, group_photo_faces, tmp_path, split):
    photos = _people(demo_photos, group_photo_faces, tmp_path)
    spec = demo.DemoSpec(n_images=60, seed=11, identity_split=split, test_fraction=0.4)
    manifest = demo.build_dataset(tmp_path / "out", spec, photos=photos, progress=False)
    assert "identity" in pd.read_csv(tmp_path / "out" / "demo_manifest.csv").columns
    train, test = (set(manifest.identity[manifest.split == s]) for s in ("train", "test"))
    donors = {s: {k.split(":", 1)[1] for k in manifest.kind[manifest.split == s] if k.startswith("swap:")} for s in ("train", "test")}
    if split:
        assert train and test and not train & test  # no test face has its identity in training
        names = {p.name: p.identity for p in photos}
        assert not {names[d] for d in donors["test"]} & train and not {names[d] for d in donors["train"]} & test
        # one person in two photos stays on one side
        pools = demo.split_identities([p.identity for p in photos], spec)
        twin, first = len(photos) - 1, [p.name for p in photos].index("pkg/group.jpg#0")
        assert (twin in pools["test"]) == (first in pools["test"]) and (twin in pools["train"]) == (first in pools["train"])
    else:
        assert train & test


def test_registry_photos_are_fetched_once_with_the_registry_client_into_the_cache(tmp_path, group_photo_faces):
    import cv2

    calls = []

    def fake_pip(cmd, **kw):  # stands in for `pip download --no-deps insightface==2.1 -d DEST`
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        ok, jpg = cv2.imencode(".jpg", group_photo_faces[..., ::-1])
        with zipfile.ZipFile(dest / "insightface-2.1-py3-none-any.whl", "w") as z:
            z.writestr("insightface/data/images/t1.jpg", jpg.tobytes())
        return subprocess.CompletedProcess(cmd, 0)

    src = reg.SOURCES[0]
    assert src.client == "pip" and src.spec == "insightface==2.1"
    files = reg.fetch_photos(tmp_path, sources=[src], run=fake_pip)
    assert files == [tmp_path / "insightface" / "t1.jpg"] and files[0].stat().st_size > 1000
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"] and "insightface==2.1" in calls[0]
    assert reg.fetch_photos(tmp_path, sources=[src], run=fake_pip) == files and len(calls) == 1  # cached


def test_the_cache_lies_outside_the_repository(monkeypatch, tmp_path):
    monkeypatch.delenv(reg.CACHE_ENV, raising=False)
    assert reg.default_cache() == Path.home() / ".cache" / "titan-demo"
    monkeypatch.setenv(reg.CACHE_ENV, str(tmp_path))
    assert reg.default_cache() == tmp_path


def test_without_network_the_demo_uses_the_bundled_photos_and_says_so(tmp_path, monkeypatch, demo_photos):
    def offline(cmd, **kw):
        raise subprocess.CalledProcessError(1, cmd, stderr=b"ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(reg.subprocess, "run", offline)
    monkeypatch.setattr(demo, "load_photos", lambda photos_dir=None, detector=None: list(demo_photos))
    monkeypatch.setattr(reg.shutil, "which", lambda name: None)  # and no npm either
    log = RunLog(tmp_path / "log.txt", tmp_path / "log.jsonl")
    photos = demo.gather_photos(cache=tmp_path / "cache", log=log)
    assert [p.name for p in photos] == list(demo.FACE_PHOTOS)
    text = (tmp_path / "log.txt").read_text()
    assert text.count("NOTICE: demo photos: could not fetch") == len(reg.SOURCES)
    assert "network unreachable" in text and "npm is not installed" in text
    assert "NOTICE: demo set from the 3 bundled photo(s) only" in text
    manifest = demo.build_dataset(tmp_path / "out", demo.DemoSpec(n_images=24), photos=photos, progress=False)
    assert set(manifest.split) == {"train", "test"}  # a smaller set, still split by identity
    assert not set(manifest.identity[manifest.split == "test"]) & set(manifest.identity[manifest.split == "train"])
