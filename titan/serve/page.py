"""The service's one page: choose or drop photos and videos, see one card each.

Self-contained and offline: inline CSS (detect.py's report style, ``detect_report.CSS``) and one
inline script (allowed by a per-response nonce in the Content-Security-Policy, which also forbids
every other source), no link to anywhere. Each file is posted alone to ``v1/detect?card=1`` so
its card appears as soon as it is scored; the card itself is detect.py's HTML card, rendered on
the server (every name in it HTML-escaped there); an error card is built with ``textContent``.
"""
from __future__ import annotations

import html

from ..infer.detect import VIDEO_EXTS
from ..report.detect_report import CSS
from .service import Service

PAGE_CSS = """
#drop{border:2px dashed #9ca3af;border-radius:8px;padding:18px;margin:0 0 18px;background:#fff;text-align:center}
#drop.over{border-color:#2563eb;background:#eff6ff}
#drop label{font-weight:600;cursor:pointer;color:#1d4ed8}
.limits{font-size:12px;color:#6b7280;margin-top:6px}
.card.pending .verdict{color:#6b7280;font-weight:400}
"""

SCRIPT = """
(function () {
  "use strict";
  var grid = document.getElementById("cards"), input = document.getElementById("files"),
      zone = document.getElementById("drop"), maxBytes = Number(zone.getAttribute("data-max-bytes"));
  function line(cls, text) { var d = document.createElement("div"); d.className = cls; d.textContent = text; return d; }
  function errorCard(card, name, message) {
    card.className = "card error"; card.textContent = "";
    card.append(line("name", name), line("verdict", "ERROR \\u00b7 not scored"), line("note", message));
  }
  function send(file) {
    var card = document.createElement("div");
    card.className = "card pending";
    card.append(line("name", file.name), line("verdict", "scoring\\u2026"));
    grid.prepend(card);
    if (file.size > maxBytes) { errorCard(card, file.name, "larger than the upload limit (" + maxBytes + " bytes)"); return; }
    var body = new FormData();
    body.append("files", file, file.name);
    fetch("v1/detect?card=1", {method: "POST", body: body, credentials: "same-origin"})
      .then(function (r) {
        return r.json().catch(function () { return {error: "HTTP " + r.status}; })
                       .then(function (j) { return {ok: r.ok, j: j}; });
      })
      .then(function (a) {
        if (a.ok && a.j.cards && a.j.cards.length) {
          var t = document.createElement("template");
          t.innerHTML = a.j.cards[0];
          card.replaceWith(t.content.firstElementChild);
        } else {
          errorCard(card, file.name, a.j.error || "failed");
        }
      })
      .catch(function (e) { errorCard(card, file.name, String(e)); });
  }
  function sendAll(files) { for (var i = 0; i < files.length; i++) send(files[i]); }
  input.addEventListener("change", function () { sendAll(input.files); input.value = ""; });
  zone.addEventListener("dragover", function (e) { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", function () { zone.classList.remove("over"); });
  zone.addEventListener("drop", function (e) {
    e.preventDefault(); zone.classList.remove("over"); sendAll(e.dataTransfer.files);
  });
})();
"""


def content_security_policy(nonce: str) -> str:
    """Nothing loads from anywhere: images are data URIs, the style inline, the one script by its nonce."""
    return (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'nonce-{nonce}'; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def render_page(service: Service, nonce: str) -> str:
    info = service.model_info()
    lim = service.limits
    model = (f"{len(info['folds'])} fold(s) of {info['arch']} at {info['input_size']} px · threshold "
             f"{info['threshold']:.3f} · temperature {info['temperature']:.3f} · uncertain band ±{info['uncertain_band']:.3f}"
             f" · weights {info['digest']}")
    limits = (f"Photos (any format PIL reads) and videos ({' '.join(VIDEO_EXTS)}, {lim.frames} frames sampled); "
              f"up to {lim.max_body / 2 ** 20:g} MB and {lim.max_pixels / 1e6:g} MP per file, videos up to "
              f"{lim.max_video_seconds:g} s. Files are scored in memory and kept nowhere.")
    accept = ",".join(["image/*", "video/*", *VIDEO_EXTS])
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>Titan deepfake detector</title>'
            f"<style>{CSS}{PAGE_CSS}</style></head><body><h1>Titan deepfake detector</h1>"
            f'<p class="meta">{html.escape(model)}</p><p class="legend">{html.escape(service.legend)}</p>'
            f'<div id="drop" data-max-bytes="{lim.max_body}"><label for="files">Choose photos or videos</label> '
            f'or drop them here<input id="files" type="file" multiple accept="{html.escape(accept)}" hidden>'
            f'<div class="limits">{html.escape(limits)}</div></div>'
            f'<div class="grid" id="cards"></div><script nonce="{nonce}">{SCRIPT}</script></body></html>\n')
