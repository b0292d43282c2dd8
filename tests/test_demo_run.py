"""The demo runner: its commands follow the stage scripts' contracts, it runs them in order in
DIR, stops at a failing stage, skips run2 when there are no diamonds, and scores the last run
against the held-out labels.

The stage scripts are stood in for by small stubs that log their argv and write the files the
real ones write, so this checks the runner itself; the real pipeline is exercised end to end by
``make demo``.
"""
import json
import sys
import textwrap

import pandas as pd
import pytest

from titan.demo import dataset as demo, run as demo_run

STUB = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path
    name = Path(sys.argv[0]).name
    with open("calls.jsonl", "a") as f:
        f.write(json.dumps({"script": name, "args": sys.argv[1:], "cwd": os.getcwd(),
                            "omp": os.environ.get("OMP_WAIT_POLICY")}) + "\\n")
    fail = os.environ.get("STUB_FAIL")
    if fail == name:
        sys.exit(3)
    a = sys.argv[1:]
    opt = lambda k: a[a.index(k) + 1]
    labels = __import__("pandas").read_csv("test_labels.csv")
    if name == "align_faces.py":
        Path(opt("--output"), "test").mkdir(parents=True, exist_ok=True)
    elif name == "train_v42_diamond.py":
        out = Path(opt("--out-dir")); out.mkdir(parents=True, exist_ok=True)
        prob = labels.target_feature * 0.8 + 0.1
        prob[labels.target_feature.idxmax()] = 0.2          # one missed fake
        labels.assign(prob=prob)[["Id", "prob"]].to_csv(out / "predictions_v42.csv", index=False)
        labels.assign(target_feature=(prob > 0.5).astype(int)).to_csv(out / "submission_v42.csv", index=False)
    elif name == "make_diamonds.py":  # the original rows, then one diamond unless STUB_NO_DIAMONDS
        rows = "demo_x,1,False\\n" + ("" if os.environ.get("STUB_NO_DIAMONDS") else "demo_y,0,True\\n")
        Path(opt("--out")).write_text("Id,target_feature,is_pseudo\\n" + rows)
    elif name == "plot_training_curves.py":
        Path(opt("--out")).mkdir(parents=True, exist_ok=True)
    elif name == "safe_inference.py":
        labels.assign(target_feature=0).to_csv(opt("--out"), index=False)
    elif name == "detect.py":  # its inputs (test images and the clip) must exist
        inputs = a[:a.index("--weights-dir")]
        if not all(Path(x).is_file() for x in inputs):
            sys.exit(4)
        Path(opt("--html")).write_text("<html></html>")
    elif name == "evaluate.py":  # its photos and labels must exist
        if not (Path(opt("--data")).is_dir() and Path(opt("--labels")).is_file()):
            sys.exit(5)
        Path(opt("--out")).mkdir(parents=True, exist_ok=True)
        Path(opt("--out"), "evaluation.md").write_text("# Evaluation")
''')
SCRIPTS = ("align_faces.py", "train_v42_diamond.py", "make_diamonds.py", "plot_training_curves.py", "safe_inference.py",
           "detect.py", "evaluate.py")


@pytest.fixture()
def stub_repo(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for s in SCRIPTS:
        (repo / s).write_text(STUB)
    return repo


@pytest.fixture()
def photos(demo_photos):
    return demo_photos


def _opts(argv):
    return {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}


def test_by_default_the_demo_trains_once_and_plots_and_serves_run1(tmp_path):
    cmds = demo_run.demo_commands(repo=tmp_path, python="py")
    assert [c[1].split("/")[-1] for c in cmds] == [
        "align_faces.py", "train_v42_diamond.py", "plot_training_curves.py", "safe_inference.py"]
    assert cmds[2][2:] == ["run1", "--out", "run1/plots"] and _opts(cmds[3][2:])["--weights-dir"] == "run1"


def test_commands_follow_the_stage_contracts(tmp_path):
    cmds = demo_run.demo_commands(repo=tmp_path, python="py", self_train=True)
    assert [c[1].split("/")[-1] for c in cmds] == [
        "align_faces.py", "train_v42_diamond.py", "make_diamonds.py", "train_v42_diamond.py",
        "plot_training_curves.py", "safe_inference.py"]
    assert all(c[0] == "py" and c[1].startswith(str(tmp_path)) for c in cmds)
    align, train1, diamonds, train2, plots, safe = (_opts(c[2:]) for c in cmds)
    assert align == {"--input": "data/dataset", "--output": "data/faces_512", "--size": "128"}
    assert train1 == {"--preset": "demo", "--faces-dir": "data/faces_512", "--train-csv": "train_diamond.csv",
                      "--fallback-csv": "data/dataset/train_solution.csv", "--img-size": "128", "--out-dir": "run1"}
    assert train2 == dict(train1, **{"--out-dir": "run2"})
    # diamonds come from run1's folds and feed run2's --train-csv
    assert diamonds == {"--weights-dir": "run1", "--prefix": "v42", "--test-dir": "data/faces_512/test",
                        "--train-csv": "data/dataset/train_solution.csv", "--out": "train_diamond.csv",
                        "--hi": "0.9", "--lo": "0.1"}
    assert cmds[4][2:] == ["run2", "--out", "run2/plots"]
    assert safe == {"--weights-dir": "run2", "--prefix": "v42", "--test-dir": "data/faces_512/test",
                    "--raw-test-dir": "data/dataset/test_images", "--out": "run2/submission_safe.csv"}


def test_quick_commands_override_training_flags_once():
    train = demo_run.demo_commands(quick=True)[1][2:]
    opts = _opts(train)
    assert opts["--img-size"] == "64" and opts["--n-folds"] == "2" and opts["--ft-epochs"] == "1"
    flags = [x for x in train if x.startswith("--")]
    assert len(flags) == len(set(flags))


def test_runner_runs_every_stage_in_dir_and_scores_run2(tmp_path, stub_repo, photos, monkeypatch, capsys):
    monkeypatch.setattr(demo, "gather_photos", lambda *a, **k: photos)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    out = tmp_path / "demo"
    scores = demo_run.run_demo(out, demo.DemoSpec(n_images=20), quick=True, repo=stub_repo, python=sys.executable,
                               self_train=True)
    calls = [json.loads(line) for line in (out / "calls.jsonl").read_text().splitlines()]
    expected = demo_run.demo_commands(repo=stub_repo, python=sys.executable, quick=True, self_train=True)
    assert [[c["script"], *c["args"]] for c in calls[:-2]] == [[e[1].split("/")[-1], *e[2:]] for e in expected]
    # then detect.py on a few test images (fakes and reals) and the clip made from them, with run2's folds
    detect_call = calls[-2]
    assert detect_call["script"] == "detect.py" and _opts(detect_call["args"])["--weights-dir"] == "run2"
    inputs = detect_call["args"][:detect_call["args"].index("--weights-dir")]
    assert inputs[-1] == demo_run.CLIP and (out / demo_run.CLIP).stat().st_size > 0
    y = pd.read_csv(out / "test_labels.csv").target_feature
    assert len(inputs) - 1 == min(3, int(y.sum())) + min(3, int((y == 0).sum()))
    assert all(p.startswith("data/dataset/test_images/") for p in inputs[:-1])
    assert f"{out.resolve() / 'detect' / 'report.html'}" in (out / "demo_log.txt").read_text()
    # and evaluate.py last, on the raw test photos and their labels, with a reduced sweep, into run2/evaluation
    ev = calls[-1]
    assert ev["script"] == "evaluate.py" and "--reduced" in ev["args"]
    assert {k: _opts(ev["args"])[k] for k in ("--weights-dir", "--data", "--labels", "--out")} == {
        "--weights-dir": "run2", "--data": "data/dataset/test_images", "--labels": "test_labels.csv",
        "--out": "run2/evaluation"}
    assert f"{out.resolve() / 'run2' / 'evaluation' / 'evaluation.md'}" in (out / "demo_log.txt").read_text()
    assert {c["cwd"] for c in calls} == {str(out.resolve())}
    # stages get sleeping (not spinning) OpenMP threads, as `make test` sets them
    assert {c["omp"] for c in calls} == {"PASSIVE"}
    # every command is shown before it runs, as a user would type it in DIR
    err = capsys.readouterr().err
    for e in expected:
        assert demo_run.shown(e, out.resolve()) in err
    labels = pd.read_csv(out / "test_labels.csv")
    n, n_fakes = len(labels), int(labels.target_feature.sum())
    assert scores["n"] == n and scores["n_fakes"] == n_fakes
    # the stub ranks every fake above every real (AUC 1) but its labels miss one fake
    assert scores["missed_fakes"] == 1 and scores["fp"] == 0 and scores["roc_auc"] == pytest.approx(1.0)
    assert scores["f1"] == pytest.approx(2 * (n_fakes - 1) / (2 * (n_fakes - 1) + 1))
    assert scores["safe_agreement"] == pytest.approx((n - n_fakes + 1) / n)
    assert json.loads((out / "demo_scores.json").read_text())["f1"] == pytest.approx(scores["f1"])
    assert "submission:" in err and "run2/plots" in err
    assert scores["run"] == "run2" and scores["n_diamonds"] == 1


def test_run2_is_skipped_when_make_diamonds_adds_no_rows(tmp_path, stub_repo, photos, monkeypatch, capsys):
    monkeypatch.setattr(demo, "gather_photos", lambda *a, **k: photos)
    monkeypatch.setenv("STUB_NO_DIAMONDS", "1")
    out = tmp_path / "demo"
    scores = demo_run.run_demo(out, demo.DemoSpec(n_images=20), quick=True, repo=stub_repo, python=sys.executable,
                               self_train=True)
    calls = [json.loads(line) for line in (out / "calls.jsonl").read_text().splitlines()]
    expected = demo_run.demo_commands(repo=stub_repo, python=sys.executable, quick=True, self_train=True)
    # one training run only; plots and safe inference read run1
    assert [c["script"] for c in calls].count("train_v42_diamond.py") == 1
    assert calls[-4]["args"] == ["run1", "--out", "run1/plots"]
    assert _opts(calls[-3]["args"])["--weights-dir"] == "run1" and not (out / "run2").exists()
    assert calls[-2]["script"] == "detect.py" and _opts(calls[-2]["args"])["--weights-dir"] == "run1"
    assert calls[-1]["script"] == "evaluate.py" and _opts(calls[-1]["args"])["--weights-dir"] == "run1"
    assert [[c["script"], *c["args"]] for c in calls[:3]] == [[e[1].split("/")[-1], *e[2:]] for e in expected[:3]]
    assert scores["run"] == "run1" and scores["n_diamonds"] == 0 and scores["files"]["submission"].endswith("run1/submission_v42.csv")
    assert "skipping it" in capsys.readouterr().err


def test_without_self_training_no_diamonds_are_made_and_run1_is_scored(tmp_path, stub_repo, photos, monkeypatch, capsys):
    monkeypatch.setattr(demo, "gather_photos", lambda *a, **k: photos)
    out = tmp_path / "demo"
    scores = demo_run.run_demo(out, demo.DemoSpec(n_images=20), quick=True, repo=stub_repo, python=sys.executable)
    ran = [json.loads(line)["script"] for line in (out / "calls.jsonl").read_text().splitlines()]
    assert ran == ["align_faces.py", "train_v42_diamond.py", "plot_training_curves.py", "safe_inference.py",
                   "detect.py", "evaluate.py"]
    assert scores["run"] == "run1" and scores["self_train"] is False and not (out / "train_diamond.csv").exists()
    assert "self-training (make_diamonds.py → run2) skipped" in capsys.readouterr().err


def test_failing_stage_stops_the_run_and_is_named(tmp_path, stub_repo, photos, monkeypatch):
    monkeypatch.setattr(demo, "gather_photos", lambda *a, **k: photos)
    monkeypatch.setenv("STUB_FAIL", "make_diamonds.py")
    out = tmp_path / "demo"
    with pytest.raises(demo_run.DemoRunError, match=r"'diamonds' failed with exit code 3.*make_diamonds.py"):
        demo_run.run_demo(out, demo.DemoSpec(n_images=12), quick=True, repo=stub_repo, python=sys.executable,
                          self_train=True)
    ran = [json.loads(line)["script"] for line in (out / "calls.jsonl").read_text().splitlines()]
    assert ran == ["align_faces.py", "train_v42_diamond.py", "make_diamonds.py"]
    # resuming with another demo set would mix two sets: refused
    with pytest.raises(demo_run.DemoRunError, match="--resume"):
        demo_run.run_demo(out, demo.DemoSpec(n_images=14), quick=True, resume=True, repo=stub_repo)


def test_fresh_run_removes_earlier_outputs_only(tmp_path, stub_repo, photos, monkeypatch):
    monkeypatch.setattr(demo, "gather_photos", lambda *a, **k: photos)
    out = tmp_path / "demo"
    (out / "run1").mkdir(parents=True)
    (out / "run1" / "v42_head_fold0.pth").write_text("stale")
    (out / "notes.txt").write_text("mine")
    monkeypatch.setenv("STUB_FAIL", "align_faces.py")
    with pytest.raises(demo_run.DemoRunError):
        demo_run.run_demo(out, demo.DemoSpec(n_images=12), repo=stub_repo)
    assert not (out / "run1").exists() and (out / "notes.txt").read_text() == "mine"


def test_missing_prediction_rows_are_reported_by_file(tmp_path, photos):
    out = tmp_path / "demo"
    demo.build_dataset(out, demo.DemoSpec(n_images=12), photos=photos, progress=False)
    labels = pd.read_csv(out / "test_labels.csv")
    (out / "run2").mkdir()
    labels.to_csv(out / "run2" / "submission_v42.csv", index=False)
    labels.to_csv(out / "run2" / "submission_safe.csv", index=False)
    labels.assign(prob=0.5).iloc[1:][["Id", "prob"]].to_csv(out / "run2" / "predictions_v42.csv", index=False)
    with pytest.raises(demo_run.DemoRunError, match=r"predictions_v42.csv: 1 test Id\(s\) missing"):
        demo_run.score(out)


STAGE_SCRIPTS_PRESENT = all((demo_run.REPO / s).is_file() for s in SCRIPTS)


@pytest.mark.skipif(not STAGE_SCRIPTS_PRESENT, reason="the stage scripts are not in this checkout yet")
def test_quick_demo_runs_the_real_pipeline_end_to_end(tmp_path, photos, monkeypatch):
    monkeypatch.setattr(demo, "gather_photos", lambda *a, **k: photos)
    out = tmp_path / "demo"
    scores = demo_run.run_demo(out, demo.DemoSpec(n_images=24), quick=True, self_train=True)  # every stage
    n_test = len(pd.read_csv(out / "test_labels.csv"))
    assert scores["n"] == n_test and 0.0 <= scores["roc_auc"] <= 1.0 and 0.0 <= scores["safe_agreement"] <= 1.0
    # run2 exactly when make_diamonds added rows; the last run holds the plots and the submission
    final = scores["run"]
    assert (out / "train_diamond.csv").is_file() and (final == "run2") == (scores["n_diamonds"] > 0)
    assert any((out / final / "plots").glob("*.png"))
    assert sorted(pd.read_csv(out / final / "submission_v42.csv").Id) == sorted(pd.read_csv(out / "test_labels.csv").Id)
