"""The generalization bench: one recipe trained under two protocols on a labelled folder with a
sources table, scored out-of-fold overall, per fake kind and per source.

- ``in_domain``: stratified k-fold over every image (the label CSV has no group column);
- ``leave_source_out``: the label CSV carries ``group`` = the source repository, so no
  repository is in both a fold's training and its validation rows. The bench checks that from the
  out-of-fold file after training and refuses the figures when a repository crossed folds (a
  training without group k-fold ignores the column).

The folder (``realfaces`` layout): ``images/{Id}.jpg``, ``labels.csv`` (Id,target_feature) and
``sources.csv`` (Id,target_feature,fake_type,repo,...; real rows have fake_type empty or ``real``).
Layout of ``out``: ``dataset/train_images`` (a link to the images), ``faces_{size}/train`` (the
aligned faces, shared by the protocols and reruns), per protocol ``{protocol}/labels.csv``,
``{protocol}/run/`` (the training pipeline's files) and ``{protocol}/protocol.json`` (the recipe
and a digest of the label CSV and faces, written once its out-of-fold file passed the checks: a
rerun with the same ones reuses the run; changed labels or faces run the pipeline again, which
retrains what changed; another recipe is refused, since the pipeline would keep folds trained
with the old one); the report ``generalization.{json,md,png}``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from ..checkpoints import atomic_json, atomic_write
from ..config import PRESETS, ScriptOptions, TrainConfig, option, parse_config
from ..data.fingerprint import digest_lines, images_digest
from ..data.images import ImageIndex
from ..data.labels import LabelCSVError, read_labels
from ..report.generalization import PROTOCOLS, REAL, build_report, write_report
from ..runfiles import RunFiles
from ..runlog import RunLog

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared/data/realfaces"
LAYOUT = ("images/{Id}.jpg, labels.csv (Id,target_feature; 1 = fake) and sources.csv "
          "(Id,target_feature,fake_type,repo,...; fake_type empty or 'real' on real rows)")
# Fields the bench sets for every protocol; passing them after `--` would contradict it.
OWNED_FLAGS = ("--faces-dir", "--train-csv", "--fallback-csv", "--out-dir", "--stages", "--preset", "--set",
               "--n-folds", "--seed", "--fold-seed")
# The pipeline's stage that writes the out-of-fold scores. SSL is left out: it would pretrain on
# the held-out sources' images too (and the default recipe's ImageNet-initialised arch has none).
STAGES = "finetune"


class GroupLeakError(ValueError):
    """A leave-source-out fold validated on a source its training rows came from."""


@dataclass
class GeneralizationOptions(ScriptOptions):
    """bench/generalization.py's flags; train_v42_diamond.py flags follow ``--``."""

    data: str = option("", f"labelled folder: {LAYOUT}; empty = <repo>/../shared/data/realfaces")
    out: str = option("runs/generalization", "work folder and report")
    preset: str = option("demo", "the training preset (train_v42_diamond.py --preset)", choices=tuple(sorted(PRESETS)))
    n_folds: int = option(0, "folds per protocol (0 = the preset's)")
    seed: int = option(3407, "seed of the fold split and of training")
    protocols: str = option(",".join(PROTOCOLS), "comma-separated: in_domain, leave_source_out")
    bootstrap: int = option(1000, "bootstrap resamples for the 95 %% intervals")


# --- the labelled folder ---------------------------------------------------------------------------

def data_folder(data: str | os.PathLike = "") -> Path:
    """``data`` or the default, checked to hold the layout (else an error naming what is missing)."""
    root = Path(data) if str(data) else DEFAULT_DATA
    parts = {"images/": root / "images", "labels.csv": root / "labels.csv", "sources.csv": root / "sources.csv"}
    missing = [name for name, p in parts.items() if not (p.is_dir() if name.endswith("/") else p.is_file())]
    if missing:
        where = f"{root} does not exist" if not root.is_dir() else f"{root} lacks {', '.join(missing)}"
        raise FileNotFoundError(f"no labelled folder with sources: {where}. The generalization bench needs a folder "
                                f"holding {LAYOUT}; pass it with --data DIR"
                                + ("" if str(data) else " (the default is <repo>/../shared/data/realfaces)"))
    return root


def read_sources(root: Path) -> pd.DataFrame:
    """labels.csv joined with sources.csv → Id, target_feature, kind (``real`` or the fake type), repo;
    a row that contradicts itself (a fake without a kind, a real with one, labels that disagree) is
    an error naming its line."""
    labels = read_labels(root / "labels.csv")
    path = root / "sources.csv"
    src = pd.read_csv(path, dtype=str, keep_default_na=False)
    lost = [c for c in ("Id", "fake_type", "repo") if c not in src.columns]
    if lost:
        raise LabelCSVError(f"{path}: missing column(s) {lost}; need Id,fake_type,repo (found {list(src.columns)})")
    src["line"] = range(2, len(src) + 2)
    dup = src[src.Id.duplicated(keep=False)]
    if len(dup):
        raise LabelCSVError(f"{path}: Id(s) listed more than once: "
                            + ", ".join(f"{i!r} (line {n})" for i, n in zip(dup.Id[:10], dup.line[:10])))
    src = src.set_index("Id")
    rows = []
    for i, y in zip(labels.Id, labels.target_feature):
        if i not in src.index:
            raise LabelCSVError(f"{path}: no row for Id {i!r} of labels.csv; every labelled image needs its source")
        s = src.loc[i]
        where = f"{path} line {s.line} (Id {i!r})"
        kind = s.fake_type.strip() or REAL
        if "target_feature" in src.columns and s.target_feature.strip() not in (str(y), f"{y}.0"):
            raise LabelCSVError(f"{where}: target_feature {s.target_feature!r} but labels.csv says {y}; fix one of them")
        if (kind == REAL) != (y == 0):
            raise LabelCSVError(f"{where}: fake_type {s.fake_type!r} on a {'fake' if y else 'real'} image; real rows "
                                "have fake_type empty or 'real', fakes name their kind (gan, diffusion, ...)")
        if not s.repo.strip():
            raise LabelCSVError(f"{where}: empty repo; every image needs the source it came from")
        rows.append((i, int(y), kind, s.repo.strip()))
    return pd.DataFrame(rows, columns=["Id", "target_feature", "kind", "repo"])


# --- the recipe ------------------------------------------------------------------------------------

def recipe(preset: str, passthrough: Sequence[str], n_folds: int = 0, seed: int = 3407) -> tuple[TrainConfig, list[str]]:
    """The training config the protocols share and the flags that make it (checked now, before any work)."""
    from .pipeline import StageOptions

    owned = sorted({a.split("=", 1)[0] for a in passthrough if a.split("=", 1)[0] in OWNED_FLAGS})
    if owned:
        raise ValueError(f"{', '.join(owned)} after `--`: the bench sets these itself (use its --preset, --n-folds, "
                         "--seed, --out and --data)")
    flags = ["--preset", preset, *(["--n-folds", str(n_folds)] if n_folds else []),
             "--seed", str(seed), "--fold-seed", str(seed), *passthrough]
    cfg, _ = parse_config(TrainConfig, flags, extra=StageOptions)
    return cfg, flags


def reuse_key(cfg: TrainConfig) -> dict:
    """The config fields that change what training computes (paths and machine settings left out)."""
    skip = ("out_dir", "faces_dir", "train_csv", "fallback_csv", "num_workers", "device", "threads")
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}


# --- the steps -------------------------------------------------------------------------------------

def _run(argv: list[str], what: str, log: RunLog) -> float:
    from ..demo.run import shown, stage_env

    log.info(f"[{what}] $ {shown(argv, Path.cwd())}")
    t0 = time.time()
    rc = subprocess.run(argv, env=stage_env()).returncode
    if rc != 0:
        raise RuntimeError(f"{what} failed with exit code {rc} ({shown(argv, Path.cwd())}); its output is above. "
                           "Fix it, then rerun the bench: finished work is reused")
    return time.time() - t0


def align(root: Path, out: Path, size: int, ids: Sequence[str], log: RunLog) -> Path:
    """align_faces.py over ``root/images`` into ``out/faces_{size}/train`` (it resumes, keeping done
    faces; not started at all when every Id already has its face)."""
    link = out / "dataset/train_images"
    images = (root / "images").resolve()
    if link.is_symlink() and link.resolve() != images:
        raise FileExistsError(f"{out} holds the work of another data folder ({link.resolve()}); use another --out")
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(images, target_is_directory=True)
    faces = out / f"faces_{size}"
    if (faces / "train").is_dir() and all(i in ImageIndex(faces / "train") for i in ids):
        log.info(f"faces: every image aligned earlier in {faces}/train")
        return faces
    _run([sys.executable, str(REPO / "align_faces.py"), "--input", str(link.parent), "--output", str(faces),
          "--splits", "train", "--size", str(size)], f"align at {size} px", log)
    return faces


def label_frame(rows: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """The protocol's label CSV rows: Id,target_feature (+ group = repository for leave-source-out)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    df = rows[["Id", "target_feature"]].copy()
    if protocol == "leave_source_out":
        df["group"] = rows.repo.to_numpy()
    return df


def check_groups(oof: pd.DataFrame, groups: pd.Series, where: str = "") -> None:
    """Every group (source) in exactly one fold of ``oof`` (Id, fold); else a GroupLeakError naming them."""
    fold = oof.set_index("Id").fold
    g = groups.reindex(fold.index)
    spread = pd.DataFrame({"group": g.to_numpy(), "fold": fold.to_numpy()}).groupby("group").fold.unique()
    split = {k: sorted(int(f) for f in v) for k, v in spread.items() if len(v) > 1}
    if split:
        shown = "; ".join(f"{k} in folds {v}" for k, v in list(split.items())[:6]) + (" …" if len(split) > 6 else "")
        raise GroupLeakError(f"{where}{len(split)} source(s) are in the training rows of a fold that validates on them "
                             f"({shown}): the figures would not be leave-source-out. The label CSV's group column was "
                             "not honoured: training needs stratified group k-fold (titan/train/finetune.py assign_folds); "
                             "rerun the bench once it has it (finished work is reused)")


@dataclass
class ProtocolRun:
    oof: pd.DataFrame       # Id, target_feature, prob, fold
    threshold: float        # the run's decision threshold
    seconds: float          # training wall time, summed over the bench's calls that trained this run folder
    reused: bool


def run_protocol(protocol: str, rows: pd.DataFrame, faces: Path, cfg: TrainConfig, flags: list[str], out: Path,
                 log: RunLog) -> ProtocolRun:
    """Write the protocol's label CSV, train (or reuse a finished run with the same inputs), check its folds."""
    from ..infer.folds import decision_threshold

    d = out / protocol
    run = RunFiles(d / "run")
    labels = label_frame(rows, protocol)
    csv_text = labels.to_csv(index=False)
    atomic_write(d / "labels.csv", lambda tmp: Path(tmp).write_text(csv_text))
    key = digest_lines([*csv_text.splitlines(), images_digest(ImageIndex(faces / "train"), labels.Id)])
    done = d / "protocol.json"
    saved = json.loads(done.read_text()) if done.is_file() else {}
    was = saved.get("recipe")
    if was is not None and was != reuse_key(cfg):
        # the pipeline reuses a finished fold whatever its epochs or LR were: a new recipe needs a new run
        diff = sorted(k for k in set(was) | set(reuse_key(cfg)) if was.get(k) != reuse_key(cfg).get(k))
        raise ValueError(f"{d} was trained with another recipe ({', '.join(diff)} differ); use a fresh --out, "
                         f"or delete {d} to retrain it")
    reused = saved.get("inputs") == key and run.oof_csv.is_file() and run.metrics_json.is_file()
    if reused:
        seconds = float(saved["seconds"])
        log.info(f"{protocol}: finished earlier with the same labels, faces and recipe; reusing {run.folder}")
    else:
        argv = [sys.executable, str(REPO / "train_v42_diamond.py"), *flags, "--stages", STAGES,
                "--faces-dir", str(faces), "--train-csv", str(d / "labels.csv"), "--fallback-csv", str(d / "labels.csv"),
                "--out-dir", str(run.folder)]
        # the time this run folder cost: an interrupted or changed run's earlier calls count too
        seconds = float(saved.get("seconds", 0.0)) + _run(argv, f"train {protocol}", log)
    oof = pd.read_csv(run.oof_csv, dtype={"Id": str})
    if protocol == "leave_source_out":
        check_groups(oof, rows.set_index("Id").repo, f"{protocol} ({run.oof_csv}): ")
    metrics = json.loads(run.metrics_json.read_text())
    th, _ = decision_threshold(metrics.get("oof", {}).get("threshold"), [f.get("th") for f in metrics.get("folds", [])])
    if not reused:
        atomic_json({"inputs": key, "recipe": reuse_key(cfg), "seconds": round(seconds, 1), "flags": flags}, done)
    return ProtocolRun(oof, th, seconds, reused)


def run_generalization(opts: GeneralizationOptions, passthrough: Sequence[str] = (), log: RunLog | None = None) -> dict:
    """Both protocols (or ``opts.protocols``) → the report dict, also written as generalization.{json,md,png}
    in ``opts.out``. A leave-source-out run whose folds crossed sources is left out of the report
    (with a note) and raised as GroupLeakError after the other figures are written."""
    out = Path(opts.out).resolve()
    log = log or RunLog(out / "generalization_log.txt", out / "generalization_log.jsonl")
    protocols = [p.strip() for p in opts.protocols.split(",") if p.strip()]
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad or not protocols:
        raise ValueError(f"--protocols {opts.protocols!r}: choose from {', '.join(PROTOCOLS)}")
    root = data_folder(opts.data)
    rows = read_sources(root)
    cfg, flags = recipe(opts.preset, passthrough, opts.n_folds, opts.seed)
    log.info(f"data: {root}: {len(rows)} images ({int(rows.target_feature.sum())} fake) from {rows.repo.nunique()} "
             f"sources; recipe: {' '.join(flags)} ({cfg.n_folds} folds, {cfg.img_size} px)")
    load_start = [round(x, 2) for x in os.getloadavg()]
    faces = align(root, out, cfg.img_size, rows.Id.tolist(), log)
    have = ImageIndex(faces / "train")
    lost = rows[~rows.Id.isin(have.ids())]
    if len(lost):
        log.info(f"WARNING: {len(lost)} image(s) have no aligned face (see {faces}/train/manifest.csv) and are left "
                 f"out: {lost.Id.tolist()[:10]}")
        rows = rows[rows.Id.isin(have.ids())].reset_index(drop=True)
    scored, seconds, notes = {}, {}, []
    leak: GroupLeakError | None = None
    for p in protocols:
        try:
            r = run_protocol(p, rows, faces, cfg, flags, out, log)
        except GroupLeakError as e:
            leak = e
            notes.append(f"leave-source-out not measured: {e}")
            log.info(f"ERROR: {e}")
            continue
        oof = r.oof.merge(rows[["Id", "kind", "repo"]], on="Id", how="left", validate="one_to_one")
        scored[p], seconds[p] = (oof, r.threshold), round(r.seconds, 1)
        log.record("protocol", protocol=p, seconds=r.seconds, reused=r.reused, threshold=r.threshold)
    data = {"folder": str(root), "n": int(len(rows)), "n_fakes": int(rows.target_feature.sum()),
            "n_sources": int(rows.repo.nunique()), "dropped": lost.Id.tolist(),
            "note": f"{root.name}: {len(rows)} images ({int(rows.target_feature.sum())} fake) from "
                    f"{rows.repo.nunique()} source repositories"}
    rec = {"preset": opts.preset, "flags": list(passthrough), "train_flags": flags, "stages": STAGES,
           "n_folds": cfg.n_folds, "seed": opts.seed, "img_size": cfg.img_size, "arch": cfg.arch or f"titan-{cfg.variant}",
           "seconds": seconds, "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s)",
           "load_average": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]}}
    report = build_report(scored, rec, data, n_boot=opts.bootstrap, seed=opts.seed, notes=notes)
    files = write_report(report, out)
    log.info(f"wrote {', '.join(str(f) for f in files.values())}")
    if leak is not None:
        raise leak
    return report
