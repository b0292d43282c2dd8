"""Which training settings shape the weights: the one split every reuse decision asks.

A finished SSL file, a finished fold or an epoch state is reused only when every setting that
shapes its weights is what this run asks for (beside the label and image digests of
``titan.data.fingerprint``); a difference retrains, logged as ``setting old → new``. Settings in
``NOT_WEIGHT_SHAPING`` (speed, paths, inference) never force a retrain. Every ``TrainConfig``
field is in exactly one of the two lists (tests/test_run_ownership.py fails on a new field
that is in neither).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ..config import TrainConfig

# What SimMIM's weights are made from (also shapes every fold fine-tuned from them).
SSL_SHAPING = ("arch", "variant", "input", "img_size", "drop_path", "stem", "batch_size", "accum_steps", "seed",
               "ssl_epochs", "ssl_lr", "ssl_weight_decay", "ssl_warmup_epochs", "mask_patch", "mask_ratio",
               "min_lr_ratio")
# What a fold's weights are made from, beyond SimMIM's (the data itself is in the digests).
FOLD_SHAPING = ("head", "dropout", "n_folds", "fold_seed", "ft_epochs", "ft_lr", "ft_weight_decay", "ft_warmup_epochs",
                "label_smoothing", "imbalance", "jpeg_p", "blur_p", "init_weights", "head_lr_mult", "sbi_p",
                "tune", "probe_c")
WEIGHT_SHAPING = SSL_SHAPING + FOLD_SHAPING
# Never a reason to retrain: where files are (their content is digested), speed and numerics
# plumbing, and inference-only settings.
NOT_WEIGHT_SHAPING = ("faces_dir", "train_csv", "fallback_csv", "out_dir", "skip_missing", "num_workers", "tta",
                      "infer_batch_size", "device", "amp", "channels_last", "compile", "gpu_decode", "max_bad_steps",
                      "ckpt_dir", "keep_checkpoints", "threads", "force_preprocessing", "raw_test_dir", "auto_batch")
_SSL_ONLY = tuple(f for f in SSL_SHAPING if f.startswith(("ssl_", "mask_")) and f != "ssl_epochs")


def unclassified(cls: type = TrainConfig) -> list[str]:
    """Fields of ``cls`` in neither list (or in both): each must be decided, not defaulted."""
    names = [f.name for f in dataclasses.fields(cls)]
    return [n for n in names if (n in WEIGHT_SHAPING) == (n in NOT_WEIGHT_SHAPING)]


def _plain(cfg: TrainConfig | Mapping[str, Any]) -> dict[str, Any]:
    from .session import resolved_identity  # arch "" + variant v42 is titan-v42 (files from before arch too)

    return resolved_identity(dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg or {}))


def fold_fields(cfg: TrainConfig) -> tuple[str, ...]:
    """The settings a fold is made from: SimMIM's count only when the architecture takes SimMIM."""
    from ..models.archs import resolve_arch

    if not resolve_arch(cfg.arch, cfg.variant).ssl:  # the baselines take no SimMIM at all
        return tuple(f for f in WEIGHT_SHAPING if f not in _SSL_ONLY and f != "ssl_epochs")
    uses_ssl = cfg.ssl_epochs > 0 and not cfg.init_weights
    return tuple(f for f in WEIGHT_SHAPING if uses_ssl or f not in _SSL_ONLY)


def changed_settings(saved: Mapping[str, Any] | None, cfg: TrainConfig, names: tuple[str, ...]) -> dict[str, tuple]:
    """setting → (saved, now) for each of ``names`` that differs; a setting the saved record does
    not hold (an older version's file, from before the setting existed) is not compared."""
    have, now = _plain(saved or {}), _plain(cfg)
    return {n: (have[n], now[n]) for n in names if n in have and have[n] != now[n] and not _same_number(have[n], now[n])}


def _same_number(a: Any, b: Any) -> bool:
    return isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
        and not isinstance(b, bool) and float(a) == float(b)


def describe(changed: Mapping[str, tuple]) -> str:
    """``ft_lr 0.0003 → 0.01, seed 3407 → 7``."""
    return ", ".join(f"{k} {v[0]!r} → {v[1]!r}" for k, v in changed.items())


def weight_settings(cfg: TrainConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The weight-shaping settings of a config (or of a saved config dict)."""
    c = _plain(cfg)
    return {k: c.get(k) for k in WEIGHT_SHAPING}
