"""A training session: processes, logs and the run folder, shared by the stages of one command.

``session(cfg)`` joins the process group, opens the two log channels (human lines and JSON
records), writes the resolved config, and routes titan's warnings into the run log.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from ..config import TrainConfig, save_config
from ..data.fingerprint import changed_inputs
from ..data.datasets import EncodedFaceDataset, FaceDataset, collate_encoded, decode_on_device
from ..device import to_float_image, use_channels_last
from ..models.archs import arch_input, default_img_size, resolve_arch
from ..runfiles import DEFAULT_PREFIX, RunFiles
from ..runlock import folder_lock
from ..runlog import RunLog
from . import distributed, state
from .distributed import DistEnv
from .reuse import WEIGHT_SHAPING, changed_settings, describe

PREFIX = DEFAULT_PREFIX


@dataclass
class TrainSession:
    cfg: TrainConfig
    env: DistEnv
    log: RunLog
    files: RunFiles  # the run folder's file names
    ckpt: Path       # resumable epoch states

    @property
    def out(self) -> Path:
        return self.files.folder

    @property
    def channels_last(self) -> bool:
        return use_channels_last(self.env.device, self.cfg.channels_last)

    def faces(self, ids: Sequence[str], folder: Path, labels=None, on_error: str = "replace") -> FaceDataset:
        """The dataset for these Ids; with ``gpu_decode`` JPEG bytes travel and decode on the device."""
        cls = EncodedFaceDataset if self.cfg.gpu_decode else FaceDataset
        return cls(list(ids), folder, self.cfg.img_size, labels, on_error=on_error)

    def loader(self, dataset, batch_size: int, sampler) -> DataLoader:
        return distributed.make_loader(dataset, batch_size, sampler, self.cfg.num_workers, self.env.device,
                                       collate_fn=collate_encoded if self.cfg.gpu_decode else None)

    def images(self, x) -> torch.Tensor:
        """A loader batch → float [0,1] (B,3,S,S) on the device (decoded there with ``gpu_decode``)."""
        if isinstance(x, list):
            x = decode_on_device(x, self.cfg.img_size, self.env.device)
        return to_float_image(x, self.env.device, self.channels_last)

    def resume(self, stem: str, raw: torch.nn.Module, stepper, identity: Sequence[str], where: str,
               inputs: dict[str, str]) -> dict | None:
        """Load the newest complete ``{stem}_ep{N}.pth`` into ``raw`` and ``stepper`` and restore the RNG
        streams → the saved state (None when there is none). A state made with other values of the
        weight-shaping settings ``identity`` is dropped (logged: setting saved → now); one made from
        other data (the ``inputs`` digests) is refused, saying how to start afresh."""
        saved = state.load_latest_state(self.ckpt, stem, self.log.info)
        if saved is not None:
            stale = changed_settings(saved.get("config"), self.cfg, tuple(identity))
            if stale:  # other weights than this run asks for: never continued, made afresh
                self.log.info(f"{where}: starting afresh — it was made with {describe(stale)} (saved → now)")
                state.remove_train_states(self.ckpt, stem)
                return None
            changed = changed_inputs(saved.get("inputs"), inputs)
            if changed:
                raise ValueError(f"{where} was made from other {' and '.join(changed)} than this run has (the label "
                                 f"CSV or the face images changed); to start it afresh delete {self.ckpt}/{stem}_ep*.pth, "
                                 "or use a fresh --out-dir")
            raw.load_state_dict(saved["model"])
            stepper.load_state_dict(saved["train"])
            self.restore_rng(saved["rng"], int(saved["epoch"]))
        return saved

    def restore_rng(self, rng: dict, epoch: int) -> None:
        """Resume rank 0's saved RNG streams; other ranks reseed from (seed, rank, epoch) so they stay distinct."""
        state.set_rng_state(rng)
        if self.env.rank:
            state.seed_everything(self.cfg.seed + 7919 * self.env.rank + 104729 * epoch)


class WarningsToRunLog(logging.Handler):
    """Route titan's warnings (e.g. an unreadable image replaced) into the run log."""

    def __init__(self, log: RunLog) -> None:
        super().__init__(logging.WARNING)
        self.runlog = log

    def emit(self, record: logging.LogRecord) -> None:
        self.runlog.info(f"WARNING: {record.getMessage()}")


@contextmanager
def session(cfg: TrainConfig, run: TrainSession | None = None, estimate: bool = False) -> Iterator[TrainSession]:
    """Open (or reuse) a session: join the process group, open the logs, write the config.
    ``estimate``: the estimate's own log is the only file written (no config, no training log)."""
    if run is not None:
        yield run
        return
    cfg, size_note = resolve_input_size(cfg)
    env = distributed.setup_distributed(cfg.device)
    if cfg.threads > 0:
        # Small models on a shared CPU: extra OpenMP threads spin and slow every op down.
        torch.set_num_threads(cfg.threads)
    files = RunFiles(Path(cfg.out_dir), PREFIX)
    log = RunLog(*((files.estimate_log_txt, files.estimate_log_jsonl) if estimate else (files.log_txt, files.log_jsonl)),
                 enabled=env.is_main)
    handler = WarningsToRunLog(log)
    logger = logging.getLogger("titan")
    logger.addHandler(handler)
    try:
        # The run owns its folder: a second run there is refused before anything is written.
        with folder_lock(files.folder, log.info) if env.is_main else nullcontext():
            if env.is_main and not estimate:
                save_run_config(cfg, files, log)
            if size_note:
                log.info(size_note)
            log.record("config", **dataclasses.asdict(cfg))
            log.info(f"run on {env.device} × {env.world_size} process(es); outputs in {files.folder.resolve()}")
            yield TrainSession(cfg, env, log, files, files.folder / cfg.ckpt_dir)
    finally:
        logger.removeHandler(handler)
        distributed.teardown_distributed()


def resolve_input_size(cfg: TrainConfig) -> tuple[TrainConfig, str]:
    """The one place a run's input size is decided: ``--img-size`` when given (> 0), else the
    architecture's own (``default_img_size``) → (the config with it set, a line for the log, "" when given)."""
    if cfg.img_size > 0:
        return cfg, ""
    arch = resolve_arch(cfg.arch, cfg.variant)
    size = default_img_size(arch.name)
    return dataclasses.replace(cfg, img_size=size), f"input size {size} px: {arch.name}'s own (no --img-size given)"


def save_run_config(cfg: TrainConfig, files: RunFiles, log: RunLog | None = None, weights_made: bool = False) -> None:
    """``config_{prefix}.json`` describes the weights in the folder: written when there is none, when
    its weight-shaping settings are this run's, or once this run has (re)made the weights
    (``weights_made``); else kept until then (logged), so a run that does not train leaves it true."""
    path = files.config_json
    if path.is_file() and not weights_made:
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = None
        stale = changed_settings(saved, cfg, WEIGHT_SHAPING) if isinstance(saved, dict) else {}
        if stale:
            if log is not None:
                log.info(f"NOTICE: {path.name} keeps describing the weights here ({describe(stale)}: saved → now) "
                         "until this run has retrained them")
            return
    save_config(cfg, path)


def resolved_identity(c: dict) -> dict:
    """A config (or fold meta) dict with its architecture resolved: arch "" + variant "v42" is
    "titan-v42"; files from before ``arch`` existed read as titan-<variant>; baselines have variant "";
    the input is named as the fold records it (``arch_input``: files from before read as the arch's own)."""
    out = dict(c)
    if "variant" in c or "arch" in c:
        a = resolve_arch(c.get("arch") or "", c.get("variant") or "v42")
        out.update(arch=a.name, variant=a.variant or "", input=arch_input(a, c.get("input") or "default"))
    return out


def face_dirs(cfg: TrainConfig) -> tuple[Path, Path]:
    """{faces_dir}/train and {faces_dir}/test; the train folder must exist."""
    train, test = Path(cfg.faces_dir) / "train", Path(cfg.faces_dir) / "test"
    if not train.is_dir():
        raise FileNotFoundError(f"{train}: face folder not found — run align_faces.py first, or set --faces-dir")
    return train, test
