"""The whole pipeline on the demo set: every stage script, called as a user would call it.

    python -m titan.demo.run --out demo_run [--n-images 500] [--quick] [--resume] [--self-train]

Builds the demo set (``titan.demo``) in DIR, then runs, in DIR, printing each command first:
align_faces.py → train_v42_diamond.py (demo preset) into run1 → plot_training_curves.py →
safe_inference.py with the last run's folds. With ``--self-train`` it also runs make_diamonds.py
with run1's folds and train_v42_diamond.py again with the diamonds into run2 (skipped, with a
notice, when there are none: it would repeat run1); off by default, since on the demo it cost
as much time as run1 and did not raise the test scores (docs/demo.md). Then detect.py on a
few test images and a short video of them (DIR/detect/: CSV, Grad-CAM heatmaps and an HTML report)
and evaluate.py on the test set with a reduced robustness sweep (DIR/<run>/evaluation/evaluation.md).
It ends by scoring that run's submission and probabilities
against DIR/test_labels.csv (F1, ROC-AUC, missed fakes; also written to DIR/demo_scores.json)
and how often the safe submission agrees with the main one.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from . import dataset as demo
from .. import metrics
from ..checkpoints import atomic_write
from ..config import PRESETS
from ..data.ids import id_order
from ..data.images import ImageIndex, decode_image, square_resize
from ..data.labels import LabelCSVError, read_labels
from ..runfiles import DATASET_DIR, DEFAULT_PREFIX, DIAMOND_CSV, FACES_DIR, TEST_IMAGES, TRAIN_CSV, log_files
from ..runlog import RunLog
from ..train.finetune import group_fold_limit

REPO = Path(__file__).resolve().parents[2]

# --- every flag the demo passes, in one place (paths relative to DIR) -------------------------
IMG_SIZE = 128
FACES = FACES_DIR
DIAMONDS = DIAMOND_CSV
ALIGN_FLAGS = {"input": DATASET_DIR, "output": FACES, "size": IMG_SIZE}
TRAIN_FLAGS = {"preset": "demo", "faces-dir": FACES, "train-csv": DIAMONDS, "fallback-csv": TRAIN_CSV,
               "img-size": IMG_SIZE}
# A few CPU minutes of training never make a model 99.5 % sure (the recipe's --hi/--lo): the demo's
# probabilities span about 0.06–0.9, so its diamonds are the faces beyond 0.9 / below 0.1.
DIAMOND_FLAGS = {"prefix": DEFAULT_PREFIX, "test-dir": f"{FACES}/test", "train-csv": TRAIN_CSV, "out": DIAMONDS,
                 "hi": 0.9, "lo": 0.1}
SAFE_FLAGS = {"prefix": DEFAULT_PREFIX, "test-dir": f"{FACES}/test", "raw-test-dir": TEST_IMAGES}
# --quick: a smoke run (a few dozen images, 2 folds, 1 epoch, 64 px) to check the wiring.
QUICK_N_IMAGES = 48
QUICK_TRAIN_FLAGS = {"n-folds": 2, "ft-epochs": 1, "ssl-epochs": 1, "img-size": 64}
RUNS = ("run1", "run2")
# Self-training (diamonds → run2) measured on the demo (seed 3407): +15 diamonds, run2's test
# ROC-AUC 0.931 vs run1's 0.941 for ~3 more CPU minutes, so the demo leaves it to --self-train.
SELF_TRAIN = False
# detect.py at the end: a few test images (fakes and reals) and a short clip made from them.
DETECT_DIR = "detect"
DETECT_N_IMAGES = {"fake": 3, "real": 3}
DETECT_FLAGS = {"out": f"{DETECT_DIR}/detections.csv", "html": f"{DETECT_DIR}/report.html",
                "heatmaps": f"{DETECT_DIR}/heatmaps", "frames": 6, "tta": "minimal"}
CLIP = f"{DETECT_DIR}/demo_clip.mp4"
# evaluate.py last: the raw test photos and their labels, one level per degradation (--reduced).
EVAL_FLAGS = {"data": TEST_IMAGES, "labels": "test_labels.csv", "tta": "minimal",
              "bootstrap": 500}
# What the runner made and removes before a fresh run (never the user's other files in DIR).
GENERATED = (FACES, DIAMONDS, *RUNS, DETECT_DIR, "demo_scores.json")


class DemoRunError(RuntimeError):
    """A stage failed or left out a file the next step needs; the message says which and why."""


@dataclass
class Stage:
    name: str
    script: str                 # file name in the repository
    args: list[str]

    def argv(self, python: str, repo: Path) -> list[str]:
        return [python, str(repo / self.script), *self.args]


def _flags(flags: dict) -> list[str]:
    """``--k v``; a boolean is a switch (``--k`` / ``--no-k``), the one convention of every script."""
    return [x for k, v in flags.items()
            for x in (((f"--{k}" if v else f"--no-{k}"),) if isinstance(v, bool) else (f"--{k}", str(v)))]


def demo_stages(quick: bool = False, final: str | None = None, self_train: bool = SELF_TRAIN,
                n_folds: int | None = None) -> list[Stage]:
    """The stage commands of the demo, in order, with their arguments (run in DIR). ``final`` is
    the run that plots and safe inference use: run2, or run1 when run2 is skipped (no diamonds,
    or no ``self_train``: then make_diamonds does not run either); ``n_folds`` overrides the folds."""
    final = final or (RUNS[1] if self_train else RUNS[0])
    train = {**TRAIN_FLAGS, **(QUICK_TRAIN_FLAGS if quick else {}), **({"n-folds": n_folds} if n_folds else {})}
    stages = [
        Stage("align", "align_faces.py", _flags(ALIGN_FLAGS)),
        Stage("train run1", "train_v42_diamond.py", _flags(dict(train, **{"out-dir": RUNS[0]}))),
    ]
    if self_train:
        stages.append(Stage("diamonds", "make_diamonds.py", _flags({"weights-dir": RUNS[0], **DIAMOND_FLAGS})))
    if final == RUNS[1]:
        stages.append(Stage("train run2", "train_v42_diamond.py", _flags(dict(train, **{"out-dir": RUNS[1]}))))
    return stages + [
        Stage("plots", "plot_training_curves.py", [final, *_flags({"out": f"{final}/plots"})]),
        Stage("safe inference", "safe_inference.py",
              _flags({"weights-dir": final, **SAFE_FLAGS, "out": f"{final}/submission_safe.csv"})),
    ]


def demo_folds(out: Path, quick: bool, log: RunLog) -> int | None:
    """None (the preset's folds), or fewer when the training identities — the label CSV's groups,
    which folds never split — cannot give every fold both classes (e.g. the three bundled photos
    offline leave two identities to train on)."""
    want = int(QUICK_TRAIN_FLAGS["n-folds"] if quick else PRESETS["demo"]["n_folds"])
    allowed = max(group_fold_limit(read_labels(demo.dataset_paths(out)["train_csv"])), 2)  # < 2: training says why
    if allowed >= want:
        return None
    log.info(f"NOTICE: the training identities fill only {allowed} folds with both classes (folds keep an identity "
             f"on one side): training with --n-folds {allowed} instead of {want}")
    return allowed


def detect_inputs(out: Path) -> list[str]:
    """A few test images for detect.py (the first fakes and reals by Id), relative to DIR."""
    labels = read_labels(demo.dataset_paths(out)["test_labels"])
    index = ImageIndex(out / TEST_IMAGES)
    picked = []
    for name, target in (("fake", 1), ("real", 0)):
        ids = [i for i in id_order(labels.Id[labels.target_feature == target].tolist()) if i in index]
        picked += ids[:DETECT_N_IMAGES[name]]
    return [os.path.relpath(index.path(i), out) for i in picked]


def write_clip(path: Path, images: Sequence[Path], side: int = 256, hold: int = 4, fps: int = 4) -> Path:
    """A short mpeg4 clip (PyAV): each image's centre square at ``side`` px for ``hold`` frames."""
    import av

    def write(tmp: str) -> None:
        with av.open(tmp, "w", format="mp4") as c:
            stream = c.add_stream("mpeg4", rate=fps)
            stream.width, stream.height, stream.pix_fmt = side, side, "yuv420p"
            for p in images:
                frame = av.VideoFrame.from_ndarray(square_resize(decode_image(p), side), format="rgb24")
                for _ in range(hold):
                    for pkt in stream.encode(frame):
                        c.mux(pkt)
            for pkt in stream.encode(None):
                c.mux(pkt)

    return atomic_write(path, write)


def detect_stage(inputs: Sequence[str], final: str) -> Stage:
    """detect.py on ``inputs`` and the clip with ``final``'s folds."""
    return Stage("detect", "detect.py", [*inputs, CLIP, *_flags({"weights-dir": final, **DETECT_FLAGS})])


def evaluate_stage(final: str) -> Stage:
    """evaluate.py on the demo's test photos with ``final``'s folds, reduced sweep, into final/evaluation."""
    return Stage("evaluate", "evaluate.py", [*_flags({"weights-dir": final, **EVAL_FLAGS, "out": f"{final}/evaluation"}),
                                             "--reduced"])


def demo_commands(repo: str | os.PathLike = REPO, python: str = sys.executable, quick: bool = False,
                  self_train: bool = SELF_TRAIN) -> list[list[str]]:
    """The exact argv of every stage, as the runner executes them with cwd=DIR."""
    return [s.argv(python, Path(repo)) for s in demo_stages(quick, self_train=self_train)]


def shown(argv: Sequence[str], cwd: Path) -> str:
    """The command as a user would type it in DIR: ``python <script relative to DIR> ...``."""
    script = os.path.relpath(argv[1], cwd)
    return shlex.join(["python", script, *argv[2:]])


def stage_env() -> dict[str, str]:
    """The stages' environment: idle OpenMP threads sleep instead of spinning (as ``make test``
    sets it), else on a busy 2-core machine every stage runs several times slower."""
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def run_stages(stages: Sequence[Stage], cwd: Path, log: RunLog, repo: Path = REPO,
               python: str = sys.executable) -> dict[str, float]:
    """Run each stage as a subprocess in ``cwd``, printing it first; stop at the first failure."""
    times: dict[str, float] = {}
    for st in stages:
        argv = st.argv(python, repo)
        if not Path(argv[1]).is_file():
            raise DemoRunError(f"stage {st.name!r}: {argv[1]} does not exist; run the demo from a full checkout")
        log.info(f"[{st.name}] (in {cwd}) $ {shown(argv, cwd)}")
        t0 = time.time()
        rc = subprocess.run(argv, cwd=cwd, env=stage_env()).returncode
        times[st.name] = round(time.time() - t0, 1)
        if rc != 0:
            raise DemoRunError(f"stage {st.name!r} failed with exit code {rc}: {shown(argv, cwd)} "
                               f"(in {cwd}); its output is above. Fix it, then re-run with --resume")
        log.info(f"[{st.name}] done in {times[st.name]:.1f} s")
    return times


def _read(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    if not path.is_file():
        raise DemoRunError(f"{path}: missing; the stage that writes it did not finish")
    df = pd.read_csv(path, dtype={"Id": str})
    lost = [c for c in columns if c not in df.columns]
    if lost:
        raise DemoRunError(f"{path}: no column(s) {lost}; found {list(df.columns)}")
    return df.set_index("Id")


def _aligned(df: pd.DataFrame, ids: pd.Index, col: str, path: Path) -> np.ndarray:
    missing = ids.difference(df.index)
    if len(missing):
        raise DemoRunError(f"{path}: {len(missing)} test Id(s) missing, e.g. {list(missing[:3])}")
    return df.loc[ids, col].to_numpy(dtype=float)


def score(out: str | os.PathLike, run: str = RUNS[1]) -> dict:
    """Score ``run``'s submission (hard labels) and probabilities against DIR/test_labels.csv."""
    out = Path(out)
    labels = read_labels(demo.dataset_paths(out)["test_labels"]).set_index("Id")
    ids, y = labels.index, labels["target_feature"].to_numpy(dtype=int)
    files = {"submission": out / run / "submission_v42.csv", "predictions": out / run / "predictions_v42.csv",
             "safe": out / run / "submission_safe.csv"}
    sub = _aligned(_read(files["submission"], ["target_feature"]), ids, "target_feature", files["submission"])
    prob = _aligned(_read(files["predictions"], ["prob"]), ids, "prob", files["predictions"])
    safe = _aligned(_read(files["safe"], ["target_feature"]), ids, "target_feature", files["safe"])
    f1, precision, recall = metrics.f1_precision_recall(y, sub.astype(int))
    conf = metrics.confusion(y, sub.astype(int))
    prevalence = float(y.mean())
    return {
        "n": int(len(y)), "n_fakes": int(y.sum()), "f1": f1, "precision": precision, "recall": recall,
        "roc_auc": metrics.roc_auc(y, prob), "ap": metrics.average_precision(y, prob),
        "missed_fakes": conf["fn"], **conf,
        # chance: a coin gives AUC 0.5; calling everything fake gives this F1
        "chance_f1": 2 * prevalence / (1 + prevalence),
        "safe_agreement": float(np.mean(sub.astype(int) == safe.astype(int))),
        "safe_f1": metrics.f1_precision_recall(y, safe.astype(int))[0],
        "files": {k: str(v) for k, v in files.items()},
    }


def count_diamonds(path: Path) -> int:
    """How many confident test rows (``is_pseudo`` true) make_diamonds added to ``path``."""
    try:
        return int(read_labels(path).is_pseudo.sum())
    except LabelCSVError as e:
        raise DemoRunError(f"{e}; make_diamonds.py should have written it") from None


def clean(out: Path) -> None:
    """Remove what an earlier demo run generated in ``out`` (and only that)."""
    for rel in GENERATED:
        p = out / rel
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def run_demo(out: str | os.PathLike = "demo_run", spec: demo.DemoSpec | None = None, quick: bool = False,
             resume: bool = False, photos_dir: str | os.PathLike | None = None, repo: str | os.PathLike = REPO,
             python: str = sys.executable, log: RunLog | None = None, cache: str | os.PathLike | None = None,
             self_train: bool = SELF_TRAIN) -> dict:
    """Build the demo set, run every stage, score the last run; returns the scores (also in demo_scores.json)."""
    out, repo = Path(out).resolve(), Path(repo).resolve()
    spec = spec or demo.DemoSpec(n_images=QUICK_N_IMAGES if quick else demo.DemoSpec().n_images)
    log = log or RunLog(*log_files(out, "demo"))
    t0 = time.time()
    spec_file = out / "demo_spec.json"
    if resume and spec_file.is_file():
        if json.loads(spec_file.read_text()) != asdict(spec):
            raise DemoRunError(f"--resume: {spec_file} was built with {spec_file.read_text()}, not {asdict(spec)}; "
                               "resuming would mix two demo sets. Run without --resume to start afresh")
        log.info(f"--resume: keeping the demo set and stage outputs in {out}")
    else:
        clean(out)
        demo.build_dataset(out, spec, photos_dir=photos_dir, log=log, cache=cache)
        atomic_write(spec_file, lambda tmp: Path(tmp).write_text(json.dumps(asdict(spec))))
    times = {"dataset": round(time.time() - t0, 1)}
    n_folds = demo_folds(out, quick, log)
    first = demo_stages(quick, self_train=self_train, n_folds=n_folds)[:3 if self_train else 2]  # align, run1(, diamonds)
    times.update(run_stages(first, out, log, repo, python))
    n_diamonds = count_diamonds(out / DIAMONDS) if self_train else 0
    final = RUNS[1] if n_diamonds else RUNS[0]
    if not self_train:
        log.info(f"self-training (make_diamonds.py → {RUNS[1]}) skipped: on the demo it costs as much as "
                 f"{RUNS[0]} and did not raise the test scores; --self-train runs it")
    elif n_diamonds:
        log.info(f"{n_diamonds} diamond(s) (confident test images) join the training rows for {RUNS[1]}")
    else:
        # run2 would train on exactly run1's rows with run1's seeds: minutes for the same folds.
        log.info(f"NOTICE: make_diamonds found no test image beyond its thresholds, so {DIAMONDS} holds the "
                 f"original rows only and {RUNS[1]} would repeat {RUNS[0]}: skipping it; plots, safe "
                 f"inference and the scores use {RUNS[0]}")
    times.update(run_stages(demo_stages(quick, final, self_train, n_folds)[len(first):], out, log, repo, python))
    inputs = detect_inputs(out)
    write_clip(out / CLIP, [out / p for p in inputs[::2]])
    times.update(run_stages([detect_stage(inputs, final), evaluate_stage(final)], out, log, repo, python))
    scores = score(out, final)
    scores["run"], scores["n_diamonds"], scores["self_train"] = final, n_diamonds, self_train
    scores["seconds"] = {**times, "total": round(time.time() - t0, 1)}
    atomic_write(out / "demo_scores.json", lambda tmp: Path(tmp).write_text(json.dumps(scores, indent=2)))
    log.record("demo_scores", **scores)
    log.info(f"demo test set ({scores['n']} images, {scores['n_fakes']} fakes): F1 {scores['f1']:.3f} "
             f"(chance {scores['chance_f1']:.3f}) | ROC-AUC {scores['roc_auc']:.3f} (chance 0.5) | "
             f"missed fakes {scores['missed_fakes']}/{scores['n_fakes']} | safe inference agrees on "
             f"{100 * scores['safe_agreement']:.1f}% of images (F1 {scores['safe_f1']:.3f})")
    log.info(f"detect.py's report on {len(inputs)} test images and a clip of {len(inputs[::2])} of them: "
             f"{out / DETECT_FLAGS['html']} (open it in a browser)")
    log.info(f"evaluate.py (metrics with intervals, calibration, robustness): {out / final / 'evaluation' / 'evaluation.md'}")
    log.info(f"submission: {scores['files']['submission']}  |  plots: {out / final / 'plots'}  |  "
             f"scores: {out / 'demo_scores.json'}  |  total {scores['seconds']['total']:.0f} s")
    log.info(f"try it in a browser: python serve.py --weights-dir {out / final}  → http://127.0.0.1:8000/ "
             "(drop a photo or a video; docs/serve.md)")
    return scores


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m titan.demo.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo_run", help="folder for the demo set and every stage's output (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK_N_IMAGES} images (unless --n-images), {QUICK_TRAIN_FLAGS}")
    parser.add_argument("--resume", action="store_true",
                        help="keep the demo set and stage outputs of an interrupted run; stages resume")
    parser.add_argument("--self-train", action="store_true",
                        help="also run make_diamonds.py and a second training run on the diamonds (run2); ~+3 CPU min")
    demo.add_spec_args(parser, f"images in all (default: {demo.DemoSpec().n_images}, {QUICK_N_IMAGES} with --quick)")
    parser.set_defaults(n_images=None)
    args = parser.parse_args(argv)
    if args.n_images is None:
        args.n_images = QUICK_N_IMAGES if args.quick else demo.DemoSpec().n_images
    try:
        run_demo(args.out, demo.spec_from_args(args), quick=args.quick, resume=args.resume, photos_dir=args.photos,
                 cache=args.cache, self_train=args.self_train)
    except DemoRunError as e:
        raise SystemExit(f"demo: {e}") from None


if __name__ == "__main__":
    main()
