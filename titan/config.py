"""Typed configs with the README defaults, named presets, strict overrides, and the one CLI convention.

One source of truth: every script's flags come from a dataclass of its own through
``add_config_args`` (type, default and help in one place: a field's ``option(...)`` metadata),
unknown or mistyped values are errors, and ``asdict`` gives plain types for checkpoints.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Sequence, get_args, get_origin, get_type_hints

from .runfiles import DIAMOND_CSV, FACES_DIR, TEST_IMAGES, TRAIN_CSV


@dataclass
class TrainConfig:
    # data (README layout)
    faces_dir: str = FACES_DIR
    train_csv: str = DIAMOND_CSV
    fallback_csv: str = TRAIN_CSV
    out_dir: str = "."
    skip_missing: bool = False
    # model. ``arch`` picks the architecture (titan.archs): "" follows ``variant`` (= titan-<variant>,
    # so --variant and the presets keep working); a titan-<variant> name sets the variant itself.
    arch: str = ""
    variant: str = "v42"
    head: str = "linear"
    img_size: int = 512
    dropout: float = 0.25
    drop_path: float = 0.0
    stem: str = "standard"  # standard (ConvNeXt V2) | highpass: stem filters kept zero-sum (TitanNet; from scratch on small data)
    # what the CNN sees (titan.models.frequency.INPUTS; TitanNet and EfficientNet-Lite0): default = the arch's own
    # (TitanNet rgb+fft+srm, Lite0 rgb); npr = the 2×2 nearest-resampling residual (Tan et al., CVPR'24); rgb+npr = 6 channels
    input: str = field(default="default", metadata={
        "choices": ("default", "rgb", "rgb+fft+srm", "npr", "rgb+npr"),
        "help": "the backbone's input (TitanNet, EfficientNet-Lite0; recorded with each fold): default = the arch's own"})
    # schedule
    # "auto" sets auto_batch: the largest batch that fits (halving from batch × accum on OOM), accum raised to keep the product
    batch_size: int = field(default=8, metadata={"auto": "auto_batch"})
    accum_steps: int = 4
    num_workers: int = 4
    seed: int = 3407
    fold_seed: int = 3407
    # SimMIM
    ssl_epochs: int = 50
    ssl_lr: float = 5e-4
    ssl_weight_decay: float = 0.05
    ssl_warmup_epochs: int = 5
    mask_patch: int = 32
    mask_ratio: float = 0.4
    # fine-tuning
    n_folds: int = 5
    ft_epochs: int = 10
    ft_lr: float = 3e-4
    ft_weight_decay: float = 0.05
    ft_warmup_epochs: int = 1
    label_smoothing: float = 0.1
    imbalance: str = "pos_weight"  # pos_weight | sampler | none
    # inference
    tta: str = "identity,hflip,rot+5,rot-5"
    infer_batch_size: int = 32
    # speed
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    gpu_decode: bool = False
    max_bad_steps: int = 5
    # training details (added with the training pipeline)
    jpeg_p: float = 0.3            # share of fine-tuning images re-compressed as JPEG
    blur_p: float = 0.15           # share of fine-tuning images Gaussian-blurred
    min_lr_ratio: float = 0.01     # cosine floor as a fraction of the base LR
    ckpt_dir: str = "checkpoints_v42"  # resumable training states, under out_dir
    keep_checkpoints: int = 2      # newest epoch states kept per stage/fold
    threads: int = 0               # CPU intra-op threads (0 = torch's default)
    init_weights: str = ""         # local ImageNet checkpoint for the baselines ("" = scratch); for titan archs, used in place of the SSL weights
    # --stages infer: apply img_size (and the test crops' settings) even where the folds recorded others
    force_preprocessing: bool = field(default=False, metadata={"aliases": ("--force-img-size",)})
    raw_test_dir: str = TEST_IMAGES  # the test set: its images (else the test face crops) get a row each
    auto_batch: bool = False       # --batch-size auto: probe the device for the largest batch, keep batch × accum_steps
    head_lr_mult: float = 1.0      # fine-tuning: the head's LR = ft_lr × this (SSL unaffected)
    sbi_p: float = 0.0             # share of each batch's real faces made self-blended fakes on the fly (titan.data.sbi); 0 = off


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # Tests and the demo: the small variant on small images for 1–2 epochs on CPU.
    "tiny": dict(variant="atto", img_size=64, batch_size=8, accum_steps=1, num_workers=0, ssl_epochs=1,
                 ssl_warmup_epochs=0, mask_patch=32, ft_epochs=2, ft_warmup_epochs=0, infer_batch_size=16,
                 tta="identity,hflip", threads=1),
    # `make demo`: the real pipeline on the 500-image demo set in minutes on 2 CPU cores, scored on
    # faces whose identities it never trained on. Measured (docs/demo.md): TitanNet from
    # scratch stays near chance there in 4 CPU minutes, while EfficientNet-Lite0 from the ImageNet
    # weights its package ships learns the blending cues in a few epochs; mean = std = 0.5 input,
    # lr 1e-3 with 1 warm-up epoch, 8 epochs, batch 16 (lr 1.5e-4–5e-4, a 10× head LR, 5 epochs
    # and the 9-channel input all scored lower on unseen identities). A share of self-blended
    # fakes (--sbi-p 0.3) teaches the face-region blending boundary itself rather than this set's
    # generator; JPEG re-compression (--jpeg-p 0.3, the README's) keeps it robust to re-encoding and
    # measured better, not worse. No label smoothing or blur. 128 px (the demo aligns at 128):
    # test ROC-AUC 0.97 vs 0.95 at 96 px for ~1.5× the training time, well inside the budget.
    "demo": dict(arch="efficientnet-lite0", variant="atto", stem="standard", img_size=128, batch_size=16, accum_steps=1,
                 num_workers=0, ssl_epochs=1, ssl_warmup_epochs=0, n_folds=3, ft_epochs=8, ft_lr=1e-3, ft_warmup_epochs=1,
                 label_smoothing=0.0, dropout=0.2, jpeg_p=0.3, blur_p=0.0, sbi_p=0.3, infer_batch_size=32,
                 tta="identity,hflip", threads=2),
}


def option(default: Any = MISSING, help: str = "", *, flag: str = "", aliases: tuple[str, ...] = (),
           choices: tuple | None = None, positional: bool = False, default_factory: Any = MISSING):
    """A dataclass field with its command-line form: ``help``; ``flag`` (default ``--field-name``) and
    other spellings ``aliases``; ``choices``; ``positional`` for a list of positional arguments. A
    boolean field is always a switch with its ``--no-`` form (``--amp`` / ``--no-amp``)."""
    meta = {"help": help, "flag": flag, "aliases": tuple(aliases), "choices": choices, "positional": positional}
    return field(default=default, default_factory=default_factory, metadata=meta)


@dataclass
class ScriptOptions:
    """Flags every stage script has."""

    debug: bool = option(False, "on an error, print the full traceback as well as the one-line message")


def _default(f) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _coerce(name: str, typ: Any, value: Any) -> Any:
    if get_origin(typ) is list:
        items = value.split(",") if isinstance(value, str) else list(value)
        return [_coerce(name, get_args(typ)[0], v) for v in items]
    if isinstance(value, str):
        if typ is bool:
            v = value.strip().lower()
            if v in ("1", "true", "yes", "on"):
                return True
            if v in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"config field {name!r}: {value!r} is not a boolean (true/false)")
        try:
            return typ(value)
        except ValueError:
            raise ValueError(f"config field {name!r}: {value!r} is not a valid {typ.__name__}") from None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ValueError(f"config field {name!r}: {value!r} is not a {typ.__name__}")
    return value


def apply_overrides(cfg, overrides: dict[str, Any]):
    """Return a copy of ``cfg`` with overrides applied; unknown names or bad types raise."""
    hints = get_type_hints(type(cfg))
    out = {}
    for k, v in overrides.items():
        auto = _field(cfg, k).metadata.get("auto") if k in hints else None
        if auto and isinstance(v, str) and v.strip().lower() == "auto":
            out[auto] = True  # e.g. --batch-size auto: the field keeps its value, the probe starts from it
            continue
        if k not in hints:
            close = [f for f in hints if k.replace("-", "_") == f or k in f]
            raise ValueError(f"unknown config field {k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        out[k] = _coerce(k, hints[k], v)
        choices = _field(cfg, k).metadata.get("choices")
        if choices and out[k] not in choices:
            raise ValueError(f"config field {k!r}: {out[k]!r} is not one of {list(choices)}")
    return dataclasses.replace(cfg, **out)


def _field(cfg, name: str):
    return next(f for f in fields(cfg) if f.name == name)


def make_config(cls=TrainConfig, preset: str = "default", overrides: dict[str, Any] | None = None, presets=PRESETS):
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(presets)}")
    cfg = apply_overrides(cls(), presets[preset])
    return apply_overrides(cfg, overrides or {})


def add_config_args(parser: argparse.ArgumentParser, cls=TrainConfig, presets: dict | None = PRESETS,
                    title: str = "") -> None:
    """Every field of ``cls`` as a flag (see ``option``); with ``presets`` also ``--preset`` and ``--set``.

    Flags default to None so that only what the user typed overrides the preset; help shows the
    dataclass default."""
    doc = (cls.__doc__ or "").strip().splitlines()[0].rstrip(".") if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(") else ""
    group = parser.add_argument_group(title or ("config (any field; applied over --preset)" if presets else doc or "flags"))
    if presets:
        group.add_argument("--preset", default="default", choices=sorted(presets), help="named config (default: %(default)s)")
        group.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a field (repeatable)")
    hints = get_type_hints(cls)
    for f in fields(cls):
        meta, typ, default = f.metadata, hints[f.name], _default(f)
        help_text = (meta.get("help") or "") + (" ('auto': the largest that fits the device)" if meta.get("auto") else "") \
            + f" (default: {default})"
        dest = f"cfg_{f.name}"
        if meta.get("positional"):
            group.add_argument(dest, nargs="*", default=None, metavar=f.name.upper(), help=help_text)
        elif typ is bool:  # one convention: --x / --no-x (--set x=false keeps working)
            group.add_argument(meta.get("flag") or f"--{f.name.replace('_', '-')}", *meta.get("aliases", ()), dest=dest,
                               action=argparse.BooleanOptionalAction, default=None, help=help_text.strip())
        else:
            name = typ.__name__ if isinstance(typ, type) else "LIST"
            group.add_argument(meta.get("flag") or f"--{f.name.replace('_', '-')}", dest=dest, default=None,
                               metavar=name.upper(), choices=meta.get("choices"), help=help_text.strip())


def config_from_args(args: argparse.Namespace, cls=TrainConfig, presets: dict | None = PRESETS):
    """The dataclass instance the parsed flags describe (over ``--preset`` when ``presets``)."""
    overrides: dict[str, Any] = {}
    for item in (getattr(args, "set", None) or []) if presets else []:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE")
        k, v = item.split("=", 1)
        overrides[k.strip()] = v
    for f in fields(cls):
        v = getattr(args, f"cfg_{f.name}", None)
        if v is not None and not (f.metadata.get("positional") and v == []):
            overrides[f.name] = v
    if presets:
        return make_config(cls, args.preset, overrides, presets)
    return apply_overrides(cls(), overrides)


def parse_config(cls, argv: Sequence[str] | None = None, doc: str = "", extra: type | None = None):
    """A script's whole command line: its dataclass ``cls`` (and an ``extra`` one) from ``argv``.

    Bad values exit with argparse's usage error; returns the instance (or the pair with ``extra``)."""
    parser = argparse.ArgumentParser(description=doc.strip().split("\n\n")[0], epilog=doc if extra else None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    presets = PRESETS if cls is TrainConfig else None
    if extra is not None:
        add_config_args(parser, extra, presets=None)
    add_config_args(parser, cls, presets=presets)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args, cls, presets=presets)
        return (cfg, config_from_args(args, extra, presets=None)) if extra is not None else cfg
    except ValueError as e:
        parser.error(str(e))


def save_config(cfg, path: str | os.PathLike) -> None:
    from .checkpoints import atomic_json

    atomic_json(dataclasses.asdict(cfg), path)
