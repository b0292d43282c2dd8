"""What the generalization bench's out-of-fold scores say: overall, per fake kind, per source.

Every figure comes from out-of-fold predictions (each image scored by a model that never trained
on it) of one protocol — ``in_domain`` (stratified folds over all images) or ``leave_source_out``
(no source repository in both a fold's training and its validation rows). The rows this module
reads: ``Id, target_feature, prob, fold`` (``oof_v42.csv``) joined with ``kind`` (``real`` or the
fake type) and ``repo``. The JSON is strict (no NaN: an undefined figure is ``null``).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from ..checkpoints import atomic_write
from ..metrics import binary_metrics, bootstrap_intervals, roc_auc
from ..runlog import _plain

PROTOCOLS = ("in_domain", "leave_source_out")
LABELS = {"in_domain": "in-domain", "leave_source_out": "leave-source-out"}
REAL = "real"
MIN_PER_CLASS = 5  # a mixed source gets its own within-source AUC only with this many of each class


def _finite(v: float) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


def overall(oof: pd.DataFrame, threshold: float, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """ROC-AUC with its bootstrap 95 % interval (fakes and reals resampled apart, as evaluate.py),
    AP, and F1 at ``threshold`` (the run's own threshold)."""
    y, p = oof.target_feature.to_numpy(int), oof.prob.to_numpy(float)
    m = binary_metrics(y, p, threshold)
    ci = bootstrap_intervals(y, p, threshold, n_boot=n_boot, seed=seed)["roc_auc"]
    return {"roc_auc": _finite(m["roc_auc"]), "ci": [_finite(ci[0]), _finite(ci[1])], "ap": _finite(m["ap"]),
            "f1": _finite(m["f1"]), "threshold": float(threshold), "n": int(len(y)), "n_fakes": int(y.sum())}


def per_kind(oof: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per fake kind: ROC-AUC of every real against that kind's fakes, with its bootstrap interval."""
    reals = oof[oof.kind == REAL]
    out = {}
    for kind in sorted(set(oof.kind) - {REAL}):
        part = pd.concat([reals, oof[oof.kind == kind]])
        y, p = part.target_feature.to_numpy(int), part.prob.to_numpy(float)
        auc = roc_auc(y, p)
        ci = bootstrap_intervals(y, p, 0.5, n_boot=n_boot, seed=seed)["roc_auc"] if math.isfinite(auc) else (None, None)
        out[kind] = {"roc_auc": _finite(auc), "ci": [_finite(ci[0]), _finite(ci[1])],
                     "n_fakes": int((part.kind == kind).sum()), "n_reals": int(len(reals))}
    return out


def source_basis(n_real: int, n_fake: int) -> str:
    """What a source's AUC compares (see ``per_source``)."""
    if n_real == 0:
        return "its fakes vs all reals"
    if n_fake == 0:
        return "its reals vs all fakes"
    if min(n_real, n_fake) >= MIN_PER_CLASS:
        return "within the source"
    return f"none: mixed, fewer than {MIN_PER_CLASS} of a class"


def per_source(oof: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per source repository: a fake-only source's fakes against every real, a real-only source's
    reals against every fake, a mixed source within itself when both classes have
    ``MIN_PER_CLASS`` images (else ``roc_auc`` is null)."""
    out = {}
    for repo, g in sorted(oof.groupby("repo"), key=lambda kv: str(kv[0]).lower()):
        n_fake = int(g.target_feature.sum())
        n_real = int(len(g) - n_fake)
        basis = source_basis(n_real, n_fake)
        if n_real == 0:
            part = pd.concat([oof[oof.target_feature == 0], g])
        elif n_fake == 0:
            part = pd.concat([oof[oof.target_feature == 1], g])
        elif basis == "within the source":
            part = g
        else:
            part = None
        auc = roc_auc(part.target_feature.to_numpy(int), part.prob.to_numpy(float)) if part is not None else float("nan")
        out[str(repo)] = {"n_real": n_real, "n_fake": n_fake, "kinds": sorted(set(g.kind) - {REAL}),
                          "basis": basis, "roc_auc": _finite(auc)}
    return out


def build_report(scored: Mapping[str, tuple[pd.DataFrame, float]], recipe: dict[str, Any], data: dict[str, Any],
                 n_boot: int = 1000, seed: int = 0, notes: Sequence[str] = ()) -> dict[str, Any]:
    """``scored``: protocol → (OOF rows with kind and repo, the run's threshold) → the report:
    each protocol's overall figures, ``per_kind`` and ``per_source`` keyed by protocol inside,
    ``recipe``, ``data`` and ``notes`` (e.g. a protocol whose folds leaked a source). A protocol
    not scored is null."""
    rep: dict[str, Any] = {p: (overall(*scored[p], n_boot=n_boot, seed=seed) if p in scored else None) for p in PROTOCOLS}
    kinds = {p: per_kind(scored[p][0], n_boot, seed) for p in scored}
    sources = {p: per_source(scored[p][0]) for p in scored}
    every_kind = sorted({k for v in kinds.values() for k in v})
    rep["per_kind"] = {k: {p: (kinds[p].get(k) if p in kinds else None) for p in PROTOCOLS} for k in every_kind}
    every_repo = sorted({r for v in sources.values() for r in v}, key=str.lower)
    rep["per_source"] = {}
    for r in every_repo:
        first = next(sources[p][r] for p in sources if r in sources[p])
        rep["per_source"][r] = {**{k: first[k] for k in ("n_real", "n_fake", "kinds", "basis")},
                                **{p: (sources[p][r]["roc_auc"] if p in sources and r in sources[p] else None)
                                   for p in PROTOCOLS}}
    rep.update(recipe=recipe, data=data, notes=list(notes))
    return rep


def strict_json(obj: Any) -> str:
    """Indented JSON with every non-finite float as null (``allow_nan=False`` proves none is left)."""
    return json.dumps(_plain(obj), indent=2, allow_nan=False)


# --- the files a reader opens ------------------------------------------------------------------

def _num(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _auc_ci(m: Mapping[str, Any] | None) -> str:
    if not m or m.get("roc_auc") is None:
        return "–"
    lo, hi = m.get("ci") or (None, None)
    return _num(m["roc_auc"]) + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")


def report_markdown(rep: Mapping[str, Any], plot: str | None = "generalization.png") -> str:
    r = rep["recipe"]
    flags = " ".join(r.get("flags") or []) or "none"
    lines = [
        "# Generalization: in-domain vs leave-source-out", "",
        f"Data: {rep['data'].get('note', '')}.",
        f"Recipe: preset `{r['preset']}`, extra train flags: `{flags}`; {r['n_folds']} folds, seed {r['seed']}, "
        f"{r['img_size']} px faces. Every score is out-of-fold; intervals are bootstrap 95 % (fakes and reals "
        "resampled apart). F1 is at the run's threshold, itself chosen on these out-of-fold scores (optimistic).", "",
        "| protocol | ROC-AUC [95 % CI] | AP | F1 | threshold | images (fakes) | training s |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in PROTOCOLS:
        m = rep.get(p)
        secs = (r.get("seconds") or {}).get(p)
        if m is None:
            lines.append(f"| {LABELS[p]} | not measured | – | – | – | – | – |")
            continue
        lines.append(f"| {LABELS[p]} | {_auc_ci(m)} | {_num(m['ap'])} | {_num(m['f1'])} | {m['threshold']:.3f} | "
                     f"{m['n']} ({m['n_fakes']}) | {_num(secs, 0)} |")
    lines += ["", "## Per fake kind", "", "ROC-AUC of every real against that kind's fakes.", "",
              "| kind | fakes | in-domain | leave-source-out |", "|---|---|---|---|"]
    for kind, by in rep["per_kind"].items():
        n = next((m["n_fakes"] for m in by.values() if m), 0)
        lines.append(f"| {kind} | {n} | {_auc_ci(by.get('in_domain'))} | {_auc_ci(by.get('leave_source_out'))} |")
    lines += ["", "## Per source", "",
              f"A fake-only source: its fakes vs all reals; a real-only source: its reals vs all fakes; a mixed "
              f"source: within itself when it has {MIN_PER_CLASS} or more of each class.", "",
              "| source | real | fake | kinds | ROC-AUC of | in-domain | leave-source-out |", "|---|---|---|---|---|---|---|"]
    for repo, s in rep["per_source"].items():
        lines.append(f"| {repo} | {s['n_real']} | {s['n_fake']} | {', '.join(s['kinds']) or '–'} | {s['basis']} | "
                     f"{_num(s.get('in_domain'))} | {_num(s.get('leave_source_out'))} |")
    if rep.get("notes"):
        lines += ["", "## Notes", "", *[f"- {n}" for n in rep["notes"]]]
    if plot:
        lines += ["", f"![ROC-AUC per kind]({plot})"]
    return "\n".join(lines) + "\n"


def plot_report(rep: Mapping[str, Any], path: str | os.PathLike) -> Path | None:
    """Grouped bars: overall and each fake kind, one bar per protocol, with the 95 % intervals."""
    from .plots import plt, save

    groups = ["overall", *rep["per_kind"]]
    shown = [p for p in PROTOCOLS if rep.get(p) is not None]
    if not shown:
        return None
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(groups), 4))
    x = np.arange(len(groups))
    width = 0.8 / len(shown)
    for i, p in enumerate(shown):
        ms = [rep[p], *[rep["per_kind"][k].get(p) for k in groups[1:]]]
        auc = np.array([m["roc_auc"] if m and m["roc_auc"] is not None else np.nan for m in ms], dtype=float)
        lo = np.array([m["ci"][0] if m and m["ci"][0] is not None else np.nan for m in ms], dtype=float)
        hi = np.array([m["ci"][1] if m and m["ci"][1] is not None else np.nan for m in ms], dtype=float)
        err = np.nan_to_num(np.vstack([auc - lo, hi - auc]), nan=0.0).clip(min=0)
        pos = x - 0.4 + width * (i + 0.5)
        ax.bar(pos, np.nan_to_num(auc), width, yerr=err, capsize=3, color=f"C{i}", label=LABELS[p])
        for xi, v in zip(pos, auc):
            ax.text(xi, 0.02, "–" if np.isnan(v) else f"{v:.2f}", ha="center", va="bottom", fontsize=8, color="white")
    ax.axhline(0.5, color="grey", linestyle=":", lw=1, label="chance")
    counts = [next((m["n_fakes"] for m in rep["per_kind"][k].values() if m), 0) for k in groups[1:]]
    ax.set_xticks(x, ["overall"] + [f"{k}\n({n} fakes)" for k, n in zip(groups[1:], counts)])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("ROC-AUC (out-of-fold)")
    ax.set_title("ROC-AUC per fake kind (reals vs that kind), in-domain vs leave-source-out")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8, frameon=False)
    return save(fig, path)


def write_report(rep: Mapping[str, Any], out: str | os.PathLike) -> dict[str, Path]:
    """generalization.json (strict), generalization.md and generalization.png in ``out``."""
    out = Path(out)
    text = strict_json(rep)
    files = {"json": atomic_write(out / "generalization.json", lambda tmp: Path(tmp).write_text(text + "\n"))}
    png = plot_report(rep, out / "generalization.png")
    if png is not None:
        files["png"] = png
    md = report_markdown(rep, png.name if png is not None else None)
    files["md"] = atomic_write(out / "generalization.md", lambda tmp: Path(tmp).write_text(md))
    return files
