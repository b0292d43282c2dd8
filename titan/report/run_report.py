"""The run report: every figure plus ``report.md`` (metrics per fold and out-of-fold, the figures,
the config) — one page a person can read to judge a run, or compare several.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Sequence

from .logparse import RunRecord, load_runs
from ..metrics import binary_metrics
from ..checkpoints import atomic_write
from ..config import ScriptOptions, option
from ..runfiles import DEFAULT_PREFIX, TEST_FACES
from .plots import plot_all

log = logging.getLogger("titan")

FIGURE_TITLES = {
    "ssl_loss.png": "SimMIM pretraining loss",
    "ft_loss.png": "Fine-tuning loss per fold",
    "val_f1_auc.png": "Validation F1 and ROC-AUC per fold (★ = best epoch, the saved weights)",
    "learning_rate.png": "Learning rate",
    "roc_pr.png": "ROC and precision–recall, out-of-fold (● = operating point at the threshold)",
    "f1_threshold.png": "F1 against threshold, out-of-fold",
    "confusion_matrix.png": "Confusion matrix, out-of-fold (red = missed fakes)",
    "test_probabilities.png": "Test-set probabilities",
    "gradcam.png": "Grad-CAM: where the fold ensemble looks",
}


def _fmt(v: Any, spec: str = ".4f") -> str:
    if v is None or isinstance(v, bool):
        return "–" if v is None else str(v)
    if isinstance(v, float):
        return "–" if not math.isfinite(v) else format(v, spec)
    return str(v)


def oof_metrics(run: RunRecord) -> dict[str, Any] | None:
    """OOF metrics: metrics json, else the log's oof record, else computed from oof csv at the run's threshold."""
    src = (run.metrics or {}).get("oof")
    if isinstance(src, dict) and src:
        return src
    if run.oof_record:
        return run.oof_record
    if run.oof is not None and len(run.oof):
        return binary_metrics(run.oof["target_feature"].to_numpy(), run.oof["prob"].to_numpy(), run.threshold())
    return None


def metrics_table(run: RunRecord) -> list[str]:
    rows = run.fold_rows()
    lines = ["| fold | best epoch | F1 | threshold | ROC-AUC | AP |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.get('fold', '–')} | {_fmt(r.get('best_epoch'))} | {_fmt(r.get('f1'))} | "
                     f"{_fmt(r.get('th', r.get('threshold')), '.3f')} | {_fmt(r.get('auc', r.get('roc_auc')))} | {_fmt(r.get('ap'))} |")
    oof = oof_metrics(run)
    if oof:
        lines.append(f"| **OOF** | | **{_fmt(oof.get('f1'))}** | {_fmt(oof.get('threshold'), '.3f')} | "
                     f"{_fmt(oof.get('roc_auc'))} | {_fmt(oof.get('ap'))} |")
        if all(k in oof for k in ("tn", "fp", "fn", "tp")):
            lines += ["", f"Out-of-fold: precision {_fmt(oof.get('precision'))}, recall {_fmt(oof.get('recall'))}, "
                          f"**missed fakes {oof.get('missed_fakes', oof['fn'])} of {oof.get('n_fakes', oof['fn'] + oof['tp'])}**, "
                          f"TN {oof['tn']} · FP {oof['fp']} · FN {oof['fn']} · TP {oof['tp']} (n = {oof.get('n', '–')})."]
    if len(lines) == 2:
        lines = ["No per-fold or out-of-fold metrics in this run."]
    return lines


def config_table(runs: Sequence[RunRecord]) -> list[str]:
    """One column per run; with several runs the fields that differ are in bold."""
    configs = [(r.name, r.config) for r in runs if r.config]
    if not configs:
        return ["No config found (config_v42.json or a config record in the JSON-lines log)."]
    keys = list(dict.fromkeys(k for _, c in configs for k in c))
    lines = ["| field | " + " | ".join(n for n, _ in configs) + " |", "|---" * (len(configs) + 1) + "|"]
    for k in keys:
        values = [_fmt(c.get(k), "g") for _, c in configs]
        differ = len(configs) > 1 and len(set(values)) > 1
        cell = (lambda s: f"**{s}**") if differ else (lambda s: s)
        lines.append(f"| {cell(k)} | " + " | ".join(cell(v) for v in values) + " |")
    return lines


def render(runs: Sequence[RunRecord], figures: Sequence[str]) -> str:
    out = ["# Training report", "", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')}.", ""]
    out += ["| run | log | lines used | malformed lines skipped |", "|---|---|---|---|"]
    for r in runs:
        logs = ", ".join(f"`{p}`" for p in r.log_paths) or "(none)"
        out.append(f"| {r.name} | {logs} | {r.n_used} | {r.n_bad} |")
    out += ["", "## Metrics", ""]
    for r in runs:
        out += ([f"### {r.name}", ""] if len(runs) > 1 else []) + metrics_table(r) + [""]
    out += ["## Figures", ""]
    for name in figures:
        out += [f"### {FIGURE_TITLES.get(name, name)}", "", f"![{FIGURE_TITLES.get(name, name)}]({name})", ""]
    out += ["## Config", ""] + config_table(runs) + [""]
    return "\n".join(out)


def write_report(runs: Sequence[RunRecord], figures: Sequence[str], out_dir: str | os.PathLike) -> Path:
    text = render(runs, figures)
    return atomic_write(Path(out_dir) / "report.md", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


@dataclass
class ReportOptions(ScriptOptions):
    """plot_training_curves.py's arguments."""

    runs: list[str] = option(help="log files or run folders to plot (overlaid)", positional=True, default_factory=lambda: ["."])
    out: str = option("plots", "folder for the PNGs and report.md")
    prefix: str = option(DEFAULT_PREFIX, "file prefix: training_{prefix}_log.*, oof_{prefix}.csv, {prefix}_*_fold{k}.pth")
    explain: int = option(0, "Grad-CAM gallery of N test faces (0 = off)")
    weights_dir: str = option(".", "fold weights and predictions_{prefix}.csv for --explain")
    test_dir: str = option(TEST_FACES, "test face crops for --explain")
    img_size: int = option(0, "--explain input size (0: the folds' own, from their metadata)")
    force_preprocessing: bool = option(False, "--explain at --img-size even when the folds were trained at another size",
                                       aliases=("--force-img-size",))
    device: str = option("cpu", "--explain device (cpu, cuda, auto)")


def make_report(opts: ReportOptions) -> dict[str, Path]:
    """Load the runs, draw every figure they have data for (and the Grad-CAM gallery), write report.md.

    Returns {file name: path} of what was written. Raises ``LogError`` for a log with no usable line.
    """
    out_dir, prefix = opts.out, opts.prefix
    runs = load_runs(list(opts.runs) or ["."], prefix)
    for r in runs:
        if r.n_bad:
            log.warning("%s: skipped %d malformed line(s)", r.name, r.n_bad)
    figures = plot_all(runs, out_dir)
    if opts.explain:
        from .gradcam import explain_gallery

        figures["gradcam.png"] = explain_gallery(Path(out_dir) / "gradcam.png", opts.explain, opts.weights_dir, prefix,
                                                 opts.test_dir, opts.img_size, opts.device, opts.force_preprocessing)
        log.info("wrote %s", figures["gradcam.png"])
    figures["report.md"] = write_report(runs, [n for n in figures], out_dir)
    log.info("wrote %s", figures["report.md"])
    return figures
