"""The face-crop run: decode in loader workers, detect in size buckets, write crops from a pool.

Per output folder a ``manifest.csv`` records every image (face / fallback / failed). Rows are
appended under a file lock as images finish, so a killed run loses at most the images in flight
and a re-run skips every image whose crop exists and whose row says it is done. At the end the
manifest is rewritten atomically: one row per Id, sorted.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
import time
import zlib
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..checkpoints import atomic_json, atomic_write
from ..config import ScriptOptions, option
from ..costs import StageCost, TimedLoader, Work, cost_table
from ..device import peak_memory_gib, reset_peak_memory, resolve_device
from .images import MAX_PIXELS, ImageDecodeError, ImageIndex, decode_image, encode_image
from .faces import (DEFAULT_MARGIN, DEFAULT_MAX_SIDE, DEFAULT_MIN_PROB, NO_FACE, Detection, FaceDetector, face_crop,
                    shrink_for_detection)
from ..runfiles import DATASET_DIR, FACES_DIR, log_files
from ..runlock import holds_folder
from ..safe_text import csv_cell, restore_cell
from ..runlog import RunLog

try:  # POSIX: shards of one folder append to the same manifest
    import fcntl
except ImportError:  # pragma: no cover - single process only
    fcntl = None

MANIFEST_COLUMNS = ["Id", "source", "status", "prob", "box_x1", "box_y1", "box_x2", "box_y2", "n_faces", "error"]
STATUSES = ("face", "fallback", "failed")
TEXT_COLUMNS = ("Id", "source", "error")  # user-controlled text: written as cells no spreadsheet runs
SETTINGS_JSON = "align_settings.json"  # the settings the folder's crops were made with
CROP_SETTINGS = ("size", "margin", "format", "quality", "min_prob", "max_side")  # what changes a crop
DONE = ("face", "fallback")


@dataclass
class AlignOptions(ScriptOptions):
    """align_faces.py's flags."""

    input: str = option(DATASET_DIR, "dataset folder holding {split}_images/")
    output: str = option(FACES_DIR, "writes {split}/ under it")
    splits: str = option("train,test", "comma-separated splits")
    size: int = option(512, "output side in pixels")
    margin: float = option(DEFAULT_MARGIN, "crop side = larger box side × (1 + 2·margin)")
    device: str = option("auto", "auto = CUDA if present, else cpu")
    batch_size: int = option(0, "detection batch per size bucket; 0 = 32 on GPU, 8 on CPU")
    workers: int = option(4, "image-decoding loader threads (0 = in the main thread)")
    writers: int = option(2, "threads cropping and encoding outputs")
    format: str = option("jpg", "output format", choices=("jpg", "png"))
    quality: int = option(95, "JPEG quality")
    shard: str = option("0/1", "I/N: process only shard I (0-based) of N, split by a hash of the Id")
    overwrite: bool = option(False, "redo images already done")
    strict: bool = option(False, "exit 1 if any image failed")
    max_side: int = option(DEFAULT_MAX_SIDE, "shrink larger images for detection only")
    min_prob: float = option(DEFAULT_MIN_PROB, "ignore faces the detector scores below this")
    max_pixels: int = option(MAX_PIXELS, "refuse (as failed, by name) images with more pixels than this; 0 = no limit")
    estimate: bool = option(False, "time the whole alignment (decode, detect, crop, encode) on a sample of each split "
                                   "and print the projected cost; writes nothing but align_estimate_log.txt/.jsonl")
    estimate_images: int = option(64, "with --estimate: images sampled per split")


@dataclass
class SplitSummary:
    split: str
    total: int = 0
    skipped: int = 0
    face: int = 0
    fallback: int = 0
    failed: int = 0
    stale: int = 0      # crops moved to stale/: their original is gone
    seconds: float = 0.0

    @property
    def processed(self) -> int:
        return self.face + self.fallback + self.failed

    @property
    def img_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


def read_align_settings(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The settings a face folder's crops were made with (its ``align_settings.json``), None when it
    has none (crops not made by align_faces.py, or from before the file was written)."""
    path = Path(folder) / SETTINGS_JSON
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({e}); delete it (align_faces.py rewrites it) or fix it") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a JSON object; delete it (align_faces.py rewrites it)")
    return obj


# --- shards -----------------------------------------------------------------------------------

def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' → (I, N) with 0 ≤ I < N."""
    try:
        i, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected I/N, e.g. 0/4 (I counts from 0)") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: need N ≥ 1 and 0 ≤ I < N (I counts from 0)")
    return i, n


def in_shard(image_id: str, shard: tuple[int, int]) -> bool:
    """Stable across runs and machines (crc32 of the Id), so shards never overlap."""
    i, n = shard
    return zlib.crc32(image_id.encode("utf-8")) % n == i


# --- manifest ---------------------------------------------------------------------------------

class Manifest:
    """Append-only CSV of per-image rows; the last row for an Id wins."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(f".{self.path.name}.lock")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(lock, fcntl.LOCK_UN)

    def read(self) -> dict[str, dict[str, str]]:
        """Id → row. Rows that do not parse (a line torn by a kill) are ignored."""
        if not self.path.is_file():
            return {}
        rows: dict[str, dict[str, str]] = {}
        with open(self.path, newline="", encoding="utf-8") as f:
            for rec in csv.reader(f):
                if len(rec) != len(MANIFEST_COLUMNS) or rec[0] == "Id" or rec[2] not in STATUSES:
                    continue
                row = {k: restore_cell(v) if k in TEXT_COLUMNS else v for k, v in zip(MANIFEST_COLUMNS, rec)}
                rows[row["Id"]] = row
        return rows

    def append(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        buf = io.StringIO()
        w = csv.DictWriter(buf, MANIFEST_COLUMNS, lineterminator="\n")
        for r in rows:
            w.writerow(_csv_safe(r))
        with self._locked():
            new = not self.path.is_file() or self.path.stat().st_size == 0
            with open(self.path, "a+b") as f:
                if not new:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":  # a killed run tore the last line: end it first
                        f.write(b"\n")
                if new:
                    f.write((",".join(MANIFEST_COLUMNS) + "\n").encode())
                f.write(buf.getvalue().encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())

    @property
    def settings_path(self) -> Path:
        return self.path.with_name(SETTINGS_JSON)

    def settle(self, settings: dict[str, Any], size: int) -> dict[str, tuple]:
        """Make the rows mean "done with ``settings``": when the folder's crops were made with other
        settings every row is forgotten (→ redone); a folder from before settings were recorded
        keeps only crops of the right side. Returns what changed (setting → (then, now))."""
        with self._locked():
            saved = json.loads(self.settings_path.read_text()) if self.settings_path.is_file() else None
            changed: dict[str, tuple] = {}
            if saved is not None and saved != settings:
                changed = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
                self.path.unlink(missing_ok=True)
            elif saved is None and self.path.is_file():
                rows, crops = self.read(), ImageIndex(self.path.parent)
                wrong = {i for i, r in rows.items() if r["status"] in DONE and _side(crops, i) not in (None, size)}
                if wrong:
                    changed = {"size": ("other", size)}
                    self._rewrite({i: r for i, r in rows.items() if i not in wrong})
            if saved != settings:
                atomic_json(settings, self.settings_path)
        return changed

    def drop(self, ids: set[str]) -> None:
        """Forget the rows of these Ids (their crops were moved away)."""
        with self._locked():
            self._rewrite({i: r for i, r in self.read().items() if i not in ids})

    def _rewrite(self, rows: dict[str, dict[str, str]]) -> None:
        def write(tmp: str) -> None:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, MANIFEST_COLUMNS, lineterminator="\n")
                w.writeheader()
                for k in sorted(rows):
                    w.writerow(_csv_safe(rows[k]))

        atomic_write(self.path, write)

    def compact(self) -> int:
        """Rewrite atomically: one row per Id, sorted by Id. Returns the number of rows."""
        with self._locked():
            rows = self.read()
            self._rewrite(rows)
        return len(rows)


def _csv_safe(row: dict[str, Any]) -> dict[str, Any]:
    """The row's user-controlled text (Id, source path, error) as cells no spreadsheet runs."""
    return {k: csv_cell(v) if k in TEXT_COLUMNS else v for k, v in row.items()}


def manifest_row(image_id: str, source: Path, status: str, det: Detection = NO_FACE, error: str = "") -> dict[str, Any]:
    box = [f"{v:.1f}" for v in det.box] if det.box is not None else [""] * 4
    return dict(zip(MANIFEST_COLUMNS, [image_id, str(source), status, "" if det.prob is None else f"{det.prob:.4f}",
                                       *box, det.n_faces, " ".join(error.split())]))


# --- decode (loader workers) and write (writer pool) ------------------------------------------

def _decode(path: Path, max_side: int, max_pixels: int) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """(image, detection input, "") or (None, None, reason) — runs in a loader thread."""
    try:
        img = decode_image(path, max_pixels)
    except ImageDecodeError as e:
        return None, None, e.reason
    return img, shrink_for_detection(img, max_side), ""


def prefetch(fn: Callable[[Any], Any], items: list[Any], workers: int, depth: int,
             size: Callable[[Any], int] | None = None, budget: int = 0) -> Iterator[tuple[int, Any]]:
    """(k, fn(items[k])) in order, computed up to ``depth`` items ahead by ``workers`` threads;
    with ``size`` and ``budget``, no more work starts while the finished results waiting hold
    ``budget`` (bytes, by ``size``) or more — at most ``workers`` more are then in flight.

    Threads, not processes: PIL and OpenCV release the GIL while decoding and resizing, and a
    forked worker can deadlock in OpenCV's thread pool once the parent has used it.
    """
    if workers <= 0:
        yield from ((k, fn(x)) for k, x in enumerate(items))
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        ahead: deque[Future] = deque()
        try:
            for k in range(len(items)):
                while len(ahead) < depth and k + len(ahead) < len(items) and not _over(ahead, size, budget, workers):
                    ahead.append(pool.submit(fn, items[k + len(ahead)]))
                yield k, ahead.popleft().result()
        finally:
            for f in ahead:
                f.cancel()


def _over(ahead: deque, size: Callable[[Any], int] | None, budget: int, workers: int) -> bool:
    """The results decoded ahead hold the budget (the in-flight ones are not known yet: at most ``workers``)."""
    if not (size and budget) or not ahead:
        return False
    running = sum(not f.done() for f in ahead)
    return running >= workers or sum(size(f.result()) for f in ahead if f.done()) >= budget


def _write_crop(img: np.ndarray, det: Detection, out_path: Path, opts: AlignOptions) -> str:
    crop, status = face_crop(img, det, opts.size, opts.margin)
    data = encode_image(crop, opts.format, opts.quality)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(out_path, write)
    return status


# --- the run ----------------------------------------------------------------------------------

def _side(crops: ImageIndex, image_id: str) -> int | None:
    """The side of an existing square crop (header only; -1 if not square or unreadable), None when there is none."""
    if image_id not in crops:
        return None
    try:
        with Image.open(crops.path(image_id)) as im:
            return im.width if im.width == im.height else -1
    except OSError:
        return -1


def move_stale(index: ImageIndex, out_dir: Path, manifest: Manifest, log: RunLog, split: str) -> list[str]:
    """Crops whose original is gone are moved to ``{out_dir}/stale/`` (nothing is deleted) and
    their rows dropped, so the next stages never read them. Returns their Ids."""
    if not out_dir.is_dir():
        return []
    crops = ImageIndex(out_dir)
    stale = sorted(i for i in crops.ids() if i not in index)
    if not stale:
        return []
    (out_dir / "stale").mkdir(exist_ok=True)
    for i in stale:
        os.replace(crops.path(i), out_dir / "stale" / crops.path(i).name)
    manifest.drop(set(stale))
    log.info(f"{split}: {len(stale)} crop(s) whose original is no longer in {index.folder} moved to {out_dir / 'stale'}: "
             f"{stale[:10]}{' …' if len(stale) > 10 else ''}")
    return stale


def plan_split(index: ImageIndex, out_dir: Path, opts: AlignOptions) -> tuple[list[str], list[str]]:
    """(Ids of this shard, Ids still to do): done = crop on disk and a face/fallback row."""
    ids = [i for i in index.ids() if in_shard(i, parse_shard(opts.shard))]
    if opts.overwrite:
        return ids, ids
    rows = Manifest(out_dir / "manifest.csv").read()
    todo = [i for i in ids if not (rows.get(i, {}).get("status") in DONE and (out_dir / f"{i}.{opts.format}").is_file())]
    return ids, todo


def align_split(detector: FaceDetector, src_dir: Path, out_dir: Path, split: str, opts: AlignOptions, log: RunLog,
                wrap: Callable[[Iterator], Iterator] = iter) -> SplitSummary:
    """Crop every image of ``src_dir`` still to do into ``out_dir`` (``wrap``: around the decoding
    loader, e.g. ``--estimate``'s timer)."""
    index = ImageIndex(src_dir, probe_unknown=True)
    if index.ignored:
        log.info(f"{split}: {len(index.ignored)} file(s) in {src_dir} are not images PIL recognises, ignored: "
                 f"{[p.name for p in index.ignored[:10]]}")
    manifest = Manifest(out_dir / "manifest.csv")
    stale = move_stale(index, out_dir, manifest, log, split) if parse_shard(opts.shard)[0] == 0 else []
    changed = manifest.settle({k: getattr(opts, k) for k in CROP_SETTINGS}, opts.size) if not opts.overwrite else {}
    if changed:
        log.info(f"{split}: crop settings changed since the crops in {out_dir} were made {changed}: redoing them")
    ids, todo = plan_split(index, out_dir, opts)
    summary = SplitSummary(split, total=len(ids), skipped=len(ids) - len(todo), stale=len(stale))
    log.info(f"{split}: {len(ids)} images in {src_dir} (shard {opts.shard}), {summary.skipped} already done, {len(todo)} to do → {out_dir}")
    if not todo:
        return summary
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [index.path(i) for i in todo]
    loader = wrap(prefetch(partial(_decode, max_side=detector.max_side, max_pixels=opts.max_pixels), paths, opts.workers,
                           depth=2 * detector.batch_size + 4))
    bar = tqdm(total=len(todo), desc=f"align {split}", unit="img", dynamic_ncols=True)
    max_pending = 4 * detector.batch_size
    pending: dict[tuple[int, ...], list[tuple[int, np.ndarray, np.ndarray]]] = defaultdict(list)
    futures: list[tuple[int, Detection, Future]] = []
    t0 = time.perf_counter()

    def record(rows: list[dict[str, Any]]) -> None:
        manifest.append(rows)
        for r in rows:
            setattr(summary, r["status"], getattr(summary, r["status"]) + 1)
        bar.update(len(rows))

    def drain(block_until: int) -> None:
        """Record finished writes, in order; wait until at most ``block_until`` are in flight."""
        rows = []
        while futures and (futures[0][2].done() or len(futures) > block_until):
            k, det, fut = futures.pop(0)
            rows.append(manifest_row(todo[k], paths[k], fut.result(), det))
        record(rows)

    def detect(items: list[tuple[int, np.ndarray, np.ndarray]]) -> None:
        dets = detect_or_fail(detector, items, log)
        failed = []
        for (k, img, _), det in zip(items, dets):
            if isinstance(det, str):
                failed.append(manifest_row(todo[k], paths[k], "failed", error=det))
            else:
                futures.append((k, det, pool.submit(_write_crop, img, det, out_dir / f"{todo[k]}.{opts.format}", opts)))
        record(failed)
        drain(block_until=2 * max_pending)

    with ThreadPoolExecutor(max_workers=max(1, opts.writers)) as pool:
        try:
            for k, (img, small, error) in loader:
                if img is None:
                    log.info(f"failed: {paths[k]}: {error}")
                    record([manifest_row(todo[k], paths[k], "failed", error=error)])
                    continue
                bucket = pending[small.shape]
                bucket.append((k, img, small))
                if len(bucket) >= detector.batch_size:
                    detect(pending.pop(small.shape))
                elif sum(map(len, pending.values())) >= max_pending:  # many sizes: flush the fullest
                    detect(pending.pop(max(pending, key=lambda s: len(pending[s]))))
            for shape in list(pending):
                detect(pending.pop(shape))
            drain(block_until=0)
        finally:
            bar.close()
    summary.seconds = time.perf_counter() - t0
    manifest.compact()
    return summary


def detect_or_fail(detector: FaceDetector, items: list[tuple[int, np.ndarray, np.ndarray]], log: RunLog) -> list[Detection | str]:
    """Detections for one bucket; if the batch raises, image by image, so one bad image fails alone."""
    try:
        return list(detector.detect([im for _, im, _ in items], [s for _, _, s in items]))
    except Exception as e:  # noqa: BLE001 - retried below, then reported per image
        if len(items) == 1:
            log.info(f"detection failed on an image of shape {items[0][1].shape}: {type(e).__name__}: {e}")
            return [f"detection failed: {type(e).__name__}: {e}"]
    return [r for it in items for r in detect_or_fail(detector, [it], log)]


def check_options(opts: AlignOptions) -> dict[str, Path]:
    """The input folder of every split, after checking the settings (each error names the fix)."""
    if opts.format not in ("jpg", "png"):
        raise ValueError(f"--format {opts.format!r}: choose jpg or png")
    if not 1 <= opts.quality <= 100:
        raise ValueError(f"--quality {opts.quality}: must be 1–100")
    if opts.size < 1 or opts.margin < 0:
        raise ValueError(f"--size {opts.size} / --margin {opts.margin}: need size ≥ 1 and margin ≥ 0")
    parse_shard(opts.shard)
    splits = [s.strip() for s in opts.splits.split(",") if s.strip()]
    sources = {s: Path(opts.input) / f"{s}_images" for s in splits}
    missing = [str(p) for p in sources.values() if not p.is_dir()]
    if missing:
        raise FileNotFoundError(f"input folder(s) not found: {', '.join(missing)}; check --input, or choose splits with --splits")
    return sources


@holds_folder(lambda opts, log=None: opts.output)
def run_align(opts: AlignOptions, log: RunLog | None = None) -> list[SplitSummary]:
    """Crop every split; returns per-split summaries (see ``SplitSummary``)."""
    sources = check_options(opts)
    out_root = Path(opts.output)
    log = log or RunLog(*log_files(out_root, "align_faces"))
    device = resolve_device(opts.device)
    detector = FaceDetector(device, opts.batch_size or None, max_side=opts.max_side, min_prob=opts.min_prob)
    log.info(f"align_faces: device {device}, detection batch {detector.batch_size}, {opts.workers} loader workers, "
             f"{opts.writers} writers, size {opts.size}, margin {opts.margin}")
    log.record("align_config", **asdict(opts), resolved_device=str(device), resolved_batch_size=detector.batch_size)
    summaries = []
    for split, src in sources.items():
        s = align_split(detector, src, out_root / split, split, opts, log)
        log.info(f"{split}: {s.face} face, {s.fallback} fallback, {s.failed} failed, {s.stale} stale, {s.skipped} skipped "
                 f"(already done) in {s.seconds:.1f}s — {s.img_s:.1f} images/s")
        log.record("align_summary", **asdict(s), img_s=s.img_s)
        summaries.append(s)
    return summaries


# --- --estimate ------------------------------------------------------------------------------------

def estimate_split(detector: FaceDetector, index: ImageIndex, todo: list[str], split: str, opts: AlignOptions) -> StageCost:
    """Align an evenly spread sample of ``todo`` (or of every image, when all are done) into a
    temporary folder through ``align_split`` itself, timing how long detection waits on decoding."""
    pool = todo or index.ids()
    n = min(len(pool), max(1, opts.estimate_images))
    sample = [pool[int(i)] for i in np.linspace(0, len(pool) - 1, n)] if pool else []
    if not sample:
        return StageCost(f"align {split}", 0.0, Work(0, 0), 0.0, notes=["no images"])
    with tempfile.TemporaryDirectory(prefix="align_estimate_") as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        for i in sample:
            link = src / index.path(i).name
            try:
                link.symlink_to(index.path(i).resolve())
            except OSError:  # no symlinks here: a copy times the same
                shutil.copyfile(index.path(i), link)
        detector.detect([decode_image(index.path(sample[0]), opts.max_pixels)])  # warm-up: weights, autotune
        reset_peak_memory(detector.device)
        timer: list[TimedLoader] = []
        quiet = RunLog(None, None, echo=False)
        align_split(detector, src, Path(tmp) / "out", split, replace(opts, overwrite=True, shard="0/1"), quiet,
                    wrap=lambda it: timer.append(TimedLoader(it, size_of=lambda _: 1)) or timer[0])
        end = time.perf_counter()
    t, warm = timer[0], min(detector.batch_size, len(timer[0].came) - 1)
    seconds = end - t.came[warm]
    wait = sum(c - a for a, c in zip(t.asked[warm + 1:], t.came[warm + 1:]))
    n_todo = len(todo)
    return StageCost(f"align {split}", (len(t.came) - warm) / max(seconds, 1e-9),
                     Work(n_todo, math.ceil(n_todo / detector.batch_size)), peak_memory_gib(detector.device),
                     wait / max(seconds, 1e-9), t.warmup_seconds(warm),
                     notes=[f"{len(sample)} sampled of {len(index)} images, {n_todo} still to do"])


def estimate_align(opts: AlignOptions) -> list[StageCost]:
    """``align_faces.py --estimate``: the projected cost of each split, logged as a table; the
    output folder gets only ``align_estimate_log.txt`` / ``.jsonl`` (the sample is aligned into a
    temporary folder that is removed)."""
    sources = check_options(opts)
    out_root = Path(opts.output)
    log = RunLog(*log_files(out_root, "align_estimate"))
    device = resolve_device(opts.device)
    detector = FaceDetector(device, opts.batch_size or None, max_side=opts.max_side, min_prob=opts.min_prob)
    log.info(f"align_faces --estimate: device {device}, detection batch {detector.batch_size}, {opts.workers} loader "
             f"workers, {opts.writers} writers, up to {opts.estimate_images} images per split")
    rows = []
    for split, src in sources.items():
        index = ImageIndex(src, probe_unknown=True)
        _, todo = plan_split(index, out_root / split, opts)
        rows.append(estimate_split(detector, index, todo, split, opts))
    for line in cost_table(rows, "peak GiB" if device.type == "cuda" else "RSS GiB"):
        log.info(line)
    log.record("align_estimate", device=str(device), batch_size=detector.batch_size, workers=opts.workers,
               stages=[r.as_dict() for r in rows], total_seconds=sum(r.seconds for r in rows))
    return rows
