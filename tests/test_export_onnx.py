"""export.py → one ONNX graph of the fold ensemble + its sidecar record, checked against PyTorch on
real photos; OnnxEnsemble runs it with ResilientPredictor's call contract."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import export
from _single_thread import single_thread  # noqa: F401  (autouse fixture)
from fold_fixtures import write_v42_folds
from titan.checkpoints import save_checkpoint
from titan.infer.calibration import Calibration
from titan.infer.folds import FoldSet
from titan.infer.onnx_engine import GRAPH_FIELDS, OnnxEngineError, OnnxEnsemble, sidecar_path
from titan.infer import onnx_export
from titan.infer.onnx_export import ExportOptions, export_onnx, parity_faces
from titan.infer.record import Preprocessing
from titan.infer.resilient import ResilientPredictor
from titan.infer.tta import resolve_tta
from titan.models.archs import build_arch_backbone, default_start, parse_arch
from titan.models.frequency import FrequencyInput, MatmulFrequencyInput
from titan.models.heads import build_head

THRESHOLD, TEMPERATURE, BAND = 0.45, 1.7, 0.05


def _quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def atto_run(tmp_path_factory) -> Path:
    """Two 9-channel ConvNeXt V2 (atto) folds at 32 px and the run's calibration."""
    root = tmp_path_factory.mktemp("onnx_atto")
    write_v42_folds(root, n=2, size=32)
    (root / "metrics_v42.json").write_text(json.dumps({
        "oof": {"threshold": THRESHOLD}, "calibration": {"temperature": TEMPERATURE, "uncertain_band": BAND}}))
    return root


@pytest.fixture(scope="module")
def atto_export(atto_run: Path):
    return export_onnx(ExportOptions(weights_dir=str(atto_run)), _quiet)


def _lite0_run(root: Path, arch: str, size: int = 64, meta: dict | None = None) -> Path:
    """Two EfficientNet-Lite0 folds from the packaged ImageNet weights (real features, large logits)."""
    for k in range(2):
        torch.manual_seed(k)
        body = build_arch_backbone(arch, img_size=size)
        default_start(body, parse_arch(arch))
        m = dict(arch=arch, head="linear", img_size=size, epoch=1, **(meta or {}))
        save_checkpoint(body, root / f"v42_backbone_fold{k}.pth", **m)
        save_checkpoint(build_head("linear", body.num_features), root / f"v42_head_fold{k}.pth", **m)
    return root


def test_matmul_dft_input_equals_the_fft_input_on_real_photos():
    _, faces = parity_faces(96)
    x = faces.float() / 255.0
    for sub in (x, x[:, :, :96, :72].contiguous()):  # square and not square, even and odd rfft width
        want, got = FrequencyInput()(sub), MatmulFrequencyInput()(sub)
        assert got.shape == want.shape and (got - want).abs().max() < 1e-4


def test_export_writes_the_graph_and_the_preprocessing_record(atto_run, atto_export):
    r = atto_export
    assert r.onnx == atto_run / "v42_ensemble.onnx" and r.sidecar == sidecar_path(r.onnx)
    rec = json.loads(r.sidecar.read_text())
    fs = FoldSet.from_folder(atto_run)
    assert rec["arch"] == "titan-atto" and rec["folds"] == ["fold0", "fold1"]
    assert rec["input"]["shape"] == ["N", 3, 32, 32] and rec["output"]["shape"] == ["n_folds", "N"]
    # the folds' record as FoldSet.resolve gives it: these folds record their size only
    assert rec["preprocessing"] == fs.resolve(say=_quiet).as_record()
    p = rec["preprocessing"]
    assert p["img_size"] == 32 and p["sources"]["img_size"] == "the folds' record" and p["input"] == ""  # "": the arch's own (9 channels)
    assert p["tta"] == ["identity", "hflip", "rot+5", "rot-5"] and p["sources"]["tta"] == "default"
    assert (p["margin"], p["min_prob"], p["max_side"]) == (0.2, 0.9, 1024) and p["mean"] == [0.5, 0.5, 0.5]
    assert rec["threshold"] == THRESHOLD and rec["calibration"]["temperature"] == TEMPERATURE
    assert rec["calibration"]["band"] == BAND and rec["folds_digest"] == fs.digest()
    assert "aten::fft_rfft2" in rec["fft"]
    assert rec["parity"]["max_abs_diff"] == r.max_abs_diff <= 1e-3 and rec["parity"]["n_inputs"] == 5 * 4
    assert not [p for p in atto_run.iterdir() if p.name.endswith(".tmp")]


def test_onnx_ensemble_gives_the_pytorch_predictors_logits_and_verdicts(atto_run, atto_export):
    """Same call contract as ResilientPredictor: uint8 (B,3,S,S) → (n_folds, B), TTA averaged per fold."""
    engine = OnnxEnsemble(atto_export.onnx, weights_dir=atto_run, threads=1, batch_size=2)  # 2: chunks of a batch
    fs = FoldSet.from_folder(atto_run)
    eager = ResilientPredictor(fs.models, fs.names, torch.device("cpu"), resolve_tta("full"), 32)
    _, faces = parity_faces(32)
    got, want = engine(faces), eager(faces)
    assert got.shape == want.shape == (2, 5) and got.dtype == np.float32
    assert np.abs(got - want).max() < 1e-4
    cal = Calibration(TEMPERATURE, BAND, THRESHOLD)
    assert (cal.verdicts(got.mean(0))[1] == cal.verdicts(want.mean(0))[1]).all()
    assert np.allclose(engine(faces.float() / 255.0), got, atol=1e-6)  # float [0,1] in: the same
    assert engine(faces[:0]).shape == (2, 0)
    minimal = OnnxEnsemble(atto_export.onnx, views="minimal", threads=1)
    assert minimal.views == ["identity", "hflip"]
    assert np.abs(minimal(faces) - ResilientPredictor(fs.models, fs.names, torch.device("cpu"), ["identity", "hflip"], 8)(faces)).max() < 1e-4


@pytest.mark.parametrize("arch", ["efficientnet-lite0", "efficientnet-lite0-9ch"])
def test_efficientnet_lite0_exports_with_parity(arch, tmp_path):
    run = _lite0_run(tmp_path, arch)
    r = export_onnx(ExportOptions(weights_dir=str(run), out=str(tmp_path / "m" / "lite.onnx")), _quiet)
    assert r.max_abs_diff <= 1e-3
    engine = OnnxEnsemble(r.onnx, weights_dir=run, threads=1)
    fs = FoldSet.from_folder(run)
    _, faces = parity_faces(64)
    want = ResilientPredictor(fs.models, fs.names, torch.device("cpu"), engine.views, 8)(faces)
    assert np.abs(want).max() > 0.05  # real features: the check is not on near-zero numbers
    assert np.abs(engine(faces) - want).max() < 1e-3


def _recorded(arch: str, size: int, tta: str = "minimal") -> dict:
    """A fold meta's preprocessing record as training writes it (faces cropped at margin 0.3, min_prob 0.8)."""
    crop = {"margin": 0.3, "min_prob": 0.8, "max_side": 800}
    return {"preprocessing": Preprocessing.for_training(arch, size, tta, crop, input="rgb").to_dict()}


def test_the_folds_record_travels_into_the_sidecar_and_flags_meet_it_as_everywhere(tmp_path, capsys):
    run = _lite0_run(tmp_path, "efficientnet-lite0", 32, meta=_recorded("efficientnet-lite0", 32))
    p = export_onnx(ExportOptions(weights_dir=str(run)), _quiet).record["preprocessing"]
    assert (p["margin"], p["min_prob"], p["max_side"]) == (0.3, 0.8, 800) and p["tta"] == ["identity", "hflip"]
    assert p["input"] == "rgb" and p["mean"] == p["std"] == [0.5, 0.5, 0.5]
    assert {p["sources"][k] for k in ("margin", "tta", "img_size")} == {"the folds' record"}
    p = export_onnx(ExportOptions(weights_dir=str(run), tta="identity"), _quiet).record["preprocessing"]
    assert p["tta"] == ["identity"] and p["sources"]["tta"] == "flag"  # a flag beats the record (TTA: no forcing)
    # an input size the folds were not trained at: refused as every consumer refuses it, nothing written
    out = tmp_path / "other" / "m.onnx"
    assert export.main(["--weights-dir", str(run), "--img-size", "48", "--out", str(out)]) == 2
    assert "--img-size 48 was given" in capsys.readouterr().err and not out.parent.exists()


def test_export_refuses_a_graph_that_differs_from_pytorch_and_writes_nothing(atto_run, tmp_path, monkeypatch, capsys):
    real = onnx_export.exportable

    def off_by_a_little(model):  # what a wrong export would do: shift every logit by 0.01
        m = real(model)
        with torch.no_grad():
            m.head.head[1].bias += 0.01
        return m

    monkeypatch.setattr(onnx_export, "exportable", off_by_a_little)
    out = tmp_path / "bad.onnx"
    rc = export.main(["--weights-dir", str(atto_run), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "differ from PyTorch by 0.01" in err and "> 0.001" in err and "nothing written" in err
    assert list(tmp_path.iterdir()) == []  # neither the graph, nor its sidecar, nor a temp file


def test_export_cli_names_a_missing_run_and_a_wrong_suffix(tmp_path, capsys):
    assert export.main(["--weights-dir", str(tmp_path)]) == 2
    assert "no v42_backbone_fold*.pth" in capsys.readouterr().err
    write_v42_folds(tmp_path, n=1, size=32)
    assert export.main(["--weights-dir", str(tmp_path), "--out", str(tmp_path / "x.bin")]) == 2
    assert "name the file .onnx" in capsys.readouterr().err


def test_engine_refuses_stale_or_mismatched_files(atto_run, atto_export, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(atto_run, run)
    onnx = run / atto_export.onnx.name
    OnnxEnsemble(onnx, threads=1)  # a copy with the same content: fine without the weights check
    st = (run / "v42_head_fold1.pth").stat()
    os.utime(run / "v42_head_fold1.pth", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the fold file changed
    with pytest.raises(OnnxEngineError, match="stale.*other fold files.*python export.py --weights-dir"):
        OnnxEnsemble(onnx, weights_dir=run, threads=1)
    rec = json.loads(sidecar_path(onnx).read_text())
    sidecar_path(onnx).write_text(json.dumps({**rec, "onnx_sha256": "0" * 64}))
    with pytest.raises(OnnxEngineError, match="does not match its sidecar"):
        OnnxEnsemble(onnx, threads=1)
    sidecar_path(onnx).unlink()
    with pytest.raises(OnnxEngineError, match="sidecar is missing"):
        OnnxEnsemble(onnx, threads=1)
    engine = OnnxEnsemble(atto_export.onnx, threads=1)
    with pytest.raises(OnnxEngineError, match=r"takes \(B,3,32,32\) faces, got \(1, 3, 64, 64\)"):
        engine(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


# --- --engine onnx: detect.py, evaluate.py and serve.py score with the export ---------------------------

@pytest.fixture(scope="module")
def lite_run(tmp_path_factory) -> Path:
    """Two EfficientNet-Lite0 folds (ImageNet features: logits far from 0) at 64 px, calibrated, exported."""
    run = _lite0_run(tmp_path_factory.mktemp("lite_run"), "efficientnet-lite0", 64)
    (run / "metrics_v42.json").write_text(json.dumps({
        "oof": {"threshold": 0.5}, "calibration": {"temperature": 1.3, "uncertain_band": 0.02}}))
    export_onnx(ExportOptions(weights_dir=str(run)), _quiet)
    return run


@pytest.fixture(scope="module")
def face_photos(tmp_path_factory) -> Path:
    """Real photos: two faces, a face pair, a photo without a face."""
    import cv2
    from skimage import data
    from titan.demo.dataset import FACE_PHOTOS, _rgb

    folder = tmp_path_factory.mktemp("photos")
    astro = cv2.resize(_rgb(FACE_PHOTOS["astronaut"]()), (192, 192), interpolation=cv2.INTER_AREA)
    grace = cv2.resize(_rgb(FACE_PHOTOS["grace_hopper"]()), (160, 192), interpolation=cv2.INTER_AREA)
    for name, img in {"astro": astro, "grace": grace, "two": np.concatenate([astro, grace], 1),
                      "coffee": cv2.resize(data.coffee(), (200, 150))}.items():
        cv2.imwrite(str(folder / f"{name}.png"), img[..., ::-1])
    return folder


def _detect(*args) -> int:
    import detect

    return detect.main([*map(str, args), "--no-progress", "--device", "cpu", "--workers", "0"])


def _rows(path: Path) -> dict:
    return {(r["path"], r["face"]): r for r in map(json.loads, path.read_text().splitlines())}


def test_detect_with_the_onnx_engine_gives_the_torch_engines_verdicts_and_probabilities(lite_run, face_photos, tmp_path):
    out = {}
    for engine in ("torch", "onnx"):
        out[engine] = tmp_path / f"{engine}.jsonl"
        assert _detect(face_photos, "--weights-dir", lite_run, "--engine", engine, "--out", out[engine],
                       "--heatmaps", tmp_path / f"heat_{engine}") == 0
    torch_rows, onnx_rows = _rows(out["torch"]), _rows(out["onnx"])
    assert list(torch_rows) == list(onnx_rows) and len(torch_rows) == 4 + 5  # 5 faces (and centre squares), 4 inputs
    probs = np.array([[r["prob"] for r in rows.values()] for rows in (torch_rows, onnx_rows)])
    assert probs.std() > 0.01 and np.abs(probs[0] - probs[1]).max() < 1e-4
    for key, r in torch_rows.items():
        o = onnx_rows[key]
        assert (o["verdict"], o["decision"], o["status"], o["box"]) == (r["verdict"], r["decision"], r["status"], r["box"])
        assert abs(o["calibrated_prob"] - r["calibrated_prob"]) < 1e-4
    # Grad-CAM heatmaps from the PyTorch folds under either engine: the same pictures
    heat = {e: sorted(p.name for p in (tmp_path / f"heat_{e}").iterdir()) for e in out}
    assert heat["torch"] == heat["onnx"] and len(heat["onnx"]) == 5


def test_detect_refuses_a_stale_or_mismatched_export_naming_export_py(lite_run, face_photos, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(lite_run, run)  # copytree keeps the files' times: the digest still matches
    assert _detect(face_photos / "astro.png", "--weights-dir", run, "--engine", "onnx") == 0
    capsys.readouterr()
    # the same flags must resolve to what the graph was exported with
    assert _detect(face_photos / "astro.png", "--weights-dir", run, "--engine", "onnx", "--img-size", "48",
                   "--force-preprocessing") == 2
    err = capsys.readouterr().err
    assert "img_size 64 in the export, 48 now" in err and f"python export.py --weights-dir {lite_run}" in err
    # --onnx only with --engine onnx
    assert _detect(face_photos / "astro.png", "--weights-dir", run, "--onnx", run / "v42_ensemble.onnx") == 2
    assert "add --engine onnx" in capsys.readouterr().err
    # a fold file changed after the export: stale
    st = (run / "v42_head_fold1.pth").stat()
    os.utime(run / "v42_head_fold1.pth", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert _detect(face_photos / "astro.png", "--weights-dir", run, "--engine", "onnx") == 2
    err = capsys.readouterr().err
    assert "is stale" in err and "other fold files than the folds loaded now (fold0, fold1)" in err and "export.py" in err
    # no export at all: named, with the command that writes it
    (run / "v42_ensemble.onnx").unlink()
    assert _detect(face_photos / "astro.png", "--weights-dir", run, "--engine", "onnx") == 2
    assert "no such ONNX file; export one with export.py" in capsys.readouterr().err


def test_for_folds_checks_what_the_graph_bakes_in(lite_run):
    fs = FoldSet.from_folder(lite_run)
    prep = fs.resolve(say=_quiet)
    engine = OnnxEnsemble.for_folds(lite_run / "v42_ensemble.onnx", fs, prep, threads=1)
    assert engine.views == list(prep.tta) and engine.names == fs.names
    assert engine.prep["img_size"] == 64 and set(GRAPH_FIELDS) <= set(engine.prep)
    from dataclasses import replace

    with pytest.raises(OnnxEngineError, match=r"mean \[0.5, 0.5, 0.5\] in the export, \[0.4, 0.4, 0.4\] now"):
        OnnxEnsemble.for_folds(lite_run / "v42_ensemble.onnx", fs, replace(prep, mean=(0.4,) * 3), threads=1)
    engine = OnnxEnsemble.for_folds(lite_run / "v42_ensemble.onnx", fs, replace(prep, tta=("identity",)), threads=1)
    assert engine.views == ["identity"]  # TTA and crop are the consumer's: applied outside the graph


def test_serve_says_which_engine_scores(lite_run):
    from fastapi.testclient import TestClient
    from titan.infer.detect import Detector
    from titan.serve.app import create_app
    from titan.serve.service import Service

    for engine in ("torch", "onnx"):
        det = Detector.from_run(lite_run, device="cpu", say=_quiet, engine=engine)
        with TestClient(create_app(Service(det))) as c:
            m = c.get("/v1/model").json()
        assert m["engine"]["name"] == engine
        if engine == "onnx":
            assert m["engine"]["file"] == "v42_ensemble.onnx" and len(m["engine"]["sha256"]) == 64
            assert str(lite_run) not in json.dumps(m)
