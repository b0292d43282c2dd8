"""A run owns its output folder: one lock file, taken by every stage that writes a folder.

Two trainings (or a training and a safe inference) writing the same folder mix their files
silently: one skips the other's "finished" folds, the config describes neither. ``folder_lock``
creates ``.titan_run.lock`` atomically (``O_CREAT|O_EXCL``) holding who took it (pid, host, start
time, command); a second run is refused at once, naming the holder. A lock whose process is gone
on this host (a killed run) is taken over with a NOTICE; one from another host is left for a
person to clear. The lock is dropped on return, exception or Ctrl-C; nested stages of one process
share it (the count below).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import Refusal, running_command

LOCK_NAME = ".titan_run.lock"
log = logging.getLogger("titan")

_held: dict[str, int] = {}  # resolved lock path → nesting depth, in this process
_guard = threading.Lock()


class FolderInUse(Refusal):
    """Another run holds the folder's lock (exit 2: the message names it and how to clear it)."""


def _holder(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}  # being written this very moment, or damaged: treated as held, by an unknown run


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def _stale(info: dict[str, Any]) -> bool:
    """Its process is gone on this host (a run on another host cannot be checked from here)."""
    pid = info.get("pid")
    return info.get("host") == socket.gethostname() and isinstance(pid, int) and (pid == os.getpid() or not _alive(pid))


def _describe(info: dict[str, Any]) -> str:
    if not info:
        return "an unknown run (the lock file is empty or unreadable)"
    return (f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}: "
            f"{info.get('command') or '?'}")


def _create(path: Path, info: dict[str, Any]) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(info) + "\n")
    return True


@contextmanager
def folder_lock(folder: str | os.PathLike, say: Callable[[str], None] | None = None,
                command: str | None = None) -> Iterator[Path]:
    """Hold ``folder``'s run lock (created with the folder) for the block; refuse with
    ``FolderInUse`` when another live run holds it."""
    say = say or log.warning
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise Refusal(f"{folder} is a file, not a folder; choose an output folder")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    key = str(path.resolve())
    with _guard:
        if key in _held:
            _held[key] += 1
            nested = True
        else:
            nested = False
    if not nested:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                "command": command if command is not None else running_command() or "a Python process"}
        if not _create(path, info):
            holder = _holder(path)
            if not _stale(holder):
                raise FolderInUse(
                    f"{folder} is in use by another run ({_describe(holder)}); wait for it to end or choose another "
                    f"output folder — if that run is gone (e.g. its machine crashed), delete {path}")
            say(f"NOTICE: taking over the lock of a run that is gone ({_describe(holder)}) in {folder}")
            if _holder(path) == holder:  # still that dead run's file (not a third run's, taken meanwhile)
                path.unlink(missing_ok=True)
            if not _create(path, info):
                raise FolderInUse(f"{folder} is in use by another run ({_describe(_holder(path))}); "
                                  f"it took the folder over first — wait for it to end or choose another output folder")
        with _guard:
            _held[key] = 1
    try:
        yield path
    finally:
        with _guard:
            _held[key] -= 1
            last = _held[key] == 0
            if last:
                del _held[key]
        if last and _holder(path).get("pid") == os.getpid():
            path.unlink(missing_ok=True)


def holds_folder(folder_of: Callable[..., str | os.PathLike | None]):
    """Decorate a stage's function: it runs holding the lock of ``folder_of(*args, **kwargs)``
    (None: no folder written, no lock)."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            folder = folder_of(*args, **kwargs)
            if folder is None:
                return fn(*args, **kwargs)
            with folder_lock(folder):
                return fn(*args, **kwargs)
        return run
    return wrap
