"""Thin modules over the lct_kernels ops."""

from .layer_norm import (
    FusedLayerNorm,
    NonScalingLayerNorm,
    NsLNModulate,
    patch_layernorms,
    unpatch_layernorms,
)
from .losses import CauchyLoss, GemanMcClureLoss, PseudoHuberLoss
from .dit import patch_dit, unpatch_dit

__all__ = [
    "CauchyLoss",
    "PseudoHuberLoss",
    "GemanMcClureLoss",
    "FusedLayerNorm",
    "NonScalingLayerNorm",
    "NsLNModulate",
    "patch_layernorms",
    "unpatch_layernorms",
    "patch_dit",
    "unpatch_dit",
]
