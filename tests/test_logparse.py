import json
import math
import shutil

import pytest

from titan.report.logparse import LogError, fold_table, load_run, load_runs

from fake_run import FIXTURES


def test_original_project_log_gives_ssl_loss_and_per_fold_f1_with_zero_based_folds():
    run = load_run(FIXTURES / "seed_training_v42_log.txt")
    assert run.ssl_epoch == [1, 2, 3]
    assert run.ssl_loss == [6.7646, 5.5040, 4.4225]
    assert all(math.isnan(v) for v in run.ssl_lr)  # the original logged no learning rate
    assert sorted(run.folds) == [0, 1, 2, 3, 4]  # " FOLD 1/5" is fold 0, as in the weight file names
    assert run.folds[1].epoch == [1, 2, 3, 4]
    assert run.folds[1].f1 == [0.0, 0.0, 0.0, 0.7]
    assert run.folds[1].th == [0.5, 0.5, 0.5, 0.1]
    assert run.folds[2].f1 == [0.0, 0.7368, 0.7368, 0.7368]
    # best = first epoch reaching the top F1 (the original saved on a strict improvement)
    assert [run.folds[k].best() for k in range(5)] == [1, 4, 2, 3, 1]
    assert run.n_used == 3 + 5 * 4 and run.n_bad == 0


def test_new_text_format_gives_loss_f1_auc_ap_lr_and_counts_malformed_lines():
    run = load_run(FIXTURES / "training_v42_log.txt")
    assert run.ssl_epoch == [1, 2] and run.ssl_loss == [0.6120, 0.4121] and run.ssl_lr == [2.5e-4, 5.0e-4]
    f1 = run.folds[1]
    assert f1.epoch == [1, 2, 3]
    assert f1.train_loss == [0.70, 0.60, 0.52]
    assert f1.f1 == [0.5, 0.6667, 0.91]
    assert f1.th == [0.55, 0.45, 0.43]
    assert f1.auc == [0.6, 0.75, 0.97]
    assert f1.ap == [0.55, 0.70, 0.95]
    assert f1.lr == [3.0e-4, 1.5e-4, 2.0e-4]
    assert run.folds[0].best() == 2 and f1.best() == 3
    # "SSL Ep 3 | Loss: | LR: …" and "Fold 1 Ep 4 | Loss: oops" are skipped and counted; chatter is not
    assert run.n_bad == 2 and run.n_used == 2 + 6


def test_jsonl_log_gives_series_best_epochs_oof_and_config_and_counts_malformed_records():
    run = load_run(FIXTURES / "training_v42_log.jsonl")
    assert run.ssl_loss == [0.612, 0.4121] and run.ssl_lr == [2.5e-4, 5e-4]
    assert run.folds[0].val_loss == [0.70, 0.60, 0.62]
    assert run.folds[0].best_epoch == 2 and run.fold_done[1]["f1"] == 0.91
    assert run.oof_record["threshold"] == 0.43 and run.oof_record["missed_fakes"] == 1
    assert run.config["variant"] == "atto" and run.config["n_folds"] == 2
    # a truncated line, a JSON list and a record with fold "zero"
    assert run.n_bad == 3
    assert fold_table(run) == [
        {"fold": 0, "best_epoch": 2, "f1": 0.8, "th": 0.43, "auc": 0.88, "ap": 0.81},
        {"fold": 1, "best_epoch": 3, "f1": 0.91, "th": 0.43, "auc": 0.97, "ap": 0.95},
    ]


def test_text_and_jsonl_channels_of_one_run_give_the_same_curves():
    text, js = load_run(FIXTURES / "training_v42_log.txt"), load_run(FIXTURES / "training_v42_log.jsonl")
    assert text.ssl_loss == js.ssl_loss
    for k in (0, 1):
        for key in ("epoch", "train_loss", "f1", "th", "auc", "ap", "lr"):
            assert getattr(text.folds[k], key) == getattr(js.folds[k], key), (k, key)


def test_run_folder_prefers_the_jsonl_log_and_reads_its_results(tmp_path):
    shutil.copy(FIXTURES / "training_v42_log.txt", tmp_path)
    shutil.copy(FIXTURES / "training_v42_log.jsonl", tmp_path)
    (tmp_path / "metrics_v42.json").write_text(json.dumps({"oof": {"threshold": 0.37}, "folds": []}))
    run = load_run(tmp_path)
    assert [p.name for p in run.log_paths] == ["training_v42_log.jsonl"]
    assert run.config is not None and run.threshold() == 0.37


def test_resumed_run_logging_an_epoch_twice_keeps_the_later_values(tmp_path):
    log = tmp_path / "training_v42_log.txt"
    log.write_text("[2026-01-01 00:00:00] SSL Ep 1 | Loss: 0.9 | LR: 1e-4\n"
                   "[2026-01-01 00:00:01] SSL Ep 1 | Loss: 0.8 | LR: 1e-4\n"
                   "[2026-01-01 00:00:02] SSL Ep 2 | Loss: 0.7 | LR: 2e-4\n")
    run = load_run(log)
    assert run.ssl_epoch == [1, 2] and run.ssl_loss == [0.8, 0.7]


@pytest.mark.parametrize("content", ["", "\n\n", "[2026-01-01 00:00:00] starting\nnothing to see\n",
                                     "SSL Ep x | Loss: ?\n{broken json\n"])
def test_log_without_usable_lines_is_an_error_naming_the_file(tmp_path, content):
    log = tmp_path / "training_v42_log.txt"
    log.write_text(content)
    with pytest.raises(LogError, match="training_v42_log.txt: no usable lines"):
        load_run(log)


def test_folder_without_log_or_results_is_an_error(tmp_path):
    with pytest.raises(LogError, match="no training log"):
        load_run(tmp_path)


def test_oof_csv_with_probability_out_of_range_names_the_file_and_line(tmp_path):
    shutil.copy(FIXTURES / "training_v42_log.jsonl", tmp_path)
    (tmp_path / "oof_v42.csv").write_text("Id,target_feature,prob,fold\na,1,0.9,0\nb,0,1.7,1\n")
    with pytest.raises(LogError, match=r"oof_v42.csv: 'prob' must be a number in \[0,1\]; bad value on line\(s\) 3"):
        load_run(tmp_path)


def test_same_log_name_in_two_folders_gets_distinct_run_names(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        shutil.copy(FIXTURES / "training_v42_log.txt", tmp_path / d)
    runs = load_runs([tmp_path / "a" / "training_v42_log.txt", tmp_path / "b" / "training_v42_log.txt"])
    assert len({r.name for r in runs}) == 2


def test_jsonl_log_with_only_malformed_records_is_an_error_with_the_count(tmp_path):
    log = tmp_path / "training_v42_log.jsonl"
    log.write_text('{"event": "ssl_epoch", "epo\n[1, 2]\n{"event": "ft_epoch", "fold": 0}\n')
    with pytest.raises(LogError, match=r"no usable lines \(3 malformed\)"):
        load_run(log)
