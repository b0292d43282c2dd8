"""What detect.py leaves behind: the terminal table, the CSV/JSONL rows, Grad-CAM overlays and one
self-contained HTML page (images embedded as data URIs, inline CSS, no script, no link).

``run_detect`` is detect.py's one call: it checks the options, loads the run's detector
(``titan.infer.detect``), scores every input, and writes only ``--out``, ``--heatmaps`` and
``--html`` (each file atomically). The heatmap of a face is the ensemble Grad-CAM of
``titan.report.gradcam`` for the class the ensemble called, laid over the crop that was scored.
"""
from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import pandas as pd
import torch

from ..checkpoints import atomic_write, check_output_file
from ..data.images import encode_image, to_chw_uint8
from ..infer.calibration import Calibration
from ..infer.detect import (ERROR, FACE, ROW_COLUMNS, DetectError, DetectOptions, Detector, FaceResult, InputResult,
                            expand_inputs, iter_rows)
from ..runlock import folder_lock
from ..runlog import RunLog
from ..safe_text import csv_frame, strict_json
from .gradcam import gradcam

OUT_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
VERDICT_COLOURS = {"fake": (220, 38, 38), "real": (22, 163, 74), "uncertain": (217, 119, 6), "": (120, 120, 120)}


def out_format(path: str) -> str:
    fmt = OUT_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise DetectError(f"--out {path}: the extension picks the format; use .csv or .jsonl")
    return fmt


def check_outputs(opts: DetectOptions) -> None:
    """--out and --html can be written (a file name with the right extension, in a writable folder),
    checked before any scoring: a bad name is exit 2, a folder that refuses writing exit 3."""
    if opts.out:
        check_output_file(opts.out, "--out", DetectError)
        out_format(opts.out)
    if opts.html:
        check_output_file(opts.html, "--html", DetectError)
        if Path(opts.html).suffix.lower() not in (".html", ".htm"):
            raise DetectError(f"--html {opts.html}: name the page .html")


# --- rows and the terminal table -----------------------------------------------------------------

def _csv_cell(key: str, v):
    if v is None:
        return ""
    if key == "box":
        return " ".join(f"{x:.1f}" for x in v)
    if isinstance(v, float):
        return f"{v:.6f}"
    if key == "name_escaped":
        return "true" if v else ""
    return v


def write_rows(path: str | Path, results: Sequence[InputResult]) -> Path:
    """Every face's row, then each input's summary row (``face`` empty), as CSV or JSONL by extension."""
    rows = list(iter_rows(results))
    if out_format(str(path)) == "jsonl":
        text = "".join(strict_json(r, ensure_ascii=False) + "\n" for r in rows)
        return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    df = pd.DataFrame([{k: _csv_cell(k, r[k]) for k in ROW_COLUMNS} for r in rows], columns=ROW_COLUMNS)
    df = csv_frame(df, ["path", "error", "folds"])  # user-controlled text: no cell runs as a formula
    return atomic_write(path, lambda tmp: df.to_csv(tmp, index=False, encoding="utf-8"))


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def _note(r: InputResult) -> str:
    if not r.scored:
        return r.error
    n_faces = sum(f.status == FACE for f in r.faces)
    parts = [f"most suspicious frame: {r.frame} ({r.n_frames} frames sampled)" if r.kind == "video" else ""]
    parts.append(r.error)
    if r.status == "ok" and r.kind == "image" and n_faces > 1:
        parts.append(f"{n_faces} faces: the most fake decides")
    return "; ".join(p for p in parts if p)


def format_table(results: Sequence[InputResult], cal: Calibration, width: int = 44) -> str:
    """One line per input (its verdict, raw and calibrated P(fake), faces) and a closing count."""
    head = f"{'input':<{width}}  {'kind':<5}  {'faces':>5}  {'P(fake)':>7}  {'calib.':>6}  {'verdict':<9}  note"
    lines = [head, "-" * len(head)]
    for r in results:
        faces = sum(f.status == FACE for f in r.faces)
        p = f"{r.prob:7.3f}" if r.scored else f"{'-':>7}"
        c = f"{r.calibrated_prob:6.3f}" if r.scored else f"{'-':>6}"
        verdict = r.verdict if r.scored else "ERROR"
        lines.append(f"{_short(r.path, width):<{width}}  {r.kind:<5}  {faces:>5}  {p}  {c}  {verdict:<9}  {_note(r)}")
    counts = {v: sum(r.verdict == v for r in results if r.scored) for v in ("fake", "real", "uncertain")}
    errors = sum(not r.scored for r in results)
    lines.append(f"{len(results)} input(s): {counts['fake']} fake, {counts['real']} real, {counts['uncertain']} uncertain, "
                 f"{errors} error(s) | fake when P(fake) ≥ {cal.threshold:.3f} (calibrated {cal.calibrated_cut:.3f}); "
                 f"uncertain within ±{cal.band:.3f} of it (calibrated); temperature {cal.temperature:.3f}")
    return "\n".join(lines)


# --- Grad-CAM overlays ----------------------------------------------------------------------------

def overlay(crop: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """A jet-coloured heatmap (cam in [0,1], HxW) laid over an HxWx3 uint8 crop."""
    heat = cv2.applyColorMap(np.clip(cam * 255.0 + 0.5, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)
    return np.clip((1 - alpha) * crop.astype(np.float32) + alpha * heat.astype(np.float32) + 0.5, 0, 255).astype(np.uint8)


class Explainer:
    """Grad-CAM overlays of the faces an input is judged by, for the class each was called."""

    def __init__(self, detector: Detector, batch_size: int = 8) -> None:
        self.models, self.device = detector.fold_models  # PyTorch's, whichever engine scores
        self.batch_size = batch_size
        self.arch = detector.folds.arch  # its registry entry names the layer Grad-CAM explains

    def __call__(self, res: InputResult, every_face: bool) -> list[tuple[FaceResult, np.ndarray]]:
        if not res.scored:
            return []
        faces = [f for f in res.judged_by if f.crop is not None]
        if not every_face:
            faces = [f for f in faces if f is res.top_face]
        out = []
        for i in range(0, len(faces), self.batch_size):
            chunk = faces[i:i + self.batch_size]
            x = torch.stack([to_chw_uint8(f.crop) for f in chunk]).to(self.device).float().div_(255.0)
            cams, _ = gradcam(self.models, x, torch.tensor([f.decision == "fake" for f in chunk]), arch=self.arch)
            out += [(f, overlay(f.crop, cam)) for f, cam in zip(chunk, cams.cpu().numpy())]
        return out


class HeatmapWriter:
    """One PNG per explained face in ``folder``: ``<input path, flattened>[_frame{n}]_face{k}.png``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.taken: set[str] = set()
        self.written: list[Path] = []

    def name(self, f: FaceResult) -> str:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", f.path).strip("._")[-120:] or "input"
        base = f"{stem}{'' if f.frame is None else f'_frame{f.frame}'}_face{f.face}"
        name, n = f"{base}.png", 1
        while name in self.taken:
            n += 1
            name = f"{base}_{n}.png"
        self.taken.add(name)
        return name

    def write(self, explained: list[tuple[FaceResult, np.ndarray]]) -> None:
        for f, img in explained:
            data = encode_image(img, "png")
            path = atomic_write(self.folder / self.name(f), lambda tmp, d=data: Path(tmp).write_bytes(d))
            self.written.append(path)


# --- the HTML page --------------------------------------------------------------------------------

def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _thumbnail(res: InputResult, side: int = 320) -> np.ndarray:
    """The image (a video: its most suspicious frame) at ≤ ``side`` px, each judged face boxed in its verdict's colour."""
    img = res.image
    h, w = img.shape[:2]
    s = min(1.0, side / max(h, w))
    thumb = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA) if s < 1 else img.copy()
    for f in res.judged_by:
        if f.status != FACE:
            continue
        x1, y1, x2, y2 = (int(round(v * s * res.scale)) for v in f.box)  # boxes are in source pixels
        cv2.rectangle(thumb, (x1, y1), (x2, y2), VERDICT_COLOURS.get(f.verdict, (120, 120, 120)), max(1, round(2 * side / 320)))
    return thumb


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1f2937;background:#f9fafb}
h1{font-size:22px;margin:0 0 6px}
.meta{color:#4b5563;font-size:13px;margin:0 0 4px}
.legend{font-size:12px;color:#4b5563;margin:8px 0 18px}
.grid{display:grid;align-items:start;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:16px}
.card{background:#fff;border:1px solid #e5e7eb;border-left:6px solid #9ca3af;border-radius:8px;padding:12px}
.card.fake{border-left-color:#dc2626}.card.real{border-left-color:#16a34a}.card.uncertain{border-left-color:#d97706}
.imgs{display:flex;gap:10px;align-items:flex-start}
figure{margin:0}
figcaption{font-size:11px;color:#6b7280;margin-top:2px}
.imgs img{display:block;max-width:200px;max-height:200px;border-radius:4px}
.imgs img.cam{width:120px;height:120px}
.name{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;word-break:break-all;margin:8px 0 4px}
.verdict{font-weight:600;font-size:15px}
.fake .verdict{color:#b91c1c}.real .verdict{color:#15803d}.uncertain .verdict{color:#b45309}.error .verdict{color:#4b5563}
.bar{position:relative;height:12px;background:#e5e7eb;border-radius:6px;margin:8px 0;overflow:hidden}
.bar .fill{position:absolute;left:0;top:0;bottom:0;background:#6b7280}
.fake .bar .fill{background:#ef4444}.real .bar .fill{background:#22c55e}.uncertain .bar .fill{background:#f59e0b}
.bar .band{position:absolute;top:0;bottom:0;background:rgba(217,119,6,.25)}
.bar .th{position:absolute;top:0;bottom:0;width:2px;background:#111827}
.note{font-size:12px;color:#4b5563}
.error .note{color:#b91c1c}
"""


@dataclass
class HtmlReport:
    """Cards built as results arrive (so their pixels can be released), written once at the end."""

    calibration: Calibration
    cards: list[str] = field(default_factory=list)
    counts: dict = field(default_factory=lambda: {"fake": 0, "real": 0, "uncertain": 0, "error": 0})

    def add(self, res: InputResult, explained: list[tuple[FaceResult, np.ndarray]]) -> None:
        cls = res.verdict if res.scored else "error"
        self.counts[cls] = self.counts.get(cls, 0) + 1
        imgs = []
        if res.image is not None:
            what = f"frame {res.frame}" if res.kind == "video" else "input"
            imgs.append(f'<figure><img src="{_data_uri(encode_image(_thumbnail(res), "jpg", 85), "image/jpeg")}" '
                        f'alt="{html.escape(res.path)}"><figcaption>{what}</figcaption></figure>')
        top = res.top_face
        cam = next((img for f, img in explained if f is top), None)
        if cam is not None:  # shown at 160 px whatever the model's input size
            interp = cv2.INTER_AREA if cam.shape[0] > 160 else cv2.INTER_CUBIC
            small = cv2.resize(cam, (160, 160), interpolation=interp)
            imgs.append(f'<figure><img class="cam" src="{_data_uri(encode_image(small, "jpg", 90), "image/jpeg")}" '
                        f'alt="Grad-CAM of the most fake face"><figcaption>Grad-CAM of the most fake face</figcaption></figure>')
        if res.scored:
            c = self.calibration
            cth = 100 * c.calibrated_cut
            lo, hi = max(0.0, cth - 100 * c.band), min(100.0, cth + 100 * c.band)
            verdict = (f"{res.verdict.upper()} · P(fake) {res.calibrated_prob:.3f} calibrated "
                       f"({res.prob:.3f} raw; {res.decision} at the threshold)")
            bar = (f'<div class="bar" title="calibrated P(fake) {res.calibrated_prob:.3f}">'
                   f'<div class="fill" style="width:{100 * res.calibrated_prob:.1f}%"></div>'
                   f'<div class="band" style="left:{lo:.1f}%;width:{hi - lo:.1f}%"></div>'
                   f'<div class="th" style="left:{cth:.1f}%"></div></div>')
        else:
            verdict, bar = "ERROR · not scored", ""
        figures = f'<div class="imgs">{"".join(imgs)}</div>' if imgs else ""
        self.cards.append(
            f'<div class="card {cls}">{figures}'
            f'<div class="name">{html.escape(res.path)}</div><div class="verdict">{html.escape(verdict)}</div>{bar}'
            f'<div class="note">{html.escape(_note(res) or ("1 face" if len(res.judged_by) == 1 else ""))}</div></div>')

    def legend(self) -> str:
        """How to read a card (plain text): the bar, the threshold, the band, the boxes, the heatmap."""
        c = self.calibration
        return (f"Bar: calibrated P(fake) (temperature {c.temperature:.3f}); black line: the run's threshold "
                f"({c.threshold:.3f} raw = {c.calibrated_cut:.3f} calibrated); shaded: the uncertain band "
                f"(±{c.band:.3f}). Boxes: the faces the verdict rests on; an image's verdict is its most fake face, "
                "a video's the mean over its sampled frames (shown: the most suspicious frame). Heatmap: Grad-CAM of "
                "the most fake face for the class called (red = most weight).")

    def write(self, path: str | Path, source: str) -> Path:
        n = self.counts
        meta = (f"{len(self.cards)} input(s): {n['fake']} fake, {n['real']} real, {n['uncertain']} uncertain, "
                f"{n['error']} error(s) · {source}")
        legend = self.legend()
        page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Titan detection report</title>'
                f"<style>{CSS}</style></head><body><h1>Titan detection report</h1>"
                f'<p class="meta">{html.escape(meta)}</p><p class="legend">{html.escape(legend)}</p>'
                f'<div class="grid">{"".join(self.cards)}</div></body></html>\n')
        return atomic_write(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))


# --- the command ----------------------------------------------------------------------------------

def interrupted(opts: DetectOptions, done: list[InputResult], total: int) -> str:
    """What a Ctrl-C leaves: the rows scored so far are written to --out (marked partial), and
    detect does not resume — the message says both."""
    head = f"interrupted after {len(done)} of {total} input(s)"
    if opts.out and done:
        write_rows(opts.out, done)
        return (f"{head}; their rows are in {opts.out} (partial: the other {total - len(done)} input(s) are missing). "
                "detect.py does not resume: rerun the same command to score every input")
    return (f"{head}; nothing was written{'' if opts.out else ' (no --out given)'}. detect.py does not resume: "
            "rerun the same command to score every input (with --out, an interrupt keeps the rows scored so far)")


@dataclass
class DetectRun:
    results: list[InputResult]
    table: str
    exit_code: int
    written: list[Path] = field(default_factory=list)


def run_detect(opts: DetectOptions, log: RunLog | None = None) -> DetectRun:
    """Score ``opts.inputs`` with the run in ``opts.weights_dir``; exit code 0 when at least one
    input was scored, 2 when none was (``DetectError`` when no weights load)."""
    log = log or RunLog(None, None)
    check_outputs(opts)  # a wrong name or a folder that refuses writing, before any work
    if opts.frames < 1:
        raise DetectError(f"--frames {opts.frames}: sample at least one frame per video")
    if opts.memory_budget_mb < 64:
        raise DetectError(f"--memory-budget-mb {opts.memory_budget_mb}: give at least 64")
    if opts.heatmaps:  # the one folder detect writes: this run's alone while it does
        with folder_lock(opts.heatmaps, log.info):
            return _run_detect(opts, log)
    return _run_detect(opts, log)


def _run_detect(opts: DetectOptions, log: RunLog) -> DetectRun:
    sources = expand_inputs(opts.inputs, log.info)
    detector = opts.detector(log.info, band=opts.uncertain_band)
    explain = Explainer(detector) if opts.heatmaps or opts.html else None
    heatmaps = HeatmapWriter(opts.heatmaps) if opts.heatmaps else None
    page = HtmlReport(detector.calibration) if opts.html else None
    log.info(f"{len(sources)} input(s): {sum(s.kind == 'image' for s in sources)} image(s), "
             f"{sum(s.kind == 'video' for s in sources)} video(s), {sum(s.kind == ERROR for s in sources)} not found")

    done: list[InputResult] = []

    def report(res: InputResult) -> None:
        done.append(res)
        explained = explain(res, every_face=heatmaps is not None) if explain is not None else []
        if heatmaps is not None:
            heatmaps.write(explained)
        if page is not None:
            page.add(res, explained)

    try:
        results = detector.run(sources, opts.frames, opts.workers, progress=opts.progress, on_result=report,
                               memory_budget_mb=opts.memory_budget_mb)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(interrupted(opts, done, len(sources))) from None
    for note in detector.notes:
        log.info(f"degraded: {note}")
    files = []
    if opts.out:
        files.append(write_rows(opts.out, results))
    if page is not None:
        files.append(page.write(opts.html, f"{detector.folds.describe()} from {opts.weights_dir}"))
    if heatmaps is not None:
        log.info(f"heatmaps: {len(heatmaps.written)} Grad-CAM overlay(s) in {opts.heatmaps}")
    for p in files:
        log.info(f"wrote {p}")
    n_scored = sum(r.scored for r in results)
    if not n_scored:
        log.info(f"no input could be scored ({len(results)} failed; the reasons are in the table)")
    written = (heatmaps.written if heatmaps is not None else []) + files
    return DetectRun(results, format_table(results, detector.calibration), 0 if n_scored else 2, written)
