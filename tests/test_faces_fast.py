"""The fast MTCNN path (titan.data.mtcnn_fast) finds facenet-pytorch's faces: same boxes and
probabilities on package photos of mixed sizes in one batch, none where there is none, and no
crash on degenerate shapes."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch.nn.functional import interpolate

from _single_thread import single_thread  # noqa: F401  (autouse fixture)
from titan.data.faces import MIN_FACE_PX, NO_FACE, FaceDetector, all_faces, face_crop
from titan.data.images import decode_image
from titan.data.mtcnn_fast import AreaSampler, _pnet, detect_faces, pyramid_scales


def _photos() -> dict[str, np.ndarray]:
    """Package photos (offline): faces at several sizes, a two-face strip, a grey photo, a cat."""
    from matplotlib import cbook
    from skimage import data

    astro, camera = data.astronaut(), np.repeat(data.camera()[..., None], 3, axis=2)
    hopper = decode_image(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    pair = np.hstack([astro, cv2.resize(hopper, (round(hopper.shape[1] * 512 / hopper.shape[0]), 512))])
    return {"astronaut": astro, "astronaut_300": cv2.resize(astro, (300, 300), interpolation=cv2.INTER_AREA),
            "astronaut_wide": astro[60:330, :], "camera": camera, "hopper": hopper,
            "pair": cv2.resize(pair, (pair.shape[1] // 2, 256), interpolation=cv2.INTER_AREA),
            "chelsea": data.chelsea()}


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return _photos()


@pytest.fixture(scope="module")
def detectors() -> tuple[FaceDetector, FaceDetector]:
    """facenet's MTCNN as titan ran it (min face 20) and the fast path with the same pyramid."""
    return FaceDetector("cpu", engine="facenet", min_face_size=20), FaceDetector("cpu", min_face_size=20)


@pytest.fixture(scope="module")
def reference(photos, detectors) -> dict[str, np.ndarray]:
    """facenet's own MTCNN.detect, one photo per call (the path titan ran before)."""
    return {k: detectors[0].boxes([im])[0] for k, im in photos.items()}


def _assert_same(ours: np.ndarray, ref: np.ndarray, name: str) -> None:
    assert ours.shape == ref.shape, f"{name}: {len(ours)} faces vs facenet's {len(ref)}"
    if len(ref):
        assert np.abs(ours[:, :4] - ref[:, :4]).max() < 0.01, name  # pixels
        assert np.abs(ours[:, 4] - ref[:, 4]).max() < 1e-4, name


def test_mixed_size_batch_gives_facenets_boxes_and_probabilities(photos, detectors, reference):
    ours = detectors[1].boxes(list(photos.values()))
    for (name, ref), got in zip(reference.items(), ours):
        _assert_same(got, ref, name)
    n = {k: int((b[:, 4] >= 0.9).sum()) for k, b in reference.items()}
    assert n["astronaut"] == n["astronaut_300"] == n["hopper"] == 1 and n["pair"] == 2 and n["chelsea"] == 0


def test_padded_pnet_canvases_give_the_same_boxes(photos, detectors, reference):
    """The GPU setting (photos of different sizes zero-padded into one P-Net batch) on the CPU."""
    m = detectors[1].mtcnn
    ours = detect_faces(list(photos.values()), m.pnet, m.rnet, m.onet, 20, pad_waste=100.0)
    for (name, ref), got in zip(reference.items(), ours):
        got = got[np.argsort((got[:, 2] - got[:, 0]) * (got[:, 3] - got[:, 1]))[::-1]]
        _assert_same(got, ref, name)


@pytest.mark.parametrize("sizes", [[(31, 40), (29, 41), (25, 23), (30, 30)], [(57, 18), (13, 13)]])
def test_pnet_on_a_padded_canvas_equals_pnet_on_each_photo(detectors, sizes):
    """Odd and even sizes: the ceil-mode pool's last window must not see the padding."""
    pnet = detectors[1].mtcnn.pnet
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, 3, h, w, generator=g) for h, w in sizes]
    H, W = max(h for h, _ in sizes), max(w for _, w in sizes)
    canvas = torch.zeros(len(xs), 3, H, W)
    for j, x in enumerate(xs):
        canvas[j, :, :x.shape[2], :x.shape[3]] = x[0]
    with torch.no_grad():
        reg, prob = _pnet(pnet, canvas, sizes)
        for j, x in enumerate(xs):
            r1, p1 = pnet(x)
            gh, gw = r1.shape[2:]
            assert (gh, gw) == ((sizes[j][0] - 1) // 2 - 4, (sizes[j][1] - 1) // 2 - 4)
            torch.testing.assert_close(reg[j, :, :gh, :gw], r1[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(prob[j, :, :gh, :gw], p1[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape,out", [((377, 501), (227, 301)), ((377, 501), (12, 17)), ((40, 30), (97, 61))])
def test_area_resampling_is_torchs_bit_for_bit(shape, out):
    img = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    ref = interpolate(torch.as_tensor(img)[None].permute(0, 3, 1, 2).float(), size=out, mode="area")
    assert np.array_equal(AreaSampler(img).resize(*out), ref[0].permute(1, 2, 0).numpy())
    # a box resampled alone (R-/O-Net crops), as facenet's per-box interpolate
    y0, x0, h, w = 3, 5, shape[0] - 9, shape[1] - 7
    ref = interpolate(torch.as_tensor(img[y0:y0 + h, x0:x0 + w])[None].permute(0, 3, 1, 2).float(), size=(24, 24), mode="area")
    got = AreaSampler(img).crops(np.array([y0]), np.array([x0]), np.array([h]), np.array([w]), 24)
    assert np.array_equal(got[0], ref[0].permute(1, 2, 0).numpy())


def test_a_larger_min_face_size_skips_the_first_scales_and_keeps_the_rest():
    full = pyramid_scales(512, 512, 20)
    assert full[0] == pytest.approx(0.6) and len(full) == 10
    assert pyramid_scales(512, 512, 40) == full[2:]  # windows of 20 and 28 px only find faces under 40
    assert pyramid_scales(512, 512, 30) == full[1:]
    assert pyramid_scales(512, 512, 12)[0] == pytest.approx(1.0)  # below 20: facenet's own pyramid
    assert pyramid_scales(19, 4000, 20) == [] and len(pyramid_scales(20, 20, 20)) == 1


def test_default_min_face_finds_the_same_faces_and_skips_smaller_ones(photos, reference):
    """MIN_FACE_PX (40) skips the two finest scales: the package photos' faces (all larger) stay
    within a pixel; a face of about 15 px is no longer looked for."""
    assert MIN_FACE_PX == 40
    default = FaceDetector("cpu")
    for (name, ref), got in zip(reference.items(), default.detect_all(list(photos.values()))):
        ref = all_faces(ref[:, :4], ref[:, 4])
        assert len(got) == len(ref), name
        for a, b in zip(got, ref):
            assert np.abs(np.subtract(a.box, b.box)).max() < 1 and abs(a.prob - b.prob) < 1e-4, name
    tiny = cv2.resize(photos["astronaut"], (80, 80), interpolation=cv2.INTER_AREA)  # a face of about 15 px
    assert FaceDetector("cpu", min_face_size=20).detect([tiny])[0].box is not None
    assert default.detect([tiny])[0] is NO_FACE


def test_photo_without_a_face_gets_the_centre_square(photos, detectors):
    (det,) = detectors[1].detect([photos["chelsea"]])
    assert det is NO_FACE and face_crop(photos["chelsea"], det, 64)[1] == "fallback"


@pytest.mark.parametrize("shape", [(1, 1, 3), (20000, 100, 3), (5, 700, 3), (19, 19, 3), (12, 12, 3)])
def test_tiny_and_extreme_shapes_fall_back_without_crashing(detectors, shape):
    img = np.full(shape, 128, np.uint8)
    for det in detectors:
        (found,) = det.detect([img])
        assert found is NO_FACE and face_crop(img, found, 32)[1] == "fallback"


def test_grey_and_rgba_files_are_detected_as_their_rgb(photos, detectors, tmp_path):
    astro = photos["astronaut_300"]
    grey_path, rgba_path = tmp_path / "grey.png", tmp_path / "rgba.png"
    cv2.imwrite(str(grey_path), cv2.cvtColor(astro, cv2.COLOR_RGB2GRAY))
    cv2.imwrite(str(rgba_path), cv2.cvtColor(astro, cv2.COLOR_RGB2BGRA))
    grey, rgba = decode_image(grey_path), decode_image(rgba_path)
    ours = detectors[1].detect_all([grey, rgba, astro])
    assert ours[1] == ours[2] and len(ours[0]) == 1 and len(ours[1]) == 1
    ref = detectors[0].detect_all([grey])[0]
    assert np.allclose(ours[0][0].box, ref[0].box, atol=0.01)


def test_an_undecoded_array_is_refused_with_the_fix(detectors):
    with pytest.raises(ValueError, match="decode_image"):
        detectors[1].detect([np.zeros((64, 64), np.uint8)])
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        detectors[1].detect([np.zeros((64, 64, 4), np.uint8)])


def test_boxes_are_in_source_pixels_when_the_photo_is_shrunk(photos):
    big = cv2.resize(photos["astronaut"], (1024, 1024))
    (small,) = FaceDetector("cpu").detect([photos["astronaut"]])
    (shrunk,) = FaceDetector("cpu", max_side=512).detect([big])
    assert np.allclose(np.array(shrunk.box) / 2, small.box, atol=2)
