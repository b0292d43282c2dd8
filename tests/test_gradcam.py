import numpy as np
import pandas as pd
import pytest
import torch

from titan import build_backbone, build_head
from titan.data.images import square_resize
from titan.models.classifier import FoldModel
from titan.report.gradcam import gradcam, pick_examples

from fake_run import real_photos

SIZE = 64
ARCH = "titan-atto"


def _folds(n: int = 2) -> list[FoldModel]:
    out = []
    for k in range(n):
        torch.manual_seed(10 + k)
        out.append(FoldModel(build_backbone("atto"), build_head("linear", 320)).eval())
    return out


def _photos(*names: str, size: int = SIZE) -> torch.Tensor:
    photos = real_photos()
    imgs = [square_resize(photos[n], size) for n in names]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0


def test_heatmap_has_the_input_size_is_finite_and_in_unit_range():
    x = _photos("astronaut", "chelsea", "coffee")
    cams, prob = gradcam(_folds(), x, arch=ARCH)
    assert cams.shape == (3, SIZE, SIZE)
    assert torch.isfinite(cams).all() and cams.min() >= 0 and cams.max() <= 1
    assert torch.allclose(cams.flatten(1).amax(1), torch.ones(3))  # normalised: the hottest pixel is 1
    assert prob.shape == (3,) and ((prob > 0) & (prob < 1)).all()


def test_heatmap_of_a_non_square_input_matches_its_height_and_width():
    x = torch.rand(1, 3, 96, 64)
    cams, _ = gradcam(_folds(1), x, arch=ARCH)
    assert cams.shape == (1, 96, 64)


def test_heatmap_responds_to_the_image_content():
    folds = _folds()
    cams, _ = gradcam(folds, _photos("astronaut", "rocket"), torch.tensor([True, True]), arch=ARCH)
    assert (cams[0] - cams[1]).abs().mean() > 0.05
    # the same image twice gives the same map: the difference above comes from the content
    again, _ = gradcam(folds, _photos("astronaut", "astronaut"), torch.tensor([True, True]), arch=ARCH)
    assert torch.allclose(again[0], again[1], atol=1e-5)


def test_explaining_fake_or_real_highlights_opposite_evidence():
    x = _photos("chelsea")
    folds = _folds()
    fake, _ = gradcam(folds, x, torch.tensor([True]), arch=ARCH)
    real, _ = gradcam(folds, x, torch.tensor([False]), arch=ARCH)
    # ReLU of +S and of −S: where one map is hot the other is cold
    hot_fake = fake[0] > 0.5
    assert hot_fake.any() and real[0][hot_fake].max() < 0.5


def test_ensemble_map_is_the_mean_of_normalised_fold_maps_not_one_fold():
    x = _photos("astronaut")
    a, b = _folds(2)
    ca, _ = gradcam([a], x, torch.tensor([True]), arch=ARCH)
    cb, _ = gradcam([b], x, torch.tensor([True]), arch=ARCH)
    cab, _ = gradcam([a, b], x, torch.tensor([True]), arch=ARCH)
    assert not torch.allclose(cab, ca, atol=1e-3) and not torch.allclose(cab, cb, atol=1e-3)


def test_gradcam_leaves_model_weights_without_gradients():
    folds = _folds(1)
    gradcam(folds, _photos("coffee"), arch=ARCH)
    assert all(p.grad is None for p in folds[0].parameters())


def test_pick_examples_takes_confident_fakes_confident_reals_and_the_most_uncertain():
    preds = pd.DataFrame({"Id": list("abcdefgh"), "prob": [0.99, 0.01, 0.52, 0.97, 0.03, 0.40, 0.70, 0.20]})
    groups = dict(pick_examples(preds, 7, threshold=0.5))
    assert list(groups["most confident fakes"].Id) == ["a", "d", "g"]
    assert list(groups["most confident reals"].Id) == ["b", "e"]
    assert list(groups["most uncertain"].Id) == ["c", "f"]
    # an unusable face is replaced by the next in rank; an Id is never in two groups
    groups = dict(pick_examples(preds, 3, threshold=0.5, usable=lambda i: i not in ("a", "b")))
    assert [list(groups[g].Id) for g in groups] == [["d"], ["e"], ["c"]]
    with pytest.raises(ValueError, match="positive number"):
        pick_examples(preds, 0, 0.5)
