"""Safe checkpoint loading and atomic saving.

Everything loads with ``torch.load(weights_only=True)``; there is no unsafe fallback. Our own
files are ``{"model": state_dict, "meta": {...plain types...}}``; released files are raw state
dicts, possibly nested under ``"model"``/``"state_dict"`` and prefixed by ``module.`` (DDP) or
``_orig_mod.`` (torch.compile).
"""
from __future__ import annotations

import errno
import os
import pickle
import shutil
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

_PREFIXES = ("module.", "_orig_mod.")
_NESTS = ("model", "state_dict", "model_state_dict")


class CheckpointError(RuntimeError):
    """A checkpoint file could not be read, or does not fit the model."""


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` then rename over ``path``, so a crash never leaves half a file.

    An OSError names ``path``; a writer that fails on a full disk with its own error (torch's zip
    writer says "unexpected pos") is reported as the disk-full OSError it is."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(e.filename or path)) from e
    os.close(fd)
    # mkstemp makes the file private (0600); give the result the user's normal file mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        if isinstance(e, Exception) and _disk_full(path.parent):
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from e
        raise
    return path


def check_output_file(path: str | os.PathLike, flag: str, refusal: type[Exception] = ValueError) -> Path:
    """Before any work: ``path`` names a file (not a folder) that can be written. A folder is
    refused with ``refusal`` (exit 2); a folder that cannot be created or written raises the
    OSError naming it (exit 3). Probed with a temporary file, removed at once."""
    path = Path(path)
    if path.is_dir() or str(path).endswith(os.sep):
        raise refusal(f"{flag} {path} is a folder; give a file name")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e
    return path


def _disk_full(folder: Path, margin: int = 1 << 20) -> bool:
    try:
        return shutil.disk_usage(folder).free < margin
    except OSError:
        return False


def atomic_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented, strict JSON atomically: numpy scalars as numbers, NaN and
    infinities as null (bare NaN is not JSON; strict readers refuse the whole file)."""
    from .safe_text import strict_json

    text = strict_json(obj, indent=2)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save through a temp file + os.replace."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_checkpoint(model_or_state: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike, **meta: Any) -> Path:
    """Save ``{"model": state_dict, "meta": meta}``; meta must be plain types (weights_only)."""
    sd = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else dict(model_or_state)
    sd = {strip_prefixes(k): v.detach().cpu() for k, v in sd.items()}
    return save_atomic({"model": sd, "meta": dict(meta)}, path)


_SHA256: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime) so five folds naming one shared
    backbone file hash it once per process."""
    import hashlib

    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _SHA256[key] = h.hexdigest()
    return _SHA256[key]


def weights_digest(sd: Mapping[str, torch.Tensor]) -> str:
    """16 hex digits of sha256 over a state dict's names, dtypes, shapes and bytes: which weights these are."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _numpy_float_types() -> list:
    """What a numpy float threshold pickles to (the original saved ``np.linspace``'s float64)."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    return [scalar, np.dtype, type(np.dtype(np.float64)), type(np.dtype(np.float32))]


def load_file(path: str | os.PathLike, numpy_scalars: bool = False) -> Any:
    """torch.load with weights_only=True, errors naming the file and the reason.

    ``numpy_scalars`` also allows numpy float64/float32 scalars (and nothing else): meta files
    written by the original project hold its threshold as one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty (an interrupted copy or save?)")
    if path.suffix == ".safetensors":  # tensors only by construction (e.g. timm's model.safetensors)
        return _load_safetensors(path)
    try:
        with torch.serialization.safe_globals(_numpy_float_types()) if numpy_scalars else nullcontext():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused — it holds objects other than tensors and plain containers, which "
            f"weights_only loading does not unpickle ({str(e).splitlines()[0]}). Re-save only the "
            f"state dict (torch.save(model.state_dict(), path)) from code you trust."
        ) from None
    except Exception as e:  # zip/pickle corruption surfaces as many types
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file as st_load
    except ImportError:
        raise CheckpointError(f"{path}: reading .safetensors needs the safetensors package "
                              "(pip install safetensors), or convert the file to .pth") from None
    try:
        return st_load(str(path), device="cpu")
    except Exception as e:  # header/corruption errors come as several types
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the state dict inside ``obj`` and normalise its keys."""
    while isinstance(obj, Mapping):
        nested = next((obj[k] for k in _NESTS if k in obj and isinstance(obj[k], Mapping)), None)
        if nested is None:
            break
        obj = nested
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a state dict, found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: not a state dict — non-tensor entries {bad[:5]}")
    return {strip_prefixes(str(k)): v for k, v in obj.items()}


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return unwrap_state_dict(load_file(path), str(path))


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Metadata of one of our checkpoints ({} for a raw state dict), without building a model."""
    obj = load_file(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("meta"), Mapping):
        return dict(obj["meta"])
    if isinstance(obj, Mapping) and obj and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)  # a plain meta file such as v42_meta_fold{k}.pth
    return {}


def compare_keys(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, wrongly shaped 'key: file shape vs model shape')."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    return missing, unexpected, shapes


def load_into(model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor], strict: bool = True) -> nn.Module:
    """Load a file (or a state dict) into ``model``; on a mismatch list every offending key."""
    name = str(source) if not isinstance(source, Mapping) else "state dict"
    sd = load_state_dict(source) if not isinstance(source, Mapping) else unwrap_state_dict(source, name)
    missing, unexpected, shapes = compare_keys(model, sd)
    if shapes or (strict and (missing or unexpected)):
        def show(title, keys):
            return f"\n  {title} ({len(keys)}): " + ", ".join(keys[:20]) + (" …" if len(keys) > 20 else "") if keys else ""
        raise CheckpointError(
            f"{name} does not fit {type(model).__name__}:" + show("missing", missing) + show("unexpected", unexpected)
            + show("wrong shape", shapes) + "\n  Is it the right variant/head for this file?"
        )
    model.load_state_dict(sd, strict=strict)
    return model
