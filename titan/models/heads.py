"""Classifier heads. Each maps pooled features (B,C) to one fake logit (B,): sigmoid = P(fake).

One logit per image for every head lets TTA and the fold ensemble average logits uniformly.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoints import CheckpointError


class LinearHead(nn.Module):
    """V42 head: ``head`` = Dropout → Linear(C,1) (keys ``head.1.*``)."""

    def __init__(self, in_features: int = 768, dropout: float = 0.25) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, 1))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats).squeeze(-1)


class ArcFaceHead(nn.Module):
    """V38 head: cosine classifier ``weight`` (2,C) with scale s and additive angular margin m,
    plus an auxiliary linear classifier ``aux_head`` used as a training aid.

    The fake probability is softmax(s·cos)[1] = sigmoid(s·(cos₁ − cos₀)), hence the single logit.
    """

    def __init__(self, in_features: int = 768, s: float = 30.0, m: float = 0.5) -> None:
        super().__init__()
        self.s, self.m = s, m
        self.weight = nn.Parameter(torch.empty(2, in_features))
        nn.init.xavier_uniform_(self.weight)
        self.aux_head = nn.Linear(in_features, 2)

    def cosine(self, feats: torch.Tensor) -> torch.Tensor:
        f = F.layer_norm(feats.float(), feats.shape[-1:])
        return F.linear(F.normalize(f), F.normalize(self.weight.float()))  # (B,2)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        cos = self.cosine(feats)
        return self.s * (cos[:, 1] - cos[:, 0])

    def margin_loss(self, feats: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """ArcFace loss (cos(θ+m) on the true class) plus the auxiliary head's cross-entropy."""
        cos = self.cosine(feats).clamp(-1 + 1e-6, 1 - 1e-6)
        y = target.long()
        onehot = F.one_hot(y, 2).to(cos.dtype)
        cos_m = torch.cos(torch.acos(cos) + self.m)
        logits = self.s * (onehot * cos_m + (1 - onehot) * cos)
        return F.cross_entropy(logits, y) + F.cross_entropy(self.aux_head(feats.float()), y)


HEADS = {"linear": LinearHead, "arcface": ArcFaceHead}


def build_head(kind: str = "linear", in_features: int = 768, **kwargs) -> nn.Module:
    """``linear`` (V42) or ``arcface`` (V38) over ``in_features``-wide pooled features."""
    if kind not in HEADS:
        raise ValueError(f"unknown head {kind!r}; choose one of {sorted(HEADS)}")
    return HEADS[kind](in_features, **kwargs)


def head_of(sd: dict[str, torch.Tensor]) -> str:
    """The head kind of a head state dict, from its keys."""
    if "head.1.weight" in sd:
        return "linear"
    if "weight" in sd and "aux_head.weight" in sd:
        return "arcface"
    raise CheckpointError(f"unknown head layout (keys {sorted(sd)[:6]})")
