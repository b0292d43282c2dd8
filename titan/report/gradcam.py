"""Grad-CAM of a fold ensemble: where on the face the models look for their decision.

Per fold, the gradient of the fake logit with respect to a feature map weights that map's
channels (Selvaraju et al., Grad-CAM). Which map is the architecture's choice: its registry entry
(``titan.models.archs``, ``Arch.cam``) names the module, and a reshape for token outputs (a ViT's
last block, CLS dropped, laid on the patch grid). The signed maps of the folds are normalised per
image (each fold gets an equal vote), averaged, then the sign of the explained class is applied:
the fake logit for images called fake, its negative for images called real. Because the logit is
linear in the sign, one backward pass per fold serves both classes.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..data.images import ImageDecodeError, ImageIndex, decode_image, square_resize, to_chw_uint8
from ..data.ids import check_id
from ..infer.calibration import decide, ensemble_probability
from ..infer.folds import FoldSet, find_fold_files
from ..models.archs import CamLayer, parse_arch
from ..models.classifier import FoldModel
from ..device import resolve_device
from ..runfiles import DEFAULT_PREFIX, TEST_FACES, RunFiles
from .logparse import read_prob_csv

log = logging.getLogger("titan")


def signed_cam(model: FoldModel, x: torch.Tensor, layer: CamLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_c w_c·A_c at map resolution (B,h,w), fake logit (B,)) for a float [0,1] batch; A is the
    output of the architecture's Grad-CAM ``layer`` (its registry entry), read by a forward hook."""
    module = layer.resolve(model.backbone)
    seen: list[torch.Tensor] = []
    hook = module.register_forward_hook(lambda _m, _inp, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.enable_grad():
            x = x.detach().float().requires_grad_(True)  # gives the map a graph even with frozen weights
            logit = model(x).float()
            if not seen:
                raise ValueError(f"the Grad-CAM layer {layer.module!r} never ran in {type(model.backbone).__name__}'s "
                                 "forward pass; fix the architecture's registry entry (titan/models/archs.py)")
            act = seen[-1]  # a module called several times (a shared activation): its last call
            (grad,) = torch.autograd.grad(logit.sum(), act)
    finally:
        hook.remove()
    to_map = layer.to_map or (lambda t: t)
    fmap, grad = to_map(act.detach().float()), to_map(grad.float())
    if fmap.ndim != 4:
        raise ValueError(f"the Grad-CAM layer {layer.module!r} gives shape {tuple(fmap.shape)}, not a (B,C,h,w) map; "
                         "give its registry entry a to_map (e.g. tokens_to_grid for a ViT)")
    if not bool(grad.abs().amax() > 0):  # no gradient reaches the layer: every heatmap would be black
        raise ValueError(f"the fake logit does not depend on the Grad-CAM layer {layer.module!r} of "
                         f"{type(model.backbone).__name__} (zero gradient); fix the architecture's registry entry "
                         "(for a ViT with a CLS-token head: the last block's first norm, see tokens_to_grid)")
    weights = grad.mean(dim=(2, 3), keepdim=True)  # channel importance: pooled gradient
    return (weights * fmap).sum(1), logit.detach()


def gradcam(models: Sequence[FoldModel], x: torch.Tensor, explain_fake: torch.Tensor | None = None,
            threshold: float = 0.5, *, arch: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Ensemble Grad-CAM → (heatmaps (B,H,W) in [0,1] at the input size, ensemble P(fake) (B,)).

    ``arch`` (the folds' architecture) names the layer explained: its registry entry's ``cam``.
    ``explain_fake`` (B,) bool picks the class explained per image; by default the ensemble's
    own call at ``threshold``. A map with no positive evidence is all zeros, never nan.
    """
    if not models:
        raise ValueError("gradcam needs at least one fold model")
    layer = parse_arch(arch).cam
    maps, logits = [], []
    for m in models:
        s, logit = signed_cam(m.eval(), x, layer)
        scale = s.flatten(1).abs().amax(1).clamp_min(1e-12)[:, None, None]
        maps.append(s / scale)
        logits.append(logit)
    prob = torch.from_numpy(ensemble_probability(torch.stack(logits).cpu().numpy())).float().to(x.device)
    if explain_fake is None:
        explain_fake = torch.from_numpy(decide(prob.cpu().numpy(), threshold)).bool()
    sign = explain_fake.to(x.device).float() * 2 - 1
    cam = F.relu(torch.stack(maps).mean(0) * sign[:, None, None])
    cam = F.interpolate(cam[:, None], size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
    cam = cam / cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return torch.nan_to_num(cam, nan=0.0).clamp_(0.0, 1.0), prob


# --- picking and rendering test faces --------------------------------------------------------------

GROUPS = ("most confident fakes", "most confident reals", "most uncertain")


def pick_examples(predictions: pd.DataFrame, n: int, threshold: float,
                  usable: Callable[[str], bool] = lambda _id: True) -> list[tuple[str, pd.DataFrame]]:
    """Split ``n`` test images over the three groups (fakes, reals, nearest the threshold), no repeats.

    ``usable(Id)`` is asked in rank order, so an unreadable face is replaced by the next in line.
    """
    if n < 1:
        raise ValueError(f"--explain needs a positive number of images, got {n}")
    sizes = [n // 3 + (1 if i < n % 3 else 0) for i in range(3)]
    p = predictions.assign(margin=(predictions["prob"] - threshold).abs())
    fake = decide(p["prob"].to_numpy(), threshold) == 1
    ranked = (p[fake].sort_values("prob", ascending=False, kind="mergesort"),
              p[~fake].sort_values("prob", ascending=True, kind="mergesort"),
              p.sort_values("margin", kind="mergesort"))
    taken: set[str] = set()
    out = []
    for title, size, df in zip(GROUPS, sizes, ranked):
        rows = []
        for i, image_id in zip(df.index, df["Id"]):
            if len(rows) == size:
                break
            if image_id not in taken and usable(image_id):
                taken.add(image_id)
                rows.append(i)
        out.append((title, df.loc[rows]))
    return out


def _short(image_id: str, width: int = 18) -> str:
    return image_id if len(image_id) <= width else image_id[: width - 1] + "…"


def explain_gallery(out_path: str | os.PathLike, n: int, weights_dir: str | os.PathLike = ".", prefix: str = DEFAULT_PREFIX,
                    test_dir: str | os.PathLike = TEST_FACES, img_size: int | None = None,
                    device: str = "cpu", force_preprocessing: bool = False, batch_size: int = 4) -> Path:
    """Grad-CAM gallery of ``n`` test faces picked from ``predictions_{prefix}.csv`` → PNG path.

    The folds, their input size and the decision threshold come from the fold set (``titan.infer.folds``).
    """
    from .plots import plot_gradcam_gallery

    weights_dir = Path(weights_dir)
    rf = RunFiles(weights_dir, prefix)
    if not find_fold_files(weights_dir, prefix):
        raise FileNotFoundError(f"--explain: no {rf.fold_glob()} with its {rf.fold_glob('head')} in "
                                f"{weights_dir}; point --weights-dir at the trained folds (or --prefix titan)")
    pred_path = rf.predictions_csv
    if not pred_path.is_file():
        raise FileNotFoundError(f"--explain: {pred_path} not found; it picks the faces to explain "
                                f"(written by train_v42_diamond.py's inference)")
    preds = read_prob_csv(pred_path, ("Id", "prob"))
    for i, s in enumerate(preds["Id"]):
        check_id(s, f"{pred_path} line {i + 2}: ")
    dev = resolve_device(device)
    fs = FoldSet.from_folder(weights_dir, prefix)
    models = [m.to(dev).eval() for m in fs.models]
    size = fs.input_size(img_size or 0, force_preprocessing, log.warning)
    stride = getattr(fs.models[0].backbone, "stride", 1)  # ConvNeXt V2 needs a multiple of its total stride
    if size % stride:
        raise ValueError(f"image size {size} is not a multiple of {stride} (the backbone's stride); pass --img-size")
    threshold, th_note = fs.threshold()
    index = ImageIndex(test_dir)
    log.info("Grad-CAM: %s from %s, %dpx, threshold %.3f (%s), faces from %s", fs.describe(), weights_dir, size,
             threshold, th_note, test_dir)

    absent = int((~preds["Id"].isin(index.paths)).sum())
    if absent:
        log.warning("%d Id(s) of %s have no image in %s and were not considered", absent, pred_path, test_dir)
    images: dict[str, np.ndarray] = {}

    def readable(image_id: str) -> bool:  # decodes once; a bad face is named and replaced by the next
        try:
            images[image_id] = square_resize(decode_image(index.path(image_id)), size)
            return True
        except ImageDecodeError as e:
            log.warning("Grad-CAM: skipped %s", e)
            return False

    with logging_redirect_tqdm():
        picked = pick_examples(preds[preds["Id"].isin(index.paths)], n, threshold, readable)
    total = sum(len(df) for _, df in picked)
    if total == 0:
        raise FileNotFoundError(f"--explain: no readable face in {test_dir} for the Ids of {pred_path}")
    groups = []
    with logging_redirect_tqdm(), tqdm(total=total, desc="Grad-CAM", unit="img") as bar:
        for title, df in picked:
            faces = [(r, images[r.Id]) for r in df.itertuples(index=False)]
            items = []
            for start in range(0, len(faces), batch_size):
                chunk = faces[start:start + batch_size]
                x = torch.stack([to_chw_uint8(im) for _, im in chunk]).to(dev).float().div_(255.0)
                explain_fake = torch.from_numpy(decide([r.prob for r, _ in chunk], threshold)).bool()
                cams, _ = gradcam(models, x, explain_fake, threshold, arch=fs.arch)
                for (r, im), cam, fake in zip(chunk, cams.cpu().numpy(), explain_fake.tolist()):
                    call = "fake" if fake else "real"
                    items.append({"image": im, "cam": cam, "title": f"{_short(r.Id)}\nP(fake) {r.prob:.3f} → {call}"})
                bar.update(len(chunk))
            groups.append((title, items))
    subtitle = f"{len(models)} fold(s) of {weights_dir.resolve().name}, {size}px, threshold {threshold:.3f}"
    return plot_gradcam_gallery(groups, out_path, subtitle)
