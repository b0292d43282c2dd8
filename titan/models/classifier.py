"""A backbone with its head: the model of one fold.

``FoldModel`` scores ([0,1] RGB → one fake logit per image); ``Classifier`` is the same model
that also computes its training loss in ``forward``, so DDP sees every parameter the loss uses
(ArcFace's margin weights included).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .heads import ArcFaceHead


class FoldModel(nn.Module):
    """backbone + head: [0,1] RGB (B,3,H,W) → fake logit (B,)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)).float()


class Classifier(FoldModel):
    """A fold model whose ``forward(x, y)`` also returns the training loss: BCE with label
    smoothing (and ``pos_weight``) for the linear head, the ArcFace margin loss for ArcFace."""

    def __init__(self, backbone: nn.Module, head: nn.Module, label_smoothing: float = 0.1, pos_weight: float | None = None) -> None:
        super().__init__(backbone, head)
        self.label_smoothing = label_smoothing
        self.register_buffer("pos_weight", torch.tensor([pos_weight if pos_weight else 1.0]), persistent=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        feats = self.backbone(x)
        logit = self.head(feats).float()
        if y is None:
            return logit, None
        if isinstance(self.head, ArcFaceHead):
            return logit, self.head.margin_loss(feats, y)
        target = y.float() * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
        return logit, F.binary_cross_entropy_with_logits(logit, target, pos_weight=self.pos_weight)
