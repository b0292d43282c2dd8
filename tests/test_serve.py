"""serve.py's app through FastAPI's TestClient: every endpoint, every limit (the right status and
a JSON error), the token off loopback, and hostile inputs after each of which the service still
answers. Tiny atto folds at 32 px built here (random weights: the checks are on the plumbing)."""
from __future__ import annotations

import io
import json
import re
import struct
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from _single_thread import single_thread  # noqa: E402,F401  (autouse fixture)
from fold_fixtures import write_calibrated_run  # noqa: E402
from test_detect import write_video  # noqa: E402  (the same generated clip as detect.py's tests)
from titan.demo.dataset import FACE_PHOTOS, _rgb  # noqa: E402
from titan.infer.calibration import logit_of, sigmoid  # noqa: E402
from titan.infer.detect import ROW_COLUMNS, Detector  # noqa: E402
from titan.infer.folds import FoldSet  # noqa: E402
from titan.serve.app import create_app  # noqa: E402
from titan.serve.service import (Batcher, Busy, Job, Limits, ServeError, Service, Upload, check_bind,  # noqa: E402
                                 is_loopback, resolve_token)

import serve  # noqa: E402

TEMPERATURE, BAND, THRESHOLD = 2.0, 0.02, 0.5
LIMITS = Limits(max_body=3 * 1024 * 1024, max_files=8, max_pixels=4_000_000, max_video_seconds=30,
                max_video_frames=500, frames=4)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve_run")
    return write_calibrated_run(root, THRESHOLD, TEMPERATURE, BAND)


@pytest.fixture(scope="module")
def detector(run_dir) -> Detector:
    return Detector.from_run(run_dir, tta="minimal", device="cpu", say=lambda s: None)


@pytest.fixture(scope="module")
def client(detector):
    with TestClient(create_app(Service(detector, LIMITS, max_wait=0.1))) as c:
        yield c


def other_client(detector, **kwargs) -> TestClient:
    """The same detector behind other limits or a token (only one is used at a time)."""
    return TestClient(create_app(Service(detector, kwargs.pop("limits", LIMITS), **kwargs)))


def encode(img: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    import cv2
    from skimage import data

    astro = cv2.resize(_rgb(FACE_PHOTOS["astronaut"]()), (192, 192), interpolation=cv2.INTER_AREA)
    grace = cv2.resize(_rgb(FACE_PHOTOS["grace_hopper"]()), (160, 192), interpolation=cv2.INTER_AREA)
    coffee = cv2.resize(data.coffee(), (200, 150), interpolation=cv2.INTER_AREA)
    return {"astro": encode(astro, "JPEG"), "grace": encode(grace), "coffee": encode(coffee),
            "astro_array": astro}


def png_header(w: int, h: int) -> bytes:
    """A valid PNG signature and IHDR declaring w×h, with a token IDAT: what a decompression bomb's header looks like."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def post(c: TestClient, *files: tuple[str, bytes], card: bool = False, **kw):
    return c.post("/v1/detect" + ("?card=1" if card else ""),
                  files=[("files", (name, data, "application/octet-stream")) for name, data in files], **kw)


def refused(r, status: int, *words: str) -> dict:
    """A refusal: the status, a JSON body {"error", "status"} naming the cause, no traceback."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["status"] == status and body["error"]
    assert "Traceback" not in r.text
    for w in words:
        assert w.lower() in body["error"].lower(), body["error"]
    return body


def still_serving(c: TestClient, photos) -> None:
    assert c.get("/healthz").json() == {"status": "ok"}
    r = post(c, ("after.png", photos["grace"]))
    assert r.status_code == 200 and r.json()["rows"][-1]["status"] in ("ok", "no_face")


# --- endpoints -----------------------------------------------------------------------------------

def test_health_checks_answer(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"ready": True}


def test_readyz_is_503_when_the_model_worker_is_not_running(detector):
    c = other_client(detector)  # not entered: the lifespan never started the worker
    r = c.get("/readyz")
    refused(r, 503, "not ready")


def test_model_describes_folds_calibration_digest_and_preprocessing(client, run_dir, detector):
    m = client.get("/v1/model").json()
    assert m["arch"] == "titan-atto" and m["input_size"] == 32 and m["folds"] == ["fold0", "fold1"]
    assert m["threshold"] == THRESHOLD and m["temperature"] == TEMPERATURE and m["uncertain_band"] == BAND
    assert m["digest"] == FoldSet.from_folder(run_dir).digest()
    p = m["preprocessing"]
    assert {k: p[k] for k in ("arch", "variant", "head", "img_size", "tta", "margin", "min_prob", "max_side")} == {
        "arch": "titan-atto", "variant": "atto", "head": "linear", "img_size": 32, "tta": ["identity", "hflip"],
        "margin": 0.2, "min_prob": 0.9, "max_side": 1024}
    assert p["sources"]["img_size"] == "the folds' record" and p["mean"] == [0.5, 0.5, 0.5]
    assert m["limits"]["max_files"] == LIMITS.max_files and m["batching"]["enabled"] is True
    assert str(run_dir) not in json.dumps(m)  # no path of the server's machine


def test_detect_returns_detect_py_rows_scored_like_the_detector(client, detector, photos):
    r = post(client, ("astro.jpg", photos["astro"]), ("coffee.png", photos["coffee"]))
    assert r.status_code == 200
    body = r.json()
    rows = body["rows"]
    assert all(list(row) == ROW_COLUMNS for row in rows)
    summaries = {row["path"]: row for row in rows if row["face"] is None}
    assert list(summaries) == ["astro.jpg", "coffee.png"]
    assert summaries["astro.jpg"]["status"] == "ok" and summaries["coffee.png"]["status"] == "no_face"
    direct = detector.score_images([("astro.jpg", Image.open(io.BytesIO(photos["astro"])))])[0]
    assert summaries["astro.jpg"]["prob"] == pytest.approx(direct.prob, abs=1e-6)
    s = summaries["astro.jpg"]
    assert s["calibrated_prob"] == pytest.approx(sigmoid(logit_of(s["prob"]) / TEMPERATURE), abs=1e-6)
    assert s["decision"] == ("fake" if s["prob"] >= THRESHOLD else "real")
    assert body["digest"] == client.get("/v1/model").json()["digest"] and "cards" not in body


def test_video_is_scored_on_its_sampled_frames_and_its_temporary_file_removed(client, photos, tmp_path, monkeypatch):
    write_video(tmp_path / "clip.mp4", photos["astro_array"], n=10)
    spool = tmp_path / "tmp"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    r = post(client, ("clip.mp4", (tmp_path / "clip.mp4").read_bytes()))
    assert r.status_code == 200, r.text
    rows = r.json()["rows"]
    summary = rows[-1]
    assert summary["path"] == "clip.mp4" and summary["status"] == "ok" and summary["frame"] in (0, 3, 6, 9)
    assert {row["frame"] for row in rows[:-1]} == {0, 3, 6, 9}  # LIMITS.frames = 4, spread evenly
    assert list(spool.iterdir()) == []


def test_card_has_the_boxed_image_verdict_bar_band_and_heatmap(client, photos):
    r = post(client, ("astro.jpg", photos["astro"]), card=True)
    assert r.status_code == 200
    (card,) = r.json()["cards"]
    verdict = r.json()["rows"][-1]["verdict"]
    assert card.startswith(f'<div class="card {verdict}">') and verdict.upper() in card
    assert card.count("data:image/jpeg;base64,") == 2  # the boxed image and the Grad-CAM
    assert all(f'class="{cls}"' in card for cls in ("bar", "fill", "band", "th"))
    assert "calibrated" in card and "raw" in card


def test_page_is_self_contained_with_no_external_url(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert not re.search(r"https?://", page, re.I) and "//" not in re.sub(r"<script.*?</script>", "", page, flags=re.S)
    assert "<link" not in page and 'src="' not in page  # nothing fetched: the script is inline, images come as data URIs
    csp = r.headers["content-security-policy"]
    nonce = re.search(r"'nonce-([^']+)'", csp).group(1)
    assert "default-src 'none'" in csp and f'<script nonce="{nonce}">' in page
    assert 'id="files"' in page and "v1/detect?card=1" in page
    assert client.get("/").headers["content-security-policy"] != csp  # a fresh nonce per response


def test_a_file_name_is_a_label_html_escaped_and_never_a_path(client, photos, tmp_path):
    hostile = "<img src=x onerror=alert(1)><script>alert(2)</script>.png"
    r = post(client, (hostile, photos["grace"]), card=True)
    assert r.status_code == 200
    card = r.json()["cards"][0]
    assert "<img src=x" not in card and "<script" not in card
    assert '<div class="name">&lt;img src=x onerror=alert(1)&gt;&lt;script&gt;alert(2)&lt;/script&gt;.png</div>' in card
    assert r.json()["rows"][-1]["path"] == hostile  # JSON carries the label as sent
    # a name that is a real file here: the upload's bytes are scored, never that file
    Image.open(io.BytesIO(photos["coffee"])).save(tmp_path / "other.png")
    by_path = post(client, (str(tmp_path / "other.png"), photos["astro"])).json()["rows"][-1]
    plain = post(client, ("astro.jpg", photos["astro"])).json()["rows"][-1]
    assert by_path["prob"] == pytest.approx(plain["prob"], abs=1e-6) and by_path["status"] == "ok"
    r = post(client, ("../../../../etc/hostname", b"not an image"))
    refused(r, 415, "not an image")


# --- limits and hostile input --------------------------------------------------------------------

def test_declared_body_past_the_limit_is_refused_before_reading(client, photos):
    r = client.post("/v1/detect", content=b"x" * 10, headers={"Content-Length": str(10 ** 9),
                                                              "Content-Type": "multipart/form-data; boundary=b"})
    refused(r, 413, "1,000,000,000 bytes", "limit")
    assert r.headers["connection"] == "close"
    still_serving(client, photos)


def test_streamed_body_without_length_past_the_limit_is_refused(client, photos):
    sent = []

    def body():
        yield b'--b\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n\r\n'
        for _ in range(8):  # 8 MB against a 3 MB limit
            sent.append(1)
            yield b"\0" * (1024 * 1024)

    r = client.post("/v1/detect", content=body(), headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert "content-length" not in {k.lower() for k in r.request.headers}
    refused(r, 413, "past the limit")
    still_serving(client, photos)


def test_decompression_bomb_header_is_refused_before_decoding(client, photos):
    t0 = time.perf_counter()
    r = post(client, ("bomb.png", png_header(50000, 50000)))
    refused(r, 413, "bomb.png", "pixels")
    assert time.perf_counter() - t0 < 5
    still_serving(client, photos)


def test_image_above_the_pixel_limit_is_refused_from_its_header(client, photos):
    r = post(client, ("big.png", png_header(3000, 3000)))  # 9 MP against 4 MP, far below PIL's own bomb check
    body = refused(r, 413, "big.png", "9,000,000 pixels", "4,000,000")
    assert body["file"] == "big.png"
    still_serving(client, photos)


def test_non_image_with_an_image_extension_is_415(client, photos):
    refused(post(client, ("photo.jpg", b"%PDF-1.4 definitely not a photo")), 415, "photo.jpg", "not an image")
    still_serving(client, photos)


def test_truncated_image_and_empty_file_are_422(client, photos):
    refused(post(client, ("cut.jpg", photos["astro"][: len(photos["astro"]) // 3])), 422, "cut.jpg", "cannot decode")
    refused(post(client, ("empty.png", b"")), 422, "empty.png", "empty")
    still_serving(client, photos)


def test_truncated_video_is_422(client, photos, tmp_path):
    write_video(tmp_path / "clip.mp4", photos["astro_array"], n=10)
    data = (tmp_path / "clip.mp4").read_bytes()
    refused(post(client, ("clip.mp4", data[:200])), 422, "clip.mp4", "cannot read the video")
    still_serving(client, photos)


def test_thousand_files_in_one_request_are_refused(client, photos):
    t0 = time.perf_counter()
    r = post(client, *[(f"f{i}.png", b"x") for i in range(1000)])
    refused(r, 413, f"more than {LIMITS.max_files} files")
    assert time.perf_counter() - t0 < 10
    still_serving(client, photos)


def test_requests_without_files_or_not_multipart_are_refused(client, photos):
    refused(client.post("/v1/detect", json={"path": "/etc/passwd"}), 415, "multipart/form-data")
    refused(client.post("/v1/detect", data={"card": "1"}, files={}), 415)  # urlencoded
    refused(client.post("/v1/detect", files={"note": (None, "text only")}), 400, "no file")
    refused(client.get("/v1/nothing"), 404)
    refused(client.get("/v1/detect"), 405)
    refused(client.post("/v1/detect?card=maybe", files=[("files", ("a.png", photos["grace"]))]), 422, "card")
    still_serving(client, photos)


def test_video_past_its_duration_or_frame_limit_is_413(detector, photos, tmp_path):
    write_video(tmp_path / "clip.mp4", photos["astro_array"], n=10, fps=10)  # 1 s, 10 frames
    data = (tmp_path / "clip.mp4").read_bytes()
    short = Limits(max_video_seconds=0.5, frames=4)
    few = Limits(max_video_frames=5, frames=4)
    with other_client(detector, limits=short) as c:
        refused(post(c, ("clip.mp4", data)), 413, "clip.mp4", "0.5 s")
    with other_client(detector, limits=few) as c:
        refused(post(c, ("clip.mp4", data)), 413, "clip.mp4", "frames", "limit of 5")
        still_serving(c, photos)


def test_decoded_pixels_past_the_in_flight_budget_are_503_and_released(detector, photos):
    lim = Limits(max_pixels=100_000, max_inflight_pixels=100_000, frames=4)
    with other_client(detector, limits=lim) as c:
        r = post(c, *[(f"a{i}.jpg", photos["astro"]) for i in range(3)])  # 3 × 192² = 110,592 pixels
        refused(r, 503, "busy", "pixels", "100,000")
        assert r.headers["retry-after"] == "1"
        for _ in range(3):  # what the refused request held was given back
            still_serving(c, photos)
    with pytest.raises(ServeError, match="--max-inflight-pixels"):
        Limits(max_pixels=1000, max_inflight_pixels=999).check()


# --- the token -----------------------------------------------------------------------------------

def test_any_address_but_loopback_needs_a_token(monkeypatch, capsys, run_dir):
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")
    check_bind("127.0.0.1", "")
    check_bind("0.0.0.0", "s3cret")
    with pytest.raises(ServeError, match="--token"):
        check_bind("0.0.0.0", "")
    monkeypatch.delenv("TITAN_TOKEN", raising=False)
    assert resolve_token("") == "" and resolve_token("flag") == "flag"
    monkeypatch.setenv("TITAN_TOKEN", "from-env")
    assert resolve_token("") == "from-env" and resolve_token("flag") == "flag"
    monkeypatch.delenv("TITAN_TOKEN")
    # the script refuses before loading anything
    assert serve.main(["--host", "0.0.0.0", "--weights-dir", str(run_dir), "--device", "cpu"]) == 2
    assert "TITAN_TOKEN" in capsys.readouterr().err


def test_serve_exits_2_naming_the_files_when_no_weights_load(tmp_path, capsys):
    assert serve.main(["--weights-dir", str(tmp_path), "--device", "cpu"]) == 2
    assert "v42_backbone_fold*.pth" in capsys.readouterr().err


def test_token_is_checked_on_every_endpoint_but_the_health_checks(detector, photos):
    import base64

    with other_client(detector, token="s3cret") as c:
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        for method, path in [("get", "/"), ("get", "/v1/model"), ("post", "/v1/detect"), ("get", "/nothing")]:
            r = getattr(c, method)(path)
            refused(r, 401, "token")
            assert r.headers["www-authenticate"].startswith("Basic")
            refused(getattr(c, method)(path, headers={"Authorization": "Bearer wrong"}), 401)
        # refused before a byte of the body is read, whatever its size
        refused(c.post("/v1/detect", headers={"Content-Length": str(10 ** 9)}), 401)
        good = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/model", headers=good).status_code == 200
        assert c.get("/", headers={"Authorization": "Basic " + base64.b64encode(b"me:s3cret").decode()}).status_code == 200
        refused(c.get("/", headers={"Authorization": "Basic " + base64.b64encode(b"s3cret:x").decode()}), 401)
        r = post(c, ("g.png", photos["grace"]), headers=good)
        assert r.status_code == 200 and r.json()["rows"][-1]["path"] == "g.png"


# --- batching ------------------------------------------------------------------------------------

def test_concurrent_requests_are_scored_together_with_the_same_rows(client, photos):
    alone = post(client, ("astro.jpg", photos["astro"])).json()["rows"]
    before = client.get("/v1/model").json()["batching"]
    out, n = [None] * 6, 6
    start = threading.Barrier(n)

    def one(i: int) -> None:
        start.wait()
        out[i] = post(client, ("astro.jpg", photos["astro"]))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    after = client.get("/v1/model").json()["batching"]
    assert all(r.status_code == 200 for r in out)
    for r in out:
        for a, b in zip(r.json()["rows"], alone):
            assert a["prob"] == pytest.approx(b["prob"], abs=1e-5) and a["verdict"] == b["verdict"]
    assert after["images_scored"] - before["images_scored"] == n
    assert after["batches_run"] - before["batches_run"] < n  # some requests shared a batch
    assert after["largest_batch"] >= 2


def _fake_upload() -> Upload:
    return Upload("x", "image", np.zeros((4, 4, 3), np.uint8))


def test_batcher_groups_up_to_max_batch_and_off_scores_each_alone():
    for enabled in (True, False):
        seen, gate = [], threading.Event()

        def score(jobs, seen=seen, gate=gate):
            gate.wait(5)  # hold the worker until every job is queued
            seen.append(len(jobs))
            for j in jobs:
                j.future.set_result(len(jobs))

        b = Batcher(score, max_batch=4, max_wait=0.05, enabled=enabled)
        b.start()
        futures = [b.submit(Job([_fake_upload()])) for _ in range(10)]
        gate.set()
        assert [f.result(10) for f in futures] and sum(seen) == 10
        b.stop()
        assert max(seen) <= 4
        assert len(seen) <= 4 if enabled else seen == [1] * 10


def test_batcher_refuses_past_its_queue_and_survives_a_failing_batch():
    gate = threading.Event()

    def score(jobs):
        gate.wait(5)
        for j in jobs:
            if j.uploads[0].name == "bad":
                raise RuntimeError("boom")
            j.future.set_result("ok")

    b = Batcher(score, max_batch=8, max_wait=0.05, max_queue=3)
    b.start()
    good = [b.submit(Job([_fake_upload()])) for _ in range(2)]
    bad = b.submit(Job([Upload("bad", "image", np.zeros((4, 4, 3), np.uint8))]))
    with pytest.raises(Busy, match="limit 3"):
        b.submit(Job([_fake_upload()]))
    gate.set()
    assert [f.result(10) for f in good] == ["ok", "ok"]  # retried alone after the batch failed
    with pytest.raises(RuntimeError, match="boom"):
        bad.result(10)
    assert b.submit(Job([_fake_upload()])).result(10) == "ok" and b.alive
    b.stop()
    assert not b.alive
