"""Thin modules over the lct_kernels ops."""

from .layer_norm import (
    FusedLayerNorm,
    NonScalingLayerNorm,
    NsLNModulate,
    patch_layernorms,
    unpatch_layernorms,
)
from .losses import CauchyLoss, GemanMcClureLoss, PseudoHuberLoss

__all__ = [
    "CauchyLoss",
    "PseudoHuberLoss",
    "GemanMcClureLoss",
    "FusedLayerNorm",
    "NonScalingLayerNorm",
    "NsLNModulate",
    "patch_layernorms",
    "unpatch_layernorms",
]
