"""Titan deepfake detector: ConvNeXt V2 over RGB + FFT + SRM inputs, SimMIM, fold ensembles.

Where things live (one owner per concept): ``models/`` the networks, ``data/`` labels, images,
datasets, augmentation, faces and alignment, ``train/`` the training stages, ``infer/`` fold
sets, TTA, resilient scoring, safe inference, diamonds and the submission writer, ``report/``
logs, plots, Grad-CAM and the run report, ``demo/`` the demo set; small shared modules at the
top (config, checkpoints, metrics, runlog, device, runfiles).
"""
from .models.convnextv2 import VARIANTS, ConvNeXtV2, build_backbone
from .models.heads import ArcFaceHead, LinearHead, build_head

__all__ = ["build_backbone", "build_head", "ConvNeXtV2", "LinearHead", "ArcFaceHead", "VARIANTS"]
__version__ = "0.1.0"
