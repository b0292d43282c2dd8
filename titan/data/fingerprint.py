"""What a piece of training was made from, as short digests: work is reused only when they match.

``labels`` covers the label rows (Id, label, pseudo flag, and the fold each row fell in);
``images`` covers the face images read (Id, file name, size, modification time — cheap: no pixel
is read). A re-aligned face at another size, a flipped label or new diamonds change them.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Sequence

from .images import ImageIndex


def digest_lines(lines: Iterable[str]) -> str:
    """16 hex digits of SHA-256 over the lines: the one digest every reuse check compares."""
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()[:16]


def labels_digest(ids: Sequence[str], labels: Sequence[int], pseudo: Sequence[bool], folds: Sequence[int] = ()) -> str:
    folds = list(folds) or [0] * len(ids)
    return digest_lines(f"{i},{int(y)},{int(bool(p))},{int(k)}" for i, y, p, k in zip(ids, labels, pseudo, folds))


def file_version(path: Path) -> str:
    """``name,size,mtime_ns``: which version of a file was read (cheap: no byte is read)."""
    st = path.stat()
    return f"{path.name},{st.st_size},{st.st_mtime_ns}"


def images_digest(index: ImageIndex, ids: Iterable[str]) -> str:
    return digest_lines(f"{i},{file_version(index.path(i))}" for i in ids)


def changed_inputs(saved: dict | None, now: dict[str, str]) -> list[str]:
    """Which of ``now``'s digests differ from ``saved`` (all of them when nothing was recorded)."""
    if not isinstance(saved, dict):
        return list(now)
    return [k for k, v in now.items() if saved.get(k) != v]
