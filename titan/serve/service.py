"""The service behind serve.py, without HTTP: its options, the limits on uploads, decoding an
upload in memory, and the batcher whose one worker thread owns the model.

Everything scored goes through ``titan.infer.detect.Detector`` (faces, crops, the fold ensemble,
calibration) and every card through ``titan.report.detect_report`` (the HTML card, Grad-CAM):
this module only turns uploads into the in-memory images those take, and groups concurrent
requests into one call.
"""
from __future__ import annotations

import hmac
import io
import ipaddress
import logging
import math
import os
import queue
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..config import option
from ..data.images import ImageDecodeError, decode_image
from ..device import trim_host_memory
from ..infer.detect import VIDEO_EXTS, Detector, DetectorOptions, InputResult, read_video
from ..report.detect_report import Explainer, HtmlReport

log = logging.getLogger("titan")
TRIM_EVERY = 16  # batches between handing freed host memory back (cheap: ~1 ms)

TOKEN_ENV = "TITAN_TOKEN"
MAX_LABEL = 200  # characters of an upload's file name kept as its label


class ServeError(RuntimeError):
    """The service cannot start as asked (an exposed address without a token, a bad limit)."""


@dataclass
class ServeOptions(DetectorOptions):
    """serve.py's flags: the run's detector (as detect.py's), the address, the token and the limits."""

    host: str = option("127.0.0.1", "address to listen on; any address but loopback requires a token")
    port: int = option(8000, "port to listen on")
    token: str = option("", f"token required on every endpoint but /healthz and /readyz (Authorization: Bearer, "
                            f"or Basic with any user name); default ${TOKEN_ENV}")
    # the same meaning as detect.py's flags of these names
    frames: int = option(16, "frames sampled evenly from each video")
    uncertain_band: float = option(-1.0, "half-width of the uncertain band around the threshold, calibrated scale; "
                                         "-1 = the run's")
    max_upload_mb: float = option(50.0, "largest request body in MB (413, refused before it is read)")
    max_files: int = option(16, "files per request (413 above)")
    max_pixels: int = option(40_000_000, "largest image or video frame in pixels, read from the header (413 above)")
    max_video_seconds: float = option(120.0, "longest video in seconds (413 above)")
    max_video_frames: int = option(7200, "most frames in a video (413 above)")
    max_batch: int = option(16, "most uploaded images scored together on the model")
    max_wait_ms: float = option(10.0, "how long the first waiting image waits for others to join its batch")
    max_queue: int = option(256, "most images waiting for the model (503 with Retry-After above)")
    max_inflight_pixels: int = option(400_000_000, "most decoded pixels held for all requests at once, about 3 bytes "
                                                   "each (503 with Retry-After above)")
    batching: bool = option(True, "batch concurrent requests together on the model (--no-batching: score every "
                                  "request alone, the benchmark's baseline)")

    def limits(self) -> "Limits":
        return Limits(int(self.max_upload_mb * 1024 * 1024), self.max_files, self.max_pixels,
                      self.max_video_seconds, self.max_video_frames, self.frames, self.max_inflight_pixels)


@dataclass(frozen=True)
class Limits:
    """What one request may hold; every check raises ``UploadError`` with its HTTP status."""

    max_body: int = 50 * 1024 * 1024
    max_files: int = 16
    max_pixels: int = 40_000_000
    max_video_seconds: float = 120.0
    max_video_frames: int = 7200
    frames: int = 16
    max_inflight_pixels: int = 400_000_000

    def check(self) -> None:
        for name in ("max_body", "max_files", "max_pixels", "max_video_seconds", "max_video_frames", "frames",
                     "max_inflight_pixels"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ServeError(f"--{name.replace('_', '-')} {v}: must be a positive number")
        if self.max_inflight_pixels < self.max_pixels:
            raise ServeError(f"--max-inflight-pixels {self.max_inflight_pixels:,} is below --max-pixels "
                             f"{self.max_pixels:,}: an image of the largest size allowed could never be scored")

    def as_dict(self) -> dict:
        return {"max_upload_bytes": self.max_body, "max_files": self.max_files, "max_pixels": self.max_pixels,
                "max_video_seconds": self.max_video_seconds, "max_video_frames": self.max_video_frames,
                "frames_per_video": self.frames, "max_inflight_pixels": self.max_inflight_pixels}


class UploadError(Exception):
    """A request or one of its files refused: ``status`` is the HTTP status, ``message`` says why
    (naming the file) and what to do."""

    def __init__(self, status: int, message: str, file: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.file = status, message, file


# --- the address and the token -------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def resolve_token(flag: str) -> str:
    """--token, else $TITAN_TOKEN, else none."""
    return flag or os.environ.get(TOKEN_ENV, "")


def check_bind(host: str, token: str) -> None:
    """Loopback needs nothing; any other address needs a token (the service would be open to the network)."""
    if not is_loopback(host) and not token:
        raise ServeError(f"--host {host} exposes the service beyond this machine: set a token with --token or "
                         f"${TOKEN_ENV} (clients send 'Authorization: Bearer <token>'), or keep the default 127.0.0.1")


def token_matches(given: str, token: str) -> bool:
    """Constant-time comparison (the time taken does not tell how much of a guess was right)."""
    return hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8"))


# --- uploads -------------------------------------------------------------------------------------

def label(filename: str | None, index: int) -> str:
    """An upload's name as a label only: never a path on this machine (control characters dropped,
    length capped); HTML-escaped wherever it is shown."""
    name = "".join(ch for ch in (filename or "") if ch.isprintable()).strip()
    return name[-MAX_LABEL:] if name else f"upload{index}"


@dataclass
class Upload:
    """One decoded upload: an image, or a video's sampled frames."""

    name: str
    kind: str  # image | video
    image: np.ndarray | None = None
    frames: list[tuple[int, np.ndarray]] = field(default_factory=list)
    note: str = ""

    @property
    def size(self) -> int:
        """Images it puts on the model (a video: its sampled frames)."""
        return len(self.frames) if self.kind == "video" else 1


def _claims_video(name: str, content_type: str | None) -> bool:
    return os.path.splitext(name)[1].lower() in VIDEO_EXTS or (content_type or "").lower().startswith("video/")


def read_upload(name: str, data: bytes, content_type: str | None, limits: Limits,
                reserve: Callable[[int], None] = lambda pixels: None) -> Upload:
    """Bytes of one uploaded file → its decoded image or sampled video frames, or ``UploadError``:
    413 past a size limit (read from the header, before decoding), 415 for a format that is
    neither an image PIL recognises nor a video, 422 for a file of a known kind that does not decode.
    ``reserve(pixels)`` is called with what decoding will hold, before decoding (it may refuse)."""
    if not data:
        raise UploadError(422, f"{name}: the file is empty (0 bytes)", name)
    try:
        with Image.open(io.BytesIO(data)) as img:  # the header only: no pixel is decoded here
            w, h = img.size
    except Image.DecompressionBombError as e:
        raise UploadError(413, f"{name}: image refused before decoding: {e}; the limit is "
                               f"{limits.max_pixels:,} pixels", name) from None
    except UnidentifiedImageError:
        if _claims_video(name, content_type):
            return _read_video(name, data, limits, reserve)
        raise UploadError(415, f"{name}: not an image format PIL recognises, nor a video "
                               f"({', '.join(VIDEO_EXTS)}); send a photo (JPEG, PNG, WebP, ...) or a video", name) from None
    except Exception as e:  # noqa: BLE001 — a header PIL chokes on is this file's fault, said by name
        raise UploadError(422, f"{name}: cannot read the image header ({type(e).__name__}: {e})", name) from None
    if w * h > limits.max_pixels:
        raise UploadError(413, f"{name}: {w}×{h} = {w * h:,} pixels, above the limit of {limits.max_pixels:,}; "
                               "send a smaller image", name)
    reserve(w * h)
    try:
        return Upload(name, "image", decode_image(name, limits.max_pixels, data=data))
    except ImageDecodeError as e:
        status = 413 if "decompression bomb" in e.reason else 422
        raise UploadError(status, f"{name}: cannot decode the image: {e.reason}", name) from None


def probe_video(path: str) -> tuple[int, float, int, int]:
    """(frames, seconds, width, height) a video declares; 0 frames / NaN seconds when it does not say."""
    import av

    with av.open(path) as c:
        if not c.streams.video:
            raise ImageDecodeError(path, "no video stream in this file")
        s = c.streams.video[0]
        secs = float(s.duration * s.time_base) if s.duration and s.time_base else (
            c.duration / 1e6 if c.duration else math.nan)
        return int(s.frames or 0), secs, int(s.codec_context.width or 0), int(s.codec_context.height or 0)


def _count_packets(path: str, stop: int) -> int:
    """Video packets, counting stops past ``stop`` (a container that does not declare its frames)."""
    import av

    n = 0
    with av.open(path) as c:
        for pkt in c.demux(c.streams.video[0]):
            n += bool(pkt.size)
            if n > stop:
                break
    return n


def _read_video(name: str, data: bytes, limits: Limits, reserve: Callable[[int], None]) -> Upload:
    """PyAV reads from a file: the bytes go to a temporary file of our own naming, removed on return."""
    ext = os.path.splitext(name)[1].lower()
    with tempfile.TemporaryDirectory(prefix="titan-serve-") as tmp:
        path = os.path.join(tmp, "upload" + (ext if ext in VIDEO_EXTS else ".video"))
        with open(path, "wb") as f:
            f.write(data)
        try:
            n, secs, w, h = probe_video(path)
            if w * h > limits.max_pixels:
                raise UploadError(413, f"{name}: frames of {w}×{h} = {w * h:,} pixels, above the limit of "
                                       f"{limits.max_pixels:,}", name)
            if math.isfinite(secs) and secs > limits.max_video_seconds:
                raise UploadError(413, f"{name}: {secs:.1f} s long, above the limit of {limits.max_video_seconds:g} s; "
                                       "send a shorter clip", name)
            n = n or _count_packets(path, limits.max_video_frames)
            if n > limits.max_video_frames:
                raise UploadError(413, f"{name}: {n if n <= limits.max_video_frames + 1 else 'more than ' + str(n)} "
                                       f"frames, above the limit of {limits.max_video_frames}; send a shorter clip", name)
            reserve(w * h * min(n, limits.frames))
            frames, note = read_video(path, limits.frames)
        except ImageDecodeError as e:
            raise UploadError(422, f"{name}: cannot read the video: {e.reason}", name) from None
        except UploadError:
            raise
        except Exception as e:  # noqa: BLE001 — anything FFmpeg cannot read is this file's error
            raise UploadError(422, f"{name}: cannot read the video ({type(e).__name__}: {e})", name) from None
    return Upload(name, "video", frames=frames, note=note)


# --- batching on the model -----------------------------------------------------------------------

class Busy(Exception):
    """More work waits than the service takes on (images queued, pixels held): try again shortly."""


@dataclass
class Job:
    """One request's uploads, scored together with other requests' in one batch."""

    uploads: list[Upload]
    cards: bool = False
    future: Future = field(default_factory=Future)

    @property
    def size(self) -> int:
        return sum(u.size for u in self.uploads)


@dataclass
class Scored:
    """What a job gets back: its rows (detect.py's), and a card per upload when asked."""

    rows: list[dict]
    cards: list[str]
    results: list[InputResult]


class Batcher:
    """A queue of jobs and one worker thread that owns the model: it takes the first waiting job,
    waits up to ``max_wait`` seconds for others until ``max_batch`` images are in hand, and hands
    them to ``score`` in one call. ``enabled=False`` scores each job alone (the baseline)."""

    def __init__(self, score: Callable[[list[Job]], None], max_batch: int = 16, max_wait: float = 0.01,
                 enabled: bool = True, max_queue: int = 256) -> None:
        self.score, self.max_batch, self.max_wait = score, max(1, max_batch), max(0.0, max_wait)
        self.enabled, self.max_queue = enabled, max_queue
        self._q: queue.Queue[Job | None] = queue.Queue()
        self._carry: Job | None = None
        self._lock = threading.Lock()
        self.waiting = 0  # images queued or being scored
        self.batches = self.images = self.largest = 0
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="titan-model", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping = True
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def submit(self, job: Job) -> Future:
        if not self.alive:
            raise Busy("the model worker is not running")
        with self._lock:
            if self.waiting + job.size > self.max_queue:
                raise Busy(f"{self.waiting} image(s) already wait for the model (limit {self.max_queue})")
            self.waiting += job.size
        self._q.put(job)
        return job.future

    def _next(self, timeout: float | None) -> Job | None:
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        return self._q.get(timeout=timeout) if timeout is None or timeout > 0 else self._q.get_nowait()

    def _gather(self) -> list[Job] | None:
        first = self._next(None)
        if first is None:
            return None
        jobs, n = [first], first.size
        deadline = time.monotonic() + self.max_wait
        while self.enabled and n < self.max_batch:
            try:
                job = self._next(deadline - time.monotonic())
            except queue.Empty:
                break
            if job is None:
                self._q.put(None)  # stop after this batch
                break
            if n + job.size > self.max_batch:
                self._carry = job  # first in the next batch
                break
            jobs.append(job)
            n += job.size
        return jobs

    def _loop(self) -> None:
        while True:
            jobs = self._gather()
            if jobs is None:
                break
            n = sum(j.size for j in jobs)
            try:
                self.score(jobs)
            except Exception:  # noqa: BLE001 — one job's failure must not fail the others in its batch
                log.exception("a batch of %d request(s) failed; scoring them one by one", len(jobs))
                for job in jobs:
                    if job.future.done():
                        continue
                    try:
                        self.score([job])
                    except Exception as e:  # noqa: BLE001 — handed to that request (a 500), the worker goes on
                        if not job.future.done():
                            job.future.set_exception(e)
            finally:
                with self._lock:
                    self.waiting -= n
                    self.batches += 1
                    self.images += n
                    self.largest = max(self.largest, n)
                if self.batches % TRIM_EVERY == 0:
                    trim_host_memory()  # decoding threads' freed arenas back to the OS: memory stays flat

    def stats(self) -> dict:
        return {"enabled": self.enabled, "max_batch": self.max_batch, "max_wait_ms": 1000 * self.max_wait,
                "max_queue": self.max_queue, "waiting": self.waiting, "batches_run": self.batches,
                "images_scored": self.images, "largest_batch": self.largest}


# --- the service ---------------------------------------------------------------------------------

def preprocessing_record(det: Detector) -> dict:
    """What is done to an upload before the model sees it: the folds' preprocessing record as the
    detector resolved it (``titan.infer.record``), with where each value came from."""
    fs = det.folds
    return {**det.prep.as_record(), "arch": fs.arch, "variant": fs.variant, "head": fs.head}


class Service:
    """A run's detector behind a batcher, with the limits and the token the HTTP app enforces."""

    def __init__(self, detector: Detector, limits: Limits | None = None, token: str = "", max_batch: int = 16,
                 max_wait: float = 0.01, batching: bool = True, max_queue: int = 256) -> None:
        self.detector, self.limits, self.token = detector, limits or Limits(), token
        self.limits.check()
        self.explain = Explainer(detector)  # the card's heatmap, as detect.py's HTML report
        self.legend = HtmlReport(detector.calibration).legend()
        self.batcher = Batcher(self._score, max_batch, max_wait, batching, max_queue)
        self.digest = detector.folds.digest()
        self._pixels, self._pixels_lock = 0, threading.Lock()

    @classmethod
    def from_options(cls, opts: ServeOptions, say: Callable[[str], None] = log.info) -> "Service":
        token = resolve_token(opts.token)
        check_bind(opts.host, token)
        limits = opts.limits()
        limits.check()
        if opts.max_batch < 1 or opts.max_queue < 1 or opts.max_wait_ms < 0:
            raise ServeError("--max-batch and --max-queue must be ≥ 1 and --max-wait-ms ≥ 0")
        det = opts.detector(say, band=opts.uncertain_band)
        return cls(det, limits, token, opts.max_batch, opts.max_wait_ms / 1000.0, opts.batching, opts.max_queue)

    def start(self) -> None:
        self.batcher.start()

    def stop(self) -> None:
        self.batcher.stop()

    @property
    def ready(self) -> bool:
        return self.batcher.alive

    def reserve(self, pixels: int) -> None:
        """Hold ``pixels`` of decoded image memory for a request, or refuse (``Busy``) past the limit."""
        with self._pixels_lock:
            if self._pixels + pixels > self.limits.max_inflight_pixels:
                raise Busy(f"{self._pixels:,} decoded pixels already held for other requests (limit "
                           f"{self.limits.max_inflight_pixels:,})")
            self._pixels += pixels

    def release(self, pixels: int) -> None:
        with self._pixels_lock:
            self._pixels -= pixels

    def _score(self, jobs: list[Job]) -> None:
        """In the worker thread: every image of every job in one ``score_images`` call, each video
        on its own, then each job's rows (and cards) handed back."""
        det = self.detector
        images = [u for j in jobs for u in j.uploads if u.kind == "image"]
        scored = iter(det.score_images([(u.name, u.image) for u in images]) if images else [])
        for job in jobs:
            results = [next(scored) if u.kind == "image" else det.video_result(u.name, u.frames, u.note)
                       for u in job.uploads]
            cards = []
            if job.cards:
                report = HtmlReport(det.calibration)
                for res in results:
                    report.add(res, self.explain(res, every_face=False))
                cards = report.cards
            rows = [row for r in results for row in r.rows()]
            for r in results:
                r.release()
            job.uploads = []  # the pixels go with the request
            job.future.set_result(Scored(rows, cards, results))

    def submit(self, uploads: Sequence[Upload], cards: bool = False) -> Future:
        return self.batcher.submit(Job(list(uploads), cards))

    def model_info(self) -> dict:
        """GET /v1/model: what scores the uploads (no path of this machine in it)."""
        det, cal = self.detector, self.detector.calibration
        return {"arch": det.folds.arch, "input_size": det.img_size, "folds": det.folds.names,
                "folds_left_out": [n for n, _ in det.folds.skipped], "threshold": cal.threshold,
                "calibrated_threshold": cal.calibrated_cut, "temperature": cal.temperature,
                "uncertain_band": cal.band, "calibration": cal.note, "digest": self.digest,
                "preprocessing": preprocessing_record(det), "device": str(det.device), "engine": det.engine_info(),
                "limits": self.limits.as_dict(), "batching": self.batcher.stats(), "degraded": list(det.notes)}
