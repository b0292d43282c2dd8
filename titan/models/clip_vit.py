"""CLIP's ViT-B/16 image encoder as a backbone: ``--arch clip-vit-b16``.

A plain pre-norm Vision Transformer in CLIP's layout (Radford et al. 2021; the image tower of
``openai/clip-vit-base-patch16``), small modules in timm's style:

    [0,1] RGB → (x − CLIP mean) / CLIP std → patch_embed (Conv 16×16/16, no bias)
    → [cls_token; patches] + pos_embed → norm_pre (LayerNorm)
    → blocks × 12: x + attn(norm1(x)), x + mlp(norm2(x))   (MLP 768→3072→768, quick_gelu)
    → norm (LayerNorm) of the class token → (B, 768)        [→ proj (768→512, no bias) if ``project``]

The backbone returns the post-LayerNorm class token (``num_features`` = width, 768 for B/16), or
its 512-d projection into CLIP's joint space when built with ``project=True`` and weights that
carry ``visual_projection``. Depth, width, heads, patch and image size are configurable
(``ClipVisionConfig``) so tests build tiny ones. Input sizes other than the config's are refused;
a model built for another image size resamples the pretrained position grid when loading
(``clip_weights``). Weights: ``titan.models.clip_weights``.

Training building blocks: ``freeze_except_layernorms`` (LayerNorm-only tuning, as GenD) and
``embed`` (frozen embeddings of TTA views, batch-wise under no_grad, for a linear probe on a cache).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CLIP_ARCHS = ("clip-vit-b16",)
# OpenAI CLIP's image normalisation (its preprocess transform and HF's CLIPImageProcessor)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_INPUT_SIZE = 224  # the size ViT-B/16 was trained at: 14×14 patches


@dataclass(frozen=True)
class ClipVisionConfig:
    """Shape of the encoder; the defaults are ViT-B/16 (HF ``CLIPVisionConfig`` names in comments)."""
    image_size: int = CLIP_INPUT_SIZE   # image_size
    patch_size: int = 16                # patch_size
    width: int = 768                    # hidden_size
    layers: int = 12                    # num_hidden_layers
    heads: int = 12                     # num_attention_heads
    mlp_dim: int = 3072                 # intermediate_size
    proj_dim: int = 512                 # projection_dim (the visual projection's output)
    eps: float = 1e-5                   # layer_norm_eps

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def check(self) -> "ClipVisionConfig":
        if self.image_size % self.patch_size:
            raise ValueError(f"image size {self.image_size} is not a multiple of the patch size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by {self.heads} heads")
        return self


VIT_B16 = ClipVisionConfig()


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's GELU approximation x·σ(1.702x): the weights were trained with it, not erf GELU."""
    return x * torch.sigmoid(1.702 * x)


class ClipAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (CLIP's checkpoint layout)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, d // self.heads).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # scale 1/√head_dim, as CLIP
        return self.out_proj(y.transpose(1, 2).reshape(b, n, d))


class ClipMLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class ClipBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg: ClipVisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = ClipAttention(cfg.width, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = ClipMLP(cfg.width, cfg.mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ClipViT(nn.Module):
    """[0,1] RGB (B,3,S,S) → the post-LayerNorm class token (B, width), or its projection (B, proj_dim)
    with ``project=True``. S must be ``cfg.image_size``."""

    def __init__(self, cfg: ClipVisionConfig = VIT_B16, project: bool = False) -> None:
        super().__init__()
        self.cfg = cfg.check()
        d = cfg.width
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.patch_embed = nn.Conv2d(3, d, cfg.patch_size, stride=cfg.patch_size, bias=False)
        # CLIP's initialisation scales (width^-0.5); pretrained weights replace them anyway
        self.cls_token = nn.Parameter(torch.randn(d) * d ** -0.5)
        self.pos_embed = nn.Parameter(torch.randn(cfg.grid ** 2 + 1, d) * d ** -0.5)
        self.norm_pre = nn.LayerNorm(d, eps=cfg.eps)
        self.blocks = nn.ModuleList(ClipBlock(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(d, eps=cfg.eps)
        self.proj = nn.Linear(d, cfg.proj_dim, bias=False) if project else None
        self.num_features = cfg.proj_dim if project else d

    @classmethod
    def b16(cls, img_size: int = CLIP_INPUT_SIZE, project: bool = False) -> "ClipViT":
        """ViT-B/16 built for ``img_size`` (224 native; another size resamples the position grid on loading)."""
        return cls(replace(VIT_B16, image_size=int(img_size)), project)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[0,1] RGB → the last block's tokens (B, 1 + grid², width), before the final LayerNorm."""
        s = self.cfg.image_size
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-2:] != (s, s):
            raise ValueError(f"{type(self).__name__} was built for (B,3,{s},{s}) images, got {tuple(x.shape)}; "
                             f"resize the input or build it with image_size={x.shape[-1]}")
        x = (x.float() - self.mean) / self.std
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, grid², width)
        x = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1) + self.pos_embed.to(x.dtype)
        x = self.norm_pre(x)
        for block in self.blocks:
            x = block(x)
        return x

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens → the pooled embedding: the class token, LayerNormed (and projected)."""
        pooled = self.norm(tokens[:, 0])
        return self.proj(pooled) if self.proj is not None else pooled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def freeze_except_layernorms(model: nn.Module) -> int:
    """LayerNorm-only tuning (as GenD, 2025, tunes CLIP's encoder): every parameter of ``model`` is frozen except
    the weights and biases of its LayerNorms. Apply it to the backbone (the head, outside it, stays
    trainable). Returns the number of trainable parameters left in ``model``."""
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            for p in m.parameters(recurse=False):
                p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _batches(images, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"embed: a numpy array of images must be (N,H,W,3), got {images.shape}")
        images = torch.from_numpy(images).permute(0, 3, 1, 2)
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"embed: a tensor of images must be (N,3,H,W), got {tuple(images.shape)}")
        return images.split(batch_size)
    return (b[0] if isinstance(b, (tuple, list)) else b for b in images)  # a loader's batches


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor | np.ndarray | Iterable, views: Sequence[str] = ("identity",),
          batch_size: int = 16, progress=None) -> torch.Tensor:
    """Embeddings of every TTA view of every image → float32 (len(views), N, num_features) on the CPU,
    computed batch-wise under no_grad in eval mode: the cache a frozen-encoder linear probe trains on.

    ``images``: uint8 (N,3,H,W) or (N,H,W,3), a float [0,1] tensor, or an iterable of such batches (e.g. a
    DataLoader; a batch may be an (images, labels) tuple). ``views``: names of ``titan.infer.tta`` (identity,
    hflip, vflip, rot±DEG), applied to the [0,1] batch on the model's device exactly as TTA at inference does.
    ``progress``: anything with ``update(n)`` (a tqdm bar), advanced by images done."""
    from ..device import to_float_image
    from ..infer.tta import resolve_tta, tta_view  # the one owner of view names; imported late: models stay below infer

    views = resolve_tta(list(views))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    try:
        for batch in _batches(images, batch_size):
            x = to_float_image(batch, device)
            out.append(torch.stack([model(tta_view(x, v)).float().cpu() for v in views]))
            if progress is not None:
                progress.update(x.shape[0])
    finally:
        model.train(was_training)
    if not out:
        raise ValueError("embed: no images")
    return torch.cat(out, dim=1)
