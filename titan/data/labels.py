"""The label-CSV contract: ``Id,target_feature[,is_pseudo][,group]`` read and validated, every
error naming its line and the fix. Ids themselves (what a valid one is, their order) are ``ids.py``'s.

``group`` (optional) names what must never be split between training and validation: a person,
a source, a video. It is kept as a string; a blank cell means the row is a group of its own
(``group_codes``). A CSV without the column — or with every cell blank — has no groups, and its
folds are exactly the plain stratified ones."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .ids import UnsafeIdError, check_id
from .images import ImageIndex

log = logging.getLogger("titan")

ID_ALIASES = ("Id", "id", "ID", "image_id")
LABEL_ALIASES = ("target_feature", "target", "label")
GROUP = "group"


class LabelCSVError(ValueError):
    """The label CSV breaks the contract; the message names the row(s) and the fix."""


def _checked(image_id: str, where: str) -> str:
    try:
        return check_id(image_id, where)
    except UnsafeIdError as e:
        raise LabelCSVError(str(e)) from None


# --- label CSV -------------------------------------------------------------------------------

def _pick(columns: Sequence[str], aliases: Sequence[str]) -> str | None:
    return next((a for a in aliases if a in columns), None)


def _as_bool(v) -> bool:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    s = str(v).strip().lower()
    if s in ("true", "1", "yes", "t", "1.0"):
        return True
    if s in ("false", "0", "no", "f", "", "nan", "0.0"):
        return False
    raise ValueError(v)


def read_labels(csv_path: str | os.PathLike, image_dir: str | os.PathLike | None = None, allow_missing: bool = False) -> pd.DataFrame:
    """Read and validate a label CSV → DataFrame[Id:str, target_feature:int, is_pseudo:bool], plus
    ``group:str`` (stripped, "" when blank) when the CSV has that column.

    Row numbers in errors are the CSV's line numbers (header = line 1). With ``image_dir`` every
    Id must have an image there (``allow_missing`` drops those rows with a warning instead).
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise LabelCSVError(f"{csv_path}: label CSV not found")
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except Exception as e:
        raise LabelCSVError(f"{csv_path}: not a readable CSV ({e})") from None
    id_col, y_col = _pick(df.columns, ID_ALIASES), _pick(df.columns, LABEL_ALIASES)
    for col, aliases in ((id_col, ID_ALIASES), (y_col, LABEL_ALIASES)):
        if col is None:
            raise LabelCSVError(f"{csv_path}: missing column — need one of {list(aliases)}, found {list(df.columns)}")
    if len(df) == 0:
        raise LabelCSVError(f"{csv_path}: no label rows (only a header); add one row per training image: Id,target_feature")
    line = lambda i: f"{csv_path} line {i + 2}: "  # noqa: E731
    ids = [_checked(s.strip(), line(i)) for i, s in enumerate(df[id_col])]
    labels = []
    for i, v in enumerate(df[y_col]):
        try:
            f = float(v)
            if f not in (0.0, 1.0):
                raise ValueError
        except ValueError:
            raise LabelCSVError(f"{line(i)}label {v!r} for Id {ids[i]!r} is not 0 or 1 (1 = fake)") from None
        labels.append(int(f))
    pseudo = [False] * len(ids)
    if "is_pseudo" in df.columns:
        try:
            pseudo = [_as_bool(v) for v in df["is_pseudo"]]
        except ValueError as e:
            raise LabelCSVError(f"{csv_path}: is_pseudo value {e} is not true/false") from None
    out = pd.DataFrame({"Id": ids, "target_feature": labels, "is_pseudo": pseudo})
    if GROUP in df.columns:
        out[GROUP] = [s.strip() for s in df[GROUP]]
    dup = out["Id"].duplicated(keep=False)
    if dup.any():
        rows = [f"{out.Id[i]!r} (line {i + 2})" for i in np.flatnonzero(dup)[:10]]
        raise LabelCSVError(f"{csv_path}: duplicate Ids — {', '.join(rows)}; each image must appear once")
    if image_dir is not None:
        index = ImageIndex(image_dir)
        missing = [(i, s) for i, s in enumerate(out.Id) if s not in index]
        if missing and not allow_missing:
            shown = ", ".join(f"{s!r} (line {i + 2})" for i, s in missing[:10])
            raise LabelCSVError(
                f"{csv_path}: {len(missing)} Id(s) have no image in {image_dir}: {shown}"
                + (" …" if len(missing) > 10 else "") + ". Run align_faces.py for them, or drop them (--skip-missing)."
            )
        if missing:
            log.warning("dropping %d Id(s) with no image in %s: %s", len(missing), image_dir, [s for _, s in missing[:10]])
            out = out[~out.Id.isin({s for _, s in missing})].reset_index(drop=True)
    return out



def has_groups(df: pd.DataFrame) -> bool:
    """Whether label rows carry groups: a ``group`` column with at least one non-blank cell."""
    return GROUP in df.columns and bool((df[GROUP] != "").any())


def group_codes(df: pd.DataFrame) -> np.ndarray:
    """One integer per row naming its group: equal names share a code, and every blank (or a
    frame without groups) gets a code of its own — a row without a group is its own group."""
    names = df[GROUP].to_numpy(dtype=str) if GROUP in df.columns else np.full(len(df), "")
    codes, _ = pd.factorize(pd.Series(names).where(names != "", None), use_na_sentinel=True)
    blank = codes < 0
    codes[blank] = codes.max(initial=-1) + 1 + np.arange(int(blank.sum()))
    return codes
