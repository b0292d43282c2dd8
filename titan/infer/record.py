"""The preprocessing record: what a fold was trained on travels with its weights, and one resolver.

Like timm's ``pretrained_cfg``, every fold's meta holds a ``"preprocessing"`` dict (``Preprocessing``):

- ``arch``, ``input`` (what the backbone makes of the RGB: ``titan.models.frequency.INPUTS``),
  ``img_size`` and the input normalisation (``mean``/``std`` of the RGB channels; the
  model applies it itself, so it is recorded to be read, never a flag);
- the face crop the training faces were made with (``margin``, ``min_prob``, ``max_side``), as the
  faces folder's ``align_settings.json`` (``titan.data.align.SETTINGS_JSON``) says; faces without
  one (not made by align_faces.py) record no crop;
- ``tta``: the views the run's inference scores with (its ``--tta``), and ``oof_tta``: the views
  behind its out-of-fold scores, hence its threshold and calibration (validation scores one view);
- the calibration (``temperature``, ``band``): fitted on the OOF rows once every fold is done, so
  the fold set reads it from the run's ``metrics_{prefix}.json`` (``FoldSet.preprocessing``).

``resolve_preprocessing`` answers every consumer (training's inference, safe_inference.py,
make_diamonds.py, detect.py, evaluate.py) in one order: explicit flag → the folds' record → the
default, and logs where each value came from. A flag that contradicts what the folds recorded
for what the model *sees* (input size, crop) is refused naming both values unless forced
(``--force-preprocessing``; then applied and logged). The TTA views are a choice of how to
average, not what the model saw: a ``--tta`` simply overrides the record (logged). Folds from
before records were kept (V38, earlier v42) get the defaults below with ONE notice.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Mapping

from ..data.faces import DEFAULT_MARGIN, DEFAULT_MAX_SIDE, DEFAULT_MIN_PROB
from ..models.archs import input_normalisation
from .tta import DEFAULT_TTA, resolve_tta

log = logging.getLogger("titan")

DEFAULT_IMG_SIZE = 512
OOF_TTA = ("identity",)  # training's validation scores each face once
CROP = ("margin", "min_prob", "max_side")
SEEN = ("img_size", *CROP)  # what changes the pixels the model sees: a contradicting flag needs forcing
# Sentinel flag values meaning "not given: from the folds' record, else the default".
UNSET = {"img_size": 0, "margin": -1.0, "min_prob": -1.0, "max_side": 0, "tta": ""}
FORCE_FLAG = "--force-preprocessing"


class PreprocessingError(ValueError):
    """A flag contradicts the folds' record (and was not forced); the message names both values."""


@dataclass(frozen=True)
class Preprocessing:
    """One fold set's preprocessing; ``recorded`` names the fields its folds recorded (the rest
    are defaults), ``sources`` (after ``resolve_preprocessing``) where each value came from."""

    arch: str = ""
    input: str = ""  # "" = the architecture's own (folds from before --input)
    img_size: int = DEFAULT_IMG_SIZE
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    margin: float = DEFAULT_MARGIN
    min_prob: float = DEFAULT_MIN_PROB
    max_side: int = DEFAULT_MAX_SIDE
    tta: tuple[str, ...] = tuple(resolve_tta(DEFAULT_TTA))
    oof_tta: tuple[str, ...] = OOF_TTA
    temperature: float | None = None
    band: float | None = None
    recorded: frozenset[str] = frozenset()
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    @classmethod
    def for_training(cls, arch: str, img_size: int, tta: str, crop: Mapping[str, Any] | None,
                     input: str = "", oof_tta: tuple[str, ...] | None = None) -> "Preprocessing":
        """What a fold trained now records: ``crop`` is its faces' align_settings.json (None: not made
        by align_faces.py, so no crop is recorded); ``oof_tta`` the views behind its OOF scores (default one)."""
        mean, std = input_normalisation(arch)
        values = dict(arch=arch, input=input, img_size=int(img_size), mean=mean, std=std, tta=tuple(resolve_tta(tta)),
                      oof_tta=tuple(oof_tta or OOF_TTA))
        for k in CROP if crop else ():
            if crop.get(k) is not None:
                values[k] = type(getattr(cls, k))(crop[k])
        return cls(**values, recorded=frozenset(values))

    def to_dict(self) -> dict[str, Any]:
        """The recorded fields as plain types (``weights_only`` loads them)."""
        out = {}
        for k in sorted(self.recorded):
            v = getattr(self, k)
            out[k] = list(v) if isinstance(v, tuple) else v
        return out

    def as_record(self) -> dict[str, Any]:
        """Every value (recorded or default) as plain types, with ``recorded`` and where each came
        from (``sources``): what a consumer applies, as serve's /v1/model and export's sidecar give it."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name not in ("recorded", "sources"):
                v = getattr(self, f.name)
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return {**out, "recorded": sorted(self.recorded), "sources": dict(self.sources)}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> "Preprocessing":
        """A fold's record from its meta: the ``"preprocessing"`` dict, else (older folds) the
        ``arch`` / ``img_size`` they stored beside their weights, everything else the defaults."""
        rec = meta.get("preprocessing")
        values: dict[str, Any] = {}
        if isinstance(rec, Mapping):
            for f in fields(cls):
                if f.name in rec and f.name not in ("recorded", "sources"):
                    v = rec[f.name]
                    values[f.name] = tuple(v) if isinstance(v, (list, tuple)) else v
        else:
            size = meta.get("img_size")
            if isinstance(size, (int, float)) and not isinstance(size, bool) and size > 0:
                values["img_size"] = int(size)
        arch = values.get("arch") or meta.get("arch") or ""
        if "input" not in values and isinstance(meta.get("input"), str):
            values["input"] = meta["input"]
        if arch and "mean" not in values:
            values["mean"], values["std"] = input_normalisation(arch)
        recorded = frozenset(values)
        return cls(**{**values, "arch": arch}, recorded=recorded)

    @property
    def legacy(self) -> bool:
        """Folds from before records were kept: no crop, no TTA recorded."""
        return "tta" not in self.recorded

    def describe(self) -> str:
        def src(k: str) -> str:
            return f" ({self.sources[k]})" if k in self.sources else ""
        return (f"input {self.img_size} px{src('img_size')}{' ' + self.input if self.input else ''}, normalisation mean {list(self.mean)} std {list(self.std)}, "
                f"crop margin {self.margin:g}{src('margin')} min_prob {self.min_prob:g}{src('min_prob')} "
                f"max_side {self.max_side}{src('max_side')}, TTA {','.join(self.tta)}{src('tta')} "
                f"(OOF and threshold: {','.join(self.oof_tta)})")


def _given(name: str, value: Any) -> bool:
    return value is not None and value != UNSET[name] and not (isinstance(value, (int, float)) and value < 0)


def resolve_preprocessing(record: Preprocessing, *, img_size: int = 0, margin: float = -1.0, min_prob: float = -1.0,
                          max_side: int = 0, tta: str | None = "", force: bool = False,
                          say: Callable[[str], None] = log.info, where: str = "the folds") -> Preprocessing:
    """Each value: the explicit flag (not its sentinel: 0, -1 or "") → the folds' record → the
    default. A flag contradicting a recorded input size or crop raises ``PreprocessingError``
    naming both values, unless ``force`` (then it is applied, with a WARNING through ``say``).
    Logs one line saying where every value came from (and one NOTICE for folds without a record)."""
    flags = {"img_size": img_size, "margin": margin, "min_prob": min_prob, "max_side": max_side, "tta": tta}
    values, sources, clashes = {}, {}, []
    for name, flag in flags.items():
        own = getattr(record, name)
        if not _given(name, flag):
            sources[name] = "the folds' record" if name in record.recorded else "default"
            continue
        value = tuple(resolve_tta(flag)) if name == "tta" else type(own)(flag)
        values[name] = value
        if name in SEEN and name in record.recorded and value != own:
            clashes.append((name, value, own))
            sources[name] = f"{FORCE_FLAG}; the folds recorded {own}"
        else:
            sources[name] = "flag"
    if clashes and not force:
        what = "; ".join(f"--{n.replace('_', '-')} {v} was given but {where} were trained with {n} {o}" for n, v, o in clashes)
        raise PreprocessingError(f"{what}. Drop the flag to use the folds' value, or add {FORCE_FLAG} to apply it anyway")
    for n, v, o in clashes:
        say(f"WARNING: {FORCE_FLAG}: {n} {v} instead of the {o} {where} were trained with")
    if record.legacy:
        defaulted = [n for n in flags if sources[n] == "default"]
        if defaulted:
            say(f"NOTICE: {where} record no preprocessing (saved before records were kept): the defaults for "
                + ", ".join(f"{n} {getattr(record, n) if n != 'tta' else ','.join(record.tta)}" for n in defaulted))
    out = replace(record, **values, sources=sources)
    say(f"preprocessing: {out.describe()}")
    return out
