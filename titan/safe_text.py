"""Text that comes from users (file names, Ids, reasons) made safe to write, in one place.

- ``display_path``: a file name that is not valid UTF-8 (Python holds its bytes as lone
  surrogates, PEP 383) written as ``\\xff`` escapes, flagged, instead of failing the whole output.
- ``csv_cell`` / ``csv_frame``: a CSV cell a spreadsheet would run as a formula (starting with
  ``= + - @``, tab or CR) gets a leading single quote, as OWASP's "CSV injection" page advises;
  numbers stay numbers and ``restore_cell`` undoes it for files read back (resume files).
- ``strict_json``: JSON as the standard defines it (``null``, never ``NaN``/``Infinity``).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable

import numpy as np
import pandas as pd

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
QUOTE = "'"


def display_path(path: str | os.PathLike) -> tuple[str, bool]:
    """(the path as text that any UTF-8 writer accepts, whether it had to be escaped): bytes that
    are not UTF-8 (surrogate-escaped by the OS layer) become ``\\xNN``."""
    s = os.fspath(path)
    try:
        s.encode("utf-8")
        return s, False
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"), True


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def csv_cell(v: Any) -> Any:
    """A text cell a spreadsheet would evaluate, quoted (``'=SUM(1)``); a cell that already starts
    with the quote gets another, so ``restore_cell`` gives back exactly what was written. Other
    values (numbers, numeric text such as ``-0.5``) pass unchanged."""
    if not isinstance(v, str) or not v:
        return v
    if v.startswith(QUOTE) or (v.startswith(FORMULA_START) and not _is_number(v)):
        return QUOTE + v
    return v


def restore_cell(v: Any) -> Any:
    """``csv_cell`` undone (for a CSV this project reads back)."""
    if isinstance(v, str) and v.startswith(QUOTE):
        return v[1:]
    return v


def csv_frame(df: pd.DataFrame, columns: Iterable[str] | None = None) -> pd.DataFrame:
    """A copy with ``csv_cell`` applied to the text cells of ``columns`` (default: every column of
    text), ready for ``to_csv``."""
    out = df.copy()
    cols = list(columns) if columns is not None else [c for c in out.columns if out[c].dtype == object]
    for c in cols:
        if c in out.columns:
            out[c] = out[c].map(csv_cell)
    return out


def restore_frame(df: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    for c in columns:
        if c in df.columns:
            df[c] = df[c].map(restore_cell)
    return df


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float (numpy's too) replaced by None, numpy scalars and
    arrays made plain, containers walked."""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return finite_or_none(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def strict_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that never writes NaN/Infinity (they become null); other kwargs as json.dumps."""
    return json.dumps(finite_or_none(obj), allow_nan=False, default=_plain, **kwargs)


def _plain(v: Any) -> Any:
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    try:
        return float(v)  # numpy and torch scalars
    except (TypeError, ValueError):
        raise TypeError(f"{type(v).__name__} is not JSON serialisable") from None
