"""Training logs → per-run series for the plotter and the report.

Reads both log channels of ``train_v42_diamond.py`` (JSON-lines records and the human lines
``SSL Ep 3 | Loss: … | LR: …`` / ``Fold 2 Ep 5 | Loss: … | Val F1: … (th=…) | AUC: … | AP: … | LR: …``)
and the original project's text lines (``SSL Ep 12 | Loss: 0.3120``, `` FOLD 1/5`` then
``Ep 4 | Val F1: 0.8731 (th=0.42)``). Folds are numbered from 0 everywhere, as in the weight
file names; the original's 1-based ``FOLD k/n`` becomes fold k-1.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..runfiles import DEFAULT_PREFIX, RunFiles
from ..runlog import read_jsonl


class LogError(ValueError):
    """A log (or run folder) holds nothing usable; the message names it and what was expected."""


@dataclass
class FoldSeries:
    """One fold's fine-tuning curves; every list is aligned with ``epoch`` (nan where not logged)."""

    epoch: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    f1: list[float] = field(default_factory=list)
    th: list[float] = field(default_factory=list)
    auc: list[float] = field(default_factory=list)
    ap: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    best_epoch: int | None = None  # from a fold_done record; else the first epoch with the top F1

    def add(self, epoch: int, **values: float) -> None:
        if epoch in self.epoch:  # a resumed run logs an epoch again: the later line wins
            i = self.epoch.index(epoch)
            for k in ("train_loss", "val_loss", "f1", "th", "auc", "ap", "lr"):
                getattr(self, k)[i] = _num(values.get(k))
            return
        self.epoch.append(epoch)
        for k in ("train_loss", "val_loss", "f1", "th", "auc", "ap", "lr"):
            getattr(self, k).append(_num(values.get(k)))

    def best(self) -> int | None:
        """The best epoch: the logged one, else the first epoch with the highest F1."""
        if self.best_epoch is not None:
            return self.best_epoch
        f1 = np.asarray(self.f1, dtype=float)
        if not len(f1) or np.isnan(f1).all():
            return None
        return self.epoch[int(np.nanargmax(f1))]

    def at(self, epoch: int | None, key: str) -> float:
        if epoch is None or epoch not in self.epoch:
            return float("nan")
        return getattr(self, key)[self.epoch.index(epoch)]


@dataclass
class RunRecord:
    """Everything one training run left behind, as series and tables."""

    name: str
    folder: Path
    log_paths: list[Path] = field(default_factory=list)
    ssl_epoch: list[int] = field(default_factory=list)
    ssl_loss: list[float] = field(default_factory=list)
    ssl_lr: list[float] = field(default_factory=list)
    folds: dict[int, FoldSeries] = field(default_factory=dict)
    fold_done: dict[int, dict[str, Any]] = field(default_factory=dict)
    oof_record: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None      # metrics_{prefix}.json
    oof: pd.DataFrame | None = None            # oof_{prefix}.csv: Id, target_feature, prob, fold
    predictions: pd.DataFrame | None = None    # predictions_{prefix}.csv: Id, prob
    n_used: int = 0                            # log lines / records that gave a value
    n_bad: int = 0                             # malformed lines skipped

    def add_ssl(self, epoch: int, loss: float, lr: float | None = None) -> None:
        if epoch in self.ssl_epoch:
            i = self.ssl_epoch.index(epoch)
            self.ssl_loss[i], self.ssl_lr[i] = _num(loss), _num(lr)
            return
        self.ssl_epoch.append(epoch)
        self.ssl_loss.append(_num(loss))
        self.ssl_lr.append(_num(lr))

    def fold(self, k: int) -> FoldSeries:
        return self.folds.setdefault(k, FoldSeries())

    @property
    def has_curves(self) -> bool:
        return bool(self.ssl_epoch or any(f.epoch for f in self.folds.values()))

    @property
    def has_anything(self) -> bool:
        return self.has_curves or self.oof is not None or self.predictions is not None or self.metrics is not None

    def decision_threshold(self) -> tuple[float, str]:
        """The run's decision threshold and where it came from, by the fold set's one rule
        (``titan.infer.folds.decision_threshold``): recorded OOF, fold mean, OOF predictions, 0.5."""
        from ..infer.folds import decision_threshold

        recorded = next((float(src["threshold"]) for src in ((self.metrics or {}).get("oof"), self.oof_record)
                         if isinstance(src, dict) and _finite(src.get("threshold"))), None)
        oof = lambda: None if self.oof is None else (self.oof["target_feature"].to_numpy(int), self.oof["prob"].to_numpy(float))  # noqa: E731
        return decision_threshold(recorded, [d.get("th") for d in self.fold_rows()], oof)

    def threshold(self) -> float:
        return self.decision_threshold()[0]

    def fold_rows(self) -> list[dict[str, Any]]:
        """Per-fold best-epoch metrics: metrics_{prefix}.json's, else from the log."""
        rows = (self.metrics or {}).get("folds")
        if isinstance(rows, list) and rows:
            return [r for r in rows if isinstance(r, dict)]
        return fold_table(self)


def _num(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return f


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fold_table(run: RunRecord) -> list[dict[str, Any]]:
    """Per-fold best-epoch rows (fold, best_epoch, f1, th, auc, ap) from fold_done records or the curves."""
    rows = []
    for k in sorted(set(run.folds) | set(run.fold_done)):
        done = run.fold_done.get(k, {})
        s = run.folds.get(k, FoldSeries())
        best = done.get("best_epoch", s.best())
        rows.append({"fold": k, "best_epoch": best,
                     **{m: done.get(m, s.at(best, m)) for m in ("f1", "th", "auc", "ap")}})
    return rows


# --- text lines ---------------------------------------------------------------------------------

_TS = re.compile(r"^\[\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d[^\]]*\]\s?")
_F = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)"
_SSL = re.compile(rf"^SSL Ep (\d+) \| Loss: {_F}(?: \| LR: {_F})?(?: \|.*)?$")
_FT = re.compile(rf"^Fold (\d+) Ep (\d+) \| Loss: {_F} \| Val F1: {_F} \(th={_F}\)"
                 rf"(?: \| AUC: {_F})?(?: \| AP: {_F})?(?: \| LR: {_F})?(?: \|.*)?$")
_OLD_FOLD = re.compile(r"^FOLD (\d+)\s*/\s*(\d+)$")
_OLD_EP = re.compile(rf"^Ep (\d+) \| Val F1: {_F} \(th={_F}\)(?: \|.*)?$")
# A line that starts like a record but does not parse is malformed (counted), not chatter.
_LOOKS_LIKE = re.compile(r"^(SSL Ep\b|Fold \d+ Ep\b|Ep \d|FOLD \d)")


def parse_text_log(path: str | os.PathLike, run: RunRecord) -> None:
    """Add the series of a human log (new or original format) to ``run``."""
    fold = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for raw in f:
            line = _TS.sub("", raw.rstrip("\r\n")).strip()
            if not line or not _LOOKS_LIKE.match(line):
                continue
            if m := _SSL.match(line):
                run.add_ssl(int(m[1]), float(m[2]), m[3])
            elif m := _FT.match(line):
                run.fold(int(m[1])).add(int(m[2]), train_loss=m[3], f1=m[4], th=m[5], auc=m[6], ap=m[7], lr=m[8])
            elif m := _OLD_FOLD.match(line):
                fold = int(m[1]) - 1  # the original counts folds from 1; file names from 0
                run.fold(fold)
                continue  # a header, not a value
            elif m := _OLD_EP.match(line):
                run.fold(fold if fold is not None else 0).add(int(m[1]), f1=m[2], th=m[3])
            else:
                run.n_bad += 1
                continue
            run.n_used += 1


# --- JSON-lines records ---------------------------------------------------------------------------

def _ints(rec: dict, *keys: str) -> list[int]:
    out = []
    for k in keys:
        v = rec[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
            raise ValueError(k)
        out.append(int(v))
    return out


def parse_jsonl_log(path: str | os.PathLike, run: RunRecord) -> None:
    """Add the records of a JSON-lines log to ``run``; records missing required keys count as malformed."""
    recs, bad = read_jsonl(path)
    run.n_bad += bad
    for rec in recs:
        ev = rec.get("event")
        try:
            if ev == "ssl_epoch":
                (epoch,) = _ints(rec, "epoch")
                run.add_ssl(epoch, _num(rec["loss"]), rec.get("lr"))
            elif ev == "ft_epoch":
                k, epoch = _ints(rec, "fold", "epoch")
                run.fold(k).add(epoch, **{m: rec.get(m) for m in ("train_loss", "val_loss", "f1", "th", "auc", "ap", "lr")})
            elif ev == "fold_done":
                k, best = _ints(rec, "fold", "best_epoch")
                run.fold(k).best_epoch = best
                run.fold_done[k] = {key: v for key, v in rec.items() if key not in ("event", "time")}
            elif ev == "oof":
                run.oof_record = {key: v for key, v in rec.items() if key not in ("event", "time")}
            elif ev == "config":
                run.config = {key: v for key, v in rec.items() if key not in ("event", "time")}
            else:
                continue  # other events (resume, bad_step, …) are not plotted
        except (KeyError, ValueError, TypeError):
            run.n_bad += 1
            continue
        run.n_used += 1


# --- run folders -------------------------------------------------------------------------------------

def find_logs(folder: str | os.PathLike, prefix: str = DEFAULT_PREFIX) -> list[Path]:
    """The log of a run folder: JSON-lines preferred (it holds everything the text log does).

    ``training_{prefix}_log.jsonl`` / ``.txt`` first; else any ``*log*.jsonl`` / ``*log*.txt``.
    """
    folder = Path(folder)
    files = RunFiles(folder, prefix)
    for path in (files.log_jsonl, files.log_txt):
        if path.is_file():
            return [path]
    for pattern in ("*log*.jsonl", "*log*.txt"):
        found = sorted(p for p in folder.glob(pattern) if p.is_file())
        if found:
            return found[:1]
    return []


def read_prob_csv(path: Path, needed: tuple[str, ...]) -> pd.DataFrame | None:
    """A CSV with a ``prob`` column in [0,1] (None when absent); bad rows are an error naming their lines."""
    if not path.is_file():
        return None
    try:
        df = pd.read_csv(path, dtype={"Id": str})
    except Exception as e:
        raise LogError(f"{path}: not a readable CSV ({e})") from None
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise LogError(f"{path}: missing column(s) {missing}; expected {list(needed)} (found {list(df.columns)})")
    df = df.copy()
    df["prob"] = pd.to_numeric(df["prob"], errors="coerce")
    bad = df["prob"].isna() | ~df["prob"].between(0.0, 1.0)
    if bad.any():
        rows = ", ".join(str(i + 2) for i in np.flatnonzero(bad.to_numpy())[:10])
        raise LogError(f"{path}: 'prob' must be a number in [0,1]; bad value on line(s) {rows}")
    return df


def read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LogError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(obj, dict):
        raise LogError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def load_run(source: str | os.PathLike, prefix: str = DEFAULT_PREFIX, name: str | None = None) -> RunRecord:
    """One run from a log file or a run folder, with the folder's OOF, predictions, metrics and config.

    Raises ``LogError`` when a given log has no usable line, or a folder holds neither a log nor results.
    """
    source = Path(source)
    if not source.exists():
        raise LogError(f"{source}: no such log file or run folder")
    folder = source if source.is_dir() else source.parent
    logs = find_logs(folder, prefix) if source.is_dir() else [source]
    run = RunRecord(name=name or (source.resolve().name if source.is_dir() else source.stem), folder=folder, log_paths=logs)
    for p in logs:
        (parse_jsonl_log if p.suffix == ".jsonl" else parse_text_log)(p, run)
    if logs and run.n_used == 0:
        raise LogError(
            f"{logs[0]}: no usable lines ({run.n_bad} malformed). Expected JSON records "
            f"(event ssl_epoch / ft_epoch) or lines like 'SSL Ep 3 | Loss: 0.41' and "
            f"'Fold 2 Ep 5 | Loss: 0.21 | Val F1: 0.91 (th=0.43) | …'")
    files = RunFiles(folder, prefix)
    run.oof = read_prob_csv(files.oof_csv, ("target_feature", "prob"))
    run.predictions = read_prob_csv(files.predictions_csv, ("Id", "prob"))
    run.metrics = read_json(files.metrics_json)
    run.config = read_json(files.config_json) or run.config
    if not run.has_anything:
        raise LogError(f"{source}: no training log ({files.log_jsonl.name} / .txt) and no "
                       f"{files.oof_csv.name} / {files.predictions_csv.name} / {files.metrics_json.name} here")
    return run


def load_runs(sources: list[str | os.PathLike], prefix: str = DEFAULT_PREFIX) -> list[RunRecord]:
    """Several runs; names made unique (folder/file) so legends tell them apart."""
    runs = [load_run(s, prefix) for s in sources]
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = f"{r.folder.resolve().name}/{r.log_paths[0].name if r.log_paths else r.name}"
    seen: dict[str, int] = {}
    for r in runs:  # still equal (the same file twice): number them
        seen[r.name] = seen.get(r.name, 0) + 1
        if seen[r.name] > 1:
            r.name = f"{r.name} ({seen[r.name]})"
    return runs
