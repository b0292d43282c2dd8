"""Titan deepfake detector: ConvNeXt V2 over RGB + FFT + SRM inputs, SimMIM, fold ensembles."""
from .convnextv2 import VARIANTS, ConvNeXtV2, build_backbone
from .heads import ArcFaceHead, LinearHead, build_head

__all__ = ["build_backbone", "build_head", "ConvNeXtV2", "LinearHead", "ArcFaceHead", "VARIANTS"]
__version__ = "0.1.0"
