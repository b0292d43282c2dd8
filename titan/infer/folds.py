"""A fold set: the one owner of fold files and of what a set of folds decides.

Training's inference stage, make_diamonds.py, safe_inference.py, Grad-CAM, the plots and the
report all ask here. The rules (also in docs/folds.md):

- **Files**: ``{prefix}_{backbone,head,meta}_fold{k}.pth`` in one folder (``titan.runfiles``),
  or a backbone glob paired with a head glob. Each fold is read once; its metadata is the
  backbone checkpoint's embedded ``meta`` overlaid by the meta file.
- **Architecture, variant, head**: recorded in the metadata, else read off the weights (a
  ConvNeXt V2 variant by its depths and widths, a head by its keys). Every fold must agree;
  folds that do not are an error naming each file.
- **Input** (what the backbone makes of the RGB: ``titan.models.frequency.INPUTS``): the fold's
  recorded ``input``, else (folds from before ``--input``) the architecture's own.
- **Preprocessing** (``preprocessing``, ``resolve``): each fold's record (``titan.infer.record``:
  input size, normalisation, crop, TTA, calibration); every fold that records a value must agree
  (else an error naming the files). ``resolve`` is the one place a consumer's flags meet the record:
  flag → record → default, a contradicting input size or crop refused unless forced
  (``--force-preprocessing``, alias ``--force-img-size``), each value's source logged.
- **Input size**: the folds' recorded ``img_size``; none recorded → 512, said so.
- **Decision threshold** (``decision_threshold``): the out-of-fold best-F1 threshold recorded in
  ``metrics_{prefix}.json`` (or the log's ``oof`` record), else the mean of the thresholds the
  folds record (folds without one are left out), else the best-F1 threshold of the OOF
  predictions ``oof_{prefix}.csv``, else 0.5.
- **Calibration** (``calibration``): the temperature and uncertain band training stored beside the
  OOF metrics (``metrics_{prefix}.json``, ``"calibration"``; ``titan.infer.calibration``); a run
  from before that has temperature 1 (said so) and the band of its OOF predictions, else the
  default band.
"""
from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from ..data.fingerprint import digest_lines, file_version
from ..checkpoints import CheckpointError, file_sha256, load_file, load_into, unwrap_state_dict
from .calibration import DEFAULT_BAND, Calibration, choose_band, logit_of
from .record import DEFAULT_IMG_SIZE, SEEN, Preprocessing, PreprocessingError, resolve_preprocessing
from ..metrics import best_f1_threshold
from ..models.archs import arch_input, build_arch_backbone, parse_arch
from ..models.classifier import FoldModel
from ..models.convnextv2 import variant_of
from ..models.heads import build_head, head_of
from ..runfiles import DEFAULT_PREFIX, ENSEMBLE_JSON, RunFiles, fold_number

log = logging.getLogger("titan")


class FoldSetError(CheckpointError):
    """The fold files do not make one usable set; the message names the files and the fix."""


@dataclass(frozen=True)
class FoldFiles:
    """The files of one fold; ``head`` is None when the backbone has no partner head file."""

    backbone: Path
    head: Path | None
    meta: Path | None = None

    @property
    def name(self) -> str:
        k = fold_number(self.backbone)
        return f"fold{k}" if k is not None else self.backbone.stem


def find_fold_files(folder: str | os.PathLike, prefix: str = DEFAULT_PREFIX) -> list[FoldFiles]:
    """Every ``{prefix}_backbone_fold{k}.pth`` in ``folder`` (ascending k), with its head and meta
    when present; a backbone without a head is kept (head None) so callers can name it."""
    files = RunFiles(Path(folder), prefix)
    out = []
    for k in files.fold_numbers():
        head, meta = files.fold("head", k), files.fold("meta", k)
        out.append(FoldFiles(files.fold("backbone", k), head if head.is_file() else None, meta if meta.is_file() else None))
    return out


def pair_globs(backbones: str, heads: str) -> list[FoldFiles]:
    """Pair backbone and head files matched by two globs: by fold number in the names when every
    file has one, else in sorted order. A meta file ``*meta*`` beside a backbone is picked up."""
    bs = sorted(Path(p) for p in glob.glob(backbones))
    hs = sorted(Path(p) for p in glob.glob(heads))
    if all(fold_number(p) is not None for p in bs + hs):
        by_k = {fold_number(h): h for h in hs}
        pairs = [(b, by_k.get(fold_number(b))) for b in bs]
    else:
        pairs = [(b, hs[i] if i < len(hs) else None) for i, b in enumerate(bs)]
    out = []
    for b, h in pairs:
        meta = b.with_name(b.name.replace("backbone", "meta"))
        out.append(FoldFiles(b, h, meta if meta != b and meta.is_file() else None))
    return out


@dataclass
class Fold:
    name: str
    model: FoldModel
    files: FoldFiles
    threshold: float | None = None
    meta: dict = field(default_factory=dict)  # plain values; always has arch, variant, head
    notes: list[str] = field(default_factory=list)  # what was given up while loading it
    record: Preprocessing = field(default_factory=Preprocessing)  # what it was trained on (titan.infer.record)


def _plain(meta: dict) -> dict:
    """Plain values only (numpy scalars of the original's meta files become floats)."""
    out = {}
    for k, v in meta.items():
        if isinstance(v, (int, float, str, bool)):
            out[k] = v
        elif isinstance(v, np.floating):
            out[k] = float(v)
    return out


def load_fold(files: FoldFiles, variant: str | None = None, head: str | None = None, arch: str | None = None) -> Fold:
    """Build one fold model from its files; arch, variant and head come from the files unless given."""
    if files.head is None:
        raise CheckpointError(f"no matching head file (expected {files.backbone.name.replace('backbone', 'head')})")
    bobj = load_file(files.backbone)
    bsd = unwrap_state_dict(bobj, str(files.backbone))
    hsd = unwrap_state_dict(load_file(files.head), str(files.head))
    meta = dict(bobj["meta"]) if isinstance(bobj, dict) and isinstance(bobj.get("meta"), dict) else {}
    if meta.get("backbone_base"):  # a difference from the run's shared frozen start (titan.train.tune)
        bsd = {**unwrap_state_dict(load_file(backbone_base(files.backbone, meta)), "backbone base"), **bsd}
    notes = []
    if files.meta is not None and files.meta.is_file():
        try:
            obj = load_file(files.meta, numpy_scalars=True)
            meta.update(obj if isinstance(obj, dict) else {})
        except CheckpointError as e:  # a refused meta file costs its threshold, never the fold
            notes.append(f"{files.name}: meta file ignored, no threshold of its own ({e})")
            log.warning("%s", notes[-1])
    arch = arch or meta.get("arch") or ""
    head = head or head_of(hsd)
    inp = meta.get("input") or "default"  # the input it was trained on; none recorded: the arch's own
    if arch and not parse_arch(arch).variant:  # a baseline: its layout is named, not inferred
        # EfficientNet-Lite0's TF padding is built for the size it was trained at
        size = int(meta.get("img_size") or DEFAULT_IMG_SIZE)
        backbone, variant = load_into(build_arch_backbone(arch, img_size=size, input_choice=inp), bsd), ""
    else:
        variant = variant or variant_of(bsd)  # the weights decide, not a name
        arch = f"titan-{variant}"
        backbone = load_into(build_arch_backbone(arch, input_choice=inp), bsd)
    head_mod = load_into(build_head(head, backbone.num_features), hsd)
    th = meta.get("th", meta.get("threshold"))
    return Fold(files.name, FoldModel(backbone, head_mod).eval(), files, float(th) if th is not None else None,
                 {**_plain(meta), "arch": arch, "variant": variant, "head": head,
                  "input": arch_input(parse_arch(arch), inp)}, notes,
                 Preprocessing.from_meta({**meta, "arch": arch}))


def backbone_base(backbone: Path, meta: dict) -> Path:
    """The shared base file a fold's backbone file names (``backbone_base``), beside it, with the sha256 it
    recorded checked: a missing, moved or rewritten base is an error naming both files."""
    name = str(meta["backbone_base"])
    if Path(name).name != name or name in (".", ".."):
        raise CheckpointError(f"{backbone}: backbone_base {name!r} is not a file name beside it")
    path = backbone.with_name(name)
    if not path.is_file():
        raise CheckpointError(f"{backbone} holds only its differences from {name}, which is not beside it: "
                              f"copy {name} from the run folder with the fold files")
    want = meta.get("backbone_base_sha256")
    if want != file_sha256(path):
        raise CheckpointError(f"{path} is not the shared backbone {backbone.name} was trained on (sha256 differs from the "
                              "one it recorded): the base was rewritten by another run; retrain, or restore the base")
    return path


def decision_threshold(recorded_oof: float | None = None, fold_thresholds: Sequence[float | None] = (),
                       oof: Callable[[], tuple[np.ndarray, np.ndarray] | None] = lambda: None,
                       where: str = "") -> tuple[float, str]:
    """The one threshold rule → (threshold, where it came from); see the module docstring.
    ``oof`` is asked only when nothing was recorded (it may read a file)."""
    if isinstance(recorded_oof, (int, float)) and not isinstance(recorded_oof, bool) and np.isfinite(recorded_oof):
        return float(recorded_oof), f"out-of-fold best F1{' from ' + where if where else ''}"
    ths = [float(t) for t in fold_thresholds if isinstance(t, (int, float)) and np.isfinite(t)]
    if ths:
        return float(np.mean(ths)), f"mean of {len(ths)} fold threshold(s)"
    pairs = oof()
    if pairs is not None and len(pairs[0]):
        th, _ = best_f1_threshold(*pairs)
        return float(th), "best F1 of the out-of-fold predictions"
    return 0.5, "0.5: no threshold recorded"


def _metrics(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text())
        if not isinstance(obj, dict) or not isinstance(obj.get("oof", {}), dict):
            raise ValueError("not a JSON object with an 'oof' object")
        return obj
    except (OSError, ValueError) as e:
        raise FoldSetError(f"{path}: unreadable metrics file ({e}); fix or delete it") from None


def _read_metrics(path: Path) -> float | None:
    th = _metrics(path).get("oof", {}).get("threshold")
    return float(th) if isinstance(th, (int, float)) else None


def _finite_number(v, lo: float, hi: float) -> float | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and lo < v <= hi
    return float(v) if ok else None


def _read_oof(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        df = pd.read_csv(path).dropna(subset=["target_feature", "prob"])
        return df.target_feature.to_numpy(int), df.prob.to_numpy(float)
    except (OSError, ValueError, KeyError) as e:
        raise FoldSetError(f"{path}: unreadable OOF file ({e}); fix or delete it") from None


@dataclass
class FoldSet:
    """Loaded folds and what they agree on. Build with ``FoldSet.load`` or ``FoldSet.from_folder``."""

    folds: list[Fold]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason) of folds left out
    run: RunFiles | None = None  # where the set's metrics / OOF files are, when it came from a run folder

    @classmethod
    def load(cls, files: Sequence[FoldFiles], strict: bool = True, variant: str | None = None, head: str | None = None,
             run: RunFiles | None = None) -> "FoldSet":
        """Load every fold once. ``strict`` raises on the first fold that does not load; otherwise it is
        skipped and named in ``skipped``. Folds that disagree (arch, input size) are always an error."""
        folds, skipped = [], []
        for f in files:
            try:
                folds.append(load_fold(f, variant=variant or None, head=head or None))
            except Exception as e:  # noqa: BLE001 — any failure to build a fold is reported the same way
                names = " + ".join(str(p) for p in (f.backbone, f.head) if p is not None)
                reason = f"{f.name} ({names}): " + (str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}")
                if strict:
                    raise CheckpointError(reason) from e
                skipped.append((f.name, reason))
        fs = cls(folds, skipped, run)
        fs._check_agreement()
        return fs

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, prefix: str = DEFAULT_PREFIX, strict: bool = True,
                    variant: str | None = None, head: str | None = None, n_folds: int | None = None) -> "FoldSet":
        """The folds of a run folder; ``n_folds`` keeps folds 0..n_folds-1 (extra files are skipped, named)."""
        files = find_fold_files(folder, prefix)
        extra = [f for f in files if n_folds is not None and (fold_number(f.backbone) or 0) >= n_folds]
        files = [f for f in files if f not in extra]
        if not files:
            rf = RunFiles(Path(folder), prefix)
            if (Path(folder) / ENSEMBLE_JSON).is_file():
                raise FoldSetError(f"{folder} holds an ensemble of runs ({ENSEMBLE_JSON}), not one run's folds: detect.py, "
                                   "evaluate.py, serve.py and safe_inference.py score ensembles; for this command "
                                   "name one member run's folder")
            raise FoldSetError(f"no {rf.fold_glob()} with its {rf.fold_glob('head')} in {folder}")
        fs = cls.load(files, strict, variant, head, RunFiles(Path(folder), prefix))
        fs.skipped += [(f.name, f"{f.backbone}: beyond n_folds={n_folds}") for f in extra]
        return fs

    def _agreed(self, key: str, describe: Callable[[Fold], object]) -> None:
        values = {}
        for f in self.folds:
            values.setdefault(describe(f), []).append(f)
        if len(values) > 1:
            parts = "; ".join(f"{v}: {', '.join(str(f.files.backbone) for f in fs)}" for v, fs in values.items())
            raise FoldSetError(f"the folds disagree on {key} ({parts}); one ensemble needs one {key} — "
                               "move the odd folds to another folder")

    def _check_agreement(self) -> None:
        self._agreed("architecture", lambda f: f.meta["arch"])
        recorded = FoldSet([f for f in self.folds if _size(f) is not None])
        recorded._agreed("input size", lambda f: f"{_size(f)} px")
        for key in SEEN[1:] + ("tta",):
            FoldSet([f for f in self.folds if key in f.record.recorded])._agreed(key, lambda f: getattr(f.record, key))

    # --- what the set decides -------------------------------------------------------------------

    @property
    def notes(self) -> list[str]:
        """What was given up while loading (e.g. a refused meta file's threshold)."""
        return [n for f in self.folds for n in f.notes]

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.folds]

    def digest(self) -> str:
        """A short digest of the files the loaded folds came from (name, size, modification time) and
        of the run's metrics file: work scored with this set is reused only while it matches."""
        bases = sorted({f.files.backbone.with_name(f.meta["backbone_base"]) for f in self.folds if f.meta.get("backbone_base")})
        return self.files_digest([f.files for f in self.folds], self.run, bases)

    @staticmethod
    def files_digest(files: Sequence[FoldFiles], run: RunFiles | None = None, extra: Sequence[Path] = ()) -> str:
        """``digest()`` of a set made of ``files`` (and ``run``'s metrics file; ``extra``: the shared
        base backbone a probe's folds name), without loading them."""
        paths = [p for f in files for p in (f.backbone, f.head, f.meta) if p is not None] + list(extra)
        if run is not None and run.metrics_json.is_file():
            paths.append(run.metrics_json)
        return digest_lines(file_version(p) for p in paths)

    @classmethod
    def folder_digest(cls, folder: str | os.PathLike, prefix: str = DEFAULT_PREFIX) -> str:
        """``digest()`` of ``from_folder(folder, prefix)`` when every fold loads (backbones without a
        head are not folds), without loading any weights."""
        files = [f for f in find_fold_files(folder, prefix) if f.head is not None]
        return cls.files_digest(files, RunFiles(Path(folder), prefix))

    @property
    def models(self) -> list[FoldModel]:
        return [f.model for f in self.folds]

    def _one(self, key: str) -> str:
        return self.folds[0].meta[key] if self.folds else ""

    @property
    def arch(self) -> str:
        return self._one("arch")

    @property
    def variant(self) -> str:
        return self._one("variant")

    @property
    def head(self) -> str:
        return ",".join(sorted({f.meta["head"] for f in self.folds}))

    @property
    def img_size(self) -> tuple[int, str]:
        """(input size, where it came from)."""
        sizes = [s for f in self.folds if (s := _size(f)) is not None]
        if not sizes:
            return DEFAULT_IMG_SIZE, f"{DEFAULT_IMG_SIZE} (no img_size in the folds' metadata)"
        return sizes[0], f"{sizes[0]} (the folds' metadata)"

    @property
    def preprocessing(self) -> Preprocessing:
        """The set's record (the folds agree on what they record, ``_check_agreement``): its input
        size by the rule above, and the calibration the run fitted on its OOF rows, when stored."""
        base = next((f.record for f in self.folds if not f.record.legacy), self.folds[0].record if self.folds else Preprocessing())
        size = self.img_size[0]
        recorded = set(base.recorded) | ({"img_size"} if any(_size(f) is not None for f in self.folds) else set())
        cal = _metrics(self.run.metrics_json).get("calibration", {}) if self.run is not None else {}
        cal = cal if isinstance(cal, dict) else {}
        t, band = _finite_number(cal.get("temperature"), 0.0, 1e6), _finite_number(cal.get("uncertain_band"), 0.0, 0.5)
        recorded |= {k for k, v in (("temperature", t), ("band", band)) if v is not None}
        return replace(base, arch=self.arch or base.arch, img_size=size, temperature=t, band=band,
                       recorded=frozenset(recorded))

    def resolve(self, *, img_size: int = 0, margin: float = -1.0, min_prob: float = -1.0, max_side: int = 0,
                tta: str | None = "", force: bool = False, say: Callable[[str], None] = log.info) -> Preprocessing:
        """The preprocessing to score this set with (``titan.infer.record.resolve_preprocessing``):
        each flag (its sentinel: not given) → the folds' record → the default; a flag contradicting
        the recorded input size or crop is a ``FoldSetError`` naming both values and the folds' files."""
        try:
            return resolve_preprocessing(self.preprocessing, img_size=img_size, margin=margin, min_prob=min_prob,
                                         max_side=max_side, tta=tta, force=force, say=say,
                                         where=f"the folds ({', '.join(str(f.files.backbone) for f in self.folds)})")
        except PreprocessingError as e:
            raise FoldSetError(str(e)) from None

    def input_size(self, explicit: int = 0, force: bool = False, say: Callable[[str], None] = lambda s: None) -> int:
        """The input size alone (Grad-CAM's question): ``resolve`` with only a size."""
        return self.resolve(img_size=explicit, force=force, say=say).img_size

    def threshold(self, used: Sequence[str] | None = None) -> tuple[float, str]:
        """The decision threshold → (value, where it came from); ``used`` names the folds that voted
        (their own thresholds are the rule's third source)."""
        folds = [f for f in self.folds if used is None or f.name in used]
        if self.run is None:
            return decision_threshold(None, [f.threshold for f in folds])
        return decision_threshold(_read_metrics(self.run.metrics_json), [f.threshold for f in folds],
                                  lambda: _read_oof(self.run.oof_csv), self.run.metrics_json.name)

    def calibration(self, threshold: tuple[float, str] | None = None, say: Callable[[str], None] = log.warning) -> Calibration:
        """The temperature and uncertain band stored with the OOF metrics, around ``threshold``
        (default: ``self.threshold()``). A run without them: temperature 1 (said through ``say``)."""
        th, th_note = threshold or self.threshold()
        cal = _metrics(self.run.metrics_json).get("calibration", {}) if self.run is not None else {}
        cal = cal if isinstance(cal, dict) else {}
        t, band = _finite_number(cal.get("temperature"), 0.0, 1e6), _finite_number(cal.get("uncertain_band"), 0.0, 0.5)
        where = self.run.metrics_json.name if self.run is not None else "no run folder"
        notes = []
        if t is None:
            t = 1.0
            missing = self.run is None or not self.run.metrics_json.is_file()
            notes.append(f"no temperature recorded ({'no ' + where if missing else where + ' is from before calibration'}): "
                         "temperature 1")
            say(f"NOTICE: {notes[-1]}")
        if band is None:
            oof = _read_oof(self.run.oof_csv) if self.run is not None else None
            if oof is not None and len(oof[0]):
                band = choose_band(logit_of(oof[1]), t, th)
                notes.append(f"uncertain band from {self.run.oof_csv.name}")
            else:
                band = DEFAULT_BAND
                notes.append(f"no out-of-fold data: default uncertain band ±{DEFAULT_BAND}")
        note = f"temperature {t:.3f}, band ±{band:.3f}, threshold {th:.3f} ({th_note})" + (
            f"; {'; '.join(notes)}" if notes else f" (from {where})")
        return Calibration(t, band, th, note)

    def describe(self) -> str:
        size, _ = self.img_size
        return (f"{len(self.folds)} fold(s) [{', '.join(self.names)}] of {self.arch}/{self.head} at {size} px"
                + (f"; left out: {', '.join(n for n, _ in self.skipped)}" if self.skipped else ""))


def _size(f: Fold) -> int | None:
    s = f.meta.get("img_size")
    return int(s) if isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 else None


# --- an ensemble of runs (ensemble.py fits it: titan.infer.ensemble; here, with FoldSet, is what it decides) ------------

def is_ensemble(folder: str | os.PathLike) -> bool:
    """A folder whose ``ensemble.json`` names member runs (``python ensemble.py``)."""
    return (Path(folder) / ENSEMBLE_JSON).is_file()


@dataclass
class EnsembleSet:
    """Member fold sets and the ensemble's calibration, with what scorers ask of a ``FoldSet``."""

    members: list[FoldSet]
    labels: list[str]  # each member's folder, as ensemble.json names it
    folder: Path
    spec: dict = field(default_factory=dict)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, strict: bool = True) -> "EnsembleSet":
        folder = Path(folder)
        path = folder / ENSEMBLE_JSON
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
            entries = spec["members"]
            assert isinstance(entries, list) and entries and all("folder" in e for e in entries)
        except (OSError, ValueError, KeyError, AssertionError) as e:
            raise FoldSetError(f"{path}: not an ensemble file ({type(e).__name__}: {e}); refit it with "
                               "python ensemble.py RUN RUN... --out " + str(folder)) from None
        members, labels = [], []
        for e in entries:
            where = (folder / e["folder"]) if not Path(e["folder"]).is_absolute() else Path(e["folder"])
            fs = FoldSet.from_folder(where, e.get("prefix") or DEFAULT_PREFIX, strict=strict)
            if not fs.folds:
                raise FoldSetError(f"ensemble member {where}: no fold loads ({'; '.join(w for _, w in fs.skipped)})")
            if not fs.skipped and fs.digest() != e.get("digest"):
                raise FoldSetError(f"ensemble member {where} changed since {path} was fitted (its fold files or metrics "
                                   "differ from the recorded digest): its threshold and calibration no longer hold; refit: "
                                   f"python ensemble.py {' '.join(str(folder / x['folder']) for x in entries)} "
                                   f"--out {folder}")
            members.append(fs)
            labels.append(str(e["folder"]))
        return cls(members, labels, folder, spec)

    # --- what a FoldSet answers, for the ensemble ---

    @property
    def folds(self) -> list[Fold]:
        return [f for m in self.members for f in m.folds]

    @property
    def names(self) -> list[str]:
        return [f"{label}/{n}" for label, m in zip(self.labels, self.members) for n in m.names]

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return [(f"{label}/{n}", why) for label, m in zip(self.labels, self.members) for n, why in m.skipped]

    @property
    def notes(self) -> list[str]:
        return [n for m in self.members for n in m.notes]

    @property
    def arch(self) -> str:
        return "+".join(m.arch for m in self.members)

    @property
    def variant(self) -> str:
        return "+".join(m.variant for m in self.members)

    @property
    def head(self) -> str:
        return "+".join(m.head for m in self.members)

    def digest(self) -> str:
        return digest_lines([file_version(self.folder / ENSEMBLE_JSON)] + [m.digest() for m in self.members])

    def resolve(self, say: Callable[[str], None] = log.info, **flags) -> list[Preprocessing]:
        """Each member's preprocessing by its own record (``FoldSet.resolve``) and the same flags."""
        return [m.resolve(say=lambda s, lb=label: say(f"{lb}: {s}"), **flags) for label, m in zip(self.labels, self.members)]

    def threshold(self, used: Sequence[str] | None = None) -> tuple[float, str]:
        """The threshold fitted on the members' combined OOF logits (the rule's first source); the members'
        own thresholds are not the ensemble's, so a file without one is an error, not a fallback."""
        th, note = decision_threshold(self.spec.get("oof", {}).get("threshold"), where=f"the members' combined OOF ({ENSEMBLE_JSON})")
        if not note.startswith("out-of-fold"):
            raise FoldSetError(f"{self.folder / ENSEMBLE_JSON}: no fitted threshold; refit the ensemble")
        return th, note

    def calibration(self, threshold: tuple[float, str] | None = None, say: Callable[[str], None] = log.warning) -> Calibration:
        th, note = threshold or self.threshold()
        cal = self.spec.get("calibration", {})
        t, band = _finite_number(cal.get("temperature"), 0.0, 1e6), _finite_number(cal.get("uncertain_band"), 0.0, 0.5)
        if t is None or band is None:
            raise FoldSetError(f"{self.folder / ENSEMBLE_JSON}: no fitted temperature and band; refit the ensemble")
        return Calibration(t, band, th, f"temperature {t:.3f}, band ±{band:.3f}, threshold {th:.3f} ({note})")

    def describe(self) -> str:
        return f"ensemble of {len(self.members)} runs: " + "; ".join(
            f"{label}: {m.describe()}" for label, m in zip(self.labels, self.members))


def load_scoring_set(folder: str | os.PathLike, prefix: str = DEFAULT_PREFIX, strict: bool = True) -> "FoldSet | EnsembleSet":
    """What a scorer scores with: the ensemble a folder's ensemble.json describes, else the folder's folds."""
    if is_ensemble(folder):
        return EnsembleSet.from_folder(folder, strict)
    return FoldSet.from_folder(folder, prefix, strict=strict)


def members_of(s: "FoldSet | EnsembleSet") -> list[FoldSet]:
    """The fold sets a scoring set is made of: an ensemble's members, or the one run."""
    return s.members if isinstance(s, EnsembleSet) else [s]
