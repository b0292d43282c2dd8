"""How far to trust a trained detector on a labelled set: metrics with intervals, calibration, and
a robustness sweep over the ways images are damaged on the internet (``evaluate.py``).

Every labelled image is decoded once; each point of the sweep (clean, then each degradation at
each level, ``degrade.sweep_plan``) degrades it, finds and crops the face as detection does, and
scores it with the run's fold ensemble. Scores go to ``scores.csv`` after every chunk of images
(atomically, with the inputs' digests beside it), so an interrupted evaluation resumes where it
stopped and a rerun with other weights, images, labels or settings starts afresh, saying why.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from . import degrade
from ..checkpoints import atomic_json, atomic_write
from ..data.fingerprint import changed_inputs, digest_lines, file_version
from ..infer.calibration import Calibration
from ..infer.detect import DetectorOptions
from ..config import option
from ..data.faces import DEFAULT_MARGIN
from ..data.images import MAX_PIXELS, ImageDecodeError, ImageIndex, decode_image
from ..data.labels import read_labels
from ..runfiles import TEST_IMAGES, log_files
from ..runlock import holds_folder
from ..safe_text import csv_frame, restore_frame
from . import one_class as oc
from ..runlog import RunLog
from ..metrics import (best_f1_threshold, binary_metrics, bootstrap_intervals, expected_calibration_error,
                       headline)

log = logging.getLogger("titan")

SCORE_COLUMNS = ["Id", "target_feature", "degradation", "level", "logit", "n_faces", "fallback", "status", "error"]


class EvaluationError(RuntimeError):
    """The labelled set cannot be evaluated (no images, no labels matching them, no weights)."""


@dataclass
class ScoredImage:
    """One (possibly degraded) photo as the detector saw it: the ensemble's logit for its most
    fake face (nan when it failed), how many faces were found, whether the centre square stood in."""

    logit: float
    n_faces: int = 0
    fallback: bool = False
    error: str | None = None


# (photos, crop margin) → one ScoredImage each, in order: the detector of a trained run.
Scorer = Callable[[Sequence[np.ndarray], float], list[ScoredImage]]


@dataclass
class LabelledSet:
    """The images to evaluate, with their labels; what does not match is kept, to be listed."""

    ids: list[str]
    labels: np.ndarray
    paths: dict[str, Path]
    missing_images: list[str] = field(default_factory=list)    # labelled, no image file
    unlabelled_images: list[str] = field(default_factory=list)  # image file, no label

    @classmethod
    def load(cls, data_dir: str | os.PathLike, labels_csv: str | os.PathLike) -> "LabelledSet":
        if not Path(labels_csv).is_file():
            raise EvaluationError(f"{labels_csv}: labels not found; give --labels CSV with columns Id,target_feature")
        try:
            index = ImageIndex(data_dir, probe_unknown=True)
        except FileNotFoundError as e:
            raise EvaluationError(f"{e}; give --data, the folder of the labelled photos") from None
        rows = read_labels(labels_csv)
        ids = rows.Id.tolist()
        found = [i for i in ids if i in index.paths]
        missing = [i for i in ids if i not in index.paths]
        unlabelled = sorted(set(index.paths) - set(ids))
        if not found:
            raise EvaluationError(f"none of the {len(ids)} Ids in {labels_csv} has an image in {data_dir} "
                                  f"(first Ids: {ids[:3]}; first files: {sorted(index.paths)[:3]})")
        lab = dict(zip(ids, rows.target_feature))
        return cls(found, np.array([int(lab[i]) for i in found]), {i: index.paths[i] for i in found},
                   missing, unlabelled)

    def digest(self) -> str:
        return digest_lines(f"{i},{y},{file_version(self.paths[i])}" for i, y in zip(self.ids, self.labels))


# --- scoring the sweep, resumably -------------------------------------------------------------

class ScoreBook:
    """``scores.csv`` and its inputs' digests: rows done so far, saved atomically as they come."""

    def __init__(self, out_dir: Path, inputs: dict[str, str], say: Callable[[str], None] = log.info) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.csv, self.meta = out_dir / "scores.csv", out_dir / "scores_inputs.json"
        self.inputs = inputs
        self.rows: list[dict] = []
        if self.csv.is_file() and self.meta.is_file():
            changed = changed_inputs(json.loads(self.meta.read_text()), inputs)
            if changed:
                say(f"NOTICE: {self.csv} was scored with other {', '.join(changed)}; scoring afresh")
            else:
                self.rows = pd.read_csv(self.csv, dtype={"Id": str, "error": str}, keep_default_na=False,
                                        na_values={"logit": ["", "nan", "NaN"]})
                self.rows = restore_frame(self.rows, ["Id", "error"]).to_dict("records")
                say(f"resuming: {len(self.rows)} scored rows in {self.csv} are reused")

    def done(self) -> set[tuple[str, str, float]]:
        return {(str(r["Id"]), str(r["degradation"]), float(r["level"])) for r in self.rows}

    def add(self, rows: list[dict]) -> None:
        self.rows += rows
        self.save()

    def save(self) -> None:
        atomic_json(self.inputs, self.meta)
        frame = pd.DataFrame(self.rows, columns=SCORE_COLUMNS)
        frame = csv_frame(frame, ["Id", "error"])  # user-controlled text: no cell runs as a formula
        atomic_write(self.csv, lambda tmp: frame.to_csv(tmp, index=False))

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=SCORE_COLUMNS)


def score_sweep(data: LabelledSet, plan: Sequence[tuple[str, float]], scorer: Scorer, book: ScoreBook,
                margin: float = DEFAULT_MARGIN, chunk: int = 16, max_pixels: int | None = None,
                progress: bool = True) -> pd.DataFrame:
    """Score every (image, plan point) not yet in ``book``; a chunk of images at a time."""
    done = book.done()
    todo = [(i, n, lv) for i in data.ids for n, lv in plan if (i, n, float(lv)) not in done]
    label = dict(zip(data.ids, data.labels))
    with tqdm(total=len(data.ids) * len(plan), initial=len(data.ids) * len(plan) - len(todo),
              desc="evaluate (images × degradations)", unit="img", disable=not progress) as bar:
        for start in range(0, len(todo), chunk * len(plan)):
            part = todo[start:start + chunk * len(plan)]
            rows = _score_part(part, data, scorer, margin, label, max_pixels)
            book.add(rows)
            bar.update(len(part))
    return book.frame()


def _score_part(part, data: LabelledSet, scorer: Scorer, margin: float, label: dict, max_pixels) -> list[dict]:
    photos: dict[str, np.ndarray | str] = {}
    for i in dict.fromkeys(i for i, _, _ in part):
        try:
            photos[i] = decode_image(data.paths[i], max_pixels)
        except ImageDecodeError as e:
            photos[i] = e.reason
    rows: dict[tuple, dict] = {}
    groups: dict[float, list[tuple]] = {}
    for key in part:
        i, name, level = key
        row = {"Id": i, "target_feature": int(label[i]), "degradation": name, "level": float(level),
               "logit": float("nan"), "n_faces": 0, "fallback": False, "status": "ok", "error": ""}
        rows[key] = row
        if isinstance(photos[i], str):
            row.update(status="error", error=f"{data.paths[i]}: {photos[i]}")
        else:
            groups.setdefault(degrade.crop_margin(name, level, margin), []).append(key)
    for m, keys in groups.items():
        imgs = [degrade.degraded(photos[i], n, lv) for i, n, lv in keys]
        for key, s in zip(keys, scorer(imgs, m)):
            rows[key].update(logit=float(s.logit), n_faces=int(s.n_faces), fallback=bool(s.fallback))
            if s.error or not math.isfinite(s.logit):
                rows[key].update(status="error", error=s.error or "no finite score")
    return [rows[k] for k in part]


# --- what the scores say ----------------------------------------------------------------------

def clean_metrics(scores: pd.DataFrame, cal: Calibration, n_boot: int = 1000, seed: int = 0) -> dict:
    """Metrics of the clean images at the run's threshold and at the best one, with bootstrap 95 %
    intervals, and calibration (ECE) before and after the run's temperature."""
    ok = scores[(scores.degradation == "clean") & (scores.status == "ok")]
    y, logit = ok.target_feature.to_numpy(int), ok.logit.to_numpy(float)
    p, p_cal = cal.probabilities(logit)
    best_th, _ = best_f1_threshold(y, p)
    out: dict = {"n_scored": int(len(ok)), "n_fakes": int(y.sum()),
                 "n_errors": int(((scores.degradation == "clean") & (scores.status != "ok")).sum())}
    for name, th in (("run_threshold", cal.threshold), ("best_threshold", best_th)):
        point = headline(y, p, th)
        ci = bootstrap_intervals(y, p, th, n_boot=n_boot, seed=seed)
        out[name] = {"threshold": float(th), **{k: {"value": v, "ci95": list(ci[k])} for k, v in point.items()}}
    out["calibration"] = {"temperature": cal.temperature, "ece_raw": expected_calibration_error(y, p),
                          "ece_calibrated": expected_calibration_error(y, p_cal)}
    return out


def robustness_table(scores: pd.DataFrame, cal: Calibration) -> pd.DataFrame:
    """degradation × level → images scored, ROC-AUC, F1 at the run's threshold, and the share of
    images whose verdict flipped against the clean image (over images scored both ways)."""
    clean = scores[(scores.degradation == "clean") & (scores.status == "ok")].set_index("Id")
    clean_verdict = pd.Series(cal.decisions(cal.probabilities(clean.logit.to_numpy(float))[0]), index=clean.index)
    rows = []
    for (name, level), g in scores.groupby(["degradation", "level"], sort=False):
        ok = g[g.status == "ok"]
        y, p = ok.target_feature.to_numpy(int), cal.probabilities(ok.logit.to_numpy(float))[0]
        m = binary_metrics(y, p, cal.threshold) if len(ok) else {"f1": float("nan"), "roc_auc": float("nan")}
        both = ok[ok.Id.isin(clean_verdict.index)]
        flips = cal.decisions(cal.probabilities(both.logit.to_numpy(float))[0]) != clean_verdict.loc[both.Id].to_numpy()
        rows.append({"degradation": name, "level": level, "n_scored": int(len(ok)), "n_errors": int(len(g) - len(ok)),
                     "roc_auc": m["roc_auc"], "f1": m["f1"],
                     "flipped": float(flips.mean()) if len(both) else float("nan")})
    return pd.DataFrame(rows)


def _cell(key: str, v) -> str:
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return "–"
        return format(v, ".3f") if key in ("roc_auc", "f1", "flipped") else format(v, "g")
    return str(v)


def markdown_table(frame: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table: scores to 3 decimals, levels as written, nan as –."""
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(k, v) for k, v in r.items()) + " |" for _, r in frame.iterrows()]
    return "\n".join(lines)


# --- the files a user reads -------------------------------------------------------------------

def _fmt_ci(m: dict | None) -> str:
    if m is None:
        return oc.UNDEFINED
    v, (lo, hi) = m["value"], m["ci95"]
    return "–" if not math.isfinite(v) else f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def metrics_markdown(metrics: dict) -> str:
    keys = ("f1", "precision", "recall", "roc_auc", "ap", "tpr_at_1fpr", "tpr_at_5fpr", "missed_fakes")
    names = ("F1", "precision", "recall", "ROC-AUC", "AP", "TPR @ 1 % FPR", "TPR @ 5 % FPR", "missed fakes")
    lines = ["| at threshold | " + " | ".join(names) + " |", "|---|" + "---|" * len(keys)]
    if metrics.get("one_class"):
        keys += ("false_positive_rate", "specificity")
        names += ("false-positive rate", "specificity")
        lines = ["| at threshold | " + " | ".join(names) + " |", "|---|" + "---|" * len(keys)]
    for which in ("run_threshold", "best_threshold"):
        m = metrics[which]
        if m is None:
            continue
        cells = [_fmt_ci(m.get(k)) if k != "missed_fakes" or m.get(k) is None else
                 f"{int(m[k]['value'])}/{metrics['n_fakes']} [{m[k]['ci95'][0]:.0f}, {m[k]['ci95'][1]:.0f}]"
                 for k in keys]
        lines.append(f"| {which.replace('_', ' ')} {m['threshold']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(out_dir: Path, data: LabelledSet, scores: pd.DataFrame, cal: Calibration,
                  n_boot: int = 1000, source: str = "", one_class: int | None = None) -> tuple[dict[str, Path], dict]:
    """metrics.json, robustness.{csv,md}, errors.csv, the plots and evaluation.md tying them
    together → (the files, the metrics written to metrics.json). ``one_class`` (0 or 1): the
    labels hold that class only; what it leaves undefined is null, with the reason."""
    from .plots import plot_reliability, plot_robustness

    metrics = clean_metrics(scores, cal, n_boot=n_boot)
    if one_class is not None:
        ok = scores[(scores.degradation == "clean") & (scores.status == "ok")]
        p = cal.probabilities(ok.logit.to_numpy(float))[0]
        keys = ("f1", "precision", "recall", "roc_auc", "ap", "tpr_at_1fpr", "tpr_at_5fpr", "missed_fakes")
        metrics["run_threshold"] = oc.one_class_block(one_class, p, cal.threshold, n_boot, keys=keys)
        metrics["best_threshold"] = None  # no F1 to maximise
        metrics.update(one_class=oc.CLASS_NAMES[one_class], undefined=oc.why_undefined(one_class))
    table = robustness_table(scores, cal)
    errors = scores[scores.status != "ok"][["Id", "degradation", "level", "error"]]
    metrics.update(missing_images=data.missing_images, unlabelled_images=data.unlabelled_images,
                   robustness=table.to_dict("records"), source=source)
    files = {"metrics": atomic_json(metrics, out_dir / "metrics.json"),
             "robustness_csv": atomic_write(out_dir / "robustness.csv", lambda t: table.to_csv(t, index=False)),
             "errors": atomic_write(out_dir / "errors.csv", lambda t: csv_frame(errors, ["Id", "error"]).to_csv(t, index=False))}
    files["robustness_md"] = atomic_write(out_dir / "robustness.md",
                                          lambda t: Path(t).write_text(markdown_table(table) + "\n"))
    clean = scores[(scores.degradation == "clean") & (scores.status == "ok")]
    y, logit = clean.target_feature.to_numpy(int), clean.logit.to_numpy(float)
    p_raw, p_cal = cal.probabilities(logit)
    files["reliability"] = plot_reliability(
        y, {"raw": p_raw, f"temperature {cal.temperature:.2f}": p_cal},
        out_dir / "reliability.png")
    clean_row = table[table.degradation == "clean"].iloc[0].to_dict()
    plots = []
    for name, g in table[table.degradation != "clean"].groupby("degradation", sort=False):
        d = degrade.DEGRADATIONS[name]
        margin = name == "margin"  # its levels lie on both sides of the usual margin
        files[f"plot_{name}"] = plot_robustness(g, name, d.unit, clean_row, out_dir / f"robustness_{name}.png",
                                                f"clean ({d.clean:g})" if margin else "clean",
                                                "" if margin else "mild → harsh")
        plots.append(files[f"plot_{name}"].name)
    files["report"] = atomic_write(out_dir / "evaluation.md", lambda t: Path(t).write_text(
        evaluation_markdown(metrics, table, data, plots, len(errors))))
    return files, metrics


def evaluation_markdown(metrics: dict, table: pd.DataFrame, data: LabelledSet, plots: Sequence[str],
                        n_error_rows: int) -> str:
    c = metrics["calibration"]
    parts = [
        "# Evaluation", "",
        f"{metrics['source']}", "",
        f"{metrics['n_scored']} clean images scored ({metrics['n_fakes']} fakes); {metrics['n_errors']} could not be "
        f"scored (errors.csv). Intervals: bootstrap 95 %, fakes and reals resampled separately. "
        "The best threshold is chosen on this very set, so its row is optimistic.", "",
        metrics_markdown(metrics), "",
        *([f"One class only: {metrics['undefined']}; they read {oc.UNDEFINED}.", ""] if metrics.get("one_class") else []),
        "## Calibration", "",
        f"Expected calibration error (ECE, 10 bins): **{c['ece_raw']:.3f}** raw, **{c['ece_calibrated']:.3f}** after the "
        f"run's temperature {c['temperature']:.2f} (0 = the probabilities are honest).", "",
        "![reliability](reliability.png)", "",
        "## Robustness", "",
        "Each image degraded, then its face found, cropped and scored as usual. F1 at the run's threshold; "
        "*flipped* = share of images whose verdict differs from the clean image's.", "",
        markdown_table(table), "",
        *[f"![{p}]({p})" for p in plots], "",
    ]
    if data.missing_images or data.unlabelled_images or n_error_rows:
        parts += ["## What did not match", "",
                  f"- labelled Ids with no image ({len(data.missing_images)}): {', '.join(data.missing_images[:20])}"
                  + (" …" if len(data.missing_images) > 20 else ""),
                  f"- images with no label, not scored ({len(data.unlabelled_images)}): "
                  f"{', '.join(data.unlabelled_images[:20])}" + (" …" if len(data.unlabelled_images) > 20 else ""),
                  f"- rows that failed to score: {n_error_rows} (errors.csv)", ""]
    return "\n".join(parts)


# --- the command ------------------------------------------------------------------------------

@dataclass
class EvalOptions(DetectorOptions):
    """evaluate.py's flags (the detector's, then its own)."""

    data: str = option(TEST_IMAGES, "folder of the labelled photos (raw or already cropped)")
    labels: str = option("test_labels.csv", "their labels: Id,target_feature (1 = fake)")
    out: str = option("evaluation", "folder for metrics.json, the tables, plots, scores.csv and evaluation.md")
    degradations: list[str] = option(help="degradations to sweep (comma-separated): " + ",".join(degrade.DEGRADATIONS),
                                     default_factory=lambda: list(degrade.DEGRADATIONS))
    one_class: bool = option(False, "the labels hold one class on purpose (e.g. only reals): report what one class "
                                    "defines (false-positive rate / detection rate) instead of refusing")
    reduced: bool = option(False, "one level per degradation (JPEG 50, ×0.5, blur 1, noise 5, margin 0.4, social) "
                                  "instead of the full sweep")
    bootstrap: int = option(1000, "bootstrap resamples for the 95%% intervals")
    chunk: int = option(16, "images per scoring step (scores are saved after each: the resume point)")
    max_pixels: int = option(MAX_PIXELS, "refuse images with more pixels than this")


def detector_scorer(detector) -> Scorer:
    """The run's detector as the sweep's scorer: each photo's most fake face (detect.py's verdict)."""
    def score(images: Sequence[np.ndarray], margin: float) -> list[ScoredImage]:
        results = detector.score_images([(f"#{i}", im) for i, im in enumerate(images)], margin=margin)
        out = []
        for r in results:
            r.release()
            if not r.scored:
                out.append(ScoredImage(float("nan"), error=r.error))
            else:
                out.append(ScoredImage(r.logit, sum(f.status == "face" for f in r.faces), r.status != "ok"))
        return out
    return score


@holds_folder(lambda opts, log_to=None: opts.out)
def evaluate(opts: EvalOptions, log_to: RunLog | None = None) -> dict[str, Path]:
    """Score the labelled set clean and degraded with the run in ``opts.weights_dir``; write the report."""
    out = Path(opts.out)
    run_log = log_to or RunLog(*log_files(out, "evaluate"))
    say = run_log.info
    data = LabelledSet.load(opts.data, opts.labels)
    say(f"{len(data.ids)} labelled images in {opts.data} ({int(data.labels.sum())} fakes); "
        f"{len(data.missing_images)} labelled Id(s) without an image, {len(data.unlabelled_images)} image(s) without a label")
    plan = degrade.sweep_plan(opts.degradations, opts.reduced)
    det = opts.detector(say)
    only = oc.check_classes(data.labels, opts.labels, opts.one_class)  # before any scoring
    cal = det.calibration
    inputs = {"weights": det.folds.digest(), "data": data.digest(), "settings": digest_lines(
        [f"tta={','.join(det.views)}", f"margin={det.margin}", f"size={det.img_size}", f"min_prob={det.prep.min_prob}",
         f"max_side={det.prep.max_side}"])}
    say(f"sweep: {len(plan)} points × {len(data.ids)} images ({', '.join(dict.fromkeys(n for n, _ in plan))})")
    with logging_redirect_tqdm():
        scores = score_sweep(data, plan, detector_scorer(det), ScoreBook(out, inputs, say), det.margin, opts.chunk,
                             opts.max_pixels, opts.progress)
    for note in det.notes:
        say(f"degraded: {note}")
    files, m = write_outputs(out, data, scores, cal, opts.bootstrap,
                          source=f"Run `{opts.weights_dir}` ({det.folds.describe()}, threshold {cal.threshold:.3f}, "
                                 f"temperature {cal.temperature:.2f}) on `{opts.data}` with labels `{opts.labels}`.",
                          one_class=only)
    r = m["run_threshold"]
    if only is not None:
        shown = {k: v["value"] for k, v in r.items() if isinstance(v, dict)}
        say(f"clean, {m['one_class']} only: " + " | ".join(f"{k} {v:.3f}" for k, v in shown.items())
            + f" at threshold {r['threshold']:.3f}; {m['undefined']}")
        say(f"evaluation: {files['report']}")
        return files
    say(f"clean: F1 {r['f1']['value']:.3f} | ROC-AUC {r['roc_auc']['value']:.3f} | missed fakes "
        f"{int(r['missed_fakes']['value'])}/{m['n_fakes']} | ECE {m['calibration']['ece_raw']:.3f} → "
        f"{m['calibration']['ece_calibrated']:.3f} after temperature")
    say(f"evaluation: {files['report']}")
    return files
