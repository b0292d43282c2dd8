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
from titan.infer.onnx_engine import OnnxEngineError, OnnxEnsemble, sidecar_path
from titan.infer import onnx_export
from titan.infer.onnx_export import ExportOptions, export_onnx, parity_faces
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
    assert rec["arch"] == "titan-atto" and rec["img_size"] == 32 and rec["folds"] == ["fold0", "fold1"]
    assert rec["input"]["shape"] == ["N", 3, 32, 32] and rec["output"]["shape"] == ["n_folds", "N"]
    assert rec["tta"] == "identity,hflip,rot+5,rot-5" and rec["crop"]["margin"] == 0.2 and rec["crop"]["max_side"] == 1024
    assert rec["threshold"] == THRESHOLD and rec["calibration"]["temperature"] == TEMPERATURE
    assert rec["calibration"]["band"] == BAND and rec["folds_digest"] == fs.digest()
    assert "FFT" in rec["normalisation"] and "aten::fft_rfft2" in rec["fft"]
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


def test_crop_and_tta_recorded_by_the_folds_travel_into_the_sidecar(tmp_path):
    run = _lite0_run(tmp_path, "efficientnet-lite0", 32, meta={"margin": 0.3, "min_prob": 0.8, "tta": "minimal"})
    rec = export_onnx(ExportOptions(weights_dir=str(run)), _quiet).record
    assert rec["crop"]["margin"] == 0.3 and rec["crop"]["min_prob"] == 0.8 and rec["crop"]["max_side"] == 1024
    assert rec["tta"] == "identity,hflip" and rec["tta_source"] == "the folds' metadata"
    assert "margin from the folds" in rec["crop"]["source"] and "max_side default" in rec["crop"]["source"]
    assert "RGB (x-0.5)/0.5" == rec["normalisation"] and rec["fft"] is None
    rec = export_onnx(ExportOptions(weights_dir=str(run), tta="identity"), _quiet).record  # a flag beats the record
    assert rec["tta"] == "identity" and rec["tta_source"] == "--tta"


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
    with pytest.raises(OnnxEngineError, match="other fold files.*re-run export.py"):
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
