"""Fit-loop pieces: non-finite guard, accumulation, schedule, AMP choice, checkpoints/RNG, samplers, augment."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from _single_thread import single_thread  # noqa: F401  (autouse fixture)
from titan import device
from titan.train import distributed, optim, state
from titan.data.augment import augment_batch, build_augment
from titan.checkpoints import load_file
from titan.models.heads import build_head
from titan.models.classifier import Classifier


def _stepper(model: nn.Module, accum: int = 1, max_bad: int = 3) -> optim.Stepper:
    env = distributed.DistEnv()
    opt = optim.make_optimizer(model, 0.1, 0.0, env.device)
    sched = optim.warmup_cosine(opt, 0, 10)
    return optim.Stepper(model, opt, sched, device.make_scaler(env.device, True), env, accum, max_bad)


def test_non_finite_loss_is_skipped_counted_and_stops_after_max_bad_steps_naming_the_step():
    model = nn.Linear(2, 1)
    st = _stepper(model, max_bad=3)
    w0 = model.weight.detach().clone()
    nan_loss = model(torch.ones(1, 2)).sum() * float("nan")
    assert st.backward(nan_loss, "step A") is False and st.bad_total == 1
    assert torch.equal(model.weight, w0) and model.weight.grad is None  # nothing back-propagated
    assert st.backward(model(torch.ones(1, 2)).sum(), "step B") is True  # a finite step resets the run
    assert not torch.equal(model.weight, w0) and st.bad_in_row == 0
    st.backward(model(torch.ones(1, 2)).sum() * float("inf"), "step C")
    st.backward(model(torch.ones(1, 2)).sum() * float("nan"), "step D")
    with pytest.raises(optim.NonFiniteLossError, match="3 non-finite losses in a row, the last at step E"):
        st.backward(model(torch.ones(1, 2)).sum() * float("nan"), "step E")
    assert st.bad_total == 4


def test_accumulation_updates_every_n_micro_steps_and_the_epoch_end_applies_the_rest():
    model = nn.Linear(2, 1)
    st = _stepper(model, accum=3)
    w0 = model.weight.detach().clone()
    for i in range(2):
        st.backward(model(torch.ones(1, 2)).sum(), f"s{i}")
    assert torch.equal(model.weight, w0) and st.micro == 2
    st.backward(model(torch.ones(1, 2)).sum(), "s2")
    w1 = model.weight.detach().clone()
    assert not torch.equal(w1, w0) and st.micro == 0 and st.scheduler.last_epoch == 1
    st.backward(model(torch.ones(1, 2)).sum(), "s3")
    st.update()  # epoch end: the partial window still updates
    assert not torch.equal(model.weight, w1) and st.scheduler.last_epoch == 2
    assert not st.sync_next(False) and st.sync_next(True)


def test_warmup_then_cosine_schedule():
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = optim.warmup_cosine(opt, warmup_steps=4, total_steps=14, min_ratio=0.01)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8]) and lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * 0.9)))


def test_a_warmup_longer_than_half_its_run_is_clamped_with_a_notice_so_the_lr_reaches_its_peak():
    cfg = type("Cfg", (), {"min_lr_ratio": 0.01, "accum_steps": 1, "max_bad_steps": 5, "amp": False})()
    notices: list[str] = []
    for warmup, epochs in ((5, 1), (1, 16)):  # SSL --ssl-epochs 1 with the README's 5 warm-up epochs; the demo's fine-tune
        model = nn.Linear(2, 1)
        st = optim.make_stepper(model, model, 5e-4, 0.0, warmup, epochs, 10, cfg, distributed.DistEnv(), "SSL", notices.append)
        lrs = []
        for _ in range(epochs * 10):
            st.backward(model(torch.ones(1, 2)).sum(), "s")
            lrs.append(st.lr)
        assert max(lrs) > 0.9 * 5e-4, (warmup, epochs, max(lrs))
    assert len(notices) == 1 and "SSL: 5 warm-up epoch(s) do not fit a 1-epoch run" in notices[0]
    assert "clamped to 5 of its 10 optimiser steps" in notices[0]
    assert optim.fit_warmup(5, 50, 7, "SSL") == (35, None)  # the README recipe is untouched


def test_head_lr_mult_gives_the_head_its_own_learning_rate_and_keeps_the_decay_split():
    model = Classifier(nn.Sequential(nn.Linear(4, 8)), build_head("linear", 8))
    opt = optim.make_optimizer(model, 1e-4, 0.05, torch.device("cpu"), head_lr_mult=10)
    head_ids = {id(p) for p in model.head.parameters()}
    for g in opt.param_groups:
        is_head = {id(p) in head_ids for p in g["params"]}
        assert len(is_head) == 1
        assert g["lr"] == pytest.approx(1e-3 if is_head.pop() else 1e-4)
    assert sorted((g["weight_decay"], len(g["params"])) for g in opt.param_groups) == [(0.0, 1), (0.0, 1), (0.05, 1), (0.05, 1)]


def test_no_weight_decay_on_norms_biases_and_grn():
    opt = optim.make_optimizer(build_head("linear", 8), 1e-3, 0.05, torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert [p.ndim for p in decay["params"]] == [2] and [p.ndim for p in no_decay["params"]] == [1]


def test_amp_is_off_on_cpu_and_the_scaler_only_runs_for_fp16():
    cpu = torch.device("cpu")
    assert device.amp_dtype(cpu, True) is None and not device.make_scaler(cpu, True).is_enabled()


def test_newest_complete_checkpoint_wins_and_a_corrupt_newer_one_is_reported(tmp_path):
    model = nn.Linear(2, 1)
    for ep in (1, 2, 3):
        state.save_train_state(tmp_path, "ssl", ep, keep=2, model=model.state_dict(), config={"a": 1})
    assert [e for e, _ in state.checkpoint_files(tmp_path, "ssl")] == [3, 2]  # pruned to the newest two
    (tmp_path / "ssl_ep3.pth").write_bytes(b"half a file")
    skipped = []
    st = state.load_latest_state(tmp_path, "ssl", skipped.append)
    assert st["epoch"] == 2 and st["config"] == {"a": 1} and "ssl_ep3.pth" in skipped[0]
    assert isinstance(load_file(tmp_path / "ssl_ep2.pth")["rng"]["torch"], torch.Tensor)  # weights_only loads
    state.remove_train_states(tmp_path, "ssl")
    assert state.load_latest_state(tmp_path, "ssl") is None


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    state.seed_everything(5)
    state.save_train_state(tmp_path, "s", 1, model={})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    state.seed_everything(99)
    state.set_rng_state(load_file(tmp_path / "s_ep1.pth")["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_samplers_split_ranks_and_balance_classes():
    a = distributed.make_sampler(10, distributed.DistEnv(rank=0, world_size=2), shuffle=True, seed=1)
    b = distributed.make_sampler(10, distributed.DistEnv(rank=1, world_size=2), shuffle=True, seed=1)
    assert sorted(list(a) + list(b)) == list(range(10))
    w = np.where(np.arange(100) < 90, 1 / 90, 1 / 10)  # 90 negatives, 10 positives
    s = distributed.make_sampler(100, distributed.DistEnv(), shuffle=True, seed=0, weights=w)
    s.set_epoch(0)
    draws = np.array(list(s))
    assert len(draws) == 100 and 30 < (draws >= 90).sum() < 70
    s.set_epoch(1)
    assert not np.array_equal(draws, np.array(list(s)))


def test_augmentations_draw_parameters_per_image_and_stay_in_range():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 64, 64).repeat(8, 1, 1, 1)
    y = augment_batch(build_augment("finetune", jpeg_p=1.0), x)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    diffs = [(y[i] - y[0]).abs().mean().item() for i in range(1, 8)]
    assert min(diffs) > 1e-4  # each image got its own draw
    s = augment_batch(build_augment("ssl"), x)
    assert s.shape == x.shape and torch.equal(augment_batch(build_augment("none"), x), x)
    with pytest.raises(ValueError, match="unknown augmentation"):
        build_augment("heavy")


def test_blur_and_jpeg_probabilities_follow_the_config():
    import kornia.augmentation as K

    def probs(aug):
        return {type(m).__name__: m.p for m in aug.modules() if isinstance(m, (K.RandomGaussianBlur, K.RandomJPEG))}

    assert probs(build_augment("finetune", jpeg_p=0.0, blur_p=0.0)) == {"RandomGaussianBlur": 0.0, "RandomJPEG": 0.0}
    assert probs(build_augment("finetune", jpeg_p=0.3, blur_p=0.5)) == {"RandomGaussianBlur": 0.5, "RandomJPEG": 0.3}


def test_classifier_losses_reach_every_parameter_for_both_heads():
    from titan.models.convnextv2 import build_backbone

    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0.0, 1.0, 1.0, 0.0])
    for kind in ("linear", "arcface"):
        bb = build_backbone("atto")
        m = Classifier(bb, build_head(kind, bb.num_features), label_smoothing=0.1, pos_weight=2.0)
        logit, loss = m(x, y)
        loss.backward()
        assert logit.shape == (4,) and torch.isfinite(loss)
        assert all(p.grad is not None for n, p in m.head.named_parameters()), kind
    # Label smoothing: a perfectly confident correct logit still has a positive loss.
    m = Classifier(nn.Identity(), nn.Identity(), label_smoothing=0.1)
    _, loss = m(torch.tensor([20.0]), torch.tensor([1.0]))
    assert loss.item() > 0.5
