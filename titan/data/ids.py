"""Ids: what a valid one is (a plain file name that never reaches outside its folder), and the
project's one Id order, in which every CSV keyed by Id is written."""
from __future__ import annotations

import os
from typing import Sequence


class UnsafeIdError(ValueError):
    """An Id that is not a plain file name; the message says where it came from."""


def check_id(image_id: str, where: str = "") -> str:
    """Refuse Ids that could leave their folder (separators, '..', absolute, empty, NUL)."""
    s = str(image_id)
    bad = (not s.strip() or "/" in s or "\\" in s or s in (".", "..") or ".." in s.split(".")
           or "\x00" in s or os.path.isabs(s) or (len(s) > 1 and s[1] == ":"))
    if bad:
        raise UnsafeIdError(f"{where}Id {s!r} is not a plain file name (no path separators, '..' or drive); fix the CSV")
    return s



def id_order(ids: Sequence[str]) -> list[str]:
    """The project's one Id order: numerically when every Id is a number (``9`` before ``10``),
    else as strings. Every CSV keyed by Id (submission, predictions, diamonds) is written in it."""
    ids = [str(i) for i in ids]
    if ids and all(i.isdigit() for i in ids):
        return sorted(ids, key=lambda s: (int(s), s))
    return sorted(ids)
