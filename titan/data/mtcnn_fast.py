"""MTCNN face detection over photos of mixed sizes at once, with facenet-pytorch's boxes.

The algorithm is MTCNN (Zhang et al. 2016, "Joint Face Detection and Alignment using Multitask
Cascaded Convolutional Networks") exactly as facenet-pytorch 2.5's ``detect_face`` runs it, with
its P/R/O-Nets and weights (shipped in the wheel) and its box helpers (``generateBoundingBox``,
``bbreg``, ``rerec``, ``nms_numpy``). Three things change, none of them the result (a
``min_face_size`` above facenet's 20 does change it, by design: see ``pyramid_scales``):

- Resampling. facenet resizes with ``F.interpolate(mode="area")`` (adaptive average pooling: the
  mean over rows ``floor(i·n/k) … ceil((i+1)·n/k)``), once per pyramid scale and once per candidate
  box — about 30 % of titan's detection time on 2 CPU cores. Here each photo's integral image is
  taken once and every such mean is four look-ups, summed exactly in integers and divided as
  torch does (``sum / kh / kw`` in float32): bit-identical inputs to the nets, ~10× less time.
- Batching. facenet needs equal-size photos in a batch. Here the pyramid's scales are the same
  sequence for every photo (12/min_face · 0.709^k), so at each scale the photos go through P-Net
  together, zero-padded to a shared canvas when their sizes are close (``pad_waste``); the padding
  cannot reach a kept output, because the conv1 cells it touches are set to −inf before
  P-Net's ceil-mode max-pool, and outputs beyond each photo's own grid are dropped. All
  candidate boxes of all photos go through R-Net and O-Net in one batch.
- Non-maximum suppression runs photo by photo, as facenet's call for that photo alone would (its
  batched form offsets boxes by the largest coordinate, which lets regressed boxes with negative
  coordinates of one photo meet another's; and ties must break in the same order, see ``_nms``).
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch
from torchvision.ops import batched_nms

# facenet-pytorch's defaults, which titan has always used (MTCNN(thresholds=…, factor=…)).
THRESHOLDS = (0.6, 0.7, 0.7)
FACTOR = 0.709
PYRAMID_START = 20  # facenet's (and titan's) min_face_size: larger bounds skip scales, never shift them
NET_BATCH = 512  # R-/O-Net crops per forward pass (facenet's fixed_batch_process)


def pyramid_scales(h: int, w: int, min_face_size: float, factor: float = FACTOR) -> list[float]:
    """The P-Net scales for an h×w photo: facenet's pyramid (computed with its float steps, so the
    same scales and count), started at ``PYRAMID_START`` px faces; for ``min_face_size`` above that,
    the scales whose 12-px window (12/scale px of the photo) is under ``min_face_size`` × factor —
    which only find faces smaller than ``min_face_size`` — are skipped, the others unchanged.
    At or below ``PYRAMID_START`` it is facenet's pyramid for that ``min_face_size``."""
    start = min(min_face_size, PYRAMID_START)
    scale, minl, scales = 12.0 / start, min(h, w) * (12.0 / start), []
    while minl >= 12:
        if 12.0 / scale >= min_face_size * factor:
            scales.append(scale)
        scale, minl = scale * factor, minl * factor
    return scales


class AreaSampler:
    """Area resampling (torch's ``interpolate(mode="area")``) of one uint8 photo, from its integral image."""

    def __init__(self, img: np.ndarray) -> None:
        h, w = img.shape[:2]
        # int32 sums are exact while the whole photo's sum fits; float64 (exact to 2^53) beyond.
        depth = cv2.CV_32S if 255 * h * w < 2**31 else cv2.CV_64F
        self.integral = cv2.integral(np.ascontiguousarray(img), sdepth=depth)  # (h+1, w+1, 3)
        self.h, self.w = h, w

    def resize(self, oh: int, ow: int) -> np.ndarray:
        """The whole photo at oh×ow → (oh, ow, 3) float32, as ``interpolate(..., (oh, ow), mode="area")``."""
        rs, re = _windows(0, self.h, oh)
        cs, ce = _windows(0, self.w, ow)
        s = self.integral
        t = np.take(s, re, 0)
        t -= np.take(s, rs, 0)
        u = np.take(t, ce, 1)
        u -= np.take(t, cs, 1)
        out = u.astype(np.float32)
        out /= (re - rs).astype(np.float32)[:, None, None]  # sum / kh / kw: torch's order of division
        out /= (ce - cs).astype(np.float32)[None, :, None]
        return out

    def crops(self, y0: np.ndarray, x0: np.ndarray, hs: np.ndarray, ws: np.ndarray, size: int) -> np.ndarray:
        """Boxes rows y0…y0+hs, cols x0…x0+ws (all inside the photo), each resampled to size×size
        → (n, size, size, 3) float32."""
        rs, re = _windows(y0[:, None], hs[:, None], size)  # (n, size) each
        cs, ce = _windows(x0[:, None], ws[:, None], size)
        stride = self.integral.shape[1]
        s = self.integral.reshape(-1, 3)  # flat look-ups: 3× faster than 2-D fancy indexing
        r0, r1, c0, c1 = rs[:, :, None] * stride, re[:, :, None] * stride, cs[:, None, :], ce[:, None, :]
        out = np.take(s, r1 + c1, 0)
        out -= np.take(s, r0 + c1, 0)
        out -= np.take(s, r1 + c0, 0)
        out += np.take(s, r0 + c0, 0)
        out = out.astype(np.float32)
        out /= (re - rs).astype(np.float32)[:, :, None, None]
        out /= (ce - cs).astype(np.float32)[:, None, :, None]
        return out


def _windows(start, n_in, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Adaptive pooling's windows [begin, end) for a span of n_in pixels from ``start`` → n_out
    (torch's integer formula: floor(i·n_in/n_out), ceil((i+1)·n_in/n_out)); arrays broadcast."""
    i = np.arange(n_out)
    return start + (i * n_in) // n_out, start + ((i + 1) * n_in + n_out - 1) // n_out


def _normalise(x: np.ndarray) -> np.ndarray:
    x -= 127.5
    x *= 0.0078125
    return x


def _pnet(pnet: torch.nn.Module, x: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """P-Net on a zero-padded canvas batch: facenet's ``PNet.forward`` with the conv1 cells that
    see padding set to −inf before the ceil-mode pool, so each photo's kept outputs are its own."""
    H, W = x.shape[2:]
    if all(s == (H, W) for s in sizes):
        return pnet(x)
    y = pnet.prelu1(pnet.conv1(x))
    for b, (h, w) in enumerate(sizes):
        y[b, :, h - 2:] = -torch.inf
        y[b, :, :, w - 2:] = -torch.inf
    y = pnet.pool1(y)
    y = pnet.prelu2(pnet.conv2(y))
    y = pnet.prelu3(pnet.conv3(y))
    return pnet.conv4_2(y), pnet.softmax4_1(pnet.conv4_1(y))


def _groups(shapes: dict[int, tuple[int, int]], pad_waste: float) -> list[list[int]]:
    """Photos (id → scaled size) in canvas groups: sorted by size, a photo joins the open group
    while the padded canvas costs at most (1 + pad_waste) × the pixels it holds."""
    groups: list[list[int]] = []
    hc = wc = area = 0
    for i in sorted(shapes, key=lambda k: (shapes[k], k)):
        h, w = shapes[i]
        if groups:
            nh, nw = max(hc, h), max(wc, w)
            if nh * nw * (len(groups[-1]) + 1) <= (1 + pad_waste) * (area + h * w):
                groups[-1].append(i)
                hc, wc, area = nh, nw, area + h * w
                continue
        groups.append([i])
        hc, wc, area = h, w, h * w
    return groups


def _nms(boxes: torch.Tensor, scores: torch.Tensor, thr: float) -> torch.Tensor:
    """facenet's call for one photo: ``batched_nms`` with a single class, which keeps its order
    among equal scores (boxes clipped to the same crop score the same, and the first one wins)."""
    return batched_nms(boxes, scores, torch.zeros(len(boxes), dtype=torch.long, device=boxes.device), thr)


def _nms_each(boxes: torch.Tensor, scores: torch.Tensor, inds: torch.Tensor, thr: float) -> torch.Tensor:
    """``_nms`` photo by photo → kept indices, photo after photo."""
    keep = [torch.nonzero(inds == i).flatten() for i in torch.unique(inds).tolist()]
    keep = [k[_nms(boxes[k], scores[k], thr)] for k in keep]
    return torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long, device=boxes.device)


def _stage_crops(samplers: Sequence[AreaSampler], boxes: torch.Tensor, inds: torch.Tensor, size: int) -> tuple[np.ndarray, np.ndarray]:
    """facenet's ``pad`` + per-box ``imresample`` for R-/O-Net: each box truncated, clipped to its
    photo (1-based, as facenet) and resampled → (crops (n, size, size, 3), which boxes had one).

    facenet skips a box that lies wholly outside its photo and then misaligns the rest (or
    raises); here such a box is marked invalid and dropped by the caller."""
    b = boxes[:, :4].trunc().int().cpu().numpy().astype(np.int64)  # int64: flat look-up indices of large photos
    inds_np = inds.cpu().numpy()
    hw = np.array([(s.h, s.w) for s in samplers])[inds_np] if len(inds_np) else np.zeros((0, 2), int)
    x, y = np.maximum(b[:, 0], 1), np.maximum(b[:, 1], 1)
    ex, ey = np.minimum(b[:, 2], hw[:, 1]), np.minimum(b[:, 3], hw[:, 0])
    ok = (ey > y - 1) & (ex > x - 1)
    out = np.zeros((len(b), size, size, 3), np.float32)
    for i in np.unique(inds_np[ok]):
        k = np.nonzero(ok & (inds_np == i))[0]
        out[k] = samplers[i].crops(y[k] - 1, x[k] - 1, ey[k] - y[k] + 1, ex[k] - x[k] + 1, size)
    return _normalise(out[ok]), ok


def _run_net(net: torch.nn.Module, crops: np.ndarray, device: torch.device) -> tuple[torch.Tensor, ...]:
    x = torch.from_numpy(crops).to(device).permute(0, 3, 1, 2)
    outs = [net(x[i:i + NET_BATCH]) for i in range(0, len(x), NET_BATCH)]
    return tuple(torch.cat(v) for v in zip(*outs))


@torch.no_grad()
def detect_faces(images: Sequence[np.ndarray], pnet: torch.nn.Module, rnet: torch.nn.Module, onet: torch.nn.Module,
                 min_face_size: float = 20, thresholds: Sequence[float] = THRESHOLDS, factor: float = FACTOR,
                 pad_waste: float = 0.0, device: torch.device | str = "cpu") -> list[np.ndarray]:
    """Per HxWx3 uint8 RGB photo (any sizes): an (n, 5) float32 array of face boxes x1, y1, x2, y2
    and probability, in facenet's ``detect_face`` order — the boxes and probabilities facenet's
    ``MTCNN.detect`` gives for that photo alone, to float rounding. ``pad_waste``: how much
    zero padding (a share of the real pixels) P-Net may run on to batch photos of different sizes."""
    from facenet_pytorch.models.utils.detect_face import bbreg, generateBoundingBox, nms_numpy, rerec

    device = torch.device(device)
    samplers = [AreaSampler(im) for im in images]
    scales = [pyramid_scales(s.h, s.w, min_face_size, factor) for s in samplers]

    # Stage 1: P-Net over each scale of every photo; candidates kept in facenet's order (scale-major).
    cand, cand_inds = [], []
    for k in range(max(map(len, scales), default=0)):
        sizes = {i: (int(s.h * sc[k] + 1), int(s.w * sc[k] + 1)) for i, (s, sc) in enumerate(zip(samplers, scales)) if k < len(sc)}
        found: dict[int, torch.Tensor] = {}
        for group in _groups(sizes, pad_waste):
            H, W = max(sizes[i][0] for i in group), max(sizes[i][1] for i in group)
            canvas = np.zeros((len(group), H, W, 3), np.float32)
            for j, i in enumerate(group):
                canvas[j, :sizes[i][0], :sizes[i][1]] = _normalise(samplers[i].resize(*sizes[i]))
            x = torch.from_numpy(canvas).to(device).permute(0, 3, 1, 2)
            reg, probs = _pnet(pnet, x, [sizes[i] for i in group])
            probs = probs[:, 1]
            for j, i in enumerate(group):
                gh, gw = (sizes[i][0] - 1) // 2 - 4, (sizes[i][1] - 1) // 2 - 4  # this photo's own output grid
                bx, _ = generateBoundingBox(reg[j:j + 1, :, :gh, :gw], probs[j:j + 1, :gh, :gw], scales[i][k], thresholds[0])
                found[i] = bx[_nms(bx[:, :4], bx[:, 4], 0.5)]
        for i in sorted(found):
            cand.append(found[i])
            cand_inds.append(torch.full((len(found[i]),), i, dtype=torch.long, device=device))
    if not cand:
        return [np.zeros((0, 5), np.float32) for _ in images]
    boxes, inds = torch.cat(cand), torch.cat(cand_inds)
    pick = _nms_each(boxes[:, :4], boxes[:, 4], inds, 0.7)
    boxes, inds = boxes[pick], inds[pick]
    regw, regh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    boxes = torch.stack([boxes[:, 0] + boxes[:, 5] * regw, boxes[:, 1] + boxes[:, 6] * regh,
                         boxes[:, 2] + boxes[:, 7] * regw, boxes[:, 3] + boxes[:, 8] * regh, boxes[:, 4]], 1)
    boxes = rerec(boxes)

    # Stage 2: R-Net on 24×24 crops of every candidate of every photo at once.
    if len(boxes):
        crops, ok = _stage_crops(samplers, boxes, inds, 24)
        ok = torch.from_numpy(ok).to(device)
        boxes, inds = boxes[ok], inds[ok]
        reg, prob = _run_net(rnet, crops, device) if len(crops) else (boxes.new_zeros(0, 4), boxes.new_zeros(0, 2))
        score = prob[:, 1]
        ipass = score > thresholds[1]
        boxes = torch.cat((boxes[ipass, :4], score[ipass].unsqueeze(1)), dim=1)
        inds, reg = inds[ipass], reg[ipass]
        pick = _nms_each(boxes[:, :4], boxes[:, 4], inds, 0.7)
        boxes = rerec(bbreg(boxes[pick], reg[pick]))
        inds = inds[pick]

    # Stage 3: O-Net on 48×48 crops; facenet's "Min" NMS (numpy) per photo.
    out = [np.zeros((0, 5), np.float32) for _ in images]
    if len(boxes):
        crops, ok = _stage_crops(samplers, boxes, inds, 48)
        ok = torch.from_numpy(ok).to(device)
        boxes, inds = boxes[ok], inds[ok]
        if len(crops):
            reg, _, prob = _run_net(onet, crops, device)
            score = prob[:, 1]
            ipass = score > thresholds[2]
            boxes = bbreg(torch.cat((boxes[ipass, :4], score[ipass].unsqueeze(1)), dim=1), reg[ipass])
            boxes, inds = boxes.cpu().numpy(), inds[ipass].cpu().numpy()
            for i in np.unique(inds):
                b = boxes[inds == i]
                out[i] = b[nms_numpy(b[:, :4], b[:, 4], 0.7, "Min")]
    return out
