"""PNG figures of one or several runs (matplotlib, Agg backend: no display needed).

Each ``plot_*`` takes the runs and an output path, draws what the runs hold and returns the path,
or ``None`` when no run has the data (e.g. the original log has no AUC or learning rate).
Several runs are overlaid: colour = fold, line style = run (for per-fold curves) or colour = run.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from ..checkpoints import atomic_write  # noqa: E402
from .logparse import RunRecord  # noqa: E402
from ..infer.calibration import decide  # noqa: E402
from ..metrics import average_precision, confusion, ranked_counts, roc_auc  # noqa: E402

log = logging.getLogger("titan")

STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")
DPI = 120


def fold_color(k: int) -> str:
    return f"C{k % 10}"


def run_style(i: int) -> dict:
    return {"linestyle": STYLES[i % len(STYLES)], "marker": MARKERS[i % len(MARKERS)], "markersize": 4}


def save(fig: plt.Figure, path: str | os.PathLike, tight_layout: bool = True) -> Path:
    """Write a figure atomically (temp file + rename) and free it."""
    try:
        if tight_layout:
            fig.tight_layout()
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight"))
    finally:
        plt.close(fig)


def _finite(values: Sequence[float]) -> bool:
    return bool(np.isfinite(np.asarray(values, dtype=float)).any())


def _fold_panel(ax: plt.Axes, runs: Sequence[RunRecord], key: str, mark_best: bool = False) -> None:
    """Per-fold curves of one FoldSeries attribute; colour = fold, line style = run.

    Legends list only the folds and runs drawn here (the original log has no loss, AUC or LR).
    """
    drawn: set[tuple[int, int]] = set()
    for i, run in enumerate(runs):
        for k, s in sorted(run.folds.items()):
            y = np.asarray(getattr(s, key), dtype=float)
            if not np.isfinite(y).any():
                continue
            drawn.add((i, k))
            ax.plot(s.epoch, y, color=fold_color(k), **run_style(i))
            best = s.best()
            if mark_best and best is not None and np.isfinite(s.at(best, key)):
                ax.plot([best], [s.at(best, key)], marker="*", markersize=15, color=fold_color(k),
                        markeredgecolor="black", linestyle="none", zorder=5)
    ax.set_xlabel("fine-tuning epoch")
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.margins(y=0.1)  # room for the best-epoch stars at the top
    handles = [Line2D([], [], color=fold_color(k), lw=2, label=f"fold {k}") for k in sorted({k for _, k in drawn})]
    if mark_best:
        handles.append(Line2D([], [], marker="*", markersize=12, color="white", markeredgecolor="black",
                              linestyle="none", label="best epoch"))
    first = ax.legend(handles=handles, loc="best", fontsize=8, framealpha=0.85)
    shown = sorted({i for i, _ in drawn})
    if len(runs) > 1:  # line styles → runs, above the panel
        ax.add_artist(first)
        ax.legend(handles=[Line2D([], [], color="0.2", **run_style(i), label=runs[i].name) for i in shown],
                  loc="lower center", bbox_to_anchor=(0.5, 1.02), ncol=min(len(shown), 3), fontsize=8, frameon=False)


def _title(runs: Sequence[RunRecord], what: str) -> str:
    return f"{what} — {runs[0].name}" if len(runs) == 1 else what


def _has_fold_series(runs: Sequence[RunRecord], key: str) -> bool:
    return any(_finite(getattr(s, key)) for r in runs for s in r.folds.values())


def _fold_panels(runs: Sequence[RunRecord], path, panels: Sequence[tuple[str, str]], title: str,
                 mark_best: bool = False) -> Path | None:
    """One panel per (FoldSeries attribute, y label) that some run has."""
    panels = [(key, label) for key, label in panels if _has_fold_series(runs, key)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        _fold_panel(ax, runs, key, mark_best)
        ax.set_ylabel(label)
    fig.suptitle(_title(runs, title), y=1.0 if len(runs) == 1 else 1.06)
    return save(fig, path)


# --- curves from the logs ----------------------------------------------------------------------

def plot_ssl_loss(runs: Sequence[RunRecord], path: str | os.PathLike) -> Path | None:
    runs_ = [r for r in runs if _finite(r.ssl_loss)]
    if not runs_:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, run in enumerate(runs):
        if _finite(run.ssl_loss):
            ax.plot(run.ssl_epoch, run.ssl_loss, color=f"C{i % 10}", label=run.name, **run_style(i))
    ax.set_xlabel("SSL epoch")
    ax.set_ylabel("SimMIM reconstruction loss")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(_title(runs, "Self-supervised pretraining loss"))
    return save(fig, path)


def plot_ft_loss(runs: Sequence[RunRecord], path: str | os.PathLike) -> Path | None:
    return _fold_panels(runs, path, [("train_loss", "training loss"), ("val_loss", "validation loss")],
                        "Fine-tuning loss per fold")


def plot_val_metrics(runs: Sequence[RunRecord], path: str | os.PathLike) -> Path | None:
    return _fold_panels(runs, path, [("f1", "validation F1 (best threshold)"), ("auc", "validation ROC-AUC")],
                        "Validation F1 and ROC-AUC per fold", mark_best=True)


def plot_lr(runs: Sequence[RunRecord], path: str | os.PathLike) -> Path | None:
    has_ssl = [r for r in runs if _finite(r.ssl_lr)]
    has_ft = _has_fold_series(runs, "lr")
    if not has_ssl and not has_ft:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12.4, 4.4))
    ax = axes[0]
    for i, run in enumerate(runs):
        if _finite(run.ssl_lr):
            ax.plot(run.ssl_epoch, run.ssl_lr, color=f"C{i % 10}", label=run.name, **run_style(i))
    ax.set_title("SimMIM pretraining", pad=24 if len(runs) > 1 else 6)
    if has_ssl:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no SSL learning rate logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("SSL epoch")
    ax = axes[1]
    ax.set_title("fine-tuning", pad=24 if len(runs) > 1 else 6)  # leave room for the run legend
    if has_ft:
        _fold_panel(ax, runs, "lr")
    else:
        ax.text(0.5, 0.5, "no fine-tuning learning rate logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("fine-tuning epoch")
    for ax in axes:
        ax.set_ylabel("learning rate")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    fig.suptitle(_title(runs, "Learning rate (end of epoch)"), y=1.0 if len(runs) == 1 else 1.06)
    return save(fig, path)


# --- out-of-fold predictions ---------------------------------------------------------------------

def roc_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate) at every distinct threshold, from (0,0) to (1,1)."""
    _, tp, fp = ranked_counts(y, p)
    return np.r_[0.0, fp / max(fp[-1], 1)], np.r_[0.0, tp / max(tp[-1], 1)]


def f1_curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(threshold, F1, precision, recall) of the rule ``p >= threshold`` at every distinct p, ascending."""
    cuts, tp, fp = ranked_counts(y, p)
    fn = y.sum() - tp
    f1 = np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / max(y.sum(), 1)
    return cuts[::-1], f1[::-1], precision[::-1], recall[::-1]


def _oof_runs(runs: Sequence[RunRecord]) -> list[tuple[int, RunRecord, np.ndarray, np.ndarray]]:
    out = []
    for i, r in enumerate(runs):
        if r.oof is not None and len(r.oof):
            out.append((i, r, r.oof["target_feature"].to_numpy().astype(int), r.oof["prob"].to_numpy(dtype=float)))
    return out


def plot_roc_pr(runs: Sequence[RunRecord], path: str | os.PathLike) -> Path | None:
    data = _oof_runs(runs)
    if not data:
        return None
    fig, (a_roc, a_pr) = plt.subplots(1, 2, figsize=(12.4, 5.2))
    for i, run, y, p in data:
        th, _ = run.decision_threshold()
        pred = decide(p, th)
        c = confusion(y, pred)
        fpr, tpr = roc_points(y, p)
        color = f"C{i % 10}"
        a_roc.plot(fpr, tpr, color=color, lw=2, label=f"{run.name}: AUC {roc_auc(y, p):.4f}")
        a_roc.plot([c["fp"] / max(c["fp"] + c["tn"], 1)], [c["tp"] / max(c["tp"] + c["fn"], 1)], "o",
                   color=color, markeredgecolor="black", markersize=8)
        _, _, prec, rec = f1_curve(y, p)
        prec, rec = prec[::-1], rec[::-1]  # descending threshold: recall grows
        # AP = Σ (R_n − R_{n−1}) P_n: each precision holds over the recall step that ends at it.
        a_pr.step(np.r_[0.0, rec], np.r_[prec[0], prec], where="pre", color=color, lw=2,
                  label=f"{run.name}: AP {average_precision(y, p):.4f}")
        a_pr.plot([c["tp"] / max(c["tp"] + c["fn"], 1)], [c["tp"] / max(c["tp"] + c["fp"], 1)], "o",
                  color=color, markeredgecolor="black", markersize=8)
        a_pr.axhline(y.mean(), color=color, lw=1, ls=":", alpha=0.7)
    a_roc.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="chance")
    a_roc.set(xlabel="false-positive rate (reals flagged fake)", ylabel="true-positive rate (fakes caught)",
              title="ROC, out-of-fold", xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    a_pr.set(xlabel="recall (fakes caught)", ylabel="precision", title="Precision–recall, out-of-fold",
             xlim=(-0.01, 1.01), ylim=(-0.01, 1.03))
    dot = Line2D([], [], marker="o", color="0.5", markeredgecolor="black", linestyle="none", label="at threshold")
    for ax in (a_roc, a_pr):
        ax.grid(alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        ax.legend(handles=handles + [dot], loc="lower right" if ax is a_roc else "lower left", fontsize=8)
    a_pr.text(0.99, 0.02, "dotted: fake prevalence", transform=a_pr.transAxes, ha="right", va="bottom",
              fontsize=7, color="0.4")
    return save(fig, path)


def plot_f1_threshold(runs: Sequence[RunRecord], path: str | os.PathLike) -> Path | None:
    data = _oof_runs(runs)
    if not data:
        return None
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    for i, run, y, p in data:
        color = f"C{i % 10}"
        ths, f1, _, _ = f1_curve(y, p)
        # F1 is constant between distinct scores: a step that holds each value up to the next score.
        ax.step(np.r_[0.0, ths, 1.0], np.r_[f1[0], f1, 0.0], where="pre", color=color, lw=2, label=run.name)
        th, kind = run.decision_threshold()
        at = int(np.searchsorted(ths, th, side="left"))  # past the last candidate: nothing flagged, F1 0
        f1_at = f1[at] if at < len(ths) else 0.0
        ax.axvline(th, color=color, ls="--", lw=1.2)
        ax.plot([th], [f1_at], "o", color=color, markeredgecolor="black", markersize=8,
                label=f"threshold {th:.3f} ({kind}) → F1 {f1_at:.4f}")
    ax.set(xlabel="threshold on P(fake)", ylabel="out-of-fold F1 (fake class)", xlim=(0, 1), ylim=(0, 1.02),
           title=_title(runs, "F1 against threshold"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower center")
    return save(fig, path)


def plot_confusion(runs: Sequence[RunRecord], path: str | os.PathLike) -> Path | None:
    data = _oof_runs(runs)
    if not data:
        return None
    fig, axes = plt.subplots(1, len(data), figsize=(4.8 * len(data), 4.6), squeeze=False)
    for ax, (_, run, y, p) in zip(axes[0], data):
        th, kind = run.decision_threshold()
        c = confusion(y, decide(p, th))
        m = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
        rows = m.sum(1, keepdims=True)
        ax.imshow(m / np.maximum(rows, 1), cmap="Blues", vmin=0, vmax=1)
        for r in range(2):
            for col in range(2):
                frac = m[r, col] / max(rows[r, 0], 1)
                ax.text(col, r, f"{m[r, col]}\n{frac:.1%} of row", ha="center", va="center", fontsize=11,
                        color="white" if frac > 0.6 else "black")
        # The costly error for a deepfake detector: a fake passed as real.
        ax.add_patch(Rectangle((-0.5, 0.5), 1, 1, fill=False, edgecolor="red", lw=4))
        ax.text(0, 1.38, f"missed fakes: {c['fn']} / {c['fn'] + c['tp']}", ha="center", va="center",
                color="red", fontsize=9, fontweight="bold")
        ax.set_xticks([0, 1], ["real", "fake"])
        ax.set_yticks([0, 1], ["real", "fake"])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{run.name}\nout-of-fold, threshold {th:.3f}\n({kind})", fontsize=9)
    return save(fig, path)


# --- test predictions -----------------------------------------------------------------------------

def plot_test_histogram(runs: Sequence[RunRecord], path: str | os.PathLike) -> Path | None:
    data = [(i, r) for i, r in enumerate(runs) if r.predictions is not None and len(r.predictions)]
    if not data:
        return None
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    bins = np.linspace(0, 1, 41)
    for i, run in data:
        p = run.predictions["prob"].to_numpy(dtype=float)
        color = f"C{i % 10}"
        th = run.threshold()
        n_fake = int(decide(p, th).sum())
        one = len(data) == 1  # one run: filled bars; several: outlines that stay visible when overlaid
        ax.hist(p, bins=bins, color=color, alpha=0.4 if one else 1.0, edgecolor=color,
                histtype="stepfilled" if one else "step", lw=1.8,
                label=f"{run.name}: {len(p)} images, {n_fake} ≥ threshold")
        ax.axvline(th, color=color, ls="--", lw=1.5, label=f"threshold {th:.3f}")
    ax.set(xlabel="P(fake), fold-ensemble with TTA", ylabel="test images", xlim=(0, 1),
           title=_title(runs, "Test-set probabilities"))
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_ylim(top=ax.get_ylim()[1] * 1.25)  # headroom for the legend
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", ncol=2 if len(data) > 1 else 1)
    return save(fig, path)


# --- Grad-CAM gallery ------------------------------------------------------------------------------

def plot_gradcam_gallery(groups: Sequence[tuple[str, Sequence[dict]]], path: str | os.PathLike,
                         subtitle: str = "") -> Path | None:
    """Rows = groups (title, items); each item {"image": HxWx3 uint8, "cam": HxW in [0,1], "title": str}.

    Each face is shown plain and with its heatmap, side by side.
    """
    groups = [(t, items) for t, items in groups if items]
    if not groups:
        return None
    cols = max(len(items) for _, items in groups)
    fig, axes = plt.subplots(len(groups), 2 * cols, figsize=(2.3 * 2 * cols, 2.7 * len(groups)), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for r, (group_title, items) in enumerate(groups):
        for j, item in enumerate(items):
            a_img, a_cam = axes[r, 2 * j], axes[r, 2 * j + 1]
            a_img.imshow(item["image"])
            a_img.set_title(item["title"], fontsize=8)
            a_cam.imshow(item["image"])
            a_cam.imshow(item["cam"], cmap="jet", alpha=0.45, vmin=0, vmax=1)
            a_cam.set_title("Grad-CAM", fontsize=8)
        axes[r, 0].text(-0.08, 0.5, group_title, transform=axes[r, 0].transAxes, rotation=90,
                        ha="right", va="center", fontsize=10, fontweight="bold")
    cbar = fig.colorbar(ScalarMappable(Normalize(0, 1), cmap="jet"), ax=axes.ravel().tolist(),
                        shrink=0.6 if len(groups) > 1 else 0.95, pad=0.02)
    cbar.set_label("Grad-CAM, predicted class")
    fig.suptitle("Where the fold ensemble looks" + (f"\n{subtitle}" if subtitle else ""), fontsize=12,
                 y=0.96 if len(groups) > 1 else 1.08)
    return save(fig, path, tight_layout=False)  # a colorbar over several axes does not mix with tight_layout


# --- all of them ------------------------------------------------------------------------------------

PLOTS: dict[str, Callable[[Sequence[RunRecord], str | os.PathLike], Path | None]] = {
    "ssl_loss.png": plot_ssl_loss,
    "ft_loss.png": plot_ft_loss,
    "val_f1_auc.png": plot_val_metrics,
    "learning_rate.png": plot_lr,
    "roc_pr.png": plot_roc_pr,
    "f1_threshold.png": plot_f1_threshold,
    "confusion_matrix.png": plot_confusion,
    "test_probabilities.png": plot_test_histogram,
}


def plot_all(runs: Sequence[RunRecord], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Every figure the runs have data for → {file name: path}; what is skipped is logged."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, fn in PLOTS.items():
        p = fn(runs, out_dir / name)
        if p is None:
            log.info("skipped %s: no run has the data for it", name)
        else:
            written[name] = p
            log.info("wrote %s", p)
    return written


# --- evaluate.py: calibration and robustness --------------------------------------------------

def plot_reliability(y: np.ndarray, probs: dict[str, np.ndarray], path: str | os.PathLike, n_bins: int = 10) -> Path:
    """Reliability diagram: share of fakes against mean predicted probability per bin, one line
    per set of probabilities (e.g. raw and after temperature), ECE in the legend; the diagonal is
    an honest detector. Below, how many images fall in each bin."""
    from ..metrics import expected_calibration_error, reliability_bins

    fig, (ax, axh) = plt.subplots(2, 1, figsize=(5.5, 6.5), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfectly calibrated")
    width = 1.0 / n_bins
    for j, (name, p) in enumerate(probs.items()):
        r = reliability_bins(y, p, n_bins)
        used = r["count"] > 0
        ece = expected_calibration_error(y, p, n_bins)
        ax.plot(r["confidence"][used], r["fraction_fake"][used], marker=MARKERS[j % len(MARKERS)],
                color=f"C{j}", label=f"{name} (ECE {ece:.3f})")
        centres = r["edges"][:-1] + width / 2
        axh.bar(centres + (j - (len(probs) - 1) / 2) * width / len(probs), r["count"], width=width / len(probs),
                color=f"C{j}", alpha=0.7)
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="share of fakes", title="Reliability (clean images)")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    axh.set(xlabel="predicted probability of fake", ylabel="images")
    return save(fig, path)


def plot_robustness(table, name: str, unit: str, clean: dict[str, float], path: str | os.PathLike,
                    clean_label: str = "clean", order: str = "mild → harsh") -> Path:
    """One degradation: ROC-AUC and F1 (at the run's threshold) from the clean image through each
    level, and the share of verdicts flipped against the clean image (bars)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    levels = [clean_label] + [format(float(v), "g") for v in table["level"]]
    x = np.arange(len(levels))
    for j, (key, label) in enumerate((("roc_auc", "ROC-AUC"), ("f1", "F1 at the run's threshold"))):
        ax.plot(x, [clean.get(key, np.nan), *table[key]], marker=MARKERS[j], color=f"C{j}", label=label)
    ax.bar(x, [0.0, *table["flipped"]], color="C3", alpha=0.3, width=0.35, label="verdicts flipped vs clean")
    ax.set(xticks=x, xticklabels=levels, ylim=(0, 1.02), xlabel=f"{name}: {unit}" + (f" ({order})" if order else ""),
           ylabel="score / share", title=f"Robustness to {name}")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    return save(fig, path)


# --- diamonds ---------------------------------------------------------------------------------------

def save_histogram_png(probs: np.ndarray, hi: float, lo: float, path: str | os.PathLike, title: str = "") -> Path:
    """The test set's ensemble P(fake) on a log-count histogram, with the diamond thresholds marked."""
    p = np.asarray(probs, dtype=np.float64)
    p = p[np.isfinite(p)]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(p, bins=50, range=(0, 1), color="#4c72b0")
    for t, c, lab in ((lo, "#2ca02c", f"real < {lo:g}"), (hi, "#d62728", f"fake > {hi:g}")):
        ax.axvline(t, color=c, linestyle="--", label=lab)
    ax.set_yscale("log" if p.size > 50 else "linear")  # the tails dwarf the middle
    ax.set_xlabel("ensemble P(fake)")
    ax.set_ylabel("test images")
    ax.set_title(title or "Test-set probabilities and diamond thresholds")
    ax.legend(loc="upper center")
    return save(fig, path)


def diamond_histogram(summary, hi: float, lo: float) -> Path:
    """make_diamonds' histogram PNG (``summary``: its ``DiamondSummary``), at ``summary.histogram_png``."""
    return save_histogram_png(summary.probs, hi, lo, summary.histogram_png,
                              f"{summary.n_folds} fold(s), {summary.n_scored} test faces: "
                              f"{summary.n_fake} fake + {summary.n_real} real diamonds")
