"""The HTTP service and its page: a training run's folds behind ``POST /v1/detect``.

``titan.serve.service`` (no HTTP: options, limits, uploads decoded in memory, the batcher whose
worker thread owns the model), ``titan.serve.app`` (FastAPI: endpoints, token, body limit),
``titan.serve.page`` (the self-contained page). Everything scored is asked of ``titan.infer``.
"""
from __future__ import annotations

from .service import Limits, ServeError, ServeOptions, Service, UploadError

__all__ = ["Limits", "ServeError", "ServeOptions", "Service", "UploadError", "run_serve"]


def run_serve(opts: ServeOptions, say=None) -> int:
    """Check the address and token, load the run's detector, then serve until interrupted."""
    import uvicorn

    from .app import create_app

    from ..runlog import RunLog

    say = say or RunLog(None, None).info
    service = Service.from_options(opts, say)
    say(f"serving on http://{opts.host}:{opts.port}/ ({'token required' if service.token else 'no token: loopback only'}; "
        f"batching {'on: up to ' + str(opts.max_batch) + ' images, ' + format(opts.max_wait_ms, 'g') + ' ms wait' if opts.batching else 'off'})")
    uvicorn.run(create_app(service), host=opts.host, port=opts.port, log_level="info", server_header=False,
                proxy_headers=False, timeout_graceful_shutdown=10)
    return 0
