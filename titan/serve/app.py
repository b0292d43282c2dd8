"""The HTTP app (FastAPI): the page, ``POST /v1/detect``, ``GET /v1/model``, ``/healthz``, ``/readyz``.

Every refusal is one JSON object ``{"error": message, "status": code}`` (``file`` names the upload
at fault), never a traceback. The outermost layer, ``Guard`` (plain ASGI, so it sees the body as it
streams in), checks the token and the body size before the app reads anything.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import secrets
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .page import content_security_policy, render_page
from .service import Busy, Limits, Service, UploadError, label, read_upload, token_matches

log = logging.getLogger("titan")

OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # the only paths without the token
SAFE_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


def error(status: int, message: str, file: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": message, "status": status, **({"file": file} if file else {})}
    return JSONResponse(body, status, headers={**SAFE_HEADERS, **(headers or {})})


def _too_large(message: str) -> JSONResponse:
    # the unread rest of the body makes the connection unusable: the client is told it closes
    return error(413, message, headers={"Connection": "close"})


def authorised(header: str, token: str) -> bool:
    """``Bearer <token>``, or ``Basic`` with any user name and the token as password (what a
    browser sends after its login prompt)."""
    scheme, _, value = header.partition(" ")
    given = ""
    if scheme.lower() == "bearer":
        given = value.strip()
    elif scheme.lower() == "basic":
        try:
            given = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            given = ""
    return bool(given) and token_matches(given, token)


class Guard:
    """ASGI middleware: the token on every path but the health checks, then the body size — a
    declared Content-Length past the limit is refused before any byte is read, and a body without
    one is counted as it arrives and refused at the first chunk past the limit."""

    def __init__(self, app, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        token = self.service.token
        if token and scope["path"] not in OPEN_PATHS and not authorised(headers.get("authorization", ""), token):
            reply = error(401, "missing or wrong token: send 'Authorization: Bearer <token>' (the service's --token "
                               "or $TITAN_TOKEN)", headers={"WWW-Authenticate": 'Basic realm="titan", charset="UTF-8"'})
            await reply(scope, receive, send)
            return
        limit = self.service.limits.max_body
        declared = headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await error(400, f"Content-Length {declared!r} is not a number")(scope, receive, send)
                return
            if size > limit:
                await _too_large(f"request body of {size:,} bytes refused: the limit is {limit:,} bytes "
                                 "(serve.py --max-upload-mb)")(scope, receive, send)
                return
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise UploadError(413, f"request body past the limit of {limit:,} bytes refused "
                                           "(serve.py --max-upload-mb)")
            return message

        await self.app(scope, counted, send)


def _read_all(raw: list[tuple[str, bytes, str | None]], limits: Limits, reserve) -> list:
    return [read_upload(name, data, ctype, limits, reserve) for name, data, ctype in raw]


def create_app(service: Service) -> FastAPI:
    """The app around a service (``Guard`` outermost); its worker starts and stops with the app (lifespan)."""

    @asynccontextmanager
    async def lifespan(_app):
        service.start()
        try:
            yield
        finally:
            service.stop()

    # no interactive docs: they load their scripts from a CDN, and the page must work offline
    app = FastAPI(title="Titan deepfake detector", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(UploadError)
    async def _upload_error(_request: Request, e: UploadError) -> JSONResponse:
        return _too_large(e.message) if e.status == 413 and e.file is None else error(e.status, e.message, e.file)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, e: StarletteHTTPException) -> JSONResponse:
        return error(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(Busy)
    async def _busy(_request: Request, e: Busy) -> JSONResponse:
        return error(503, f"busy: {e}; retry shortly", headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, e: Exception) -> JSONResponse:
        log.error("unexpected error while serving a request: %s: %s", type(e).__name__, e)
        return error(500, f"internal error ({type(e).__name__}); the server's log has the details")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, e: RequestValidationError) -> JSONResponse:
        what = "; ".join(f"{'.'.join(map(str, d.get('loc', ())))}: {d.get('msg', '')}" for d in e.errors())
        return error(422, f"bad request parameters: {what}")

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        nonce = secrets.token_urlsafe(16)
        return HTMLResponse(render_page(service, nonce),
                            headers={**SAFE_HEADERS, "Content-Security-Policy": content_security_policy(nonce)})

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"}, headers=SAFE_HEADERS)

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if service.ready:
            return JSONResponse({"ready": True}, headers=SAFE_HEADERS)
        return error(503, "not ready: the model worker is not running")

    @app.get("/v1/model")
    async def model() -> JSONResponse:
        return JSONResponse(service.model_info(), headers=SAFE_HEADERS)

    @app.post("/v1/detect")
    async def detect(request: Request, card: bool = False) -> JSONResponse:
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            return error(415, f"Content-Type {ctype or 'none'}: send multipart/form-data with one or more files "
                              "(e.g. curl -F files=@photo.jpg)")
        lim = service.limits
        try:
            form = await request.form(max_files=lim.max_files, max_fields=16, max_part_size=64 * 1024)
        except StarletteHTTPException as e:
            if "too many files" in str(e.detail).lower():
                raise UploadError(413, f"more than {lim.max_files} files in one request; send at most "
                                       f"{lim.max_files} (serve.py --max-files)") from None
            raise UploadError(400, f"cannot parse the multipart body: {e.detail}") from None
        try:
            files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            if not files:
                return error(400, "no file in the request: send one or more files as multipart form fields "
                                  "(e.g. curl -F files=@photo.jpg)")
            raw = [(label(f.filename, i), await f.read(), f.content_type) for i, f in enumerate(files)]
        finally:
            await form.close()
        held: list[int] = []

        def reserve(pixels: int) -> None:
            service.reserve(pixels)
            held.append(pixels)

        try:  # decoding runs in a request thread, beside the model's
            uploads = await run_in_threadpool(_read_all, raw, lim, reserve)
            del raw
            scored = await asyncio.wrap_future(service.submit(uploads, cards=card))
            del uploads
        finally:
            service.release(sum(held))
        body = {"rows": scored.rows, "digest": service.digest, **({"cards": scored.cards} if card else {})}
        return JSONResponse(body, headers=SAFE_HEADERS)

    app.add_middleware(Guard, service=service)
    return app
