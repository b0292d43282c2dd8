import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import plot_training_curves
from titan.report.logparse import load_run
from titan.metrics import average_precision, best_f1_threshold, roc_auc
from titan.report.plots import PLOTS, f1_curve, roc_points

from fake_run import FIXTURES, make_fake_run

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory) -> Path:
    return make_fake_run(tmp_path_factory.mktemp("run"))


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG


def test_tiny_run_gives_every_plot_gradcam_and_a_report_embedding_them(fake_run, tmp_path):
    out = tmp_path / "plots"
    rc = plot_training_curves.main([str(fake_run), "--out", str(out), "--explain", "3", "--weights-dir", str(fake_run),
                                    "--test-dir", str(fake_run / "faces" / "test")])
    assert rc == 0
    for name in [*PLOTS, "gradcam.png"]:
        assert _is_png(out / name), name
        assert f"]({name})" in (out / "report.md").read_text()
    report = (out / "report.md").read_text()
    assert "| 0 | 2 | 0.8000 | 0.430 | 0.9000 | 0.8800 |" in report  # per-fold row from metrics_v42.json
    assert "| **OOF** |" in report and "missed fakes" in report
    assert "| variant | atto |" in report  # the run's config
    assert "| 12 | 3 |" in report  # lines used, malformed lines skipped


def test_original_log_alone_gives_ssl_and_f1_plots_and_skips_what_it_lacks(tmp_path):
    shutil.copy(FIXTURES / "seed_training_v42_log.txt", tmp_path)
    out = tmp_path / "plots"
    assert plot_training_curves.main([str(tmp_path / "seed_training_v42_log.txt"), "--out", str(out)]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["report.md", "ssl_loss.png", "val_f1_auc.png"]
    assert all(_is_png(out / n) for n in written if n.endswith(".png"))
    assert "| 1 | 4 | 0.7000 | 0.100 | – | – |" in (out / "report.md").read_text()


def test_several_runs_are_overlaid_in_one_figure_and_the_report(fake_run, tmp_path):
    out = tmp_path / "cmp"
    assert plot_training_curves.main([str(fake_run), str(FIXTURES / "seed_training_v42_log.txt"), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert f"### {fake_run.name}" in report and "### seed_training_v42_log" in report
    assert _is_png(out / "ssl_loss.png") and _is_png(out / "val_f1_auc.png")


def test_no_arguments_reads_the_working_directory(fake_run, tmp_path, monkeypatch):
    monkeypatch.chdir(fake_run)
    out = tmp_path / "cwd_plots"
    assert plot_training_curves.main(["--out", str(out)]) == 0
    assert _is_png(out / "roc_pr.png") and _is_png(out / "test_probabilities.png")


def test_empty_log_exits_nonzero_and_says_why(tmp_path, capsys):
    (tmp_path / "training_v42_log.txt").write_text("")
    assert plot_training_curves.main([str(tmp_path), "--out", str(tmp_path / "plots")]) == 2
    assert "no usable lines" in capsys.readouterr().err
    assert not (tmp_path / "plots" / "report.md").exists()


def test_explain_without_fold_weights_exits_nonzero_naming_the_folder(tmp_path, capsys):
    run = make_fake_run(tmp_path / "noweights", weights=False)
    rc = plot_training_curves.main([str(run), "--out", str(tmp_path / "p"), "--explain", "2", "--weights-dir", str(run),
                                    "--test-dir", str(run / "faces" / "test")])
    assert rc == 2
    assert f"no v42_backbone_fold*.pth with its v42_head_fold*.pth in {run}" in capsys.readouterr().err


def test_help_lists_every_flag_with_its_default():
    out = subprocess.run([sys.executable, str(ROOT / "plot_training_curves.py"), "--help"], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout
    entries = {e.split()[0]: " ".join(e.split()) for e in re.split(r"\n  (?=-)", out.split("options:", 1)[1]) if e.strip()}
    for flag, default in [("--out", "plots"), ("--prefix", "v42"), ("--explain", "0"), ("--weights-dir", "."),
                          ("--test-dir", "data/faces_512/test"), ("--img-size", "0"), ("--device", "cpu")]:
        assert entries[flag].endswith(f"(default: {default})"), entries[flag]


def test_f1_curve_peak_and_roc_area_match_the_metrics_module():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    p = np.round(np.clip(0.3 * y + rng.random(300) * 0.7, 0, 1), 2)  # rounded: many ties
    ths, f1, precision, recall = f1_curve(y, p)
    th, best = best_f1_threshold(y, p)
    assert f1.max() == pytest.approx(best)
    fpr, tpr = roc_points(y, p)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(y, p))
    ap = np.sum(np.diff(np.r_[0.0, recall[::-1]]) * precision[::-1])
    assert ap == pytest.approx(average_precision(y, p))


def test_threshold_comes_from_metrics_json_else_the_folds(fake_run):
    run = load_run(fake_run)
    assert run.threshold() == pytest.approx(run.metrics["oof"]["threshold"])
    run.metrics = None
    run.oof_record = None
    assert run.threshold() == pytest.approx(0.43)  # fold_done records of the log


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only message")
def test_explain_on_cuda_without_a_gpu_exits_nonzero_suggesting_cpu(fake_run, tmp_path, capsys):
    rc = plot_training_curves.main([str(fake_run), "--out", str(tmp_path / "p"), "--explain", "1", "--device", "cuda",
                                    "--weights-dir", str(fake_run), "--test-dir", str(fake_run / "faces" / "test")])
    assert rc == 2 and "use --device cpu" in capsys.readouterr().err


def test_unreadable_test_face_is_skipped_by_name_and_the_gallery_still_drawn(fake_run, tmp_path, caplog):
    run = Path(shutil.copytree(fake_run, tmp_path / "run"))
    (run / "faces" / "test" / "astronaut.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "p"
    rc = plot_training_curves.main([str(run), "--out", str(out), "--explain", "1", "--weights-dir", str(run),
                                    "--test-dir", str(run / "faces" / "test")])
    assert rc == 0 and _is_png(out / "gradcam.png")  # the next most confident fake took its place
    assert any("astronaut.png" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
