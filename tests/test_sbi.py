"""Self-blended images online (--sbi-p): per-image draws, only inside the mask, seeded, on the share asked."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from _single_thread import single_thread  # noqa: F401  (autouse fixture)
from titan.config import make_config
from titan.data.sbi import SelfBlend
from titan.train.finetune import class_balance


def _faces(n: int, size: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g) * 0.3 + 0.35  # textured "faces"
    return x


def test_pixels_outside_the_mask_are_unchanged_and_the_blended_faces_are_labelled_fake():
    torch.manual_seed(1)
    x, y = _faces(16), torch.tensor([0] * 12 + [1] * 4)
    out, y2, mask = SelfBlend(1.0)(x, y)
    assert y2.tolist() == [1] * 16  # every real became a fake; the fakes stay fakes
    assert torch.equal(out[12:], x[12:]) and mask[12:].abs().max() == 0  # given fakes untouched
    outside = (mask == 0).expand_as(x)
    assert torch.equal(out[outside], x[outside])  # bit for bit
    for i in range(12):
        m = mask[i, 0]
        assert m.max() > 0.4 and 0.05 < (m > 0).float().mean() < 0.6  # a face-sized region
        assert (out[i] - x[i]).abs()[:, m > 0.5].mean() > 1e-3  # altered inside
        assert m[0].abs().max() == 0 and m[:, 0].abs().max() == 0  # the border is never blended


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_the_share_of_reals_turned_fake_is_honoured(p):
    torch.manual_seed(2)
    n = 1200
    y = torch.tensor([0, 0, 0, 1] * (n // 4))
    _, y2, mask = SelfBlend(p)(_faces(n, size=32), y)
    turned = ((y == 0) & (y2 == 1)).float()
    share = float(turned.sum() / (y == 0).sum())
    assert share == pytest.approx(p, abs=0.04)
    assert torch.equal(turned.bool(), mask.flatten(1).amax(1) > 0)  # exactly the turned ones carry a mask


def test_two_runs_with_one_seed_are_identical_and_another_seed_differs():
    x, y = _faces(8), torch.zeros(8, dtype=torch.long)

    def run(seed):
        torch.manual_seed(seed)
        return SelfBlend(0.5)(x, y)

    a, b, c = run(7), run(7), run(8)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_an_sbi_share_outside_0_1_is_refused():
    with pytest.raises(ValueError, match="sbi_p must lie in"):
        SelfBlend(1.5)


def test_pos_weight_counts_the_fakes_sbi_will_make():
    cfg = make_config(overrides={"sbi_p": 0.5})
    y = np.array([1] * 20 + [0] * 80)
    assert class_balance(cfg, y)[0] == pytest.approx(40 / 60)  # 40 reals left vs 20 + 40 fakes
    assert class_balance(make_config(), y)[0] == pytest.approx(80 / 20)


def test_fine_tuning_with_sbi_p_blends_real_training_faces_on_the_fly(tmp_path, monkeypatch):
    from test_train_pipeline import cfg_for, make_faces
    from titan.data import sbi
    from titan.train import finetune

    seen = []
    real_forward = sbi.SelfBlend.forward

    def spy(self, x, y):
        out = real_forward(self, x, y)
        seen.append((int((y == 0).sum()), int(((y == 0) & (out[1] == 1)).sum())))
        return out

    monkeypatch.setattr(sbi.SelfBlend, "forward", spy)
    root = make_faces(tmp_path, n_train=16, n_test=2, n_pseudo=0)
    cfg = cfg_for(root, "run", arch="titan-atto", n_folds=2, ft_epochs=1, ssl_epochs=0, sbi_p=0.5)
    finetune.run_finetune(cfg)
    reals, turned = map(sum, zip(*seen))
    assert len(seen) >= 2 and 0 < turned < reals  # training batches only (validation never blends)
