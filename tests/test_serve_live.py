"""serve.py's app on a real uvicorn server on a free localhost port: bodies past the limit refused
at the socket without being read to the end, and the page in headless Chromium (Debian's
chromium and chromium-driver; skipped, saying why, where they are not installed)."""
from __future__ import annotations

import json
import os
import select
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from _single_thread import single_thread  # noqa: E402,F401  (autouse fixture)
from test_serve import detector, photos, run_dir  # noqa: E402,F401  (the same tiny run and photos)
from titan.serve.app import create_app  # noqa: E402
from titan.serve.service import Limits, Service  # noqa: E402

LIMIT = 1024 * 1024
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1200,900"]


@pytest.fixture(scope="module")
def server(detector):  # noqa: F811
    """(host, port) of a uvicorn server in a thread, bound to 127.0.0.1 on a port the OS picked."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    app = create_app(Service(detector, Limits(max_body=LIMIT, frames=4), max_wait=0.02))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield sock.getsockname()
    srv.should_exit = True
    thread.join(15)
    sock.close()


def http_get(addr, path: str) -> tuple[int, dict]:
    import http.client

    c = http.client.HTTPConnection(*addr, timeout=30)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        c.close()


def read_response(s: socket.socket, timeout: float = 10.0) -> bytes:
    s.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    return data


HEAD = (b"POST /v1/detect HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\n")


def test_declared_gigabyte_is_refused_at_the_socket_before_the_body(server):
    with socket.create_connection(server, timeout=10) as s:
        s.sendall(HEAD + b"Content-Length: 1000000000\r\n\r\n" + b"\0" * 1000)
        reply = read_response(s)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    body = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert body["status"] == 413 and "1,000,000,000 bytes" in body["error"]
    assert http_get(server, "/healthz") == (200, {"status": "ok"})


def test_streamed_body_past_the_limit_is_refused_without_reading_it_all(server):
    """Chunked, no length: the client keeps sending 64 KB chunks until the server answers; the
    server must answer 413 long before the 64 MB the client would send."""
    chunk = b"10000\r\n" + b"\0" * 0x10000 + b"\r\n"
    sent, reply = 0, b""
    with socket.create_connection(server, timeout=10) as s:
        part = b'--b\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n\r\n'
        s.sendall(HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(part) + part + b"\r\n")
        try:
            while sent < 64 * 2 ** 20:
                if select.select([s], [], [], 0.002)[0]:
                    break  # the server has answered
                s.sendall(chunk)
                sent += 0x10000
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = read_response(s)
    assert sent < 16 * LIMIT, f"the client sent {sent:,} bytes before the server answered"
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert "past the limit" in json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
    assert http_get(server, "/readyz") == (200, {"ready": True})


# --- the page in a browser -----------------------------------------------------------------------

@pytest.fixture
def browser(tmp_path, monkeypatch):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"no browser: {CHROMIUM} and {CHROMEDRIVER} come with Debian's packages "
                    "(apt-get install -y chromium chromium-driver; .ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements-dev.txt)")
    monkeypatch.setenv("SE_OFFLINE", "true")  # never let Selenium fetch a browser or a driver
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_browser_uploads_a_photo_and_shows_its_verdict_card(server, browser, photos, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    photo = tmp_path / "astronaut.jpg"
    photo.write_bytes(photos["astro"])
    junk = tmp_path / "notes.jpg"
    junk.write_bytes(b"not a photo at all")
    base = f"http://{server[0]}:{server[1]}"
    browser.get(base + "/")
    assert browser.title == "Titan deepfake detector"
    browser.find_element(By.ID, "files").send_keys(str(photo))
    done = "#cards .card:not(.pending)"
    card = WebDriverWait(browser, 90).until(lambda d: d.find_elements(By.CSS_SELECTOR, done))[0]
    verdict = card.find_element(By.CLASS_NAME, "verdict").text
    assert card.find_element(By.CLASS_NAME, "name").text == "astronaut.jpg"
    assert len(card.find_elements(By.TAG_NAME, "img")) == 2  # the boxed photo and the Grad-CAM
    assert card.find_elements(By.CSS_SELECTOR, ".bar .th") and card.find_elements(By.CSS_SELECTOR, ".bar .band")
    # the page says what the API says for the same file
    import http.client

    c = http.client.HTTPConnection(*server, timeout=60)
    body = b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"astronaut.jpg\"\r\n\r\n" + photos["astro"] + b"\r\n--b--\r\n"
    c.request("POST", "/v1/detect", body, {"Content-Type": "multipart/form-data; boundary=b"})
    row = json.loads(c.getresponse().read())["rows"][-1]
    c.close()
    assert verdict.startswith(f"{row['verdict'].upper()} · P(fake) {row['calibrated_prob']:.3f} calibrated"), verdict
    assert row["verdict"] in card.get_attribute("class").split()  # the card's colour is its verdict's
    # a file that is not a photo gets an error card with the service's reason
    browser.find_element(By.ID, "files").send_keys(str(junk))
    err = WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#cards .card.error"))[0]
    assert err.find_element(By.CLASS_NAME, "name").text == "notes.jpg"
    assert "not an image" in err.find_element(By.CLASS_NAME, "note").text
    browser.save_screenshot(str(tmp_path / "page.png"))
    if os.environ.get("TITAN_SERVE_SCREENSHOT"):
        Path(os.environ["TITAN_SERVE_SCREENSHOT"]).write_bytes((tmp_path / "page.png").read_bytes())
