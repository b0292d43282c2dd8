"""Folds that keep a group (a person, a source, a video) on one side, from the label CSV's
optional ``group`` column, and every reader of that CSV taking the column."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.model_selection import StratifiedKFold

from titan.data.labels import group_codes, has_groups, read_labels
from titan.infer.diamonds import training_rows
from titan.train import finetune

# assign_folds(4 folds, seed 3407) on the frame of ``_rows(7)`` before groups existed (commit 29c11ed)
TODAYS_FOLDS = [3, 2, 1, 2, 1, 2, 3, 0, 0, 0, 0, 1, 3, 3, 2, 1, 1, 0, 1, 3, 0, 2, -1, -1, -1, -1]


def _rows(seed: int, n: int = 26, n_pseudo: int = 4) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"Id": [str(i) for i in range(n)], "target_feature": [int(v) for v in rng.random(n) < 0.35],
                         "is_pseudo": [i >= n - n_pseudo for i in range(n)]})


def _csv(tmp_path, df: pd.DataFrame, name: str = "labels.csv"):
    path = tmp_path / name
    df.to_csv(path, index=False)
    return path


def test_without_a_group_column_the_folds_are_todays_stratified_split_bit_for_bit(tmp_path):
    df = _rows(7)
    assert finetune.assign_folds(df, 4, 3407).tolist() == TODAYS_FOLDS
    for seed in range(5):  # and in general: sklearn's StratifiedKFold over the real rows, pseudo rows -1
        df = _rows(seed, n=40, n_pseudo=6)
        real = np.flatnonzero(~df.is_pseudo.to_numpy())
        expected = np.full(len(df), -1)
        for k, (_, va) in enumerate(StratifiedKFold(3, shuffle=True, random_state=seed).split(real, df.target_feature[real])):
            expected[real[va]] = k
        assert np.array_equal(finetune.assign_folds(df, 3, seed), expected)
    # read from a CSV without the column, or with every group cell blank: the same folds
    plain = read_labels(_csv(tmp_path, _rows(7)))
    blank = read_labels(_csv(tmp_path, _rows(7).assign(group=""), "blank.csv"))
    assert "group" not in plain.columns and not has_groups(blank)
    assert finetune.assign_folds(plain, 4, 3407).tolist() == finetune.assign_folds(blank, 4, 3407).tolist() == TODAYS_FOLDS


def test_the_group_column_is_read_as_a_string_and_a_blank_group_is_a_group_of_its_own(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("Id,target_feature,group\na,0,007\nb,1, 007 \nc,0,\nd,1,\ne,1,alice\n")
    df = read_labels(path)
    assert df.group.tolist() == ["007", "007", "", "", "alice"] and has_groups(df)
    codes = group_codes(df)
    assert codes[0] == codes[1] and len(set(codes)) == 4  # 007, alice, and each blank row alone


@pytest.mark.parametrize("trial", range(60))
def test_group_folds_never_share_a_group_and_give_each_fold_both_classes_or_refuse_naming_groups(trial):
    rng = np.random.default_rng([2024, trial])
    n, n_groups, n_folds = int(rng.integers(12, 80)), int(rng.integers(2, 16)), int(rng.integers(2, 6))
    names = np.array([f"g{int(g)}" for g in rng.integers(0, n_groups, n)], dtype=object)
    names[rng.random(n) < rng.uniform(0, 0.3)] = ""  # some rows without a group
    # a group leans to one class, as a person or a source does
    lean = {g: rng.uniform(0.05, 0.95) for g in set(names)}
    y = np.array([int(rng.random() < (lean[g] if g else 0.4)) for g in names])
    y[:2] = [0, 1]
    n_pseudo = int(rng.integers(0, 5))
    df = pd.DataFrame({"Id": [str(i) for i in range(n + n_pseudo)], "target_feature": [*y, *rng.integers(0, 2, n_pseudo)],
                       "is_pseudo": [False] * n + [True] * n_pseudo, "group": [*names, *[""] * n_pseudo]})
    try:
        fold = finetune.assign_folds(df, n_folds, seed=trial)
    except ValueError as e:
        msg = str(e)
        assert "--n-folds" in msg and "groups" in msg
        assert re.search(r"'g\d+'|\(no group: Id \d+\)", msg) or re.search(r"hold \d+ group", msg), msg
        return
    real = fold[:n]
    assert (fold[n:] == -1).all() and (real >= 0).all() and set(real) == set(range(n_folds))
    for g in set(names) - {""}:  # a group is in exactly one fold
        assert len(set(real[names == g])) == 1, g
    for k in range(n_folds):
        assert set(y[real == k]) == {0, 1}
    assert np.array_equal(finetune.assign_folds(df, n_folds, seed=trial), fold)  # the fold seed decides


def test_fewer_groups_than_folds_is_refused_naming_the_count():
    df = _rows(1, n=20, n_pseudo=0).assign(group=[f"p{i % 3}" for i in range(20)])
    df.attrs["source"] = "labels.csv"
    with pytest.raises(ValueError, match=r"labels.csv: cannot make 4 group folds: the 20 labelled rows hold 3 group\(s\).*"
                                         r"lower --n-folds to at most 3"):
        finetune.assign_folds(df, 4, 0)


def test_a_class_held_by_too_few_groups_is_refused_naming_those_groups():
    # every fake is alice's or bob's: three folds cannot each validate a fake
    group = ["alice", "alice", "bob", "bob"] + [f"p{i}" for i in range(12)]
    y = [1, 0, 1, 0] + [0] * 12
    df = pd.DataFrame({"Id": [str(i) for i in range(16)], "target_feature": y, "is_pseudo": False, "group": group})
    with pytest.raises(ValueError, match=r"only 2 group\(s\) hold fake \(1\) rows \('alice', 'bob'\).*--n-folds 2 or fewer"):
        finetune.assign_folds(df, 3, 0)
    assert finetune.group_fold_limit(df) == 2
    fold = finetune.assign_folds(df, 2, 0)
    assert fold[0] == fold[1] and fold[2] == fold[3] and fold[0] != fold[2]


def test_the_preflight_line_says_how_many_groups_each_fold_holds(tmp_path):
    from titan.config import make_config
    from titan.train import pipeline
    from titan.train.session import session

    (tmp_path / "faces" / "train").mkdir(parents=True)
    for i in range(12):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(tmp_path / "faces" / "train" / f"{i}.jpg")
    rows = pd.DataFrame({"Id": [str(i) for i in range(12)], "target_feature": [i % 2 for i in range(12)],
                         "group": [f"p{i // 2}" for i in range(12)]})
    rows.to_csv(tmp_path / "labels.csv", index=False)
    cfg = make_config(preset="tiny", overrides=dict(faces_dir=str(tmp_path / "faces"), train_csv=str(tmp_path / "labels.csv"),
                                                   out_dir=str(tmp_path / "run"), n_folds=3))
    with session(cfg) as r:
        df, folds = pipeline.preflight(r, ["finetune"])
    line = next(s for s in (tmp_path / "run" / "training_v42_log.txt").read_text().splitlines() if "checked before" in s)
    assert line.endswith("fold 0 2 real / 2 fake / 2 groups, fold 1 2 real / 2 fake / 2 groups, "
                         "fold 2 2 real / 2 fake / 2 groups")


def test_diamonds_keep_the_group_column_and_give_pseudo_rows_a_blank_group(tmp_path):
    train = read_labels(_csv(tmp_path, pd.DataFrame({"Id": ["a", "b"], "target_feature": [0, 1], "group": ["x", "y"]})))
    diamonds = pd.DataFrame({"Id": ["t1"], "target_feature": [1], "prob": [0.999]})
    rows = training_rows(train, diamonds)
    assert rows.columns.tolist() == ["Id", "target_feature", "is_pseudo", "group"]
    back = read_labels(_csv(tmp_path, rows, "train_diamond.csv"))  # and it reads back as written
    assert back.group.tolist() == ["x", "y", ""] and back.is_pseudo.tolist() == [False, False, True]
    plain = training_rows(train.drop(columns="group"), diamonds)
    assert plain.columns.tolist() == ["Id", "target_feature", "is_pseudo"]  # no groups in, none out


def test_evaluate_reads_a_labelled_set_with_a_group_column(tmp_path):
    from titan.report.evaluation import LabelledSet

    (tmp_path / "imgs").mkdir()
    for i in ("a", "b"):
        Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / f"{i}.png")
    labels = _csv(tmp_path, pd.DataFrame({"Id": ["a", "b"], "target_feature": [0, 1], "group": ["p", "q"]}))
    data = LabelledSet.load(tmp_path / "imgs", labels)
    assert data.ids == ["a", "b"] and data.labels.tolist() == [0, 1]


def test_the_demo_set_writes_each_training_faces_identity_as_its_group(tmp_path, demo_photos):
    from titan.demo import dataset as demo
    from titan.demo import run as demo_run
    from titan.runlog import RunLog

    out = tmp_path / "demo"
    manifest = demo.build_dataset(out, demo.DemoSpec(n_images=24), photos=demo_photos, progress=False)
    train = read_labels(demo.dataset_paths(out)["train_csv"])
    expected = manifest[manifest.split == "train"].set_index("Id").identity
    assert has_groups(train) and (train.set_index("Id").group == expected.loc[train.Id]).all()
    assert not set(train.group) & set(manifest.identity[manifest.split == "test"])  # test faces: unseen people
    # three bundled photos leave two training identities: the demo trains on 2 folds, not its preset's 3
    log = RunLog(tmp_path / "log.txt")
    assert demo_run.demo_folds(out, quick=False, log=log) == 2
    assert demo_run.demo_folds(out, quick=True, log=log) is None  # --quick already uses 2
    assert "training with --n-folds 2 instead of 3" in (tmp_path / "log.txt").read_text()
