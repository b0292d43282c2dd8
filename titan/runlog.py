"""The run log: human lines (``[timestamp] text``) plus one JSON record per event.

Only rank 0 writes files; every rank may call it. Nothing else in titan prints.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from .safe_text import strict_json

log = logging.getLogger("titan")


def _plain(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return _plain(v.item())
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


class RunLog:
    def __init__(self, text_path: str | os.PathLike | None, jsonl_path: str | os.PathLike | None = None,
                 enabled: bool = True, echo: bool = True) -> None:
        self.enabled, self.echo = enabled, echo
        self.text_path = Path(text_path) if text_path else None
        self.jsonl_path = Path(jsonl_path) if jsonl_path else None
        if enabled:
            for p in (self.text_path, self.jsonl_path):
                if p:
                    p.parent.mkdir(parents=True, exist_ok=True)

    def _append(self, path: Path | None, line: str) -> None:
        if path is None:
            return
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
        self._append(self.text_path, line)
        if self.echo:
            # tqdm.write keeps progress bars intact.
            try:
                from tqdm import tqdm
                tqdm.write(line, file=sys.stderr)
            except Exception:  # pragma: no cover
                print(line, file=sys.stderr)

    def record(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        rec = {"event": event, "time": time.time(), **_plain(fields)}
        self._append(self.jsonl_path, strict_json(rec))  # NaN/inf (a diverged loss) → null: every line parses


def read_jsonl(path: str | os.PathLike) -> tuple[list[dict], int]:
    """Records of a JSON-lines log and the number of malformed lines skipped."""
    recs, bad = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
                if isinstance(r, dict):
                    recs.append(r)
                else:
                    bad += 1
            except json.JSONDecodeError:
                bad += 1
    return recs, bad
