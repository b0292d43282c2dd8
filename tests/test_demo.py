"""The demo deepfake set: layout, balance, where fakes differ, and reproducibility."""
import hashlib

import cv2
import numpy as np
import pandas as pd
import pytest

from titan.demo import dataset as demo
from titan.data.images import decode_image
from titan.data.labels import read_labels


@pytest.fixture()
def photos(demo_photos):
    return demo_photos


def _build(tmp_path, photos, name="out", **kw):
    spec = demo.DemoSpec(**{"n_images": 24, **kw})
    out = tmp_path / name
    return out, demo.build_dataset(out, spec, photos=photos, progress=False)


def _digests(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_shipped_photos_all_show_one_detected_face(photos):
    assert [p.name for p in photos] == list(demo.FACE_PHOTOS)
    for p in photos:
        x1, y1, x2, y2 = p.box
        assert 0 <= x1 < x2 <= p.image.shape[1] and 0 <= y1 < y2 <= p.image.shape[0]
        assert all(x1 - 5 <= x <= x2 + 5 and y1 - 5 <= y <= y2 + 5 for x, y in p.landmarks)


def test_layout_labels_and_balance(tmp_path, photos):
    out, manifest = _build(tmp_path, photos)
    paths = demo.dataset_paths(out)
    train = read_labels(paths["train_csv"], image_dir=paths["train_images"])
    test = pd.read_csv(paths["test_labels"])
    assert list(test.columns) == ["Id", "target_feature"]
    assert len(train) + len(test) == 24 and not set(train.Id) & set(test.Id)
    assert sorted(p.stem for p in paths["train_images"].glob("*.jpg")) == sorted(train.Id)
    assert sorted(p.stem for p in paths["test_images"].glob("*.jpg")) == sorted(test.Id)
    # about 20 % fakes, both classes on both sides of the split
    assert int(manifest.target_feature.sum()) == round(24 * 0.2)
    assert set(train.target_feature) == {0, 1} and set(test.target_feature) == {0, 1}
    # the test labels stay out of the dataset folder the pipeline reads
    assert not any(p.suffix == ".csv" and p.name != "train_solution.csv" for p in paths["dataset"].rglob("*"))
    # fakes are of both kinds, every image is a real JPEG, and sizes vary
    assert set(manifest.kind[manifest.target_feature == 0]) == {"real"}
    shapes = set()
    for r in manifest.itertuples():
        img = decode_image(paths[f"{r.split}_images"] / f"{r.Id}.jpg")
        assert max(img.shape[:2]) == r.long_side
        shapes.add(img.shape)
    assert len(shapes) > 12


def test_fakes_differ_from_their_target_only_inside_the_face_mask(photos):
    seen = set()
    for seed in range(16):
        rng = np.random.default_rng(seed)
        target = photos[seed % len(photos)]
        fake = demo.make_fake(target, photos, rng)
        outside = fake.mask == 0
        assert np.array_equal(fake.image[outside], fake.target[outside])
        assert np.array_equal(fake.target, target.image)
        # the mask covers the face and stays near it
        ys, xs = np.nonzero(fake.mask)
        x1, y1, x2, y2 = target.box
        pad = 0.5 * target.face_size
        assert xs.min() >= x1 - pad and xs.max() <= x2 + pad and ys.min() >= y1 - pad and ys.max() <= y2 + pad
        cx, cy = np.round(target.landmarks[2]).astype(int)  # the nose is inside the blended region
        assert fake.mask[cy, cx] > 0.9
        inside = fake.mask > 0.5
        diff = np.abs(fake.image.astype(int) - fake.target.astype(int))[inside].mean()
        assert diff > 1.0, f"seed {seed}: the blended face is indistinguishable from the target"
        seen.add((fake.kind.split(":")[0], fake.blend))
    assert {k for k, _ in seen} == {"self_blend", "swap"} and {b for _, b in seen} == {"alpha", "poisson"}


def test_swaps_only_between_frontal_faces(photos):
    camera = next(p for p in photos if p.name == "camera")
    assert not camera.frontal
    for seed in range(8):
        assert demo.make_fake(camera, photos, np.random.default_rng(seed)).kind == "self_blend"


def test_one_seed_gives_identical_files_and_another_seed_does_not(tmp_path, photos):
    a, _ = _build(tmp_path, photos, "a")
    b, _ = _build(tmp_path, photos, "b")
    c, _ = _build(tmp_path, photos, "c", seed=7)
    da, db, dc = _digests(a), _digests(b), _digests(c)
    assert len(da) == 24 + 3 and da == db
    images = [k for k in da if k.endswith(".jpg")]
    assert sum(da[k] != dc.get(k) for k in images) > 20


def test_rebuilding_replaces_earlier_demo_images_and_keeps_other_files(tmp_path, photos):
    out, _ = _build(tmp_path, photos)
    keep = demo.dataset_paths(out)["train_images"] / "mine.png"
    cv2.imwrite(str(keep), np.zeros((8, 8, 3), np.uint8))
    _, manifest = _build(tmp_path, photos, n_images=10)
    jpgs = list(demo.dataset_paths(out)["dataset"].rglob("demo_*.jpg"))
    assert len(jpgs) == 10 == len(manifest) and keep.exists()


def test_photo_without_a_face_is_refused_by_name():
    from skimage import data

    with pytest.raises(demo.DemoDataError, match="coffee.*no face"):
        demo.detect_face(demo.make_detector(), data.coffee(), "coffee")


def test_similarity_transform_recovers_rotation_scale_and_shift():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, size=(5, 2))
    a, s, t = np.radians(12), 1.3, np.array([4.0, -7.0])
    r = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    m = demo.similarity_transform(src, src @ (s * r).T + t)
    np.testing.assert_allclose(m, np.hstack([s * r, t[:, None]]), atol=1e-9)


def test_bad_spec_is_refused():
    with pytest.raises(ValueError, match="n_images"):
        demo.plan(demo.DemoSpec(n_images=3))
    with pytest.raises(ValueError, match="fake_fraction"):
        demo.plan(demo.DemoSpec(fake_fraction=1.5))


def test_own_photos_folder_adds_faces_and_an_empty_one_is_refused(tmp_path):
    from skimage import data

    (tmp_path / "mine").mkdir()
    cv2.imwrite(str(tmp_path / "mine" / "me.png"), cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    photos = demo.load_photos(tmp_path / "mine")
    assert [p.name.split("/")[-1] for p in photos] == [*demo.FACE_PHOTOS, "me.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(demo.DemoDataError, match="empty: no images"):
        demo.load_photos(tmp_path / "empty")
