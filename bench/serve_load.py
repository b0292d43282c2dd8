"""Bounded load on serve.py over 127.0.0.1: latency, throughput, errors and the server's memory,
with request batching on and off.

    python bench/serve_load.py [--clients 8] [--requests 50] [--weights-dir RUN] [--json out.json]

For each mode (batching on, then ``--no-batching``) the script starts ``serve.py`` as a subprocess
on a free 127.0.0.1 port (never any other address), waits for ``/readyz``, warms up (``--clients``
clients × ``--warmup`` requests), then runs two phases: one client sending ``--requests`` requests
back to back, and ``--clients`` clients sending ``--requests`` each at the same time. Every request
posts one photo (the demo's face photos, ``--side`` px, JPEG) to ``/v1/detect`` and waits for its
rows. Reported per phase: p50/p95 latency, images/s, errors, the mean batch the server ran; per
mode: the server's RSS after warm-up, half-way through and at the end of the concurrent phase
(flat = no growth in its second half), and its peak (VmHWM); the load average around the run (the
machine may be shared). Bounded: each request times out after ``--timeout`` s, each phase stops after
``--max-seconds``, and the servers are stopped at the end. Without ``--weights-dir`` the folds are
random atto folds at ``--img-size`` (``detect_bench.random_folds``): speed does not depend on the
weights.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from detect_bench import random_folds  # noqa: E402  (the same random folds as detect's benchmark)
from titan.data.images import encode_image  # noqa: E402
from titan.demo.dataset import FACE_PHOTOS, _rgb  # noqa: E402

HOST = "127.0.0.1"  # loopback only, whatever the arguments


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def multipart(name: str, data: bytes, boundary: str = "titanbench") -> tuple[bytes, str]:
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def photos(side: int) -> list[tuple[bytes, str]]:
    out = []
    for name, load in FACE_PHOTOS.items():
        img = cv2.resize(_rgb(load()), (side, side), interpolation=cv2.INTER_AREA)
        out.append(multipart(f"{name}.jpg", encode_image(img, "jpg", 90)))
    return out


def proc_memory(pid: int) -> dict[str, float]:
    """RSS and peak RSS (VmHWM) of a process in MiB, from /proc (Linux); empty elsewhere."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
        return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM") if k in fields}
    except OSError:
        return {}


class Server:
    """serve.py in a subprocess on 127.0.0.1, stopped on exit."""

    def __init__(self, weights_dir: str, batching: bool, args: argparse.Namespace) -> None:
        self.port = free_port()
        cmd = [sys.executable, str(ROOT / "serve.py"), "--weights-dir", weights_dir, "--host", HOST,
               "--port", str(self.port), "--device", args.device, "--tta", args.tta,
               "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
        cmd += [] if batching else ["--no-batching"]
        env = {**os.environ, "TITAN_TOKEN": ""}
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"serve.py exited with {self.proc.returncode}:\n{self.log.read().decode()[-2000:]}")
            try:
                c = http.client.HTTPConnection(HOST, self.port, timeout=2)
                c.request("GET", "/readyz")
                if c.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        raise SystemExit("serve.py did not become ready in 180 s")

    def memory(self) -> dict[str, float]:
        return proc_memory(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def phase(port: int, clients: int, requests: int, bodies: list[tuple[bytes, str]], timeout: float,
          max_seconds: float) -> dict:
    """``clients`` threads × ``requests`` each; latency per request, throughput over the phase."""
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + max_seconds
    start = threading.Barrier(clients)

    def client(k: int) -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
        start.wait()
        for i in range(requests):
            if time.monotonic() > stop_at:
                with lock:
                    errors.append("phase time limit")
                break
            body, ctype = bodies[(k + i) % len(bodies)]
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/detect", body, {"Content-Type": ctype})
                r = conn.getresponse()
                data = r.read()
                ok = r.status == 200 and json.loads(data)["rows"][-1]["status"] in ("ok", "no_face")
                why = "" if ok else f"HTTP {r.status}: {data[:120]!r}"
            except Exception as e:  # noqa: BLE001 — counted as an error, the client goes on
                why = f"{type(e).__name__}: {e}"
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
            dt = time.perf_counter() - t0
            with lock:
                (errors.append(why) if why else lat.append(dt))
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array(lat) * 1000 if lat else np.array([np.nan])
    return {"clients": clients, "requests": clients * requests, "ok": len(lat), "errors": len(errors),
            "error_examples": sorted(set(errors))[:3], "wall_s": round(wall, 2),
            "images_per_s": round(len(lat) / wall, 2), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p95_ms": round(float(np.percentile(ms, 95)), 1)}


def batching_stats(port: int) -> dict:
    c = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        c.request("GET", "/v1/model")
        return json.loads(c.getresponse().read())["batching"]
    finally:
        c.close()


class MemoryTrace:
    """The server's RSS every ``every`` s while a phase runs: (seconds since start, MiB)."""

    def __init__(self, server: Server, every: float = 0.5) -> None:
        self.server, self.every, self.samples = server, every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.wait(self.every):
            rss = self.server.memory().get("VmRSS")
            if rss is not None:
                self.samples.append((time.monotonic() - t0, rss))

    def __enter__(self) -> "MemoryTrace":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def at(self, share: float) -> float:
        """RSS at ``share`` of the phase's duration (the last sample before it)."""
        if not self.samples:
            return float("nan")
        end = self.samples[-1][0]
        return round(max((s for s in self.samples if s[0] <= share * end), default=self.samples[0])[1], 1)


def run_mode(weights_dir: str, batching: bool, args: argparse.Namespace, bodies) -> dict:
    server = Server(weights_dir, batching, args)
    try:
        phase(server.port, args.clients, args.warmup, bodies, args.timeout, args.max_seconds)  # allocator, threads, batches
        mem0 = server.memory()
        one = phase(server.port, 1, args.requests, bodies, args.timeout, args.max_seconds)
        before = batching_stats(server.port)
        with MemoryTrace(server) as trace:
            many = phase(server.port, args.clients, args.requests, bodies, args.timeout, args.max_seconds)
        after = batching_stats(server.port)
        mem2 = server.memory()
    finally:
        server.stop()
    batches = after["batches_run"] - before["batches_run"]
    many["mean_batch"] = round((after["images_scored"] - before["images_scored"]) / max(batches, 1), 2)
    return {"batching": batching, "one_client": one, "concurrent": many,
            "rss_mib_after_warmup": round(mem0.get("VmRSS", float("nan")), 1),
            "rss_mib_concurrent_half": trace.at(0.5), "rss_mib_concurrent_end": round(mem2.get("VmRSS", float("nan")), 1),
            "peak_rss_mib": round(mem2.get("VmHWM", float("nan")), 1)}


def table(results: dict) -> str:
    lines = [f"{'batching':<9} {'phase':<12} {'requests':>8} {'errors':>6} {'p50 ms':>8} {'p95 ms':>8} {'img/s':>7}"]
    for m in results["modes"]:
        for name, key in (("1 client", "one_client"), (f"{m['concurrent']['clients']} clients", "concurrent")):
            p = m[key]
            lines.append(f"{'on' if m['batching'] else 'off':<9} {name:<12} {p['requests']:>8} {p['errors']:>6} "
                         f"{p['p50_ms']:>8.1f} {p['p95_ms']:>8.1f} {p['images_per_s']:>7.2f}")
        lines.append(f"{'':<9} mean batch {m['concurrent']['mean_batch']} images; server RSS MiB: "
                     f"{m['rss_mib_after_warmup']} after warm-up, {m['rss_mib_concurrent_half']} half-way through and "
                     f"{m['rss_mib_concurrent_end']} at the end of the {m['concurrent']['clients']}-client phase; "
                     f"peak {m['peak_rss_mib']}")
    lines.append(f"concurrent with batching / one client at a time: {results['speedup_vs_one_client']:.2f}× "
                 f"(batching off, concurrent: {results['speedup_off']:.2f}×); load average "
                 f"{results['loadavg_before']} before, {results['loadavg_after']} after ({os.cpu_count()} CPUs)")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (default: %(default)s)")
    ap.add_argument("--requests", type=int, default=50, help="requests per client (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=5, help="warm-up requests per client (default: %(default)s)")
    ap.add_argument("--weights-dir", default="", help="a run folder to serve; default: random atto folds")
    ap.add_argument("--folds", type=int, default=2, help="random folds when no --weights-dir (default: %(default)s)")
    ap.add_argument("--img-size", type=int, default=64, help="random folds' input size (default: %(default)s)")
    ap.add_argument("--side", type=int, default=256, help="photo side in px (default: %(default)s)")
    ap.add_argument("--tta", default="full", help="serve.py --tta (default: %(default)s)")
    ap.add_argument("--device", default="cpu", help="serve.py --device (default: %(default)s)")
    ap.add_argument("--max-batch", type=int, default=16, help="serve.py --max-batch (default: %(default)s)")
    ap.add_argument("--max-wait-ms", type=float, default=10.0, help="serve.py --max-wait-ms (default: %(default)s)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default: %(default)s)")
    ap.add_argument("--max-seconds", type=float, default=600.0, help="seconds per phase at most (default: %(default)s)")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args(argv)
    bodies = photos(args.side)
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        weights_dir = args.weights_dir or str(random_folds(Path(tmp), args.folds, args.img_size))
        modes = [run_mode(weights_dir, batching, args, bodies) for batching in (True, False)]
    on, off = modes
    results = {"modes": modes, "loadavg_before": load_before, "loadavg_after": [round(x, 2) for x in os.getloadavg()],
               "cpus": os.cpu_count(), "photo_side": args.side, "tta": args.tta,
               "weights": args.weights_dir or f"random atto folds x{args.folds} at {args.img_size} px",
               "speedup_vs_one_client": on["concurrent"]["images_per_s"] / max(on["one_client"]["images_per_s"], 1e-9),
               "speedup_off": off["concurrent"]["images_per_s"] / max(off["one_client"]["images_per_s"], 1e-9)}
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
