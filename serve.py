"""Serve a trained detector over HTTP: a page to drop photos and videos on, and a JSON API.

    python serve.py --weights-dir run2                 # http://127.0.0.1:8000/ (this machine only)
    TITAN_TOKEN=... python serve.py --weights-dir run2 --host 0.0.0.0 --port 8000   # other machines: a token

Inputs:  the fold weights {prefix}_{backbone,head,meta}_fold{k}.pth of --weights-dir with its
         metrics_{prefix}.json (threshold, temperature, uncertain band), as detect.py reads them.
Serves:  GET / (the page), POST /v1/detect (multipart files → detect.py's rows as JSON),
         GET /v1/model, GET /healthz, GET /readyz. Uploads are scored in memory; nothing is written.
Exit code 2 when no weights load, or for an address beyond loopback without a token.
"""
import sys

from titan.config import parse_config
from titan.errors import run_command
from titan.infer.detect import DetectError
from titan.serve import ServeError, ServeOptions, run_serve


def main(argv: list[str] | None = None) -> int:
    opts = parse_config(ServeOptions, argv, __doc__)
    return run_command("serve.py", lambda: run_serve(opts), (ServeError, DetectError, ValueError), opts.debug)


if __name__ == "__main__":
    sys.exit(main())
