"""bench/compare_archs.py: the same folds and budget per arch, a table that matches the OOF files."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

from _single_thread import single_thread  # noqa: F401  (autouse fixture)
from test_train_pipeline import make_faces
from titan.metrics import binary_metrics

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import compare_archs  # noqa: E402

ARCHS = ["mobilenetv2", "titan-atto"]
TINY = ["--preset", "tiny", "--epochs", "1", "--ssl-epochs", "1", "--img-size", "64", "--batch-size", "8",
        "--accum-steps", "1", "--n-folds", "2", "--num-workers", "0", "--threads", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def readme_layout(tmp_path_factory) -> Path:
    """Raw images and labels only (no face crops), as a user's data set arrives."""
    src = make_faces(tmp_path_factory.mktemp("src"), n_train=16, n_test=0, n_pseudo=0)
    root = tmp_path_factory.mktemp("data")
    shutil.copytree(src / "faces/train", root / "data/dataset/train_images")
    df = pd.read_csv(src / "train_diamond.csv", dtype={"Id": str})
    df[["Id", "target_feature"]].to_csv(root / "data/dataset/train_solution.csv", index=False)
    return root


@pytest.fixture(scope="module")
def study(readme_layout, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study")
    assert compare_archs.main(["--data", str(readme_layout), "--out", str(out), "--archs", ",".join(ARCHS), *TINY]) == 0
    return out


def test_table_has_one_row_per_arch_with_every_column(study):
    table = pd.read_csv(study / "archs.csv")
    assert table.arch.tolist() == ARCHS
    for col in ("params_m", "f1", "precision", "recall", "roc_auc", "missed", "s_per_epoch"):
        assert table[col].notna().all(), col
    assert (table.s_per_epoch > 0).all() and table.params_m.iloc[0] == pytest.approx(2.2249, abs=1e-3)
    md = (study / "archs.md").read_text()
    assert md.startswith("| Architecture | Params (M) | F1 |") and "uncropped images" in md
    assert all(f"| {a} |" in md for a in ARCHS)


def test_rows_are_the_oof_metrics_on_the_same_folds(study):
    table = pd.read_csv(study / "archs.csv").set_index("arch")
    oofs = {a: pd.read_csv(study / a / "oof_v42.csv", dtype={"Id": str}).set_index("Id").sort_index() for a in ARCHS}
    assert oofs[ARCHS[0]].fold.equals(oofs[ARCHS[1]].fold)  # same split for every architecture
    for a, oof in oofs.items():
        r = binary_metrics(oof.target_feature.to_numpy(), oof.prob.to_numpy())
        assert table.loc[a, "f1"] == pytest.approx(r["f1"]) and table.loc[a, "roc_auc"] == pytest.approx(r["roc_auc"])
        assert table.loc[a, "missed"] == f"{r['missed_fakes']} / {r['n_fakes']}" and r["n_fakes"] == 8


def test_baselines_skip_ssl_and_titan_pretrains(study):
    assert not (study / "mobilenetv2" / "titan_v42_ssl.pth").exists()
    assert (study / "titan-atto" / "titan_v42_ssl.pth").is_file()
    t = pd.read_csv(study / "archs.csv").set_index("arch")
    assert pd.isna(t.loc["mobilenetv2", "ssl_s"]) and t.loc["titan-atto", "ssl_s"] > 0


def test_rerun_reuses_finished_rows_and_a_new_budget_is_refused(study, readme_layout):
    before = (study / "archs.csv").read_text()
    assert compare_archs.main(["--data", str(readme_layout), "--out", str(study), "--archs", ",".join(ARCHS), *TINY]) == 0
    assert (study / "archs.csv").read_text() == before
    assert "finished earlier" in (study / "compare_archs_log.txt").read_text()
    with pytest.raises(ValueError, match="another budget"):
        compare_archs.main(["--data", str(readme_layout), "--out", str(study), "--archs", "mobilenetv2", *TINY, "--epochs", "2"])


def test_unknown_arch_and_missing_labels_are_clear_errors(tmp_path, readme_layout):
    with pytest.raises(ValueError, match="unknown arch 'resnet50'"):
        compare_archs.main(["--data", str(readme_layout), "--out", str(tmp_path), "--archs", "mobilenetv2,resnet50", *TINY])
    with pytest.raises(FileNotFoundError, match="train_solution.csv not found"):
        compare_archs.main(["--data", str(tmp_path / "nothing"), "--out", str(tmp_path), *TINY])


def test_help_lists_every_flag_with_default(capsys):
    with pytest.raises(SystemExit):
        compare_archs.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--archs", "--data", "--out", "--epochs", "--ssl-epochs", "--img-size", "--batch-size", "--n-folds"):
        assert flag in text
    assert text.count("(default:") >= 14


def test_raw_images_link_follows_the_data_given(readme_layout, tmp_path):
    from titan.train.study import find_data

    other = tmp_path / "other"
    shutil.copytree(readme_layout / "data", other / "data")
    find_data(readme_layout, tmp_path / "faces")
    d = find_data(other, tmp_path / "faces")
    assert (d.faces_dir / "train").resolve() == (other / "data/dataset/train_images").resolve()
