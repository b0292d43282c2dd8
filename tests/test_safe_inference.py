"""safe_inference: a full submission through broken crops, a garbage fold, OOM and missing CUDA."""

import numpy as np
import pandas as pd
import pytest
import torch

import safe_inference
import titan
import titan.infer.resilient
from fold_fixtures import SIZE, copy_files, write_images, write_v42_folds
from titan.data.images import square_resize
from titan.models.classifier import FoldModel
from titan.infer.calibration import ensemble_probability
from titan.infer.record import Preprocessing
from titan.infer.tta import resolve_tta, tta_logits
from titan.infer.safe import SafeConfig, SafeInferenceError, recrop, safe_inference as run
from titan.infer.submission import prior_decision

GREYS = {"s_a": 20, "s_b": 90, "s_c": 160, "s_d": 230, "s_e": 120, "s_f": 60}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Built once: folds 0,1 good + fold 2 garbage; s_c's crop corrupt, s_d's crop missing (both have
    originals); s_e's crop and original both corrupt. Returns (folder, the good folds' models, thresholds)."""
    d = tmp_path_factory.mktemp("safe_layout")
    faces, raw = d / "data/faces_512/test", d / "data/dataset/test_images"
    write_images(faces, {k: v for k, v in GREYS.items() if k != "s_d"}, size=SIZE)
    write_images(raw, GREYS, size=SIZE)
    (faces / "s_c.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (faces / "s_e.png").write_bytes(b"")
    (raw / "s_e.png").write_bytes(b"GIF89a broken")
    models = [FoldModel(bb, head).eval() for bb, head in write_v42_folds(d, n=2)]
    ths = []
    for k in range(2):  # random weights score every grey alike: put each fold's threshold mid-pack
        ths.append(float(np.sort(fold_probs(models, [k]))[2:4].mean()))
        meta = torch.load(d / f"v42_meta_fold{k}.pth", weights_only=True)
        torch.save({**meta, "th": ths[k]}, d / f"v42_meta_fold{k}.pth")
    (d / "v42_backbone_fold2.pth").write_bytes(b"garbage, not a zip")
    (d / "v42_head_fold2.pth").write_bytes(b"garbage")
    return d, models, ths


@pytest.fixture
def folder(prepared, tmp_path):
    return copy_files(prepared[0], tmp_path)


def cfg(tmp_path, **kw):
    base = dict(weights_dir=str(tmp_path), test_dir=str(tmp_path / "data/faces_512/test"),
                raw_test_dir=str(tmp_path / "data/dataset/test_images"), out=str(tmp_path / "submission_v42.csv"),
                num_workers=0, progress=False)
    return SafeConfig(**{**base, **kw})


def fold_probs(models, ks, views=("identity", "hflip")):
    """The good folds' ensemble scored by hand on the constant images (crops and originals are identical)."""
    x = torch.stack([torch.full((3, SIZE, SIZE), v / 255.0) for v in GREYS.values()])
    return ensemble_probability(np.stack([tta_logits(models[k], x, list(views)).numpy() for k in ks]))


def expected_labels(prepared, views=("identity", "hflip"), ks=(0, 1)):
    _, models, ths = prepared
    labels = dict(zip(GREYS, (fold_probs(models, ks, views) >= np.mean([ths[k] for k in ks])).astype(int)))
    assert 0 < sum(labels.values()) < len(labels)  # both classes occur, so the comparison means something
    return labels


def test_full_submission_despite_corrupt_crop_missing_crop_and_garbage_fold(folder, prepared, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert safe_inference.main(["--no-progress", "--num-workers", "0"]) == 0  # README defaults

    sub = pd.read_csv(tmp_path / "submission_v42.csv", dtype={"Id": str})
    assert list(sub.columns) == ["Id", "target_feature"] and sub.Id.tolist() == sorted(GREYS)
    exp = expected_labels(prepared, views=resolve_tta("full"))  # folds with no record: the default views
    scored = [i for i in GREYS if i != "s_e"]
    assert {i: int(y) for i, y in zip(sub.Id, sub.target_feature) if i in scored} == {i: exp[i] for i in scored}
    # s_e could not be read at all: the majority of the other five decisions.
    majority = int(sum(exp[i] for i in scored) > len(scored) / 2)
    assert int(sub.set_index("Id").target_feature["s_e"]) == majority

    issues = pd.read_csv(tmp_path / "safe_inference_issues.csv", dtype={"Id": str}).set_index("Id")
    assert issues.resolution.to_dict() == {"s_c": "recropped", "s_d": "recropped", "s_e": "prior"}
    assert "s_e.png" in issues.problem["s_e"] and "re-crop failed" in issues.problem["s_e"]
    log = (tmp_path / "safe_inference_log.txt").read_text()
    assert "skipped fold2" in log and "v42_backbone_fold2.pth" in log
    assert "fold skipped: fold2" in log and "2 row(s) scored on a re-crop" in log and "1 row(s) given the prior" in log


def test_simulated_oom_retries_with_half_the_batch(folder, tmp_path, monkeypatch):
    plain = run(cfg(tmp_path, out=str(tmp_path / "plain.csv"), batch_size=8))
    real_forward, raised = FoldModel.forward, []

    def forward(self, x):
        if not raised and x.shape[0] > 2:
            raised.append(x.shape[0])
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(self, x)

    monkeypatch.setattr(FoldModel, "forward", forward)
    s = run(cfg(tmp_path, batch_size=8))
    assert raised == [5] and s.batch_size == 4  # 5 readable images in one batch of 8 → retried at 4
    assert any("out of memory at batch 8: retried at 4" in d for d in s.degraded)
    assert pd.read_csv(s.out).equals(pd.read_csv(plain.out))


@pytest.mark.parametrize("fault", ["raises", "nan"])
def test_fold_failing_at_inference_is_left_out(folder, prepared, tmp_path, monkeypatch, fault):
    import titan.infer.folds

    real_load = titan.infer.folds.load_fold

    def load(backbone, *a, **kw):
        fold = real_load(backbone, *a, **kw)
        if "fold0" in str(backbone):
            if fault == "nan":
                fold.model.head.head[1].bias.data.fill_(float("nan"))
            else:
                fold.model.forward = lambda x: (_ for _ in ()).throw(RuntimeError("kernel exploded"))
        return fold

    monkeypatch.setattr(titan.infer.folds, "load_fold", load)
    s = run(cfg(tmp_path))
    assert s.folds_used == ["fold1"] and s.threshold == pytest.approx(prepared[2][1])
    sub = pd.read_csv(s.out, dtype={"Id": str})
    exp = expected_labels(prepared, ks=(1,))
    assert sub.Id.tolist() == sorted(GREYS)
    assert all(int(y) == exp[i] for i, y in zip(sub.Id, sub.target_feature) if i != "s_e")
    assert any("fold0" in d for d in s.degraded)


def test_unusable_cuda_continues_on_cpu(folder, tmp_path, monkeypatch):
    # Pretend CUDA is present: moving the models there fails on this machine, as a broken driver would.
    monkeypatch.setattr(titan.infer.resilient, "resolve_device", lambda name: torch.device("cuda"))
    s = run(cfg(tmp_path, device="cuda"))
    assert s.device == "cpu" and s.n_rows == len(GREYS)
    assert any(d.startswith("device: could not use cuda") for d in s.degraded)


def test_cuda_requested_without_cuda_continues_on_cpu(folder, prepared, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    s = run(cfg(tmp_path, device="cuda", tta="full"))
    assert s.device == "cpu" and any("CUDA is not available" in d for d in s.degraded)
    full = pd.read_csv(s.out, dtype={"Id": str})
    exp = expected_labels(prepared, ("identity", "hflip", "rot+5", "rot-5"))
    assert all(int(y) == exp[i] for i, y in zip(full.Id, full.target_feature) if i != "s_e")


def test_no_usable_weights_is_the_one_error(folder, tmp_path):
    for k in range(2):
        (tmp_path / f"v42_head_fold{k}.pth").unlink()
    with pytest.raises(SafeInferenceError, match=r"(?s)no usable fold weights.*fold0.*no matching head.*fold2"):
        run(cfg(tmp_path))
    assert not (tmp_path / "submission_v42.csv").exists()


def test_prior_decision_is_the_majority_then_the_mean():
    assert prior_decision(np.array([1, 1, 0]), np.array([0.9, 0.8, 0.1]), 0.5)[0] == 1
    assert prior_decision(np.array([0, 0, 1]), np.array([0.1, 0.2, 0.99]), 0.5)[0] == 0
    assert prior_decision(np.array([0, 1]), np.array([0.45, 0.9]), 0.5)[0] == 1  # tie: mean 0.675 ≥ 0.5
    assert prior_decision(np.array([], int), np.array([]), 0.5)[0] == 0


def test_recrop_is_align_faces_crop_of_the_original(tmp_path):
    import cv2
    from PIL import Image
    from skimage import data as skdata

    from titan.data.faces import FaceDetector, face_crop

    canvas = np.full((260, 320, 3), 90, np.uint8)
    canvas[30:230, 80:280] = cv2.resize(skdata.astronaut(), (200, 200), interpolation=cv2.INTER_AREA)
    Image.fromarray(canvas).save(tmp_path / "o.png")
    det = FaceDetector("cpu").detect([canvas])[0]
    assert det.box is not None  # a real face: the re-crop must be the face crop, not the centre
    expected, status = face_crop(canvas, det, 32, 0.2)
    assert status == "face"
    assert np.array_equal(recrop(tmp_path / "o.png", Preprocessing(img_size=32, margin=0.2)), expected)
    noise = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "n.png")
    assert np.array_equal(recrop(tmp_path / "n.png", Preprocessing(img_size=16)), square_resize(noise, 16))


def test_help_lists_every_flag_with_default(capsys):
    with pytest.raises(SystemExit):
        safe_inference.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for flag in ("--weights-dir", "--prefix", "--test-dir", "--raw-test-dir", "--out", "--img-size",
                 "--batch-size", "--device", "--tta", "--margin"):
        assert flag in text
    assert "empty = the folds' record" in text and "default: v42" in text


def test_cuda_dying_mid_run_finishes_on_cpu_copies():
    from titan import build_backbone, build_head
    from titan.infer.resilient import ResilientPredictor

    models = [FoldModel(build_backbone("atto"), build_head("linear", 320)).eval() for _ in range(2)]
    x = torch.randint(0, 255, (3, 3, SIZE, SIZE), dtype=torch.uint8)
    want = ResilientPredictor(models, ["f0", "f1"], torch.device("cpu"), ["identity"], 4)(x)
    p = ResilientPredictor(models, ["f0", "f1"], torch.device("cpu"), ["identity"], 4)
    p.device = torch.device("cuda")  # as if CUDA had worked until now: the next copy to it fails here
    got = p(x)
    assert p.device.type == "cpu" and any("CUDA failed mid-run" in n for n in p.notes)
    assert np.allclose(got, want, atol=1e-5)
