"""Stage 1 of training: SimMIM over every train and test face (labels unused) → ``titan_v42_ssl.pth``.

Resumes from the newest complete epoch state; a finished SSL file is kept.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

import torch.nn as nn
from torch.utils.data import ConcatDataset

from ..checkpoints import read_meta, save_checkpoint
from ..config import TrainConfig
from ..data.augment import augment_batch, build_augment
from ..data.fingerprint import changed_inputs, images_digest
from ..data.images import ImageIndex
from ..models.archs import arch_input, resolve_arch
from ..models.convnextv2 import build_backbone, keep_stem_highpass
from ..models.simmim import SimMIM
from . import distributed, optim, state
from .epoch import EpochStats, train_one_epoch
from .reuse import SSL_SHAPING, changed_settings, describe
from .session import TrainSession, face_dirs, session



def ssl_data(r: TrainSession) -> tuple[ConcatDataset, dict[str, str]]:
    """Every train and test face, and the digest of that image set (what SimMIM is made from)."""
    train_dir, test_dir = face_dirs(r.cfg)
    indexes = [ImageIndex(d) for d in (train_dir, test_dir) if d.is_dir()]
    dataset = ConcatDataset([r.faces(ix.ids(), ix) for ix in indexes])
    if len(dataset) == 0:
        raise FileNotFoundError(f"no face images in {train_dir} or {test_dir}")
    return dataset, {"images": "+".join(images_digest(ix, ix.ids()) for ix in indexes)}


def ssl_done(r: TrainSession, inputs: dict[str, str]) -> bool:
    """A finished SSL file made from these images with this run's SimMIM settings; one made from
    others is retrained (logged, naming what changed)."""
    path = r.files.ssl_weights
    if not path.is_file():
        return False
    meta = read_meta(path)
    if int(meta.get("epoch", -1)) < r.cfg.ssl_epochs:
        return False
    stale = changed_settings(meta.get("config"), r.cfg, SSL_SHAPING)
    if stale:
        r.log.info(f"SSL: retraining — {path.name} was made with {describe(stale)} (then → now)")
        state.remove_train_states(r.ckpt, "ssl")
        return False
    changed = changed_inputs(meta.get("inputs"), inputs)
    if changed:
        r.log.info(f"SSL: retraining — the face images differ from those {path.name} was made from"
                   + ("" if "inputs" in meta else " (it records none: written by an older version)"))
        state.remove_train_states(r.ckpt, "ssl")
        return False
    return True


def ssl_model(r: TrainSession, variant: str, steps_per_epoch: int,
              notify: Callable[[str], None] | None = None) -> tuple[SimMIM, nn.Module, optim.Stepper]:
    """(SimMIM around a fresh backbone, the same placed for the device, its stepper: AdamW, warm-up + cosine).
    SimMIM reconstructs the backbone's input, whichever ``--input`` that is."""
    cfg, env = r.cfg, r.env
    input_name = arch_input(resolve_arch(cfg.arch, cfg.variant), cfg.input)
    raw = SimMIM(build_backbone(variant, cfg.drop_path, cfg.stem, input_name), cfg.mask_patch, cfg.mask_ratio)
    raw.encoder.norm.requires_grad_(False)  # the pooled-feature norm is unused by SimMIM (DDP needs every trained param used)
    model = distributed.prepare_model(raw, env, r.channels_last, cfg.compile)
    stepper = optim.make_stepper(raw, model, cfg.ssl_lr, cfg.ssl_weight_decay, cfg.ssl_warmup_epochs, cfg.ssl_epochs,
                                 steps_per_epoch, cfg, env, "SSL", notify)
    if cfg.stem == "highpass":
        keep_stem_highpass(raw.encoder, stepper.optimizer)
    return raw, model, stepper


def ssl_epoch(r: TrainSession, model: nn.Module, loader, stepper: optim.Stepper, aug: nn.Module, name: str) -> EpochStats:
    """One SimMIM epoch over ``loader``: augmented faces in, the masked-pixel L1 loss out."""
    return train_one_epoch(model, loader, stepper, r.env, r.cfg.amp, lambda b: (augment_batch(aug, r.images(b[0])),),
                           lambda m, x: m(x)[0], name)


def run_ssl(cfg: TrainConfig, run: TrainSession | None = None) -> Path | None:
    """SimMIM pretraining → the SSL backbone's path (None when SimMIM does not apply or is off).

    The baselines (mobilenetv2, effnet-b3-fpn-cbam) skip it: SimMIM here reconstructs the
    9-channel ConvNeXt V2 input; they fine-tune from ``init_weights`` or from scratch."""
    with session(cfg, run) as r:
        cfg = r.cfg  # its input size resolved (session.resolve_input_size)
        env, log, dev, out_path = r.env, r.log, r.env.device, r.files.ssl_weights
        arch = resolve_arch(cfg.arch, cfg.variant)
        if not arch.ssl:
            log.info(f"NOTICE: {arch.name} takes no SimMIM pretraining (TitanNet only); skipping SSL")
            return None
        if cfg.ssl_epochs <= 0:
            log.info("SSL: --ssl-epochs 0, SimMIM skipped")
            return None
        dataset, inputs = ssl_data(r)
        if ssl_done(r, inputs):
            log.info(f"SSL already complete ({out_path}); skipping")
            return out_path
        state.seed_everything(cfg.seed + env.rank)  # DDP: each rank its own masks and augmentations
        sampler = distributed.make_sampler(len(dataset), env, shuffle=True, seed=cfg.seed)
        loader = r.loader(dataset, cfg.batch_size, sampler)

        raw, model, stepper = ssl_model(r, arch.variant, math.ceil(len(loader) / cfg.accum_steps), log.info)
        aug = build_augment("ssl").to(dev)

        start, loss = 0, float("nan")
        saved = r.resume("ssl", raw, stepper, SSL_SHAPING, f"SSL checkpoint in {r.ckpt}", inputs)
        if saved is not None:
            start, loss = int(saved["epoch"]), float(saved.get("loss", float("nan")))
            log.info(f"SSL: resuming after epoch {start} from {r.ckpt}")
        log.info(f"SSL: {len(dataset)} images, {len(loader)} batches/epoch of {cfg.batch_size}×{env.world_size}, "
                 f"accumulation {cfg.accum_steps}, epochs {start + 1}..{cfg.ssl_epochs}")

        for epoch in range(start, cfg.ssl_epochs):
            sampler.set_epoch(epoch)
            st = ssl_epoch(r, model, loader, stepper, aug, f"SSL epoch {epoch + 1}")
            loss = st.loss
            log.info(f"SSL Ep {epoch + 1} | Loss: {loss:.4f} | LR: {stepper.lr:.1e}")
            log.record("ssl_epoch", epoch=epoch + 1, loss=loss, lr=stepper.lr, img_s=st.img_s, bad_steps=st.bad_steps)
            if env.is_main:
                state.save_train_state(r.ckpt, "ssl", epoch + 1, keep=cfg.keep_checkpoints, model=raw.state_dict(),
                                       train=stepper.state_dict(), loss=loss, config=dataclasses.asdict(cfg), inputs=inputs)
            distributed.barrier(env)

        if env.is_main:
            save_checkpoint(raw.encoder, out_path, arch=arch.name, variant=arch.variant, img_size=cfg.img_size,
                            input=arch_input(arch, cfg.input), epoch=cfg.ssl_epochs, metrics={"loss": loss},
                            config=dataclasses.asdict(cfg), inputs=inputs)
            log.info(f"SSL done → {out_path}")
        distributed.barrier(env)
        return out_path
